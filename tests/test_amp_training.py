"""bfloat16 mixed-precision training (SOLVER.AMP.PRECISION, elixir_d2/amp.py).

SOLVER.AMP.ENABLED with PRECISION bfloat16 trains under bfloat16 autocast on the CPU; float16 stays
detectron2's CUDA-only AMPTrainer and is refused by name elsewhere. The step is checked against
one written out by hand (autocast forward, float32 backward and step), and that hand step against
a float32 one, so the comparison can fail; ElixirTrainer is checked to run ElixirNet's forward in
bfloat16 and keep float32 weights.
"""

import copy
import os

import pytest
import torch
from torch import nn

from detectron2.engine import SimpleTrainer, default_argument_parser
from detectron2.utils.events import EventStorage

from elixir_d2 import load_config
from elixir_d2.amp import AutocastTrainer, autocast_dtype, build_step_trainer
from elixir_d2.cli import UserInputError
from elixir_d2.data import register_deeplesion
from elixir_d2.trainer import ElixirTrainer

from reliability_helpers import QUICKSTART, REPO, build_cfg, tiny_opts, write_tiny_deeplesion

torch.set_num_threads(1)
PREFIX = "amptrain"
ELIXIRNET = os.path.join(REPO, "configs", "quickstart", "elixirnet.yaml")
BF16 = {"SOLVER.AMP.ENABLED": "True", "SOLVER.AMP.PRECISION": "bfloat16"}


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("amptrain") / "tiny")
    write_tiny_deeplesion(root, num_train=4, num_test=2)
    register_deeplesion(root, prefix=PREFIX)
    return root


def test_autocast_dtype_reads_solver_amp():
    cfg = load_config(QUICKSTART)
    assert cfg.SOLVER.AMP.PRECISION == "float16"  # detectron2's meaning of AMP by default
    assert autocast_dtype(cfg) is None  # AMP off
    cfg.SOLVER.AMP.ENABLED = True
    cfg.SOLVER.AMP.PRECISION = "bfloat16"
    assert autocast_dtype(cfg) == torch.bfloat16
    cfg.SOLVER.AMP.PRECISION, cfg.MODEL.DEVICE = "float16", "cuda:1"
    assert autocast_dtype(cfg) == torch.float16  # read from the config, no GPU needed
    cfg.MODEL.DEVICE = "cpu"
    with pytest.raises(
        ValueError,
        match=r"PRECISION float16 needs MODEL\.DEVICE cuda \(got 'cpu'\)"
        r".*SOLVER\.AMP\.PRECISION bfloat16",
    ):
        autocast_dtype(cfg)
    cfg.SOLVER.AMP.PRECISION = "float32"
    with pytest.raises(
        ValueError,
        match=r"SOLVER\.AMP\.PRECISION must be one of "
        r"\['bfloat16', 'float16'\], got 'float32'",
    ):
        autocast_dtype(cfg)


