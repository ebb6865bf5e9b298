#!/usr/bin/env python
"""Optimizer step with per-parameter gradient-norm clipping: detectron2's loop against the batched
clipping of elixir_d2.solver, on the quickstart models.

    python projects/benchmarks/optimizer_step.py [--rounds 9] [--threads 2]

For each of configs/quickstart/fpn.yaml and elixirnet.yaml (random weights and gradients, CLIP_VALUE
5 and NORM_TYPE 2 as configured), times ``step()`` of detectron2's ``maybe_add_gradient_clipping``
SGD and of ``PerParameterNormClippedSGD`` on two copies of the model, rounds interleaved, and
checks that the two leave every parameter bit for bit equal after all the steps. Prints the
median ms a step of each and the median of the per-round ratios.
"""

import os

if __name__ == "__main__":
    from pin_threads import pin_threads, threads_from_argv  # the script's folder is on sys.path

    pin_threads(threads_from_argv(default=2))

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from typing import Dict, List, Tuple  # noqa: E402

import torch  # noqa: E402

from detectron2.modeling import build_model  # noqa: E402
from detectron2.solver.build import maybe_add_gradient_clipping  # noqa: E402

from elixir_d2 import load_config  # noqa: E402
from elixir_d2.trainer import build_optimizer  # noqa: E402

from models_speed import median_ratio  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONFIGS = {"FPN": "fpn.yaml", "ElixirNet": "elixirnet.yaml"}


def time_steps(config: str, rounds: int, steps: int = 10) -> Tuple[Dict[str, List[float]], int]:
    """(ms per step of each implementation per round, number of parameter tensors); raises if
    the two leave different parameters."""
    cfg = load_config(os.path.join(ROOT, "configs", "quickstart", config), [])
    torch.manual_seed(0)
    models = {"detectron2 loop": build_model(cfg)}
    models["batched (shipped)"] = copy.deepcopy(models["detectron2 loop"])
    # The reference takes the shipped optimizer's parameter groups (rates, decay), so the two
    # differ only in how they clip.
    groups = [dict(g) for g in build_optimizer(cfg, models["detectron2 loop"]).param_groups]
    opts = {
        "detectron2 loop": maybe_add_gradient_clipping(cfg, torch.optim.SGD)(groups),
        "batched (shipped)": build_optimizer(cfg, models["batched (shipped)"]),
    }
    g = torch.Generator().manual_seed(1)
    grads = [torch.randn(p.shape, generator=g) * 4 for p in models["detectron2 loop"].parameters()]
    times: Dict[str, List[float]] = {k: [] for k in models}
    for r in range(rounds + 1):  # round 0 warms up
        order = list(models) if r % 2 else list(models)[::-1]
        for name in order:
            params = list(models[name].parameters())
            elapsed = 0.0
            for _ in range(steps):
                for p, gr in zip(params, grads):
                    p.grad = gr.clone()
                t = time.perf_counter()
                opts[name].step()
                elapsed += time.perf_counter() - t
            if r:
                times[name].append(1000 * elapsed / steps)
    a, b = (list(m.parameters()) for m in models.values())
    if not all(torch.equal(x, y) for x, y in zip(a, b)):
        raise AssertionError(f"{config}: the two optimizers left different parameters")
    return times, len(a)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for model, config in CONFIGS.items():
        times, n = time_steps(config, args.rounds)
        ref, new = times["detectron2 loop"], times["batched (shipped)"]
        print(
            f"{model} ({n} parameter tensors): detectron2 loop {statistics.median(ref):.1f} ms, "
            f"batched {statistics.median(new):.1f} ms a step, x {median_ratio(new, ref):.2f}; "
            "parameters bit for bit equal after all steps"
        )


if __name__ == "__main__":
    main()
