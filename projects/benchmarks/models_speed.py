#!/usr/bin/env python
"""Per-model parameters, inference ms/image and training s/iteration, all models in one process.

    python projects/benchmarks/models_speed.py [--quick] [--threads 2] [--rounds 10] [--size 512]
    python projects/benchmarks/models_speed.py --quick --models "ElixirNet w FPN" \
        --weights FPN=output/quality/seed0/fpn/model_final.pth \
        --weights "ElixirNet w FPN=output/quality/seed0/elixirnet/model_final.pth"

Models (paper Table 1): FPN, ElixirNet w FPN, Deformv2, ElixirNet w Deformv2, FRCNN (C4) and
ElixirNet (C4), from their R-50 DeepLesion configs (``--quick``: the CPU quickstart configs), built
with random weights (MODEL.WEIGHTS unset): the compute is that of trained weights except for what
depends on learned values. One such thing matters: how many locations TRPN keeps. With random
weights the mean-threshold truncation is arbitrary (it may keep almost no location, hence a
handful of proposals against FRCNN's 1000), and the proposal count sets the ROI head's cost. So TRPN
is timed keeping every location (MODEL.TRPN.THRESHOLD 0): its own overhead (the p conv, masking) is
paid in full and every model's ROI heads see the same number of proposals (POST_NMS_TOPK_TEST), as
trained models on CT do. That is TRPN's slowest case; the printed proposal counts show what each
head received. Second: random convs between identity FrozenBN layers blow activations up through 50
layers (up to non-finite RPN scores, hence no proposal at all), so before timing, every FrozenBN
gets the channel mean and variance of its input on the benchmark image (one calibration pass, as a
trained network's statistics keep activations near unit scale). GroupNorm / BatchNorm models are
unaffected.

Input: one CT-like 512x512 slice (the phantom of data_loader.py, windowed, 3 channels).
Inference: ``--warmup`` untimed rounds, then ``--rounds`` rounds; each round runs every model once,
the order reversed every other round so no model always follows the same one. Per model: the
median wall time, the median of the per-round ratios to FPN (robust to load changes on a shared
machine), and the median time of each stage (backbone incl. preprocessing, proposal generator,
ROI heads incl. postprocessing). Training: the same interleaving of forward + backward + SGD step
on that image with two lesions, fewer rounds (``--train-rounds``). On CUDA (``--device cuda``, or
``run_all.py`` when a GPU is present) every timed call is bracketed by ``torch.cuda.synchronize``.
CPU threads are pinned (``--threads``) before torch is imported.

Trained weights (``--weights NAME=PATH`` for every model timed): the models keep their configs'
TRPN threshold, nothing is calibrated, and each round runs one image of the config's test split
(``--test-images``, the first N, mapped as at evaluation), so the proposal count a trained TRPN
keeps on CT is part of the timing. Training is not timed then (its cost does not depend on the
weights).
"""

import os

if __name__ == "__main__":
    from pin_threads import pin_threads, threads_from_argv  # the script's folder is on sys.path

    pin_threads(threads_from_argv(default=2))

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import Callable, Dict, List, Optional, Sequence  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

from detectron2.config import CfgNode  # noqa: E402
from detectron2.layers import FrozenBatchNorm2d  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.meta_arch.rcnn import GeneralizedRCNN  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import elixir_d2  # noqa: E402,F401  (registers TRPN, ALBHead, the deformable backbones)
from elixir_d2 import load_config  # noqa: E402
from elixir_d2.benchmarking import staged_inference, sync  # noqa: E402
from elixir_d2.data.ct_mapper import window_to_uint8_range  # noqa: E402
from elixir_d2.trainer import ElixirTrainer  # noqa: E402

from data_loader import phantom  # noqa: E402

__all__ = [
    "ModelSpec",
    "MODELS",
    "BASELINE",
    "load_cfg",
    "ct_input",
    "calibrate_frozen_bn",
    "time_inference",
    "time_training",
    "median_ratio",
    "measure",
    "format_table",
    "select",
]

BASELINE = "FPN"
STAGES = ("backbone", "proposals", "roi_heads")


@dataclass(frozen=True)
class ModelSpec:
    """A benchmarked model: table label, R-50 DeepLesion config, CPU quickstart config; ``slow``
    models (R-50 only) take part in the first ``slow_rounds`` rounds only."""

    name: str
    config: str
    quick_config: str
    slow: bool = False


