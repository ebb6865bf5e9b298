"""What the ALB search writes: the per-epoch alpha history, the genotype and the heatmap.

``<OUTPUT_DIR>/alphas.json``::

    {"space": "elixir", "branches": 4, "ops": [... op names, column order ...],
     "edges": ["b0<-s0", "b0<-s1", "b1<-s0", ...],  # row order (s = block input, n = branch)
     "epochs": [{"epoch": 1, "iteration": 12,  # iterations done at the epoch's end
                 "normal": [[...], ...],  # softmax(alpha) per edge (rows sum to 1)
                 "reduce": [[...], ...],
                 "genotype": {... derived genotype, as genotype.yaml ...}}, ...]}

``<OUTPUT_DIR>/genotype.yaml`` (usable as MODEL.ALB.GENOTYPE) and ``<OUTPUT_DIR>/alphas.png``
(one heatmap per block type, edges x ops) are written when the search finishes.
"""

import json
import logging
import math
import os
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from ..modeling.alb.genotype import Genotype, edge_inputs, save_genotype

__all__ = [
    "ALPHAS_JSON",
    "ALPHAS_PNG",
    "GENOTYPE_YAML",
    "AlphaRecorder",
    "edge_labels",
    "format_genotype",
    "softmax_alphas",
    "write_search_outputs",
]

logger = logging.getLogger(__name__)

GENOTYPE_YAML = "genotype.yaml"
ALPHAS_JSON = "alphas.json"
ALPHAS_PNG = "alphas.png"


def softmax_alphas(head) -> Dict[str, np.ndarray]:
    """{"normal", "reduce"} -> softmax over ops of the head's alphas (num_edges x num_ops): the
    weights the mixed ops apply."""
    with torch.no_grad():
        return {
            name: F.softmax(alpha.detach().cpu().double(), dim=-1).numpy()
            for name, alpha in zip(("normal", "reduce"), head.arch_parameters())
        }


def edge_entropy(weights: np.ndarray) -> np.ndarray:
    """Entropy (nats) of each edge's op distribution, rows of ``weights`` (edges x ops): ln(#ops)
    for a uniform row, 0 once one op has all the weight."""
    p = np.clip(np.asarray(weights, dtype=np.float64), 1e-12, 1.0)
    return -(p * np.log(p)).sum(axis=1)


def edge_labels(branches: int) -> List[str]:
    """Row names of the alpha matrices: "b<branch><-<input>", inputs s0/s1 (block inputs) and
    n<j> (branch j of the same block)."""
    return [f"b{b}<-" + (f"s{j}" if j < 2 else f"n{j - 2}") for b, j in edge_inputs(branches)]


def format_genotype(genotype: Genotype) -> str:
    """One-line form for logs: per block type, the branches as (op<-input, op<-input)."""
    parts = []
    for kind in ("normal", "reduce"):
        pairs = genotype.pairs(kind)
        branches = [
            f"({pairs[k][0]}<-{pairs[k][1]}, {pairs[k + 1][0]}<-{pairs[k + 1][1]})"
            for k in range(0, len(pairs), 2)
        ]
        parts.append(f"{kind}: " + " ".join(branches))
    return " | ".join(parts)


def _write_text(path: str, text: str) -> None:
    # Local files are replaced whole, so a search killed mid-write keeps the previous version.
    if "://" in path:
        with PathManager.open(path, "w", encoding="utf-8") as f:
            f.write(text)
        return
    with PathManager.open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def _history_json(history: Dict) -> str:
    # Valid JSON with one epoch per line: readable, and diffs show which epochs changed.
    head = json.dumps({k: v for k, v in history.items() if k != "epochs"}, indent=1)
    epochs = ",\n".join("  " + json.dumps(e) for e in history["epochs"])
    return head[:-2] + ',\n "epochs": [\n' + epochs + "\n ]\n}\n"


