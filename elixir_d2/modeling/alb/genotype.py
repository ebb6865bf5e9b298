"""Genotype of the Auto-lesion Blocks: the discrete architecture of ALB and ALB_r.

A block has ``branches`` (B) branches; branch ``b`` sums two ops, each applied to one earlier
node. A genotype lists, per block type, ``2 * B`` pairs ``(op, input_index)``: pairs ``2b`` and
``2b + 1`` belong to branch ``b``. Input index convention (as in DARTS):

* ``0`` = output of the block before the previous one, ``1`` = output of the previous block
  (the first block gets the stem output as both),
* ``2 + j`` = output of branch ``j`` of the same block, so branch ``b`` may use ``0 .. b + 1``.

YAML form (read with ``yaml.safe_load``)::

    space: elixir          # registered search space of the op names ("elixir", "darts", ...)
    branches: 4
    normal: [[dil_conv_3x3_r2, 0], [region_nonlocal, 1], ...]   # 8 pairs, ALB
    reduce: [[avg_pool_3x3, 0], [dw_conv_7x7, 1], ...]          # 8 pairs, ALB_r
    provenance: {searched: true, config: ..., data: ..., epochs: 50, date: ...}  # optional

This module owns the genotype: its type, validation and every form it is read from or written to
(a dict, one line of YAML, a YAML file with provenance). Where a run's genotype comes from (config
keys, checkpoints) is ``elixir_d2/modeling/genotype_source.py``, one layer up; this module imports
nothing of elixir_d2 but the op names of ``spaces.py``.
"""

from dataclasses import dataclass
from math import comb
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import yaml

from detectron2.utils.file_io import PathManager

from .spaces import get_search_space, search_space_names

__all__ = [
    "Genotype",
    "GenotypeError",
    "num_edges",
    "edge_inputs",
    "count_structures",
    "genotype_from_dict",
    "genotype_from_yaml",
    "genotype_to_yaml",
    "read_genotype_file",
    "load_genotype",
    "save_genotype",
    "describe_provenance",
    "derive_genotype",
]

Pair = Tuple[str, int]


class GenotypeError(ValueError):
    """A genotype (file or dict) that does not describe a valid ALB / ALB_r."""


@dataclass(frozen=True)
class Genotype:
    """Discrete ALB (``normal``) and ALB_r (``reduce``) structures; see the module docstring."""

    normal: Tuple[Pair, ...]
    reduce: Tuple[Pair, ...]
    space: str = "elixir"
    branches: int = 4

    def __post_init__(self):
        # Normalise lists (e.g. from YAML) to tuples so genotypes compare and hash by value.
        object.__setattr__(self, "normal", tuple(tuple(p) for p in self.normal))
        object.__setattr__(self, "reduce", tuple(tuple(p) for p in self.reduce))

    def pairs(self, block_type: str) -> Tuple[Pair, ...]:
        """The ``(op, input_index)`` pairs of ``block_type`` ("normal" or "reduce")."""
        if block_type not in ("normal", "reduce"):
            raise ValueError(f"block type must be 'normal' or 'reduce', got {block_type!r}")
        return self.normal if block_type == "normal" else self.reduce

    def validate(self, source: str = "<genotype>") -> "Genotype":
        """Raise :class:`GenotypeError` naming ``source`` and the bad entry; return self if fine."""
        if not isinstance(self.space, str):  # e.g. a YAML list: not even a search-space name
            raise GenotypeError(
                f"{source}: 'space' must be the name of a registered search "
                f"space ({search_space_names()}), got {self.space!r}"
            )
        try:
            ops = get_search_space(self.space)
        except ValueError:
            raise GenotypeError(
                f"{source}: unknown search space {self.space!r}; registered: "
                f"{search_space_names()} (add one with register_search_space)"
            ) from None
        b = self.branches
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise GenotypeError(f"{source}: 'branches' must be a positive int, got {b!r}")
        for block_type in ("normal", "reduce"):
            pairs = self.pairs(block_type)
            if len(pairs) != 2 * self.branches:
                raise GenotypeError(
                    f"{source}: '{block_type}' has {len(pairs)} (op, input) pairs; "
                    f"{self.branches} branches need {2 * self.branches} (2 per branch)"
                )
            for k, (op, idx) in enumerate(pairs):
                where = f"{source}: {block_type}[{k}] = [{op}, {idx}] (branch {k // 2})"
                if op not in ops or op == "none":
                    allowed = [o for o in ops if o != "none"]
                    raise GenotypeError(
                        f"{where}: unknown op {op!r} for space {self.space!r}; allowed: {allowed}"
                    )
                top = k // 2 + 2  # branch b sees the 2 block inputs and branches 0..b-1
                if isinstance(idx, bool) or not isinstance(idx, int) or not 0 <= idx < top:
                    raise GenotypeError(
                        f"{where}: input index {idx!r} does not exist; valid: 0..{top - 1} "
                        "(0, 1 = block inputs, 2.. = earlier branches of the block)"
                    )
        return self

    def to_dict(self) -> Dict[str, Any]:
        """Plain dict, as written to YAML."""
        return {
            "space": self.space,
            "branches": self.branches,
            "normal": [[o, i] for o, i in self.normal],
            "reduce": [[o, i] for o, i in self.reduce],
        }


