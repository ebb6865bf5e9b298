"""Where the fixed ALB head's genotype comes from, and where a run binds it: config and checkpoints.

The structure of an ``ALBHead`` is not in its weights (``blocks.i.ops.k.*`` names encode neither
the op nor its input, and some ops share shapes), so a genotype travels with everything a run
leaves behind:

- ``MODEL.ALB.GENOTYPE``: the YAML file (``configs/genotypes/figure3.yaml`` by default, a hand-made
  reading of the paper's Figure 3, or a ``genotype.yaml`` written by ``search_net.py``);
- ``MODEL.ALB.GENOTYPE_YAML``: the resolved genotype as one line of YAML, filled in by
  :func:`resolve_genotype_config` before ``config.yaml`` is written, so a run's config names the
  structure it trained even if the file changes later;
- every checkpoint (:data:`GENOTYPE_KEY`, written and checked on load by
  ``elixir_d2.checkpoint`` through :func:`genotype_checkpoint_entry` and
  :func:`check_checkpoint_genotype`).

A genotype file may hold a ``provenance`` mapping (``searched``: bool, and for searches the config,
data, epochs and date), which is logged when the head is built.

Layering: the genotype's own forms (type, validation, dict, YAML text and files) are
``alb/genotype.py``'s; this module calls down into it and into ``elixir_d2.checkpoint_file`` (to
read a ``.pth``), and is called by the commands, the box head and the checkpointer, none of which
it calls. So a run's config reaches its genotype through each module once.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple

from torch import nn

from detectron2.utils.file_io import PathManager

from ..checkpoint_file import CheckpointError, load_pth
from ..cli import MissingFileError, UserInputError
from .alb.genotype import (
    Genotype,
    GenotypeError,
    describe_provenance,
    genotype_from_dict,
    genotype_from_yaml,
    genotype_to_yaml,
    read_genotype_file,
)

__all__ = [
    "GENOTYPE_KEY",
    "alb_genotype_of",
    "check_checkpoint_genotype",
    "fill_genotype_from_checkpoint",
    "genotype_checkpoint_entry",
    "genotype_from_config",
    "load_genotype_file",
    "resolve_genotype_config",
    "resolve_genotype_path",
    "uses_fixed_alb_head",
]

# Under detectron2's logger: train_net's default_setup sends it to the console and log.txt.
logger = logging.getLogger("detectron2.elixir_d2.genotype")

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GENOTYPE_KEY = "alb_genotype"  # checkpoint entry: the fixed ALB head's genotype as a plain dict


# ------------------------------------------------------------------------------------- config
def uses_fixed_alb_head(cfg) -> bool:
    """Whether ``cfg`` builds an ``ALBHead`` (the head that needs a genotype)."""
    return cfg.MODEL.ROI_BOX_HEAD.NAME == "ALBHead"


def resolve_genotype_path(path: str) -> str:
    """``path`` as given if it exists; a relative path missing from the working directory is
    looked up from the repository root (configs name ``configs/genotypes/...``)."""
    if not path or PathManager.exists(path) or os.path.isabs(path) or "://" in path:
        return path
    in_repo = os.path.join(os.path.dirname(_PACKAGE_DIR), path)
    return in_repo if PathManager.exists(in_repo) else path


def load_genotype_file(path: str) -> Tuple[Genotype, Dict[str, Any]]:
    """(genotype, provenance) of the genotype YAML MODEL.ALB.GENOTYPE names; provenance is {}
    when the file has none. A missing file is a :class:`MissingFileError` naming it and the key."""
    resolved = resolve_genotype_path(path)
    if not resolved:
        raise GenotypeError("No genotype file given (MODEL.ALB.GENOTYPE is empty)")
    if "://" not in resolved and not os.path.isfile(resolved):
        raise MissingFileError(
            f"MODEL.ALB.GENOTYPE: genotype file {path} not found; give a genotype YAML written by "
            "search_net.py or configs/genotypes/figure3.yaml"
        )
    return read_genotype_file(resolved, source=path)


def genotype_from_config(cfg) -> Genotype:
    """The genotype an ``ALBHead`` is built from, logged with where it came from.

    ``MODEL.ALB.GENOTYPE_YAML`` when set (a run's config.yaml, a checkpoint's genotype), checked
    against ``MODEL.ALB.GENOTYPE`` when that names a file too; else the file."""
    path, text = cfg.MODEL.ALB.GENOTYPE, cfg.MODEL.ALB.GENOTYPE_YAML
    if text:
        genotype = genotype_from_yaml(text, "MODEL.ALB.GENOTYPE_YAML")
        if path:
            from_file, _ = load_genotype_file(path)
            _check_same(from_file, genotype, path)
        logger.info(
            "ALB head genotype: from MODEL.ALB.GENOTYPE_YAML%s", f" (file {path})" if path else ""
        )
        return genotype
    genotype, provenance = load_genotype_file(path)
    logger.info("ALB head genotype: from %s, %s", path, describe_provenance(provenance))
    return genotype


def _check_same(from_file: Genotype, from_text: Genotype, path: str) -> None:
    if from_file != from_text:
        raise UserInputError(
            f"MODEL.ALB.GENOTYPE_YAML ({genotype_to_yaml(from_text)}) differs from the genotype in "
            f"MODEL.ALB.GENOTYPE {path} ({genotype_to_yaml(from_file)}); the file changed since "
            "the run was configured: clear one of the two keys"
        )


def resolve_genotype_config(cfg, checkpoint: Optional[str] = None) -> Optional[Genotype]:
    """Fill ``MODEL.ALB.GENOTYPE_YAML`` of an unfrozen ``cfg`` (for a fixed ALB head) so
    ``config.yaml`` records the structure; returns the genotype or None.

    ``checkpoint``: the weights to take the genotype from when the config names none (evaluation,
    prediction; see :func:`fill_genotype_from_checkpoint`); None for training, which never does."""
    if not uses_fixed_alb_head(cfg):
        return None
    if checkpoint is not None:
        fill_genotype_from_checkpoint(cfg, checkpoint)
    if not (cfg.MODEL.ALB.GENOTYPE or cfg.MODEL.ALB.GENOTYPE_YAML):
        return None
    genotype = genotype_from_config(cfg)
    cfg.MODEL.ALB.GENOTYPE_YAML = genotype_to_yaml(genotype)
    return genotype


# -------------------------------------------------------------------------------- checkpoints
def alb_genotype_of(model: nn.Module) -> Optional[Genotype]:
    """The genotype of ``model``'s fixed ALB head (DDP unwrapped), or None without one."""
    for module in getattr(model, "module", model).modules():
        genotype = getattr(module, "genotype", None)
        if isinstance(genotype, Genotype):
            return genotype
    return None


