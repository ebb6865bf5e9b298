"""Where the fixed ALB head's genotype comes from, and what a run records of it.

The structure of an ``ALBHead`` is not in its weights (``blocks.i.ops.k.*`` names encode neither
the op nor its input, and some ops share shapes), so a genotype travels with everything a run
leaves behind:

- ``MODEL.ALB.GENOTYPE``: the YAML file (``configs/genotypes/figure3.yaml`` by default, a hand-made
  reading of the paper's Figure 3, or a ``genotype.yaml`` written by ``search_net.py``);
- ``MODEL.ALB.GENOTYPE_YAML``: the resolved genotype as one line of YAML, filled in by
  :func:`resolve_genotype_config` before ``config.yaml`` is written, so a run's config names the
  structure it trained even if the file changes later;
- every checkpoint (``alb_genotype``, see ``elixir_d2.checkpoint``).

A genotype file may hold a ``provenance`` mapping (``searched``: bool, and for searches the config,
data, epochs and date), which is logged when the head is built.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Dict, Optional, Tuple

import yaml

from detectron2.utils.file_io import PathManager

from .alb.genotype import Genotype, GenotypeError, genotype_from_dict

__all__ = [
    "genotype_from_config",
    "genotype_to_yaml",
    "load_genotype_file",
    "resolve_genotype_config",
    "resolve_genotype_path",
    "write_genotype",
    "uses_fixed_alb_head",
]

# Under detectron2's logger: train_net's default_setup sends it to the console and log.txt.
logger = logging.getLogger("detectron2.elixir_d2.genotype")

_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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
    """(genotype, provenance) of a genotype YAML; provenance is {} when the file has none.
    A missing file is a :class:`GenotypeError` naming it and the config key."""
    from ..cli import MissingFileError

    resolved = resolve_genotype_path(path)
    if not resolved:
        raise GenotypeError("No genotype file given (MODEL.ALB.GENOTYPE is empty)")
    if "://" not in resolved and not os.path.isfile(resolved):
        raise MissingFileError(
            f"MODEL.ALB.GENOTYPE: genotype file {path} not found; give a genotype YAML written by "
            "search_net.py or configs/genotypes/figure3.yaml")
    with PathManager.open(resolved, "r", encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise GenotypeError(f"{path}: not valid YAML: {e}") from e
    provenance = data.pop("provenance", None) if isinstance(data, dict) else None
    if provenance is not None and not isinstance(provenance, dict):
        raise GenotypeError(f"{path}: 'provenance' must be a mapping, got {provenance!r}")
    return genotype_from_dict(data, source=path), provenance or {}


def genotype_to_yaml(genotype: Genotype) -> str:
    """The genotype as one line of flow-style YAML (the form of MODEL.ALB.GENOTYPE_YAML)."""
    return yaml.safe_dump(genotype.to_dict(), default_flow_style=True, width=float("inf"),
                          sort_keys=False).strip()


def _from_yaml_text(text: str, source: str) -> Genotype:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise GenotypeError(f"{source}: not valid YAML: {e}") from e
    return genotype_from_dict(data, source=source)


def describe_provenance(provenance: Dict[str, Any]) -> str:
    """"searched (config ..., data ..., N epochs, date)" / "not searched (...)" / "unknown"."""
    if "searched" not in provenance:
        return "provenance unknown (the file has no 'provenance' entry)"
    details = ", ".join(f"{k} {v}" for k, v in provenance.items() if k != "searched")
    word = "searched" if provenance["searched"] else "not searched"
    return f"{word} ({details})" if details else word


def genotype_from_config(cfg) -> Genotype:
    """The genotype an ``ALBHead`` is built from, logged with where it came from.

    ``MODEL.ALB.GENOTYPE_YAML`` when set (a run's config.yaml, a checkpoint's genotype), checked
    against ``MODEL.ALB.GENOTYPE`` when that names a file too; else the file."""
    path, text = cfg.MODEL.ALB.GENOTYPE, cfg.MODEL.ALB.GENOTYPE_YAML
    if text:
        genotype = _from_yaml_text(text, "MODEL.ALB.GENOTYPE_YAML")
        if path:
            from_file, _ = load_genotype_file(path)
            _check_same(from_file, genotype, path)
        logger.info("ALB head genotype: from MODEL.ALB.GENOTYPE_YAML%s",
                    f" (file {path})" if path else "")
        return genotype
    genotype, provenance = load_genotype_file(path)
    logger.info("ALB head genotype: from %s, %s", path, describe_provenance(provenance))
    return genotype


def _check_same(from_file: Genotype, from_text: Genotype, path: str) -> None:
    from ..cli import UserInputError

    if from_file != from_text:
        raise UserInputError(
            f"MODEL.ALB.GENOTYPE_YAML ({genotype_to_yaml(from_text)}) differs from the genotype in "
            f"MODEL.ALB.GENOTYPE {path} ({genotype_to_yaml(from_file)}); the file changed since "
            "the run was configured: clear one of the two keys")


def resolve_genotype_config(cfg) -> Optional[Genotype]:
    """Fill ``MODEL.ALB.GENOTYPE_YAML`` of an unfrozen ``cfg`` from its genotype file (for a fixed
    ALB head), so ``config.yaml`` records the structure; returns the genotype or None."""
    if not uses_fixed_alb_head(cfg) or not (cfg.MODEL.ALB.GENOTYPE or cfg.MODEL.ALB.GENOTYPE_YAML):
        return None
    genotype = genotype_from_config(cfg)
    cfg.MODEL.ALB.GENOTYPE_YAML = genotype_to_yaml(genotype)
    return genotype


def write_genotype(genotype: Genotype, path: str, comment: str = "",
                   provenance: Optional[Dict[str, Any]] = None) -> None:
    """Write ``genotype`` as YAML with ``comment`` lines on top and a ``provenance`` mapping."""
    genotype.validate(path)
    header = "".join(f"# {line}\n" for line in comment.splitlines()) if comment else ""
    data = genotype.to_dict()
    if provenance:
        data["provenance"] = dict(provenance)
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    with PathManager.open(path, "w", encoding="utf-8") as f:
        f.write(header + body)
