"""The ALB search under mixed precision (issue 16.4): float16 (SOLVER.AMP.ENABLED's default
precision) on the CPU is a clear error naming the key, SOLVER.AMP.PRECISION bfloat16 runs a whole
search on the CPU; the weight step and the architect step run under autocast (with or
without a GradScaler) and give finite losses and gradients; the scalers go into checkpoints.

On the CPU the steps run under bfloat16 autocast (float16 on the CPU is much slower, and what it
adds, the overflow of half-precision sums, is covered op by op in test_amp.py); with CUDA the
searcher's own SOLVER.AMP.ENABLED path runs a whole (short) search.
"""

import os

import pytest
import torch

from detectron2.utils.events import EventStorage

from elixir_d2.cli import UserInputError
from elixir_d2.data import register_deeplesion
from elixir_d2.search import ALBSearcher, search_head
from elixir_d2.search.step import MixedPrecision, check_search_amp

import search_net  # the repository root, on pytest's pythonpath
from reliability_helpers import REPO, write_tiny_deeplesion

torch.set_num_threads(1)

PREFIX = "searchamp"
SEARCH_CFG = os.path.join(REPO, "configs", "quickstart", "search_alb.yaml")


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("searchamp") / "tiny")
    write_tiny_deeplesion(root, num_train=4, num_test=2)  # 2 + 2 records: one step an epoch
    register_deeplesion(root, prefix=PREFIX)
    return root


def _args(out_dir, *opts):
    data = ["DATASETS.TRAIN", f"('{PREFIX}_train',)", "DATASETS.TEST", f"('{PREFIX}_test',)"]
    cheap = [
        "INPUT.MAX_IMAGE_SIZE",
        "64",
        "SOLVER.IMS_PER_BATCH",
        "2",
        "SEARCH.EPOCHS",
        "1",
        "SEARCH.WARMUP_EPOCHS",
        "0",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
        "16",
    ]
    return search_net.build_parser().parse_args(
        ["--config-file", SEARCH_CFG, *data, *cheap, "OUTPUT_DIR", str(out_dir), *opts]
    )


def _cfg(out_dir, *opts):
    return search_net.setup(_args(out_dir, *opts))


def test_amp_without_cuda_is_a_clear_error_naming_the_key(tiny_set, tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)  # setup() itself refuses AMP on the CPU: set it afterwards
    cfg.defrost()
    cfg.SOLVER.AMP.ENABLED, cfg.MODEL.DEVICE = True, "cpu"
    built = []
    monkeypatch.setattr("elixir_d2.search.searcher.build_model", lambda c: built.append(c))
    with pytest.raises(ValueError, match=r"SOLVER\.AMP\.ENABLED.*MODEL\.DEVICE cuda"):
        ALBSearcher(cfg)
    assert not built  # refused before any model is built
    check_search_amp(_cfg(tmp_path))  # AMP off: nothing to say
    # search_net.py checks it with its other inputs: one line, exit code 2, before any launch.
    with pytest.raises(UserInputError, match=r"SOLVER\.AMP\.ENABLED"):
        search_net.check_inputs(_args(tmp_path, "SOLVER.AMP.ENABLED", "True"))


def _finite_grads(params):
    return all(p.grad is None or torch.isfinite(p.grad).all() for p in params)


@pytest.mark.parametrize("scaled", [False, True], ids=["autocast", "autocast+scaler"])
def test_search_steps_under_cpu_autocast(tiny_set, tmp_path, scaled):
    s = ALBSearcher(_cfg(tmp_path))
    head = search_head(s.model)

    def precision():
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8) if scaled else None
        return MixedPrecision("cpu", torch.bfloat16, scaler)

    s.w_precision, s.architect.precision = precision(), precision()
    weights = [p for g in s.w_optimizer.param_groups for p in g["params"]]
    alphas0 = [a.detach().clone() for a in head.arch_parameters()]
    w0 = [p.detach().clone() for p in weights]
    batch_w, batch_a = s.next_batches()
    with EventStorage():
        w_losses = s.w_step(batch_w)
        assert _finite_grads(weights)
        a_losses = s.alpha_step(batch_a)
    assert all(torch.isfinite(torch.tensor(v)) for v in {**w_losses, **a_losses}.values())
    for a, a0 in zip(head.arch_parameters(), alphas0):
        assert a.dtype == torch.float32 and a.grad.dtype == torch.float32
        assert torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
        assert torch.isfinite(a).all() and not torch.equal(a, a0)
    assert sum(not torch.equal(p, q) for p, q in zip(weights, w0)) > len(weights) // 2
    state = s.state_dict()
    if scaled:  # both scalers are checkpointed and come back on resume
        assert state["grad_scaler_w"]["scale"] == state["grad_scaler_alpha"]["scale"] == 2.0**8
        fresh = ALBSearcher(_cfg(tmp_path / "again"))
        fresh.w_precision, fresh.architect.precision = precision(), precision()
        state["grad_scaler_alpha"]["scale"] = 2.0**5
        fresh.load_state_dict(state)
        assert fresh.architect.precision.scaler.get_scale() == 2.0**5
    else:
        assert "grad_scaler_w" not in state and "grad_scaler_alpha" not in state


def test_search_under_bfloat16_on_the_cpu_from_the_config(tiny_set, tmp_path):
    out = tmp_path / "bf16"
    s = ALBSearcher(_cfg(out, "SOLVER.AMP.ENABLED", "True", "SOLVER.AMP.PRECISION", "bfloat16"))
    assert s.w_precision == s.architect.precision == MixedPrecision("cpu", torch.bfloat16, None)
    seen = []
    s.model.roi_heads.box_predictor.cls_score.register_forward_hook(
        lambda m, i, o: seen.append(o.dtype)
    )
    head = search_head(s.model)
    alphas0 = [a.detach().clone() for a in head.arch_parameters()]
    s.resume_or_load(resume=False)
    s.train()
    assert seen and set(seen) == {torch.bfloat16}
    for a, a0 in zip(head.arch_parameters(), alphas0):
        assert a.dtype == torch.float32 and torch.isfinite(a).all()
    assert any(not torch.equal(a, a0) for a, a0 in zip(head.arch_parameters(), alphas0))
    final = torch.load(out / "model_final.pth", weights_only=False)
    assert "grad_scaler_w" not in final["trainer"] and "grad_scaler_alpha" not in final["trainer"]
    assert (out / "genotype.yaml").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="SOLVER.AMP.ENABLED needs CUDA")
def test_search_with_solver_amp_enabled_on_cuda(tiny_set, tmp_path):
    out = tmp_path / "amp"
    s = ALBSearcher(_cfg(out, "SOLVER.AMP.ENABLED", "True", "MODEL.DEVICE", "cuda"))
    assert s.w_precision.dtype == s.architect.precision.dtype == torch.float16
    assert s.w_precision.scaler is not s.architect.precision.scaler
    head = search_head(s.model)
    alphas0 = [a.detach().clone() for a in head.arch_parameters()]
    s.resume_or_load(resume=False)
    s.train()
    assert all(torch.isfinite(a).all() for a in head.arch_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(head.arch_parameters(), alphas0))
    final = torch.load(out / "model_final.pth", weights_only=False)
    assert "grad_scaler_w" in final["trainer"] and "grad_scaler_alpha" in final["trainer"]
    assert (out / "genotype.yaml").exists()
