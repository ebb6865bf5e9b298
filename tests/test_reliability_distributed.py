"""train_net's trainer and evaluator under a 2-process gloo group (elixir_d2.launch.launch, the
path `train_net.py --num-gpus 2` takes on a machine without CUDA) against a 1-process run.

What must hold, and why:
- Evaluation of the same weights: LesionEvaluator gathers the predictions of both ranks and
  pairs them with the ground truth in dataset order, so every metric equals the 1-process one
  exactly (inference is per image; the split of the images across ranks cannot matter).
- Training: SOLVER.IMS_PER_BATCH 2 is 2 images in one process or 1 image in each of 2. The ranks
  read the 1-process batches (detectron2's TrainingSampler: one shared permutation, rank r takes
  positions r, r + 2, ...), rank 0's initial weights are the 1-process ones (same seed, built
  before anything else draws) and DDP broadcasts them, and DDP averages gradients, which is the
  gradient of the 1-process mean loss because every image here has the same loss normalisers
  (one lesion per image, same size; RPN and ROI sampling take every anchor / proposal, so no
  random subsample differs). The losses then agree up to float summation order: asserted to a
  relative 1e-4 over 4 iterations (observed: at most 3e-6). With detectron2's default random
  subsampling the two runs draw different anchors / proposals and differ by 1e-3 to 3e-2, which
  this tolerance would catch. The two replicas must stay bit-identical.
"""

import hashlib
import json
import os
import uuid

import pytest
import torch

from reliability_helpers import QUICKSTART, tiny_opts, write_tiny_deeplesion

MAX_ITER = 4
# Take-all sampling (see the module docstring): 64 px images have 1023 anchors; 32 proposals + 1
# ground truth per image.
EXACT_SAMPLING = {
    "MODEL.RPN.BATCH_SIZE_PER_IMAGE": 2048,
    "MODEL.RPN.POSITIVE_FRACTION": 1.0,
    "MODEL.RPN.POST_NMS_TOPK_TRAIN": 32,
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE": 64,
    "MODEL.ROI_HEADS.POSITIVE_FRACTION": 1.0,
    "INPUT.FLIP_PROB": 0.0,
    # detectron2's RPN head: the quickstart's BatchNorm one would give each replica its own
    # statistics (as tiny_opts' GroupNorm backbone avoids), and a GroupNorm one finds nothing in 4
    # iterations, which would leave the evaluation comparison below all zeros.
    "MODEL.RPN.HEAD_NAME": "StandardRPNHead",
}


