"""The code of the entry scripts train_net.py (``commands.train``) and search_net.py
(``commands.search``), importable by projects/ and the tests; the scripts only call ``cli``."""

from __future__ import annotations

import argparse
from typing import Any, Callable, Optional, Sequence

from ..launch import launch

__all__ = ["run_command"]


def run_command(
    parser: argparse.ArgumentParser,
    check_inputs: Callable[[argparse.Namespace], Any],
    main: Callable[[argparse.Namespace], Any],
    argv: Optional[Sequence[str]] = None,
) -> None:
    """Parse ``argv``, check the inputs in this process (one-line errors, exit code 2), then run
    ``main(args)`` under the launcher (--num-gpus processes a machine, --num-machines,
    --dist-url)."""
    args = parser.parse_args(argv)
    print("Command Line Args:", args)
    check_inputs(args)
    launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )
