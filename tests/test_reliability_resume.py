"""Crash and resume: train_net.py killed with SIGKILL mid-run and restarted with --resume; a
checkpoint killed mid-write; temporary files of dead writers."""

import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid

import pytest
import torch

from elixir_d2.checkpoint import AtomicCheckpointer

from reliability_helpers import QUICKSTART, REPO, tiny_opts, write_tiny_deeplesion

MAX_ITER, PERIOD = 12, 4


def _expected_checkpoints(max_iter: int, period: int):
    # fvcore's PeriodicCheckpointer: model_{i:07d} after iteration i when (i + 1) % period == 0,
    # and model_final after the last iteration.
    return {f"model_{i:07d}.pth" for i in range(max_iter) if (i + 1) % period == 0} | {
        "model_final.pth"
    }


def _train_cmd(out_dir, resume=False):
    opts = tiny_opts("synthetic", str(out_dir), MAX_ITER, **{"SOLVER.CHECKPOINT_PERIOD": PERIOD})
    return (
        [sys.executable, os.path.join(REPO, "train_net.py"), "--config-file", QUICKSTART]
        + (["--resume"] if resume else [])
        + opts
    )


def _capture(name):
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger(name).addHandler(handler)
    return messages, lambda: logging.getLogger(name).removeHandler(handler)


def _read_tag(out_dir):
    try:
        return (out_dir / "last_checkpoint").read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return ""


def test_sigkill_then_resume_ends_like_an_uninterrupted_run(tmp_path):
    # the child registers synthetic_* from $DETECTRON2_DATASETS/synthetic, as a user's run does
    from detectron2.engine import default_argument_parser

    from elixir_d2.data import register_deeplesion

    import train_net

    data = write_tiny_deeplesion(str(tmp_path / "datasets" / "synthetic"), num_train=4, num_test=2)
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), OMP_NUM_THREADS="1")
    out = tmp_path / "out"

    proc = subprocess.Popen(
        _train_cmd(out), env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 300
    while _read_tag(out) != "model_0000003.pth":  # the first checkpoint is complete and tagged
        assert proc.poll() is None, (
            f"training ended (rc {proc.returncode}) before its first checkpoint"
        )
        assert time.time() < deadline, "no checkpoint after 300 s"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (out / "model_final.pth").exists()  # it really died mid-run
    tag = _read_tag(out)
    last_iter = int(re.fullmatch(r"model_(\d{7})\.pth", tag).group(1))
    assert torch.load(out / tag, weights_only=True)["iteration"] == last_iter

    # what a process killed inside a save leaves behind (the killed run's pid is dead now), and
    # a temporary file of a live writer (this test's process), which must be left alone
    host = os.uname().nodename.split(".")[0]
    dead_tmp = out / f".tmp_{proc.pid}@{host}.k9x2_amodel_0000007.pth"
    live_tmp = out / f".tmp_{os.getpid()}@{host}.l1v3_bmodel_0000007.pth"
    dead_tmp.write_bytes(b"PK\x03\x04 half a zip")
    live_tmp.write_bytes(b"being written")
    # the restart: train_net.main's training path with --resume, in this process (a second
    # interpreter start would only add time), so the same files are registered under a name of
    # this test's own (the process-wide synthetic_* may point elsewhere)
    prefix = f"rel_resume_{uuid.uuid4().hex[:6]}"
    register_deeplesion(data, prefix=prefix)
    argv = _train_cmd(out, resume=True)[2:] + [
        "DATASETS.TRAIN",
        f"('{prefix}_train',)",
        "DATASETS.TEST",
        f"('{prefix}_test',)",
    ]
    args = default_argument_parser().parse_args(argv)
    assert args.resume
    records, done = _capture("fvcore.common.checkpoint")
    try:
        trainer = train_net.Trainer(train_net.setup(args))
        trainer.resume_or_load(resume=args.resume)
        assert trainer.start_iter == last_iter + 1  # "Starting training from iteration 4"
        trainer.train()
    finally:
        done()
    assert trainer.iter == MAX_ITER  # detectron2 leaves iter one past the last iteration run
    removed = [m for m in records if "partial checkpoint file(s) of killed runs" in m]
    assert len(removed) == 1 and "Removed 1 " in removed[0] and dead_tmp.name in removed[0]

    pth = {p.name for p in out.glob("model_*.pth")}
    assert pth == _expected_checkpoints(MAX_ITER, PERIOD)
    assert pth == {"model_0000003.pth", "model_0000007.pth", "model_0000011.pth", "model_final.pth"}
    assert _read_tag(out) == "model_final.pth"
    for name in pth:
        ckpt = torch.load(out / name, weights_only=True)  # plain tensors: loads without pickle code
        assert {"model", "trainer", "iteration"} <= set(ckpt)
        # SGD momentum (ElixirTrainer.state_dict; detectron2 v0.6 alone leaves the optimizer out)
        # and the LR scheduler travel with the weights
        assert ckpt["trainer"]["_trainer"]["optimizer"]["state"]
        assert ckpt["trainer"]["hooks"]["LRScheduler"]
    assert torch.load(out / "model_final.pth", weights_only=True)["iteration"] == MAX_ITER - 1
    assert not dead_tmp.exists() and live_tmp.exists()
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".tmp_")) == [live_tmp.name]


