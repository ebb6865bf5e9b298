"""What produced a result file: the code's git commit, the command, the software and the machine.

Benchmark and recipe scripts put ``provenance(...)`` in the JSON they write (docs/evaluation.md,
"Provenance of results"); ``provenance_line`` is its one-line form for Markdown.
"""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import subprocess
import sys
from typing import Any, Dict, List, Optional, Sequence

import torch

__all__ = ["code_state", "cpu_model", "git_commit", "provenance", "provenance_line"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # elixir_d2/..


def _git(root: str, *args: str) -> Optional[str]:
    """``git args`` run in ``root``: its stdout, or None (no git binary, not a repository, slow)."""
    try:
        p = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return p.stdout if p.returncode == 0 else None


def git_commit(root: str = REPO_ROOT) -> Optional[str]:
    """HEAD of the repository whose top level is ``root``; None elsewhere (an installed copy
    inside some other checkout is not that checkout's code)."""
    out = _git(root, "rev-parse", "--show-toplevel", "HEAD")
    lines = out.splitlines() if out else []
    if len(lines) != 2 or os.path.realpath(lines[0]) != os.path.realpath(root):
        return None
    return lines[1]


def code_state(root: str = REPO_ROOT) -> Dict[str, Any]:
    """``commit`` (None outside a git checkout) and ``dirty`` (tracked files changed; None when
    unknown) of ``root`` now. A long run takes it when it starts and passes it to
    ``provenance(code=...)``: files edited while it runs are not the code it ran."""
    commit = git_commit(root)
    status = _git(root, "status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status.strip())}


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> Optional[str]:
    """The CPU's model name with its x86 family and model numbers, e.g. "AMD EPYC (family 26
    model 2)", from Linux's ``cpuinfo`` (first processor); else platform.processor(), else None.
    Virtual machines often name only the vendor line ("AMD EPYC"), and bfloat16/float32 training
    runs differ between microarchitectures of one name, so the numbers tell them apart."""
    fields: Dict[str, str] = {}
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    break  # the first processor's block ends at its blank line
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or None
    if name and fields.get("cpu family") and fields.get("model"):
        name += f" (family {fields['cpu family']} model {fields['model']})"
    return name


def _utc(t: Optional[float] = None) -> str:
    """``t`` (a time.time() value; default now) as an ISO 8601 UTC timestamp."""
    tz = datetime.timezone.utc
    when = datetime.datetime.now(tz) if t is None else datetime.datetime.fromtimestamp(t, tz)
    return when.isoformat(timespec="seconds")


def provenance(
    argv: Optional[Sequence[str]] = None,
    seeds: Optional[Sequence[int]] = None,
    started: Optional[float] = None,
    root: str = REPO_ROOT,
    code: Optional[Dict[str, Any]] = None,
) -> Dict[str, Any]:
    """The provenance block: ``commit`` and ``dirty`` (``code``, a ``code_state`` taken when the
    run started; default ``code_state(root)`` now), ``command`` (``argv``, default sys.argv),
    software versions, CPU, torch threads, CUDA device, ``written`` (now, UTC) and, when given,
    ``started`` (a time.time() value) and ``seeds``."""
    state = code_state(root) if code is None else code
    try:
        from detectron2 import __version__ as d2_version
    except ImportError:
        d2_version = None
    get_capability = getattr(torch.backends.cpu, "get_cpu_capability", None)
    out: Dict[str, Any] = {
        "commit": state["commit"],
        "dirty": state["dirty"],
        "command": list(sys.argv if argv is None else argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "detectron2": d2_version,
        "cpu": cpu_model(),
        "cpu_capability": get_capability() if get_capability else None,
        "threads": torch.get_num_threads(),
        "cuda_device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    if started is not None:
        out["started"] = _utc(started)
    out["written"] = _utc()
    if seeds is not None:
        out["seeds"] = list(seeds)
    return out


def provenance_line(p: Dict[str, Any]) -> str:
    """One line for a Markdown footer: commit abc1234 (dirty), CPU, torch, threads, command."""
    commit = "commit " + (p["commit"][:7] if p.get("commit") else "unknown (not a git checkout)")
    if p.get("dirty"):
        commit += " (dirty)"
    parts: List[str] = [commit, p.get("cpu") or "unknown CPU"]
    if p.get("cuda_device"):
        parts.append(p["cuda_device"])
    threads = p.get("threads")
    parts += [f"torch {p.get('torch')}", f"{threads} thread{'' if threads == 1 else 's'}"]
    return ", ".join(parts) + ", command: " + shlex.join(str(a) for a in p.get("command", []))