def _param_digest(model: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def train_and_evaluate(root: str, prefix: str, opts, eval_weights: str, out_dir: str) -> None:
    """One rank of the run: train_net.main's training path, recording every iteration's loss and
    the replica's final weights, then train_net's evaluation of ``eval_weights``."""
    torch.set_num_threads(1)
    from torch.nn.parallel import DistributedDataParallel

    from detectron2.engine import HookBase, default_argument_parser
    from detectron2.utils import comm

    from elixir_d2.checkpoint import AtomicCheckpointer
    from elixir_d2.data import register_deeplesion

    import train_net

    register_deeplesion(root, prefix=prefix)
    args = default_argument_parser().parse_args(["--config-file", QUICKSTART] + list(opts))
    cfg = train_net.setup(args)
    losses = []

    class RecordLosses(HookBase):
        def after_step(self):
            if comm.is_main_process():  # only rank 0 holds the (rank-averaged) scalars
                latest = self.trainer.storage.latest()
                losses.append(
                    {k: latest[k][0] for k in latest if k.startswith("loss") or k == "total_loss"}
                )

    trainer = train_net.Trainer(cfg)
    # DDP only with several processes; on the CPU without device_ids, and without broadcasting
    # buffers each step, as detectron2's DefaultTrainer builds it
    ddp = trainer.model if isinstance(trainer.model, DistributedDataParallel) else None
    wrapping = ddp and {"device_ids": ddp.device_ids, "broadcast_buffers": ddp.broadcast_buffers}
    trainer.register_hooks([RecordLosses()])
    trainer.resume_or_load(resume=False)
    trainer.train()
    model = trainer.model.module if hasattr(trainer.model, "module") else trainer.model
    digest = _param_digest(model)

    eval_model = train_net.Trainer.build_model(cfg)
    weights = eval_weights or os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    AtomicCheckpointer(eval_model, save_dir=cfg.OUTPUT_DIR).load(weights)
    results = train_net.Trainer.test(cfg, eval_model)
    out = {
        "world_size": comm.get_world_size(),
        "ddp": wrapping,
        "losses": losses,
        "digest": digest,
        "metrics": {k: dict(v) for k, v in results.items()},
    }
    with open(os.path.join(out_dir, f"rank{comm.get_rank()}.json"), "w", encoding="utf-8") as f:
        json.dump(out, f)


def test_two_process_training_and_evaluation_match_one_process(tmp_path):
    from elixir_d2.launch import launch

    root = write_tiny_deeplesion(str(tmp_path / "data"), num_train=8, num_test=5)
    prefix = f"rel_dist_{uuid.uuid4().hex[:8]}"
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()

    launch(
        train_and_evaluate,
        1,
        args=(root, prefix, tiny_opts(prefix, str(one), MAX_ITER, **EXACT_SAMPLING), "", str(one)),
    )
    weights = str(one / "model_final.pth")
    launch(
        train_and_evaluate,
        2,
        dist_url="auto",
        args=(
            root,
            prefix,
            tiny_opts(prefix, str(two), MAX_ITER, **EXACT_SAMPLING),
            weights,
            str(two),
        ),
    )

    r1 = json.loads((one / "rank0.json").read_text(encoding="utf-8"))
    r2 = [json.loads((two / f"rank{r}.json").read_text(encoding="utf-8")) for r in (0, 1)]
    assert r1["world_size"] == 1 and [r["world_size"] for r in r2] == [2, 2]
    assert r1["ddp"] is None  # one process trains the bare model
    assert [r["ddp"] for r in r2] == [{"device_ids": None, "broadcast_buffers": False}] * 2

    # training: the DDP replicas are identical, and the losses follow the 1-process run
    assert r2[0]["digest"] == r2[1]["digest"]
    assert len(r1["losses"]) == len(r2[0]["losses"]) == MAX_ITER and r2[1]["losses"] == []
    for it, (a, b) in enumerate(zip(r1["losses"], r2[0]["losses"])):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-7), (it, k)
    # the weights did change (a run that never stepped would also "agree")
    assert r1["losses"][0]["total_loss"] != r1["losses"][-1]["total_loss"]

    # evaluation of the same weights: identical numbers, gathered on rank 0 only
    m1, m2 = r1["metrics"]["lesion"], r2[0]["metrics"]["lesion"]
    assert r2[1]["metrics"] == {}
    assert m1["num_images"] == 5 and m1["num_lesions"] == 5
    assert m2.keys() == m1.keys()
    for k, v in m1.items():
        assert m2[k] == pytest.approx(v, rel=0, abs=0, nan_ok=True), k
    # non-trivial numbers: a comparison of all-zero metrics would prove little
    assert 0 < m1["sens@8_iobb"]


def test_a_cpu_worker_leaves_no_process_group_behind():
    """After its work, a gloo worker holds no process group, not even through detectron2's comm
    module: groups still alive at interpreter teardown can abort the process."""
    from datetime import timedelta

    import torch.distributed as dist

    from detectron2.utils import comm

    from elixir_d2 import launch as launch_mod

    seen = {}

    def work():
        seen["local"] = comm._LOCAL_PROCESS_GROUP is not None
        seen["world"] = comm.get_world_size()
        # what comm's gathers do with more than one process: cache the world group
        comm._get_global_gloo_group()
        seen["cached"] = comm._get_global_gloo_group.cache_info().currsize

    launch_mod._cpu_worker(
        0, work, 1, 1, 0, launch_mod._local_dist_url(), (), timedelta(seconds=60)
    )
    assert seen == {"local": True, "world": 1, "cached": 1}
    assert comm._LOCAL_PROCESS_GROUP is None and not dist.is_initialized()
    assert comm._get_global_gloo_group.cache_info().currsize == 0