MODELS = (
    ModelSpec("FPN", "configs/fpn_R_50_deeplesion.yaml", "configs/quickstart/fpn.yaml"),
    ModelSpec(
        "ElixirNet w FPN",
        "configs/elixirnet_R_50_FPN_deeplesion.yaml",
        "configs/quickstart/elixirnet.yaml",
    ),
    ModelSpec(
        "Deformv2", "configs/deformv2_R_50_FPN_deeplesion.yaml", "configs/quickstart/deformv2.yaml"
    ),
    ModelSpec(
        "ElixirNet w Deformv2",
        "configs/elixirnet_deformv2_R_50_FPN_deeplesion.yaml",
        "configs/quickstart/elixirnet_deformv2.yaml",
    ),
    # res5 runs on each of the 1000 test RoIs (~0.7 TMAC an image): too slow for every CPU round.
    ModelSpec(
        "FRCNN (C4)",
        "configs/faster_rcnn_R_50_C4_deeplesion.yaml",
        "configs/quickstart/faster_rcnn_C4.yaml",
        slow=True,
    ),
    ModelSpec(
        "ElixirNet (C4)",
        "configs/elixirnet_R_50_C4_deeplesion.yaml",
        "configs/quickstart/elixirnet_C4.yaml",
    ),
)


def load_cfg(
    config: str, device: str = "cpu", opts: Sequence[str] = (), trpn_keep_all: bool = True
) -> CfgNode:
    """``config`` (relative to the repository) with random weights on ``device``; TRPN keeps every
    location when ``trpn_keep_all`` (see the module docstring)."""
    # A tiny learning rate: training is only timed, and random weights must not blow up.
    cfg = load_config(
        config if os.path.isabs(config) else os.path.join(ROOT, config),
        ["MODEL.WEIGHTS", "", "MODEL.DEVICE", device, "SOLVER.BASE_LR", "1e-5", *opts],
    )
    if trpn_keep_all and cfg.MODEL.PROPOSAL_GENERATOR.NAME == "TRPN":
        cfg.MODEL.TRPN.THRESHOLD = 0.0  # p > 0 everywhere: nothing truncated
    return cfg


def ct_input(size: int = 512, seed: int = 0) -> Dict:
    """A CT-like ``size`` x ``size`` 3-channel model input (windowed phantom, two lesion boxes)."""
    hu = phantom(np.random.default_rng(seed))
    if size != hu.shape[0]:
        hu = torch.nn.functional.interpolate(
            torch.as_tensor(hu)[None, None].float(),
            size=(size, size),
            mode="bilinear",
            align_corners=False,
        )[0, 0].numpy()
    img = window_to_uint8_range(np.stack([hu] * 3, axis=0), (-1024.0, 3071.0))
    inst = Instances((size, size))
    s = size / 512.0
    inst.gt_boxes = Boxes(
        torch.tensor([[150.0, 200.0, 180.0, 226.0], [300.0, 330.0, 348.0, 372.0]]) * s
    )
    inst.gt_classes = torch.zeros(2, dtype=torch.int64)
    return {"image": torch.as_tensor(img), "height": size, "width": size, "instances": inst}


def load_trained(config: str, weights: str, device: str = "cpu"):
    """(cfg, model) of ``config`` with the checkpoint ``weights`` (genotype included), TRPN's
    threshold as configured."""
    from elixir_d2.checkpoint import AtomicCheckpointer
    from elixir_d2.modeling.genotype_source import fill_genotype_from_checkpoint

    if not os.path.isfile(weights):
        raise FileNotFoundError(f"weights file {weights} not found")
    cfg = load_config(
        config if os.path.isabs(config) else os.path.join(ROOT, config),
        ["MODEL.WEIGHTS", weights, "MODEL.DEVICE", device],
    )
    cfg.MODEL.ALB.GENOTYPE, cfg.MODEL.ALB.GENOTYPE_YAML = "", ""  # the checkpoint's own
    fill_genotype_from_checkpoint(cfg, weights)
    model = build_model(cfg)
    AtomicCheckpointer(model).load(weights)
    return cfg, model.eval()


