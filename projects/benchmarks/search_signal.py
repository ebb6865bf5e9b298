#!/usr/bin/env python
"""Does an ALB search decide anything? The alphas' gradient: its noise, and whether it persists.

    python projects/benchmarks/search_signal.py --search-dir output/quickstart/search_alb \
        [--checkpoints model_0000227.pth model_final.pth] [--batches 40] [--threads 2] \
        [KEY VALUE ...]

Rebuilds the search from SEARCH_DIR/config.yaml (as search_net.py wrote it) and, for each named
checkpoint of that folder (model_final.pth if none is named), takes the gradient of the search
objective with respect to the alphas on ``--batches`` batches of the architecture half, without
stepping. Per checkpoint it prints, over the alphas, the median per-batch signal-to-noise ratio
|mean| / std of the gradient, and the t statistic of its mean over the batches
(mean / (std / sqrt(n))): the median |t| and the shares at |t| > 2 and > 3, beside the shares
pure noise gives (Student's t, n - 1 degrees of freedom). Then the correlation of the checkpoints'
t vectors: whether the ops one point of the search prefers are those another prefers. A checkpoint
named twice is measured twice on different batches; that correlation says how well ``--batches``
batches pin the gradient down.

``--genotype-out PATH`` writes the genotype the first checkpoint's mean gradient points to (each
alpha's -t as its strength, discretised as search_net.py discretises alphas): what a search
would derive if it followed that one, well-measured, gradient.

An alpha moves by Adam's steps, about ALPHA_LR each: a gradient whose sign holds over the search
adds up, one that changes sign leaves the alpha near where it started, whatever ALPHA_LR is.
"""

import os

if __name__ == "__main__":
    from pin_threads import pin_threads, threads_from_argv  # the script's folder is on sys.path

    pin_threads(threads_from_argv(default=2))

import argparse  # noqa: E402
import math  # noqa: E402
from typing import Dict, List, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from detectron2.utils.events import EventStorage  # noqa: E402

from elixir_d2 import load_config  # noqa: E402
from elixir_d2.cli import require_file  # noqa: E402
from elixir_d2.modeling.alb.genotype import Genotype, derive_genotype, save_genotype  # noqa: E402
from elixir_d2.modeling.alb.spaces import get_search_space  # noqa: E402
from elixir_d2.search import ALBSearcher  # noqa: E402
from elixir_d2.search.searcher import search_head  # noqa: E402
from elixir_d2.search.step import search_loss  # noqa: E402


def gradient_t(grads: np.ndarray) -> np.ndarray:
    """Per column of ``grads`` (one row per batch): mean / (std / sqrt(n)), std with n - 1."""
    n = grads.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 batches for a standard deviation, got {n}")
    sd = grads.std(axis=0, ddof=1)
    return grads.mean(axis=0) / np.maximum(sd / math.sqrt(n), 1e-30)


def t_tail(x: float, df: int, steps: int = 20001) -> float:
    """P(|T| > x) for Student's t with ``df`` degrees of freedom (the density integrated on
    [0, x] by the trapezoid rule)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    t = np.linspace(0.0, x, steps)
    density = np.exp(log_c - (df + 1) / 2 * np.log1p(t * t / df))
    inner = float(np.sum((density[1:] + density[:-1]) / 2) * (t[1] - t[0]))
    return max(0.0, 1.0 - 2.0 * inner)


def signal_summary(grads: np.ndarray) -> Dict[str, float]:
    """Median per-batch |mean| / std, median |t|, and the shares of alphas at |t| > 2 and > 3."""
    sd = grads.std(axis=0, ddof=1)
    snr = np.abs(grads.mean(axis=0)) / np.maximum(sd, 1e-30)
    t = np.abs(gradient_t(grads))
    return {
        "batches": grads.shape[0],
        "snr_median": float(np.median(snr)),
        "t_median": float(np.median(t)),
        "share_t2": float((t > 2).mean()),
        "share_t3": float((t > 3).mean()),
    }


def alpha_gradients(searcher: ALBSearcher, batches: int) -> np.ndarray:
    """(batches, number of alphas): d objective / d alpha on successive architecture batches."""
    alphas = search_head(searcher.model).arch_parameters()
    alpha_ids = {id(a) for a in alphas}
    weights = [p for p in searcher.model.parameters() if p.requires_grad and id(p) not in alpha_ids]
    for p in weights:  # their gradients are not needed: skip that half of the backward
        p.requires_grad_(False)
    rows = []
    try:
        with EventStorage(0):
            for _ in range(batches):
                _, batch = searcher.next_batches()
                total, _ = search_loss(searcher.model, batch)
                grads = torch.autograd.grad(total, alphas)
                rows.append(torch.cat([g.flatten() for g in grads]).numpy())
    finally:
        for p in weights:
            p.requires_grad_(True)
    return np.stack(rows)


def gradient_genotype(t: np.ndarray, space: str, branches: int) -> Genotype:
    """The genotype the alphas' gradient points to: ``derive_genotype`` on -t (a negative
    gradient raises an op's alpha); ``t`` is alpha_normal's then alpha_reduce's, flattened."""
    ops = len(get_search_space(space))
    half = t.size // 2
    return derive_genotype(-t[:half].reshape(-1, ops), -t[half:].reshape(-1, ops), space, branches)


