"""Files and folders that appear complete or not at all, and a lock for concurrent writers.

A reader never sees a half-written file: everything is written under a temporary name unique to
the writing process and renamed into place (``os.replace`` is atomic on one file system). A
generated folder carries a completion marker (:data:`MARKER`) holding what was generated; a
folder without one is treated as absent and regenerated.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
from typing import Any, Callable, Dict, Iterator, Optional

__all__ = [
    "MARKER",
    "tmp_name",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "file_lock",
    "read_marker",
    "build_dir_atomically",
    "remove_stale_tmp",
    "tmp_target",
]

MARKER = ".complete.json"
_TMP_TAG = ".tmp-"
# What tmp_name makes: "." + target + ".tmp-" + host + "-" + pid + "-" + monotonic ns.
_TMP_RE = re.compile(r"\.(?P<target>.+?)\.tmp-(?P<host>[^/]*)-(?P<pid>[0-9]+)-(?P<ns>[0-9]+)")


def tmp_name(path: str) -> str:
    """A sibling of ``path`` no other process uses (host + pid + clock in the name)."""
    head, tail = os.path.split(os.path.abspath(path))
    return os.path.join(
        head, f".{tail}{_TMP_TAG}{socket.gethostname()}-{os.getpid()}-{time.monotonic_ns()}"
    )


def tmp_target(entry: str) -> Optional[str]:
    """The name ``entry`` is a temporary sibling of, when :func:`tmp_name` made it, else None.
    Only this exact pattern counts: a user's ``.notes.tmp-old`` is not ours to delete."""
    m = _TMP_RE.fullmatch(entry)
    return m.group("target") if m else None


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename; fsync'd, so a crash
    leaves the old file or the new one."""
    tmp = tmp_name(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any, indent: Optional[int] = None) -> None:
    atomic_write_text(path, json.dumps(obj, indent=indent))


@contextlib.contextmanager
def file_lock(path: str, timeout_s: float = 3600.0) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` (created if missing) for the ``with`` block; waits
    up to ``timeout_s`` for another holder (the kernel drops a dead holder's lock)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{path}: still locked by another process after {timeout_s:g} s"
                    ) from e
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)  # releases the lock


def read_marker(folder: str) -> Optional[Dict]:
    """The completion marker of a generated folder, or None when the folder is incomplete."""
    try:
        with open(os.path.join(folder, MARKER), encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def remove_stale_tmp(parent: str, name: str) -> None:
    """Remove the temporary siblings of ``parent/name`` a killed writer left (call under the
    lock): entries named as :func:`tmp_name` names them, nothing else."""
    with contextlib.suppress(FileNotFoundError):
        for entry in os.listdir(parent):
            if tmp_target(entry) == name:
                path = os.path.join(parent, entry)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(OSError):
                        os.remove(path)


def build_dir_atomically(
    out_dir: str, build: Callable[[str], Dict], marker: Optional[Dict]
) -> Dict:
    """Run ``build(tmp_dir)`` in a fresh temporary folder, write the completion marker
    (``marker`` + what ``build`` returned under "result"; None: ``build`` writes its own), then
    put the folder at ``out_dir``, replacing an older one. Interrupted, it leaves ``out_dir`` as it
    was. Returns build's result."""
    out_dir = os.path.abspath(out_dir)
    tmp = tmp_name(out_dir)
    os.makedirs(tmp)
    try:
        result = build(tmp)
        if marker is not None:
            atomic_write_json(os.path.join(tmp, MARKER), dict(marker, result=result), indent=1)
        old = None
        if os.path.lexists(out_dir):
            old = tmp_name(out_dir)
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return result