def write_search_outputs(
    head, output_dir: str, comment: Optional[str] = None, provenance: Optional[Dict] = None
) -> Genotype:
    """Write ``genotype.yaml`` (derived from the head's alphas; ``comment`` lines on top) and
    ``alphas.png`` to ``output_dir``; return the genotype."""
    from ..visualization import draw_alpha_heatmap  # matplotlib only when drawing

    PathManager.mkdirs(output_dir)
    genotype = head.genotype()
    save_genotype(
        genotype,
        os.path.join(output_dir, GENOTYPE_YAML),
        comment=comment or "",
        provenance=provenance,
    )
    draw_alpha_heatmap(
        softmax_alphas(head),
        head.op_names,
        os.path.join(output_dir, ALPHAS_PNG),
        edge_labels=edge_labels(head.branches),
        title=f"ALB search ({head.space} space): softmax(alpha) per edge",
    )
    return genotype


class AlphaRecorder(HookBase):
    """At the end of every epoch: log the derived genotype and append softmax(alpha) to
    alphas.json; when the search completes: write genotype.yaml and alphas.png.

    ``head_fn`` returns the ALBSearchHead (not wrapped in DDP). Only the main process writes;
    every process derives the same genotype since alphas are identical across processes.
    """

    def __init__(
        self,
        head_fn,
        iters_per_epoch: int,
        output_dir: str,
        comment: str = "",
        provenance: Optional[Dict] = None,
    ):
        self._head_fn = head_fn
        self.iters_per_epoch = iters_per_epoch
        self.output_dir = output_dir
        self.comment = comment
        self.provenance = provenance
        self.history: Dict = {}
        self.final_genotype: Optional[Genotype] = None

    @property
    def json_path(self) -> str:
        return os.path.join(self.output_dir, ALPHAS_JSON)

    def before_train(self):
        head = self._head_fn()
        self.history = {
            "space": head.space,
            "branches": head.branches,
            "ops": list(head.op_names),
            "edges": edge_labels(head.branches),
            "epochs": [],
        }
        done = self.trainer.start_iter // self.iters_per_epoch
        if done and PathManager.exists(self.json_path):
            with PathManager.open(self.json_path, "r", encoding="utf-8") as f:
                old = json.load(f)
            if old.get("ops") != self.history["ops"] or old.get("edges") != self.history["edges"]:
                raise ValueError(
                    f"{self.json_path}: ops/edges differ from the resumed search head "
                    f"(space {head.space!r}, {head.branches} branches); wrong OUTPUT_DIR?"
                )
            # Entries after the checkpoint resumed from were written by a run killed before its
            # next checkpoint: those epochs run again, so their entries go.
            self.history["epochs"] = [e for e in old.get("epochs", []) if e["epoch"] <= done]

    def after_step(self):
        it = self.trainer.iter + 1
        if it % self.iters_per_epoch:
            return
        epoch = it // self.iters_per_epoch
        head = self._head_fn()
        genotype = head.genotype()
        weights = softmax_alphas(head)
        logger.info(
            "ALB search epoch %d/%d (iteration %d): genotype %s",
            epoch,
            self.trainer.max_iter // self.iters_per_epoch,
            it,
            format_genotype(genotype),
        )
        entropy = {kind: edge_entropy(w) for kind, w in weights.items()}
        logger.info(
            "ALB search epoch %d: entropy of softmax(alpha) per edge, normal %s, reduce %s "
            "(uniform = %.3f)",
            epoch,
            np.round(entropy["normal"], 3).tolist(),
            np.round(entropy["reduce"], 3).tolist(),
            math.log(len(head.op_names)),
        )
        self.history["epochs"].append(
            {
                "epoch": epoch,
                "iteration": it,
                "normal": weights["normal"].tolist(),
                "reduce": weights["reduce"].tolist(),
                "entropy_normal": entropy["normal"].tolist(),
                "entropy_reduce": entropy["reduce"].tolist(),
                "genotype": genotype.to_dict(),
            }
        )
        if comm.is_main_process():
            PathManager.mkdirs(self.output_dir)
            _write_text(self.json_path, _history_json(self.history))

    def after_train(self):
        if self.trainer.iter < self.trainer.max_iter:
            return  # interrupted: --resume finishes the search and writes the outputs
        head = self._head_fn()
        if comm.is_main_process():
            self.final_genotype = write_search_outputs(
                head, self.output_dir, self.comment, self.provenance
            )
            logger.info(
                "ALB search done: %s written to %s; genotype %s",
                ", ".join((GENOTYPE_YAML, ALPHAS_JSON, ALPHAS_PNG)),
                self.output_dir,
                format_genotype(self.final_genotype),
            )
        else:
            self.final_genotype = head.genotype()