def test_split_inputs(cfg: CfgNode, n: int) -> List[Dict]:
    """The first ``n`` images of ``cfg``'s first test split, mapped as at evaluation."""
    from detectron2.data import DatasetCatalog

    from elixir_d2.data.ct_mapper import CTDatasetMapper

    if n < 1:
        raise ValueError(f"--test-images must be >= 1, got {n}")
    mapper = CTDatasetMapper(cfg, is_train=False)
    return [mapper(d) for d in DatasetCatalog.get(cfg.DATASETS.TEST[0])[:n]]


@torch.no_grad()
def calibrate_frozen_bn(model: GeneralizedRCNN, inputs: List[Dict]) -> int:
    """Set every FrozenBatchNorm2d's statistics to its input's channel mean / variance on ``inputs``
    (layers calibrated in forward order, each on already calibrated inputs); returns how many."""
    norms = [m for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]

    def hook(module, args):
        x = args[0]
        module.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        module.running_var.copy_(x.var(dim=(0, 2, 3), unbiased=False))

    handles = [m.register_forward_pre_hook(hook) for m in norms]
    try:
        was_training = model.training
        model.eval()
        model.inference(inputs)  # res5 of Res5ROIHeads has FrozenBN too
        if was_training:
            model.train()
    finally:
        for h in handles:
            h.remove()
    return len(norms)


def _orders(names: Sequence[str], rounds: int, rounds_of: Dict[str, int]):
    """Per round, the models taking part (those with rounds left), order reversed every other
    round."""
    for r in range(rounds):
        names_r = [n for n in names if r < rounds_of.get(n, rounds)]
        yield r, (names_r if r % 2 == 0 else list(reversed(names_r)))


def time_inference(
    models: Dict[str, GeneralizedRCNN],
    inputs: List[Dict],
    rounds: int,
    warmup: int,
    rounds_of: Optional[Dict[str, int]] = None,
    batches: Optional[List[List[Dict]]] = None,
) -> Dict[str, Dict[str, List[float]]]:
    """Per model, per stage ("backbone", "proposals", "roi_heads", "total"): seconds of each round
    (and "num_proposals": proposals handed to the ROI heads). ``rounds_of`` caps the rounds (and
    warm-ups: at most 1) of some models; they run in the first rounds, interleaved with the rest.
    ``batches``: round r runs ``batches[r % len(batches)]`` instead of ``inputs``."""
    rounds_of = rounds_of or {}
    times = {k: {s: [] for s in STAGES + ("total", "num_proposals")} for k in models}
    for m in models.values():
        m.eval()

    def batch(r: int) -> List[Dict]:
        return batches[r % len(batches)] if batches else inputs

    with torch.no_grad():
        for r, order in _orders(list(models), warmup, {k: min(v, 1) for k, v in rounds_of.items()}):
            for name in order:
                staged_inference(models[name], batch(r))
        for r, order in _orders(list(models), rounds, rounds_of):
            for name in order:
                for stage, t in staged_inference(models[name], batch(r)).items():
                    times[name][stage].append(t)
    return times


def time_training(
    models: Dict[str, GeneralizedRCNN],
    cfgs: Dict[str, CfgNode],
    inputs: List[Dict],
    rounds: int,
    warmup: int = 1,
    rounds_of: Optional[Dict[str, int]] = None,
) -> Dict[str, List[float]]:
    """Seconds per training iteration (forward, backward, optimizer step) of each round;
    ``rounds_of`` as in :func:`time_inference`."""
    rounds_of = rounds_of or {}
    steps: Dict[str, Callable[[], None]] = {}
    for name, model in models.items():
        model.train()
        opt = ElixirTrainer.build_optimizer(cfgs[name], model)

        def step(model=model, opt=opt):
            losses = model(inputs)
            opt.zero_grad()
            sum(losses.values()).backward()
            opt.step()

        steps[name] = step
    times: Dict[str, List[float]] = {k: [] for k in models}
    with EventStorage():
        for _, order in _orders(list(models), warmup, {k: min(v, 1) for k, v in rounds_of.items()}):
            for name in order:
                steps[name]()
        for _, order in _orders(list(models), rounds, rounds_of):
            for name in order:
                dev = models[name].device
                sync(dev)
                t0 = time.perf_counter()
                steps[name]()
                sync(dev)
                times[name].append(time.perf_counter() - t0)
    for m in models.values():
        m.eval()
    return times


