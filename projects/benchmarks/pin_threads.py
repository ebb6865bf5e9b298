"""Pin the BLAS / OpenMP thread pools before numpy or torch is imported (they read these
variables once, at import). Imports nothing heavy, so scripts can call it first thing."""

import os
import sys
from typing import Optional, Sequence

__all__ = ["THREAD_VARS", "pin_threads", "threads_from_argv"]

THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def threads_from_argv(default: int, argv: Optional[Sequence[str]] = None) -> int:
    """The value of ``--threads N`` in ``argv`` (default ``sys.argv``), else ``default``; read
    before argparse runs, because argparse only runs after the imports."""
    argv = list(sys.argv if argv is None else argv)
    for i, arg in enumerate(argv[:-1]):
        if arg == "--threads":
            return int(argv[i + 1])
    return default


def pin_threads(threads: int) -> None:
    """Set every pool variable of :data:`THREAD_VARS` to ``threads``."""
    for var in THREAD_VARS:
        os.environ[var] = str(threads)
