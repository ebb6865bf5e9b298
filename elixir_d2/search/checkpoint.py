"""Checkpointer of the ALB search: the project's atomic checkpointer, remembering the last load.

Checkpoints and the ``last_checkpoint`` tag are written whole or not at all (see
``elixir_d2.checkpoint.AtomicCheckpointer``), so a search killed mid-save resumes from the previous
one.
"""

from typing import Any

from ..checkpoint import AtomicCheckpointer

__all__ = ["SearchCheckpointer"]


class SearchCheckpointer(AtomicCheckpointer):
    """AtomicCheckpointer that keeps the incompatible keys of the last model load
    (``last_incompatible``) so the searcher can tell which parts were initialised."""

    last_incompatible = None

    def _load_model(self, checkpoint: Any):
        self.last_incompatible = super()._load_model(checkpoint)
        return self.last_incompatible