def select(names: Optional[str]) -> Sequence[ModelSpec]:
    """MODELS restricted to the comma-separated ``names`` (FPN, the baseline, always kept)."""
    if not names:
        return MODELS
    wanted = {n.strip() for n in names.split(",") if n.strip()} | {BASELINE}
    unknown = wanted - {s.name for s in MODELS}
    if unknown:
        raise ValueError(f"unknown models {sorted(unknown)}; known: {[s.name for s in MODELS]}")
    return tuple(s for s in MODELS if s.name in wanted)


def median_ratio(times: Sequence[float], base: Sequence[float]) -> float:
    """Median over rounds of time / baseline time of the same round."""
    return statistics.median(t / b for t, b in zip(times, base))


def measure(
    quick: bool = False,
    device: str = "cpu",
    size: int = 512,
    rounds: int = 10,
    warmup: int = 2,
    train_rounds: int = 2,
    specs: Sequence[ModelSpec] = MODELS,
    slow_rounds: int = 3,
    log: Callable[[str], None] = print,
    weights: Optional[Dict[str, str]] = None,
    test_images: int = 20,
) -> Dict[str, Dict]:
    """Build every model of ``specs`` on ``device`` and time them; returns per model
    {"config", "params", "infer_ms", "infer_ratio", "infer_rounds", "stages_ms", "num_proposals",
    "train_s", "train_ratio", "train_rounds"}. Slow specs get ``slow_rounds`` inference rounds and
    1 training round (R-50 on the CPU only; every model gets every round with --quick or on
    CUDA). ``weights``: model name -> trained checkpoint for every spec (see the module
    docstring); inference rounds then cycle over ``test_images`` test images."""
    if rounds < 1 or warmup < 0:
        raise ValueError(f"rounds must be >= 1 and warmup >= 0, got {rounds}, {warmup}")
    if not any(s.name == BASELINE for s in specs):
        raise ValueError(
            f"the model list must contain the baseline {BASELINE!r} (ratios are to it)"
        )
    if weights is not None and set(weights) != {s.name for s in specs}:
        raise ValueError(
            f"--weights names {sorted(weights)}; give one for each timed model: "
            f"{[s.name for s in specs]}"
        )
    torch.manual_seed(0)
    cfgs, models = {}, {}
    for spec in specs:
        config = spec.quick_config if quick else spec.config
        if weights is None:
            cfgs[spec.name] = load_cfg(config, device)
            models[spec.name] = build_model(cfgs[spec.name])
        else:
            cfgs[spec.name], models[spec.name] = load_trained(config, weights[spec.name], device)
        log(
            f"built {spec.name:22s} from {config}"
            + (f" with {weights[spec.name]}" if weights else "")
        )
    inputs = [ct_input(size)]
    batches = None
    if weights is None:
        for m in models.values():
            calibrate_frozen_bn(m, inputs)
    else:
        batches = [[d] for d in test_split_inputs(cfgs[BASELINE], test_images)]
        inputs = batches[0]
        train_rounds = 0  # test images carry no annotations; training cost is weight-independent
    limit_slow = not quick and device == "cpu"
    slow = {s.name for s in specs if s.slow and limit_slow}
    inf_rounds = {n: min(slow_rounds, rounds) for n in slow}
    where = f"{len(batches)} test images" if batches else f"{size}x{size}"
    log(
        f"timing inference: {warmup} warm-up + {rounds} rounds of {len(models)} models on "
        f"{where} on {device}"
        + (f" ({', '.join(sorted(slow))}: {slow_rounds} rounds)" if slow else "")
        + " ..."
    )
    t0 = time.perf_counter()
    inf = time_inference(models, inputs, rounds, warmup, inf_rounds, batches)
    log(f"  done in {time.perf_counter() - t0:.0f} s")
    tr = None
    if train_rounds > 0:
        tr_rounds = {n: 1 for n in slow}
        log(
            f"timing training: 1 warm-up + {train_rounds} rounds"
            + (f" ({', '.join(sorted(slow))}: 1)" if slow else "")
            + " ..."
        )
        t0 = time.perf_counter()
        tr = time_training(models, cfgs, inputs, train_rounds, rounds_of=tr_rounds)
        log(f"  done in {time.perf_counter() - t0:.0f} s")
    out = {}
    for spec in specs:
        name = spec.name
        out[name] = {
            "config": spec.quick_config if quick else spec.config,
            "params": sum(p.numel() for p in models[name].parameters()),
            "infer_ms": 1e3 * statistics.median(inf[name]["total"]),
            "infer_ratio": median_ratio(inf[name]["total"], inf[BASELINE]["total"]),
            "infer_rounds": len(inf[name]["total"]),
            "stages_ms": {s: 1e3 * statistics.median(inf[name][s]) for s in STAGES},
            "num_proposals": statistics.median(inf[name]["num_proposals"]),
            "train_s": statistics.median(tr[name]) if tr else None,
            "train_ratio": median_ratio(tr[name], tr[BASELINE]) if tr else None,
            "train_rounds": len(tr[name]) if tr else 0,
        }
    return out


