"""One ``.pth`` checkpoint read without running code.

``torch.load(weights_only=True)`` behind a check that the file is a torch.save archive; every
failure is a :class:`CheckpointError` naming the file. It sits below both the checkpointer
(``elixir_d2.checkpoint``) and the genotype's binding to config and checkpoints
(``elixir_d2/modeling/genotype_source.py``, which reads the genotype a checkpoint stores), so
neither of the two calls the other to read a file.
"""

from __future__ import annotations

import pickle
from typing import Any, Dict

import torch

from .cli import UserInputError, escape_name

__all__ = ["CheckpointError", "load_pth"]


class CheckpointError(UserInputError, ValueError):
    """A weights file that cannot be loaded into this model: unreadable, unsafe, or trained with
    another ALB genotype."""


def _torch_file_head(filename: str, path_manager=None) -> None:
    """Refuse a file that is neither a zip archive (torch.save's format) nor a pickle (its legacy
    format) before torch.load sees it: on text, torch's legacy loader fails with an IndexError or
    KeyError that names nothing."""
    try:
        opener = path_manager.open if path_manager is not None else open
        with opener(filename, "rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(
            f"Checkpoint {escape_name(filename)} cannot be read ({e.strerror or e})"
        ) from e
    if not (head.startswith(b"PK") or head.startswith(b"\x80")):
        raise CheckpointError(
            f"Checkpoint {escape_name(filename)} is not a torch.save file (it "
            f"starts with {head!r}); give a checkpoint written by train_net.py"
        )


def load_pth(filename: str, path_manager=None) -> Dict[str, Any]:
    """The dict a ``.pth`` file holds, loaded on the CPU with ``weights_only=True`` (through
    ``path_manager`` when given, else memory-mapped from the local file)."""
    _torch_file_head(filename, path_manager)
    try:
        if path_manager is None:
            loaded = torch.load(filename, map_location="cpu", weights_only=True, mmap=True)
        else:
            with path_manager.open(filename, "rb") as f:
                loaded = torch.load(f, map_location=torch.device("cpu"), weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"Checkpoint {filename} holds more than tensors and plain "
            "containers; torch.load(weights_only=True) refused it "
            f"({first})"
        ) from e
    # truncated / not a torch file (the legacy loader fails on garbage with Index / Key errors)
    except (RuntimeError, EOFError, ValueError, IndexError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"Checkpoint {filename} is unreadable (truncated or not a torch.save file): {first}"
        ) from e
    if not isinstance(loaded, dict):
        raise CheckpointError(
            f"Checkpoint {filename} holds a {type(loaded).__name__}, not a state dict"
        )
    return loaded
