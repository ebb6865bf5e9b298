"""Compatibility re-exports: the code lives in ``elixir_d2.launch``, ``elixir_d2.trainer`` and
``elixir_d2.checkpoint``; import from those."""
from .checkpoint import AtomicCheckpointer
from .launch import launch
from .trainer import (
    ElixirTrainer,
    build_lesion_evaluator,
    create_ddp_model,
    evaluate_with_proposal_recall,
)

__all__ = ["launch", "AtomicCheckpointer", "ElixirTrainer", "build_lesion_evaluator",
           "create_ddp_model", "evaluate_with_proposal_recall"]