def num_edges(branches: int) -> int:
    """Edges of a searchable block: branch b has 2 + b candidate inputs (14 for B = 4)."""
    return sum(2 + b for b in range(branches))


def edge_inputs(branches: int) -> List[Tuple[int, int]]:
    """``(branch, input_index)`` of each edge of a searchable block, in alpha row order."""
    return [(b, j) for b in range(branches) for j in range(2 + b)]


def count_structures(num_ops: int, branches: int) -> int:
    """Number of discrete blocks: choices of 2 inputs per branch x ``num_ops`` ops per pair."""
    inputs = 1
    for b in range(branches):
        inputs *= comb(2 + b, 2)
    return inputs * num_ops ** (2 * branches)


def _pairs_from_yaml(value: Any, key: str, source: str) -> List[Pair]:
    if not isinstance(value, (list, tuple)):
        raise GenotypeError(f"{source}: '{key}' must be a list of [op, input_index] pairs")
    pairs = []
    for k, item in enumerate(value):
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise GenotypeError(f"{source}: {key}[{k}] = {item!r} is not an [op, input_index] pair")
        op, idx = item
        if not isinstance(op, str):
            raise GenotypeError(f"{source}: {key}[{k}] = {item!r}: op must be a string")
        pairs.append((op, idx))
    return pairs


def genotype_from_dict(data: Any, source: str = "<genotype>") -> Genotype:
    """Build and validate a :class:`Genotype` from the YAML mapping ``data``."""
    if not isinstance(data, dict):
        raise GenotypeError(f"{source}: a genotype must be a mapping, got {type(data).__name__}")
    # "provenance" (who wrote the file, see save_genotype) is not structure.
    unknown = set(data) - {"space", "branches", "normal", "reduce", "provenance"}
    if unknown:
        # keys of any type
        raise GenotypeError(f"{source}: unknown keys {sorted(unknown, key=repr)}")
    for key in ("normal", "reduce"):
        if key not in data:
            raise GenotypeError(f"{source}: missing key '{key}'")
    genotype = Genotype(
        normal=tuple(_pairs_from_yaml(data["normal"], "normal", source)),
        reduce=tuple(_pairs_from_yaml(data["reduce"], "reduce", source)),
        space=data.get("space", "elixir"),
        branches=data.get("branches", 4),
    )
    return genotype.validate(source)


def genotype_to_yaml(genotype: Genotype) -> str:
    """The genotype as one line of flow-style YAML (the form of MODEL.ALB.GENOTYPE_YAML)."""
    return yaml.safe_dump(
        genotype.to_dict(), default_flow_style=True, width=float("inf"), sort_keys=False
    ).strip()