class _Net(nn.Module):
    """A conv and a linear layer (both autocast to bfloat16) and two losses."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 2)
        self.seen = []
        self.conv.register_forward_hook(self._record)  # a bound method: deepcopy rebinds it

    def _record(self, module, inputs, output):
        self.seen.append(output.dtype)

    def forward(self, batch):
        x, y = batch
        h = self.fc(self.conv(x).relu().mean(dim=(2, 3)))
        return {"loss_a": ((h - y) ** 2).float().mean(), "loss_b": h.float().abs().mean() * 0.1}


def _hand_step(model, batch, bf16: bool):
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        losses = model(batch)
    opt.zero_grad()
    sum(losses.values()).backward()
    opt.step()


def test_autocast_trainer_step_is_autocast_forward_then_float32_backward_and_step():
    torch.manual_seed(0)
    batch = (torch.randn(2, 3, 9, 9), torch.randn(2, 2))
    model = _Net()
    by_hand, in_float32 = copy.deepcopy(model), copy.deepcopy(model)
    _hand_step(by_hand, batch, bf16=True)
    _hand_step(in_float32, batch, bf16=False)
    trainer = AutocastTrainer(
        model, [batch], torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9), "cpu"
    )
    with EventStorage():
        trainer.run_step()
    assert model.seen == [torch.bfloat16]
    for p, q, r in zip(model.parameters(), by_hand.parameters(), in_float32.parameters()):
        assert p.dtype == p.grad.dtype == torch.float32
        torch.testing.assert_close(p, q, rtol=0, atol=0)
    # bfloat16 really changed the step (else the comparison above could not fail)
    assert any(not torch.equal(p, r) for p, r in zip(model.parameters(), in_float32.parameters()))


def test_build_step_trainer_picks_the_loop_from_the_config():
    cfg = load_config(QUICKSTART)
    model, opt = _Net(), None
    assert type(build_step_trainer(cfg, model, [], opt)) is SimpleTrainer
    cfg.SOLVER.AMP.ENABLED, cfg.SOLVER.AMP.PRECISION = True, "bfloat16"
    loop = build_step_trainer(cfg, model, [], opt)
    assert isinstance(loop, AutocastTrainer) and (loop.device_type, loop.dtype) == (
        "cpu",
        torch.bfloat16,
    )


@pytest.mark.parametrize("amp", [False, True], ids=["float32", "bfloat16"])
def test_elixir_trainer_trains_elixirnet_under_bfloat16_autocast(tiny_set, tmp_path, amp):
    opts = tiny_opts(PREFIX, str(tmp_path), 2, **(BF16 if amp else {}))
    trainer = ElixirTrainer(build_cfg(opts, ELIXIRNET))
    assert isinstance(trainer._trainer, AutocastTrainer) == amp
    model = trainer.model
    seen = []
    model.roi_heads.box_predictor.cls_score.register_forward_hook(
        lambda m, i, o: seen.append((m.training, o.dtype))
    )
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    trainer.resume_or_load(resume=False)
    trainer.train()
    # training steps under autocast; the evaluation after training in float32 either way
    assert set(seen) == {(True, torch.bfloat16 if amp else torch.float32), (False, torch.float32)}
    state = model.state_dict()
    assert all(v.dtype == before[k].dtype for k, v in state.items())  # float32 weights kept
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not torch.equal(
        state["roi_heads.box_predictor.cls_score.weight"],
        before["roi_heads.box_predictor.cls_score.weight"],
    )
    saved = torch.load(tmp_path / "model_final.pth", weights_only=False)["model"]
    assert saved["roi_heads.box_predictor.cls_score.weight"].dtype == torch.float32


def test_train_net_refuses_float16_on_the_cpu_by_name(tiny_set, tmp_path):
    import train_net

    opts = tiny_opts(PREFIX, str(tmp_path), 2, **{"SOLVER.AMP.ENABLED": "True"})
    args = default_argument_parser().parse_args(["--config-file", QUICKSTART, *opts])
    with pytest.raises(UserInputError, match=r"SOLVER\.AMP\.PRECISION float16 needs MODEL\.DEVICE"):
        train_net.check_inputs(args)
    args = default_argument_parser().parse_args(
        ["--config-file", QUICKSTART, *opts, "SOLVER.AMP.PRECISION", "bfloat16"]
    )
    assert train_net.check_inputs(args).SOLVER.AMP.PRECISION == "bfloat16"


@pytest.mark.parametrize(
    "choice,native,expected",
    [
        ("auto", True, "bfloat16"),
        ("auto", False, "float32"),
        ("float32", True, "float32"),
        ("bfloat16", False, "bfloat16"),
    ],
)
def test_demo_precision_turns_into_the_configs_amp(choice, native, expected):
    from demo import precision_opts  # projects/quickstart/demo.py

    precision, opts = precision_opts(choice, native)
    assert precision == expected
    for name in ("fpn.yaml", "search_alb.yaml", "elixirnet.yaml"):  # the three configs it runs
        cfg = load_config(os.path.join(REPO, "configs", "quickstart", name), opts)
        assert autocast_dtype(cfg) == (torch.bfloat16 if expected == "bfloat16" else None)
    with pytest.raises(ValueError, match="--precision must be auto, float32 or bfloat16"):
        precision_opts("float16", True)


def test_amp_speed_times_both_loops_on_a_tiny_set(tiny_set, tmp_path):
    import amp_speed  # projects/benchmarks/amp_speed.py

    assert amp_speed.amp_opts("float32") == ["SOLVER.AMP.ENABLED", "False"]
    opts = tiny_opts(PREFIX, str(tmp_path), 2)
    times = amp_speed.time_config("fpn.yaml", rounds=3, warmup=1, batches=1, opts=opts)
    assert sorted(times) == ["bfloat16", "float32"]
    assert all(len(t) == 3 and min(t) > 0 for t in times.values())


def test_amp_speed_refuses_a_config_it_cannot_find_before_timing(capsys):
    import amp_speed

    with pytest.raises(SystemExit) as e:
        amp_speed.main(["--config", "fpn.yaml", "--config", "fnp.yaml", "MODEL.ALB.GENOTYPE", "g"])
    assert e.value.code == 2
    assert "configs/quickstart/fnp.yaml not found" in capsys.readouterr().err


def test_native_cpu_bfloat16_reads_the_x86_flags_not_onednn(monkeypatch):
    import platform
    import types

    from elixir_d2.amp import native_cpu_bfloat16

    def cpu(bf16: bool, amx: bool):
        return types.SimpleNamespace(
            _is_avx512_bf16_supported=lambda: bf16, _is_amx_tile_supported=lambda: amx
        )

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    # oneDNN says "supported" on any AVX-512 CPU; an Ice Lake Xeon has neither flag
    monkeypatch.setattr(
        torch.ops, "mkldnn", types.SimpleNamespace(_is_mkldnn_bf16_supported=lambda: True)
    )
    monkeypatch.setattr(torch, "cpu", cpu(False, False))
    assert native_cpu_bfloat16() is False
    monkeypatch.setattr(torch, "cpu", cpu(True, False))  # Zen 4, Cooper Lake
    assert native_cpu_bfloat16() is True
    monkeypatch.setattr(torch, "cpu", cpu(False, True))  # AMX
    assert native_cpu_bfloat16() is True
    monkeypatch.setattr(torch, "cpu", types.SimpleNamespace())  # a build without the checks
    assert native_cpu_bfloat16() is False


def test_native_cpu_bfloat16_elsewhere_asks_onednn(monkeypatch):
    import platform
    import types

    from elixir_d2.amp import native_cpu_bfloat16

    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    monkeypatch.setattr(torch.ops, "mkldnn", types.SimpleNamespace())  # a build without the op
    assert native_cpu_bfloat16() is False
    monkeypatch.setattr(
        torch.ops, "mkldnn", types.SimpleNamespace(_is_mkldnn_bf16_supported=lambda: True)
    )
    assert native_cpu_bfloat16() is True


def test_demo_stage_lines_estimate_the_time_to_go_from_fpn_training():
    from demo import stage_line

    times = {"data": 10.0}
    assert stage_line(times, 10.0) == "[demo] stage 1/5 data: 10 s; 10 s elapsed"
    times["FPN training"] = 200.0
    # to go: 200 s per unit x (0.37 + 1.17 + 0.37) = 382 s
    assert stage_line(times, 210.0) == (
        "[demo] stage 2/5 FPN training: 200 s; 210 s elapsed; "
        "about 382 s to go (ALB search, ElixirNet training, "
        "evaluation)"
    )
    # a slower search sets the pace: (200 + 137) / 1.37 = 245.99 s, x (1.17 + 0.37) = 378.8 s
    times["ALB search"] = 137.0
    assert stage_line(times, 347.0).endswith("about 379 s to go (ElixirNet training, evaluation)")
    times.update({"ElixirNet training": 250.0, "evaluation": 80.0})
    assert stage_line(times, 677.0) == "[demo] stage 5/5 evaluation: 80 s; 677 s elapsed; done"


def test_demo_results_json_holds_nulls_for_nan_and_the_provenance(tmp_path):
    import json

    from demo import write_results

    from elixir_d2.provenance import provenance

    prov = provenance(["projects/quickstart/demo.py", "--seed", "3"], seeds=[3])
    path = tmp_path / "demo_results.json"
    write_results(
        str(path),
        {"FPN": {"AP": float("nan"), "sens@4_iou": 50.0}},
        {"FPN": 10},
        {"data": 1.0},
        "g.yaml",
        "float32",
        prov,
    )
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["rows"] == {"FPN": {"AP": None, "sens@4_iou": 50.0}}
    assert doc["provenance"] == prov and doc["provenance"]["seeds"] == [3]