# ------------------------------------------------------------------ killed inside a save
def _save_forever(out_dir: str) -> None:
    """Child: start saving 'model_a' with a torch.save that writes half a file, then hangs."""
    import elixir_d2.checkpoint as checkpoint_module

    def slow_save(obj, f):
        f.write(b"PK\x03\x04" + b"\0" * 4096)
        f.flush()
        time.sleep(600)

    checkpoint_module.torch.save = slow_save
    ckpt = AtomicCheckpointer(torch.nn.Linear(2, 2), save_dir=out_dir)
    ckpt.save("model_a")


def test_checkpoint_killed_mid_write_leaves_the_previous_files_intact(tmp_path):
    model = torch.nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.fill_(1.5)
    AtomicCheckpointer(model, save_dir=str(tmp_path)).save("model_a")
    assert _read_tag(tmp_path) == "model_a.pth"
    before = (tmp_path / "model_a.pth").read_bytes()

    # fork when this process has no other thread (fast); spawn otherwise (fork beside threads
    # can deadlock the child)
    ctx = multiprocessing.get_context("fork" if threading.active_count() == 1 else "spawn")
    child = ctx.Process(target=_save_forever, args=(str(tmp_path),))
    child.start()
    deadline = time.time() + 120
    while not any(
        p.name.startswith(f".tmp_{child.pid}@") and p.stat().st_size > 0 for p in tmp_path.iterdir()
    ):
        assert child.is_alive() and time.time() < deadline
        time.sleep(0.01)
    os.kill(child.pid, signal.SIGKILL)
    child.join()

    # the half-written file never took the checkpoint's name, nor did the tag move
    assert (tmp_path / "model_a.pth").read_bytes() == before
    assert _read_tag(tmp_path) == "model_a.pth"
    loaded = AtomicCheckpointer(torch.nn.Linear(2, 2), save_dir=str(tmp_path))
    loaded.resume_or_load("", resume=True)
    assert torch.equal(loaded.model.weight, torch.full((2, 2), 1.5))
    # the next save in that folder removes the dead writer's leftover
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp_")]
    assert len(leftovers) == 1
    loaded.save("model_b")
    assert not any(p.name.startswith(".tmp_") for p in tmp_path.iterdir())
    assert _read_tag(tmp_path) == "model_b.pth"


def test_failed_write_removes_its_temporary_file(tmp_path, monkeypatch):
    import elixir_d2.checkpoint as checkpoint_module

    ckpt = AtomicCheckpointer(torch.nn.Linear(2, 2), save_dir=str(tmp_path))
    ckpt.save("model_a")

    def full_disk(obj, f):
        f.write(b"PK\x03\x04")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save("model_b")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last_checkpoint", "model_a.pth"]
    assert _read_tag(tmp_path) == "model_a.pth"


def test_resume_restores_the_optimizer_momentum(tmp_path):
    from detectron2.utils.env import seed_all_rng

    from elixir_d2.data import register_deeplesion
    from elixir_d2.trainer import ElixirTrainer

    from reliability_helpers import build_cfg

    register_deeplesion(
        write_tiny_deeplesion(str(tmp_path / "data"), num_train=2, num_test=1), prefix="rel_resume"
    )
    cfg = build_cfg(tiny_opts("rel_resume", str(tmp_path / "out"), 2, **{"TEST.EVAL_PERIOD": 0}))
    seed_all_rng(0)
    first = ElixirTrainer(cfg)
    first.resume_or_load(resume=False)
    first.train()
    momentum = {
        k: v["momentum_buffer"].clone() for k, v in first.optimizer.state_dict()["state"].items()
    }
    assert momentum and any(bool(m.abs().sum() > 0) for m in momentum.values())

    second = ElixirTrainer(cfg)
    assert not second.optimizer.state_dict()["state"]  # a fresh optimizer has no momentum
    second.resume_or_load(resume=True)
    assert second.start_iter == 2
    restored = second.optimizer.state_dict()["state"]
    assert restored.keys() == momentum.keys()
    for k, m in momentum.items():
        assert torch.equal(restored[k]["momentum_buffer"], m), k


def test_trainer_saves_through_the_atomic_checkpointer(tmp_path):
    from detectron2.engine import hooks

    from elixir_d2.data import register_deeplesion
    from elixir_d2.trainer import ElixirTrainer

    from reliability_helpers import build_cfg

    register_deeplesion(
        write_tiny_deeplesion(str(tmp_path / "data"), num_train=2, num_test=1), prefix="rel_atomic"
    )
    trainer = ElixirTrainer(
        build_cfg(tiny_opts("rel_atomic", str(tmp_path / "out"), 2, **{"TEST.EVAL_PERIOD": 0}))
    )
    assert type(trainer.checkpointer) is AtomicCheckpointer
    periodic = [h for h in trainer._hooks if isinstance(h, hooks.PeriodicCheckpointer)]
    assert periodic and all(h.checkpointer is trainer.checkpointer for h in periodic)
