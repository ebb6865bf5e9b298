"""elixir_d2.provenance: the block every machine-written result file carries."""

import os
import shutil
import subprocess

import pytest
import torch

from elixir_d2.provenance import REPO_ROOT, code_state, cpu_model, provenance, provenance_line

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="no git binary")


def _git(cwd, *args):
    env = dict(
        os.environ,
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True, env=env
    ).stdout.strip()


def _repo_with_one_commit(tmp_path):
    """A fresh git repository under ``tmp_path`` holding a.txt ("one") in one commit."""
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.txt").write_text("one\n", encoding="utf-8")
    _git(repo, "add", "a.txt")
    _git(repo, "commit", "-q", "-m", "first")
    return repo


@needs_git
def test_commit_is_this_checkouts_head():
    try:
        top, head = _git(REPO_ROOT, "rev-parse", "--show-toplevel", "HEAD").splitlines()
    except subprocess.CalledProcessError:
        pytest.skip("the tests run from a copy without its git folder")
    if os.path.realpath(top) != os.path.realpath(REPO_ROOT):  # a copy inside another checkout
        assert provenance()["commit"] is None
    else:
        assert provenance()["commit"] == head


@needs_git
def test_dirty_follows_tracked_changes_and_a_non_repo_has_no_commit(tmp_path):
    repo = _repo_with_one_commit(tmp_path)
    p = provenance(root=str(repo))
    assert p["commit"] == _git(repo, "rev-parse", "HEAD") and p["dirty"] is False
    (repo / "untracked.txt").write_text("not tracked\n", encoding="utf-8")
    assert provenance(root=str(repo))["dirty"] is False  # untracked files do not count
    (repo / "a.txt").write_text("two\n", encoding="utf-8")
    assert provenance(root=str(repo))["dirty"] is True
    # A folder inside a checkout is not that checkout's code; a plain folder has no commit.
    (repo / "sub").mkdir()
    plain = tmp_path / "plain"
    plain.mkdir()
    for folder in (repo / "sub", plain):
        p = provenance(root=str(folder))
        assert p["commit"] is None and p["dirty"] is None


@needs_git
def test_code_state_taken_at_the_start_is_what_the_provenance_records(tmp_path):
    # A long run edited or committed over while it runs records the code it started with.
    repo = _repo_with_one_commit(tmp_path)
    first = _git(repo, "rev-parse", "HEAD")
    at_start = code_state(str(repo))
    assert at_start == {"commit": first, "dirty": False}
    (repo / "a.txt").write_text("two\n", encoding="utf-8")
    p = provenance(root=str(repo), code=at_start)
    assert p["commit"] == first and p["dirty"] is False
    assert provenance(root=str(repo))["dirty"] is True
    _git(repo, "commit", "-q", "-am", "second")
    assert provenance(root=str(repo), code=at_start)["commit"] == first
    assert provenance(root=str(repo))["commit"] == _git(repo, "rev-parse", "HEAD") != first


def test_no_git_binary_gives_no_commit(monkeypatch):
    monkeypatch.setenv("PATH", "")
    p = provenance()
    assert p["commit"] is None and p["dirty"] is None


def test_cpu_is_the_first_processors_name_family_and_model(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
        "model name\t: AMD EPYC\nstepping\t: 1\n\n"
        "processor\t: 1\ncpu family\t: 25\nmodel\t\t: 17\nmodel name\t: Other\n\n",
        encoding="utf-8",
    )
    assert cpu_model(str(info)) == "AMD EPYC (family 26 model 2)"
    # aarch64 Linux names no family: the name alone
    info.write_text("processor\t: 0\nmodel name\t: Neoverse-V2\n\n", encoding="utf-8")
    assert cpu_model(str(info)) == "Neoverse-V2"


def test_cpu_of_this_machine_is_in_the_provenance():
    if not os.path.isfile("/proc/cpuinfo"):
        pytest.skip("not Linux")
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
    if not names:
        pytest.skip("this CPU's /proc/cpuinfo names no model")
    assert provenance()["cpu"].startswith(names[0])


def test_command_seeds_threads_and_times():
    argv = ["projects/benchmarks/quality.py", "--seeds", "0", "1", "a b"]
    torch.set_num_threads(1)
    p = provenance(argv, seeds=[0, 1], started=0.0)
    assert p["command"] == argv and p["seeds"] == [0, 1] and p["threads"] == 1
    assert p["started"] == "1970-01-01T00:00:00+00:00" and p["written"].endswith("+00:00")
    assert "hostname" not in p and "seeds" not in provenance(argv)
    assert p["torch"] == torch.__version__


def test_provenance_line():
    p = {
        "commit": "abc1234def",
        "dirty": True,
        "cpu": "AMD EPYC 9654",
        "cuda_device": None,
        "torch": "2.5.0",
        "threads": 1,
        "command": ["quality.py", "--sets", "a b"],
    }
    assert provenance_line(p) == (
        "commit abc1234 (dirty), AMD EPYC 9654, torch 2.5.0, 1 thread, "
        "command: quality.py --sets 'a b'"
    )
    p.update(commit=None, dirty=None, threads=2, cuda_device="NVIDIA H100")
    assert provenance_line(p).startswith(
        "commit unknown (not a git checkout), AMD EPYC 9654, NVIDIA H100, torch 2.5.0, 2 threads,"
    )


def test_set_stats_json_holds_the_provenance(tmp_path, capsys):
    import json

    import numpy as np
    import set_stats  # projects/benchmarks, on pytest's pythonpath

    from conftest import dl_row, write_dl_info, write_slice

    root = str(tmp_path / "set")
    write_dl_info(root, [dl_row(split=3)])
    write_slice(root, "000001_01_01", 5, np.full((64, 64), -100))
    argv = [root, "--splits", "test", "--json", str(tmp_path / "stats.json")]
    results = set_stats.main(argv)
    written = json.loads((tmp_path / "stats.json").read_text(encoding="utf-8"))
    assert written.pop("provenance")["command"] == [set_stats.__file__, *argv]
    assert written == json.loads(json.dumps(results)) and written[root]["test"]["lesions"] == 1


def test_bench_json_and_md_carry_the_provenance(tmp_path, monkeypatch):
    """run_all.py (`make bench`) with the timings replaced: bench.json holds the provenance and
    bench.md ends with its line."""
    import json

    import run_all  # projects/benchmarks

    monkeypatch.setattr(run_all.ms, "measure", lambda *a, **k: {"FPN": {}})
    monkeypatch.setattr(run_all.ms, "format_table", lambda cpu, gpu: "| table |")
    monkeypatch.setattr(run_all.ms, "format_stages", lambda res, device: "| stages |")
    monkeypatch.setattr(run_all.data_loader, "main", lambda argv: 12.5)
    monkeypatch.setattr(run_all.froc_speed, "main", lambda argv: {"iou": 0.1, "iobb": 0.2})
    argv = ["--quick", "--threads", "1", "--no-gpu", "--output", str(tmp_path)]
    out = run_all.main(argv)
    bench = json.loads((tmp_path / "bench.json").read_text(encoding="utf-8"))
    assert bench["provenance"]["command"] == [run_all.__file__, *argv]
    assert bench["provenance"]["threads"] == 1 and bench["loader_records_per_s"] == 12.5
    assert out["provenance"] == bench["provenance"]
    md = (tmp_path / "bench.md").read_text(encoding="utf-8").splitlines()
    assert md[-1] == provenance_line(bench["provenance"]) and md[-3].startswith("Total benchmark")