def format_table(cpu: Dict[str, Dict], gpu: Optional[Dict[str, Dict]] = None) -> str:
    """One markdown table: per model parameters, CPU (and GPU) inference and training vs FPN."""
    base = cpu[BASELINE]
    head = [
        "Model",
        "Params (M)",
        "x FPN",
        "CPU ms/img",
        "x FPN",
        "rounds",
        "train s/iter",
        "x FPN",
    ]
    if gpu:
        head += ["GPU ms/img", "x FPN", "GPU train s/iter", "x FPN"]
    lines = ["| " + " | ".join(head) + " |", "|:--|" + "--:|" * (len(head) - 1)]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for name, r in cpu.items():
        row = [
            name,
            f(r["params"] / 1e6, ".2f"),
            f(r["params"] / base["params"], ".3f"),
            f(r["infer_ms"], ".0f"),
            f(r["infer_ratio"], ".2f"),
            str(r["infer_rounds"]),
            f(r["train_s"], ".2f"),
            f(r["train_ratio"], ".2f"),
        ]
        if gpu:
            g = gpu.get(name, {})
            row += [
                f(g.get("infer_ms"), ".1f"),
                f(g.get("infer_ratio"), ".2f"),
                f(g.get("train_s"), ".3f"),
                f(g.get("train_ratio"), ".2f"),
            ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def format_stages(res: Dict[str, Dict], device: str) -> str:
    """Median ms of each inference stage per model (where ElixirNet's time goes against FPN)."""
    lines = [
        f"{device} inference by stage, median ms: backbone incl. preprocessing | proposal "
        "generator (RPN / TRPN) | ROI heads incl. postprocessing (proposals they got)"
    ]
    for name, r in res.items():
        s = r["stages_ms"]
        lines.append(
            f"  {name:22s} {s['backbone']:8.1f} | {s['proposals']:7.1f} | "
            f"{s['roi_heads']:7.1f}  ({r['num_proposals']:.0f})"
        )
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="quickstart (CPU-sized) configs")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=512, help="square image side in pixels")
    ap.add_argument(
        "--rounds", type=int, default=10, help="timed inference rounds (>= 10 for reporting)"
    )
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--train-rounds", type=int, default=2, help="timed training rounds (0: skip)")
    ap.add_argument(
        "--slow-rounds",
        type=int,
        default=3,
        help="inference rounds of the slow models (FRCNN C4, R-50 on the CPU)",
    )
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument(
        "--models", default=None, help="comma-separated subset of the model names (FPN always in)"
    )
    ap.add_argument(
        "--weights",
        action="append",
        default=None,
        metavar="NAME=PATH",
        help="trained checkpoint of a model, one per timed model (see above)",
    )
    ap.add_argument(
        "--test-images",
        type=int,
        default=20,
        help="with --weights: test images the inference rounds cycle over",
    )
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    weights = None
    if args.weights:
        bad = [w for w in args.weights if "=" not in w]
        if bad:
            ap.error(
                f"--weights {bad[0]!r}: expected NAME=PATH, e.g. FPN=output/fpn/model_final.pth"
            )
        weights = dict(w.split("=", 1) for w in args.weights)
    res = measure(
        args.quick,
        args.device,
        args.size,
        args.rounds,
        args.warmup,
        args.train_rounds,
        specs=select(args.models),
        slow_rounds=args.slow_rounds,
        weights=weights,
        test_images=args.test_images,
    )
    print(format_table(res))
    print(format_stages(res, args.device))
    return res


if __name__ == "__main__":
    main()
