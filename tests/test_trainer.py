"""ElixirTrainer's construction (elixir_d2/trainer.py): DefaultTrainer's parts and hooks, in
DefaultTrainer's order, with the three parts that differ: the model wrapped in DDP only when there
are several processes (CPU included), the training loop SOLVER.AMP names (bfloat16 too), and saves
through AtomicCheckpointer. The 2-process DDP case is in test_reliability_distributed.py, the
resume of the optimizer state in test_reliability_resume.py.
"""

import os
import socket
import subprocess
import sys

import pytest
import torch

from detectron2.engine import DefaultTrainer, HookBase, SimpleTrainer, hooks

from elixir_d2.amp import AutocastTrainer
from elixir_d2.checkpoint import AtomicCheckpointer
from elixir_d2.data import register_deeplesion
from elixir_d2.modeling.meta_arch import BodyCropRCNN
from elixir_d2.trainer import ElixirTrainer

from reliability_helpers import build_cfg, tiny_opts, write_tiny_deeplesion

PREFIX = "trainer_build"
# detectron2 v0.6's DefaultTrainer.build_hooks, main process, PreciseBN off.
DEFAULT_HOOKS = [
    hooks.IterationTimer,
    hooks.LRScheduler,
    hooks.PeriodicCheckpointer,
    hooks.EvalHook,
    hooks.PeriodicWriter,
]


@pytest.fixture(scope="module")
def tiny_set(tmp_path_factory):
    root = write_tiny_deeplesion(
        str(tmp_path_factory.mktemp(PREFIX) / "data"), num_train=2, num_test=1
    )
    register_deeplesion(root, prefix=PREFIX)
    return root


def _cfg(out_dir, max_iter=2, **extra):
    return build_cfg(tiny_opts(PREFIX, str(out_dir), max_iter, **extra))


def test_hooks_are_default_trainers_in_its_order(tiny_set, tmp_path):
    trainer = ElixirTrainer(
        _cfg(tmp_path, **{"TEST.EVAL_PERIOD": 5, "SOLVER.CHECKPOINT_PERIOD": 3})
    )
    assert [type(h) for h in trainer._hooks] == DEFAULT_HOOKS
    _, _, periodic, evaluation, writer = trainer._hooks
    assert periodic.period == 3 and evaluation._period == 5 and writer._period == 20
    assert periodic.checkpointer is trainer.checkpointer
    assert all(h.trainer.max_iter == 2 for h in trainer._hooks)  # registered on this trainer


def test_precise_bn_comes_before_the_checkpointer(tiny_set, tmp_path):
    # PreciseBN updates the BN statistics the checkpoint then saves: it must run first.
    trainer = ElixirTrainer(
        _cfg(tmp_path, **{"TEST.PRECISE_BN.ENABLED": True, "MODEL.RESNETS.NORM": "BN"})
    )
    assert [type(h) for h in trainer._hooks] == DEFAULT_HOOKS[:2] + [
        hooks.PreciseBN
    ] + DEFAULT_HOOKS[2:]


def test_one_process_trains_the_bare_model(tiny_set, tmp_path):
    trainer = ElixirTrainer(_cfg(tmp_path))
    assert type(trainer.model) is BodyCropRCNN  # no DDP wrapper in a 1-process run
    assert trainer.checkpointer.model is trainer.model
    assert (trainer.start_iter, trainer.max_iter, trainer.iter) == (0, 2, 0)
    # the optimizer steps the very tensors of the trained (and saved) model
    stepped = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert stepped == {id(p) for p in trainer.model.parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "amp,loop",
    [
        ({}, SimpleTrainer),
        ({"SOLVER.AMP.ENABLED": True, "SOLVER.AMP.PRECISION": "bfloat16"}, AutocastTrainer),
    ],
    ids=["float32", "bfloat16"],
)
def test_the_training_loop_follows_solver_amp(tiny_set, tmp_path, amp, loop):
    trainer = ElixirTrainer(_cfg(tmp_path, **amp))
    assert type(trainer._trainer) is loop
    if loop is AutocastTrainer:
        assert (trainer._trainer.device_type, trainer._trainer.dtype) == ("cpu", torch.bfloat16)


def test_float16_on_the_cpu_is_refused_before_the_model_is_built(tiny_set, tmp_path, monkeypatch):
    def build_model(cls, cfg):
        raise AssertionError("the model was built before SOLVER.AMP was checked")

    monkeypatch.setattr(ElixirTrainer, "build_model", classmethod(build_model))
    with pytest.raises(ValueError, match=r"PRECISION float16 needs MODEL\.DEVICE cuda"):
        ElixirTrainer(_cfg(tmp_path, **{"SOLVER.AMP.ENABLED": True}))


def test_training_saves_through_the_atomic_checkpointer(tiny_set, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # what a writer killed inside a save leaves behind: only AtomicCheckpointer removes it
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f".tmp_{dead.pid}@{socket.gethostname().split('.')[0]}.x1y2_model_0000000.pth"
    stale.write_bytes(b"PK\x03\x04 half a zip")
    trainer = ElixirTrainer(_cfg(out, **{"SOLVER.CHECKPOINT_PERIOD": 1, "TEST.EVAL_PERIOD": 0}))
    assert type(trainer.checkpointer) is AtomicCheckpointer
    trainer.resume_or_load(resume=False)
    trainer.train()

    assert not stale.exists()
    assert sorted(p.name for p in out.glob("*.pth")) == [
        "model_0000000.pth",
        "model_0000001.pth",
        "model_final.pth",
    ]
    assert not [p for p in out.iterdir() if p.name.startswith(".tmp_")]
    assert (out / "last_checkpoint").read_text(encoding="utf-8").strip() == "model_final.pth"
    ckpt = torch.load(out / "model_final.pth", weights_only=True)
    assert set(ckpt) == {"model", "trainer", "iteration"} and ckpt["iteration"] == 1
    # DefaultTrainer's state (iteration, LR scheduler) plus the optimizer under "_trainer"
    assert set(ckpt["trainer"]) == {"iteration", "hooks", "_trainer"}
    assert set(ckpt["trainer"]["hooks"]) == {"LRScheduler"}
    assert ckpt["trainer"]["_trainer"]["optimizer"]["state"]
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(ckpt["model"][name], value), name


def test_a_subclass_customises_it_through_defaulttrainers_methods(tiny_set, tmp_path):
    class Marker(HookBase):
        pass

    class Custom(ElixirTrainer):
        def build_hooks(self):
            return super().build_hooks() + [Marker()]

    trainer = Custom(_cfg(tmp_path))
    assert isinstance(trainer, DefaultTrainer)
    assert [type(h) for h in trainer._hooks] == DEFAULT_HOOKS + [Marker]
    assert os.fspath(trainer.checkpointer.save_dir) == str(tmp_path)