def genotype_from_yaml(text: str, source: str = "<genotype>") -> Genotype:
    """Parse and validate the YAML ``text`` of a genotype; errors name ``source``."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise GenotypeError(f"{source}: not valid YAML: {e}") from e
    return genotype_from_dict(data, source=source)


def read_genotype_file(path: str, source: Optional[str] = None) -> Tuple[Genotype, Dict[str, Any]]:
    """(genotype, provenance) of the YAML file ``path`` (any PathManager path); provenance is {}
    when the file has none. Errors name ``source`` (default: ``path``)."""
    source = source or path
    with PathManager.open(path, "r", encoding="utf-8") as f:
        try:
            data = yaml.safe_load(f)
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise GenotypeError(f"{source}: not valid YAML: {e}") from e
    provenance = data.pop("provenance", None) if isinstance(data, dict) else None
    if provenance is not None and not isinstance(provenance, dict):
        raise GenotypeError(f"{source}: 'provenance' must be a mapping, got {provenance!r}")
    return genotype_from_dict(data, source=source), provenance or {}


def load_genotype(path: str) -> Genotype:
    """Read and validate a genotype YAML file (any PathManager path)."""
    if not path:
        raise GenotypeError("No genotype file given (MODEL.ALB.GENOTYPE is empty)")
    return read_genotype_file(path)[0]


def save_genotype(
    genotype: Genotype,
    path: str,
    comment: Optional[str] = "",
    provenance: Optional[Dict[str, Any]] = None,
) -> None:
    """Write ``genotype`` as YAML to ``path``: ``comment`` lines (e.g. the command line) on top,
    then the structure and a ``provenance`` mapping (what :func:`describe_provenance` reads)."""
    genotype.validate(path)
    header = "".join(f"# {line}\n" for line in comment.splitlines()) if comment else ""
    data = genotype.to_dict()
    if provenance:
        data["provenance"] = dict(provenance)
    body = yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    with PathManager.open(path, "w", encoding="utf-8") as f:
        f.write(header + body)


def describe_provenance(provenance: Dict[str, Any]) -> str:
    """ "searched (config ..., data ..., N epochs, date)" / "not searched (...)" / "unknown"."""
    if "searched" not in provenance:
        return "provenance unknown (the file has no 'provenance' entry)"
    details = ", ".join(f"{k} {v}" for k, v in provenance.items() if k != "searched")
    word = "searched" if provenance["searched"] else "not searched"
    return f"{word} ({details})" if details else word


def _as_numpy(alpha: Any) -> np.ndarray:
    # Duck-typed so that this module needs no torch: a tensor (e.g. a Parameter) has detach().
    if hasattr(alpha, "detach"):
        alpha = alpha.detach().cpu().numpy()
    return np.asarray(alpha, dtype=np.float64)


def _derive_pairs(alpha: Any, ops: Sequence[str], branches: int, name: str) -> List[Pair]:
    a = _as_numpy(alpha)
    if a.shape != (num_edges(branches), len(ops)):
        raise ValueError(
            f"alpha_{name} has shape {a.shape}; {branches} branches and {len(ops)} ops need "
            f"{(num_edges(branches), len(ops))}"
        )
    # Rank by softmax weights (DARTS): raw alphas of different edges are not comparable.
    w = np.exp(a - a.max(axis=1, keepdims=True))
    w /= w.sum(axis=1, keepdims=True)
    real = [k for k, o in enumerate(ops) if o != "none"]  # `none` is never chosen
    pairs: List[Pair] = []
    start = 0
    for b in range(branches):
        rows = w[start : start + 2 + b][:, real]
        strength = rows.max(axis=1)
        # Stable sort: on ties the lower input index wins, so the result is deterministic.
        keep = sorted(np.argsort(-strength, kind="stable")[:2].tolist())
        for j in keep:
            pairs.append((ops[real[int(np.argmax(rows[j]))]], int(j)))
        start += 2 + b
    return pairs


def derive_genotype(
    alpha_normal: Any, alpha_reduce: Any, space: str = "elixir", branches: int = 4
) -> Genotype:
    """Discretise searched alphas (``num_edges x num_ops`` each, ops in ``space`` order).

    Per branch, keep the 2 inputs whose strongest non-``none`` op has the largest softmax weight;
    on each kept edge take the argmax non-``none`` op.
    """
    ops = get_search_space(space)
    return Genotype(
        normal=tuple(_derive_pairs(alpha_normal, ops, branches, "normal")),
        reduce=tuple(_derive_pairs(alpha_reduce, ops, branches, "reduce")),
        space=space,
        branches=branches,
    ).validate("derived genotype")