def genotype_checkpoint_entry(model: nn.Module) -> Dict[str, Any]:
    """What a checkpoint of ``model`` stores of its genotype: ``{GENOTYPE_KEY: dict}``, or {}
    for a model without a fixed ALB head."""
    genotype = alb_genotype_of(model)
    return {} if genotype is None else {GENOTYPE_KEY: genotype.to_dict()}


def _checkpoint_genotype(entry: Any, path: str) -> Genotype:
    try:
        return genotype_from_dict(entry, source=f"{path} ({GENOTYPE_KEY})")
    except GenotypeError as e:
        raise CheckpointError(str(e)) from e


def check_checkpoint_genotype(checkpoint: Dict[str, Any], model: nn.Module, path: str) -> None:
    """Refuse loading ``checkpoint`` (read from ``path``) into ``model`` when both have a genotype
    and the two differ: :class:`CheckpointError` naming the file and both genotypes."""
    entry = checkpoint.get(GENOTYPE_KEY)
    ours = alb_genotype_of(model)
    if entry is None or ours is None:
        return
    theirs = _checkpoint_genotype(entry, path)
    if theirs != ours:
        raise CheckpointError(
            f"Checkpoint {path} was trained with ALB genotype {genotype_to_yaml(theirs)} but "
            f"the config builds {genotype_to_yaml(ours)} (MODEL.ALB.GENOTYPE / GENOTYPE_YAML); "
            "set MODEL.ALB.GENOTYPE to the file the checkpoint was trained with, or to '' (and "
            "MODEL.ALB.GENOTYPE_YAML '') to take the checkpoint's"
        )


def fill_genotype_from_checkpoint(cfg, weights: str) -> bool:
    """For evaluation / prediction: when ``cfg`` (unfrozen) builds a fixed ALB head but names no
    genotype, set MODEL.ALB.GENOTYPE_YAML to the one stored in ``weights``. Returns whether it
    did."""
    if not uses_fixed_alb_head(cfg) or cfg.MODEL.ALB.GENOTYPE or cfg.MODEL.ALB.GENOTYPE_YAML:
        return False
    hint = "pass MODEL.ALB.GENOTYPE <the genotype.yaml the model was trained with>"
    if not weights or "://" in weights or weights.endswith(".pkl"):
        raise UserInputError(
            f"MODEL.ALB.GENOTYPE is empty and the weights ({weights or 'none'}) "
            f"hold no genotype: {hint}"
        )
    if not os.path.isfile(weights):
        raise MissingFileError(f"weights file {weights} not found (MODEL.WEIGHTS / --weights)")
    entry = load_pth(weights).get(GENOTYPE_KEY)
    if entry is None:
        raise UserInputError(
            f"MODEL.ALB.GENOTYPE is empty and checkpoint {weights} holds no "
            f"genotype (written before checkpoints stored it): {hint}"
        )
    cfg.MODEL.ALB.GENOTYPE_YAML = genotype_to_yaml(_checkpoint_genotype(entry, weights))
    return True