def measure(
    search_dir: str, checkpoints: Sequence[str], batches: int, opts: Sequence[str] = ()
) -> List[Dict]:
    """One row per checkpoint: its name, iteration, summary, t vector and the search space."""
    cfg = load_config(
        require_file(
            os.path.join(search_dir, "config.yaml"),
            "search config",
            "--search-dir must be an OUTPUT_DIR of search_net.py",
        ),
        ["OUTPUT_DIR", search_dir, *opts],
    )
    paths = [
        require_file(
            os.path.join(search_dir, name),
            "search checkpoint",
            "name files of --search-dir (model_*.pth)",
        )
        for name in checkpoints
    ]
    searcher = ALBSearcher(cfg)
    searcher.model.train()
    rows = []
    for name, path in zip(checkpoints, paths):
        extra = searcher.checkpointer.load(path, checkpointables=[])
        # fvcore only logs what it could not load; a checkpoint of another search would leave
        # parts of this one at their initialisation and measure those.
        bad = searcher.checkpointer.last_incompatible
        if bad is not None and (bad.missing_keys or bad.incorrect_shapes):
            raise ValueError(
                f"{path} does not fit the search of {search_dir}/config.yaml: missing "
                f"{list(bad.missing_keys)[:3]}, shapes differ for "
                f"{[k for k, *_ in bad.incorrect_shapes][:3]}"
            )
        grads = alpha_gradients(searcher, batches)
        rows.append(
            {
                "checkpoint": name,
                "iteration": extra.get("iteration"),
                "iters_per_epoch": searcher.iters_per_epoch,
                **signal_summary(grads),
                "t": gradient_t(grads),
                "space": cfg.MODEL.ALB.SEARCH_SPACE,
                "branches": cfg.MODEL.ALB.BRANCHES,
            }
        )
    return rows


def format_rows(rows: List[Dict]) -> str:
    """The per-checkpoint table and the correlation of their t vectors, as markdown."""
    n = rows[0]["batches"]
    noise2, noise3 = t_tail(2.0, n - 1), t_tail(3.0, n - 1)
    lines = [
        f"| checkpoint | epoch | per-batch SNR (median) | median abs(t) | abs(t) > 2 "
        f"(noise: {100 * noise2:.1f}%) | abs(t) > 3 (noise: {100 * noise3:.1f}%) |",
        "|:--|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        it = r["iteration"]
        epoch = "?" if it is None else f"{(it + 1) / r['iters_per_epoch']:.0f}"
        lines.append(
            f"| {r['checkpoint']} | {epoch} | {r['snr_median']:.3f} | "
            f"{r['t_median']:.2f} | {100 * r['share_t2']:.0f}% | "
            f"{100 * r['share_t3']:.0f}% |"
        )
    if len(rows) > 1:
        lines += [
            "",
            "Correlation of the t vectors:",
            "",
            "| | " + " | ".join(f"{i + 1}" for i in range(len(rows))) + " |",
            "|:--|" + "--:|" * len(rows),
        ]
        for i, a in enumerate(rows):
            cells = [f"{np.corrcoef(a['t'], b['t'])[0, 1]:.2f}" for b in rows]
            lines.append(f"| {i + 1}: {a['checkpoint']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--search-dir", required=True, help="a search_net.py OUTPUT_DIR")
    ap.add_argument(
        "--checkpoints",
        nargs="+",
        default=["model_final.pth"],
        help="checkpoint files in --search-dir; one named twice is measured twice",
    )
    ap.add_argument("--batches", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--genotype-out", help="write the first checkpoint's gradient genotype here")
    ap.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = measure(args.search_dir, args.checkpoints, args.batches, args.opts)
    print(
        f"\nAlpha gradients of {args.search_dir}, {args.batches} architecture batches per "
        f"checkpoint, {rows[0]['t'].size} alphas:\n"
    )
    print(format_rows(rows))
    if args.genotype_out:
        genotype = gradient_genotype(rows[0]["t"], rows[0]["space"], rows[0]["branches"])
        source = os.path.join(args.search_dir, rows[0]["checkpoint"])
        save_genotype(
            genotype,
            args.genotype_out,
            comment=f"Genotype of the alphas' mean gradient over {args.batches} "
            f"architecture batches at {source} (search_signal.py).",
            provenance={
                "searched": True,
                "method": "alpha gradient (search_signal.py)",
                "checkpoint": source,
                "batches": args.batches,
            },
        )
        print(f"\ngenotype of {source}'s gradient: {args.genotype_out}")


if __name__ == "__main__":
    main()
