"""search_net under a 2-process gloo group (elixir_d2.launch.launch, the path `search_net.py
--num-gpus 2` takes without CUDA): the architecture weights alpha must stay identical across the
processes (DDP all-reduces their gradients like the head weights'), and must have moved."""

import os
import uuid

import torch

from reliability_helpers import REPO, write_tiny_deeplesion

SEARCH_CFG = os.path.join(REPO, "configs", "quickstart", "search_alb.yaml")


def search_rank(root: str, prefix: str, out_dir: str) -> None:
    """One rank: two search iterations (1 image per rank per step), then save this rank's alphas."""
    torch.set_num_threads(1)
    from detectron2.utils import comm

    from elixir_d2.data import register_deeplesion
    from elixir_d2.search import ALBSearcher, search_head

    import search_net

    register_deeplesion(root, prefix=prefix)
    args = search_net.build_parser().parse_args(
        [
            "--config-file",
            SEARCH_CFG,
            "DATASETS.TRAIN",
            f"('{prefix}_train',)",
            "DATASETS.TEST",
            f"('{prefix}_test',)",
            "INPUT.MAX_IMAGE_SIZE",
            "64",
            "SOLVER.IMS_PER_BATCH",
            "2",
            "SEARCH.EPOCHS",
            "1",
            "SEARCH.WARMUP_EPOCHS",
            "0",
            "INPUT.FLIP_PROB",
            "0.0",
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
            "16",
            "MODEL.RPN.POST_NMS_TOPK_TRAIN",
            "32",
            "OUTPUT_DIR",
            out_dir,
        ]
    )
    cfg = search_net.setup(args)
    searcher = ALBSearcher(cfg)
    head = search_head(searcher.model)
    initial = [a.detach().clone() for a in head.arch_parameters()]
    searcher.resume_or_load(resume=False)
    searcher.train()
    alphas = [a.detach().clone() for a in head.arch_parameters()]
    torch.save(
        {"initial": initial, "final": alphas, "iters": searcher.max_iter},
        os.path.join(out_dir, f"alphas_rank{comm.get_rank()}.pt"),
    )


def test_search_keeps_alphas_identical_across_two_processes(tmp_path):
    from elixir_d2.launch import launch

    root = str(tmp_path / "data")
    write_tiny_deeplesion(root, num_train=4, num_test=2)
    out = str(tmp_path / "out")
    launch(search_rank, 2, dist_url="auto", args=(root, f"srchdist_{uuid.uuid4().hex[:6]}", out))
    r0 = torch.load(os.path.join(out, "alphas_rank0.pt"), weights_only=True)
    r1 = torch.load(os.path.join(out, "alphas_rank1.pt"), weights_only=True)
    assert r0["iters"] >= 1
    assert all(torch.equal(a, b) for a, b in zip(r0["final"], r1["final"]))
    # the alpha steps really happened (Adam moves every entry with a non-zero gradient)
    assert any(not torch.equal(a, b) for a, b in zip(r0["initial"], r0["final"]))
