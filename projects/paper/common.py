"""Shared plumbing of the paper-table recipes (projects/paper/table*.py).

A recipe chains steps (steps.py): train the FPN baseline, search the ALB genotype from it
(search_net.py), train every row's model (train_net.py), fine-tune typed models, and reads what
the LesionEvaluator wrote at the end of each training (``<step>/inference/<dataset>/
lesion_metrics.json``). Steps run in this process through the code of train_net.py / search_net.py
(``elixir_d2.commands``' ``train.main`` / ``search.main``, under detectron2's ``launch``, so
``--num-gpus N`` spawns N workers), each in its own folder ``<output>/<step>``. A finished step (its
``recipe_step.json`` written last) is not run again unless ``--force``: Tables 1, 4, 5 and 6 share
the FPN baseline, the search and some models, and an interrupted recipe resumes where it stopped.

``--quick`` swaps every config for its CPU quickstart counterpart and the data for the synthetic
DeepLesion-format set under ``<root>/synthetic`` (KiTS19 format: ``<root>/synthetic_kits19``),
written first when absent; ``--iters`` / ``--search-epochs`` / ``--finetune-iters`` shorten runs.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence

import torch

from detectron2.utils.file_io import PathManager

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))

logger = logging.getLogger("elixir_d2.paper")

__all__ = [
    "DataSource",
    "Recipe",
    "StepFailed",
    "add_recipe_args",
    "prepare_data",
    "markdown_table",
    "fmt",
    "recipe_main",
    "sens",
    "STEP_DONE",
]

STEP_DONE = "recipe_step.json"  # written when a step has finished; its presence skips the step
LOGGERS = ("detectron2", "fvcore", "elixir_d2", "d2")


class StepFailed(RuntimeError):
    """A recipe step ran but left no result where it should have."""


# ------------------------------------------------------------------------------ arguments
def add_recipe_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments every recipe takes."""
    parser.add_argument(
        "--root",
        default=None,
        help="dataset root holding DeepLesion/ and kits19/ (default: "
        "$DETECTRON2_DATASETS, else the checkout's datasets/); --quick uses <root>/synthetic "
        "and <root>/synthetic_kits19",
    )
    parser.add_argument(
        "--num-gpus",
        type=int,
        default=1,
        help="processes per run (GPUs; CPU workers over gloo without CUDA)",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="folder of all runs and tables (default "
        "output/paper, with --quick output/paper_quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="quickstart configs on the synthetic data: CPU, minutes",
    )
    parser.add_argument(
        "--iters",
        type=int,
        default=None,
        help="SOLVER.MAX_ITER of every training run (steps and warm-up scaled); "
        "default: the configs' schedules (--quick: the quickstart's, 500)",
    )
    parser.add_argument(
        "--finetune-iters",
        type=int,
        default=None,
        help="SOLVER.MAX_ITER of the typed fine-tuning runs (default: the configs', 6 epochs)",
    )
    parser.add_argument(
        "--search-epochs",
        type=int,
        default=None,
        help="SEARCH.EPOCHS of the searches (default: the configs')",
    )
    parser.add_argument(
        "--genotype",
        default=None,
        help="use this genotype YAML instead of running the (medical-space) search",
    )
    parser.add_argument(
        "--speed-images",
        type=int,
        default=None,
        help="test images timed per model for the speed column (default 50, --quick 5)",
    )
    parser.add_argument("--force", action="store_true", help="rerun steps that already finished")
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        default=[],
        help="config options added to every run (KEY VALUE ...)",
    )
    return parser


# ----------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class DataSource:
    """A data set registered under ``prefix``: ``<prefix>_train``, ``<prefix>_test`` ...

    ``kind`` "deeplesion" (``path`` = the folder holding DL_info.csv) or "kits19" (``path`` =
    the slice cache holding records.json).
    """

    kind: str
    path: str
    prefix: str

    def register(self) -> None:
        from elixir_d2.data import register_deeplesion, register_kits19

        if self.kind == "deeplesion":
            register_deeplesion(self.path, prefix=self.prefix)
        elif self.kind == "kits19":
            register_kits19(self.path, prefix=self.prefix)
        else:
            raise ValueError(f"unknown data kind {self.kind!r}")

    def name(self, split: str) -> str:
        return f"{self.prefix}_{split}"

    def num_images(self, split: str) -> int:
        from detectron2.data import DatasetCatalog

        return len(DatasetCatalog.get(self.name(split)))


def _prefix(kind: str, path: str) -> str:
    # Names are bound to a folder for the life of the process: one prefix per folder.
    return f"paper_{kind}_{hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]}"


def prepare_data(kind: str, root: Optional[str], quick: bool) -> DataSource:
    """The data set of a recipe, registered; the quick synthetic sets are written when absent."""
    from elixir_d2.data import datasets_root, ensure_synthetic

    root = os.path.abspath(os.path.expanduser(root or datasets_root()))
    if kind == "deeplesion":
        path = os.path.join(root, "synthetic" if quick else "DeepLesion")
        if quick:
            ensure_synthetic(path)  # a set counts only once its completion marker is written
        elif not PathManager.exists(os.path.join(path, "DL_info.csv")):
            raise FileNotFoundError(
                f"{path}/DL_info.csv not found: prepare DeepLesion as "
                "datasets/README.md says, or pass --root"
            )
    elif kind == "kits19":
        from elixir_d2.data.kits19 import RECORDS_FILE, prepare_kits19

        base = os.path.join(root, "synthetic_kits19" if quick else "kits19")
        path = os.path.join(base, "cache")
        if quick:
            ensure_synthetic(base, kind="kits19")  # data/ counts only once the marker is written
            prepare_kits19(base, path)  # idempotent: reuses every complete, matching case cache
        elif not PathManager.exists(os.path.join(path, RECORDS_FILE)):
            if not PathManager.exists(os.path.join(base, "data")):
                raise FileNotFoundError(
                    f"{base}/data not found: download KiTS19 as "
                    "datasets/README.md says, or pass --root"
                )
            prepare_kits19(base, path)
    else:
        raise ValueError(f"unknown data kind {kind!r}")
    source = DataSource(kind, path, _prefix(kind, path))
    source.register()
    return source


# ------------------------------------------------------------------------------ running
def _worker(entry: str, args: argparse.Namespace, sources: Sequence[DataSource]):
    """One process of a run: (re-)register the data (spawned workers start empty), then main."""
    for s in sources:
        s.register()
    if entry == "train":
        from elixir_d2.commands import train

        return train.main(args)
    if entry == "search":
        from elixir_d2.commands import search

        return search.main(args)
    raise ValueError(f"unknown entry {entry!r}")


@contextlib.contextmanager
def _isolated_logging() -> Iterator[None]:
    """Drop the log handlers a run adds (detectron2 adds a console and a file handler per output
    folder; kept, every later run would print each line again and write into earlier log.txt)."""
    from detectron2.utils.logger import setup_logger

    before = {n: list(logging.getLogger(n).handlers) for n in LOGGERS}
    try:
        yield
    finally:
        for n, handlers in before.items():
            lg = logging.getLogger(n)
            for h in list(lg.handlers):
                if h not in handlers:
                    lg.removeHandler(h)
                    h.close()
        setup_logger.cache_clear()


def _schedule_opts(max_iter: int) -> List[str]:
    """MAX_ITER and a schedule scaled to it (lr steps at 2/3 and 11/12, as 8 and 11 of 12
    epochs)."""
    if max_iter < 1:
        raise ValueError(f"--iters must be >= 1, got {max_iter}")
    steps = tuple(
        sorted({max(1, round(max_iter * 2 / 3)), max(1, round(max_iter * 11 / 12))} - {max_iter})
    )
    return [
        "SOLVER.MAX_ITER",
        str(max_iter),
        "SOLVER.STEPS",
        str(steps or "()").replace(" ", ""),
        "SOLVER.WARMUP_ITERS",
        str(min(50, max(1, max_iter // 4))),
        "SOLVER.CHECKPOINT_PERIOD",
        str(max_iter),
    ]


def fmt(value: Optional[float], digits: int = 2) -> str:
    """A table cell: "-" for missing / NaN."""
    if value is None or value != value:
        return "-"
    return f"{value:.{digits}f}"


def sens(metrics: dict, fp: float, criterion: str = "iou") -> Optional[float]:
    """Sensitivity (%) at ``fp`` FPs per image from a lesion_metrics.json "metrics" dict."""
    return metrics.get(f"sens@{float(fp):g}_{criterion}")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table, first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|:--|" + "--:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


class Recipe:
    """Runs steps (steps.Train / steps.Search) into ``<output>/<step name>`` and reads results."""

    def __init__(
        self, args: argparse.Namespace, source: DataSource, command: Optional[Sequence[str]] = None
    ):
        """``command``: the recipe's command line for the provenance (default sys.argv)."""
        self.args = args
        self.command = None if command is None else list(command)
        self.quick = bool(args.quick)
        self.source = source
        self.output = os.path.abspath(
            args.output or os.path.join(ROOT, "output", "paper_quick" if args.quick else "paper")
        )
        self.num_gpus = args.num_gpus
        self.extra_opts = list(args.opts or [])
        if self.extra_opts and self.extra_opts[0] == "--":
            self.extra_opts = self.extra_opts[1:]
        if len(self.extra_opts) % 2:
            raise ValueError(f"config options must be KEY VALUE pairs, got {self.extra_opts}")
        self.device_opts: List[str] = []
        if not self.quick and not torch.cuda.is_available():
            logger.warning(
                "no CUDA device: the R-50 runs go to the CPU (MODEL.DEVICE cpu); expect days"
            )
            self.device_opts = ["MODEL.DEVICE", "cpu"]
        self.ran: Dict[str, dict] = {}
        self.overridden: set = set()  # searches replaced by --genotype
        PathManager.mkdirs(self.output)

    # ---------------------------------------------------------------- paths
    def step_dir(self, name: str) -> str:
        return os.path.join(self.output, name)

    def weights(self, name: str) -> str:
        path = os.path.join(self.step_dir(name), "model_final.pth")
        if not PathManager.exists(path):
            raise StepFailed(f"{path} does not exist: step {name!r} has not finished")
        return path

    def genotype(self, name: str) -> str:
        if name in self.overridden:
            return os.path.abspath(self.args.genotype)
        path = os.path.join(self.step_dir(name), "genotype.yaml")
        if not PathManager.exists(path):
            raise StepFailed(f"{path} does not exist: step {name!r} has not finished")
        return path

    def record(self, name: str) -> dict:
        with PathManager.open(
            os.path.join(self.step_dir(name), STEP_DONE), "r", encoding="utf-8"
        ) as f:
            return json.load(f)

    def metrics(self, name: str, split: str) -> dict:
        """The flat metrics dict of ``lesion_metrics.json`` of step ``name`` on ``split``."""
        path = os.path.join(
            self.step_dir(name), "inference", self.source.name(split), "lesion_metrics.json"
        )
        if not PathManager.exists(path):
            raise StepFailed(f"{path} does not exist: step {name!r} did not evaluate on {split}")
        with PathManager.open(path, "r", encoding="utf-8") as f:
            return json.load(f)["metrics"]

    # ---------------------------------------------------------------- running
    def _signature(self, step, opts: Sequence[str]) -> str:
        """What a run depends on: its config as resolved (the file, its _BASE_ files, the defaults
        and the options, so editing any of them makes the step stale), and when the runs it reads
        from finished (a rerun dependency makes it stale too)."""
        import elixir_d2

        deps = {d: self.record(d).get("finished_at") for d in step.deps if d not in self.overridden}
        if self.overridden and getattr(step, "genotype_from", None) in self.overridden:
            deps["--genotype"] = os.path.getmtime(self.args.genotype)
        config = step.config_for(self.quick)
        resolved = elixir_d2.load_config(os.path.join(ROOT, config), list(opts)).dump()
        return json.dumps(
            {
                "config": config,
                "opts": list(opts),
                "deps": deps,
                "resolved_sha256": hashlib.sha256(resolved.encode()).hexdigest(),
            },
            sort_keys=True,
        )

    def _done(self, name: str, signature: str) -> bool:
        path = os.path.join(self.step_dir(name), STEP_DONE)
        if self.args.force or not PathManager.exists(path):
            return False
        if self.record(name).get("signature") != signature:
            print(
                f"[paper] {name}: finished earlier with other settings or inputs; running it again"
            )
            return False
        return True

    def _launch(self, entry: str, args: argparse.Namespace):
        from elixir_d2.launch import launch

        with _isolated_logging():
            if self.num_gpus <= 1:
                return _worker(entry, args, [self.source])
            return launch(_worker, self.num_gpus, args=(entry, args, [self.source]))

    def _finish(
        self, name: str, info: dict, t0: float, signature: str, code: Optional[dict] = None
    ) -> None:
        info.update(
            {
                "wall_s": round(time.time() - t0, 1),
                "num_gpus": self.num_gpus,
                "quick": self.quick,
                "finished_at": time.time(),
                "signature": signature,
                "provenance": self.provenance(started=t0, code=code),
            }
        )
        with PathManager.open(
            os.path.join(self.step_dir(name), STEP_DONE), "w", encoding="utf-8"
        ) as f:
            json.dump(info, f, indent=1)
        self.ran[name] = info
        logger.info("step %s finished in %.0f s", name, info["wall_s"])

    def run(self, steps: Sequence) -> None:
        """Run each step unless finished; steps must come after those they read from."""
        from elixir_d2.provenance import code_state

        for step in steps:
            if getattr(step, "overridable", False) and self.args.genotype:
                if not PathManager.exists(self.args.genotype):
                    raise FileNotFoundError(f"--genotype {self.args.genotype}: no such file")
                self.overridden.add(step.name)
                print(f"[paper] {step.name}: skipped, using --genotype {self.args.genotype}")
                continue
            opts = step.plan(self)
            signature = self._signature(step, opts)
            if self._done(step.name, signature):
                self.ran[step.name] = self.record(step.name)
                print(f"[paper] {step.name}: finished earlier, reusing {self.step_dir(step.name)}")
                continue
            done_file = os.path.join(self.step_dir(step.name), STEP_DONE)
            if PathManager.exists(done_file):
                # a failed rerun must not leave the old run looking finished
                PathManager.rm(done_file)
            print(f"[paper] {step.name}: running {step.config_for(self.quick)}")
            t0, code = time.time(), code_state()
            step.execute(self, opts)
            self._finish(step.name, step.describe(self), t0, signature, code)

    def train_args(self, config: str, opts: Sequence[str]) -> argparse.Namespace:
        from detectron2.engine import default_argument_parser

        argv = ["--config-file", os.path.join(ROOT, config), "--num-gpus", str(self.num_gpus)]
        return default_argument_parser().parse_args(argv + list(opts))

    def search_args(self, config: str, opts: Sequence[str], random: bool) -> argparse.Namespace:
        from elixir_d2.commands import search

        argv = ["--config-file", os.path.join(ROOT, config), "--num-gpus", str(self.num_gpus)]
        if random:
            argv.append("--random")
        return search.build_parser().parse_args(argv + list(opts))

    def common_opts(self, name: str) -> List[str]:
        return ["OUTPUT_DIR", self.step_dir(name), *self.device_opts, *self.extra_opts]

    def schedule_opts(self, finetune: bool) -> List[str]:
        iters = self.args.finetune_iters if finetune else self.args.iters
        return _schedule_opts(iters) if iters else []

    # ---------------------------------------------------------------- reporting
    def provenance(self, started: Optional[float] = None, code: Optional[dict] = None) -> dict:
        """This run's provenance block (elixir_d2.provenance): commit (``code``, taken when the
        step started; default now), command, machine."""
        from elixir_d2.provenance import provenance

        return provenance(self.command, started=started, code=code)

    def header(self, title: str, splits: Sequence[str]) -> str:
        """What was run: data, sizes, mode; every number below comes from these runs."""
        data = ", ".join(f"{s} {self.source.num_images(s)} images" for s in splits)
        mode = (
            "--quick: CPU quickstart configs (R-18, half-width R-50 for Deformv2, from "
            "scratch, 192 px) on the synthetic data"
            if self.quick
            else "R-50 configs of configs/ (ImageNet init)"
        )
        return "\n".join(
            [
                f"## {title}",
                "",
                f"Produced by this run of projects/paper ({mode}); rows marked (paper) are the "
                "paper's numbers, typed in from the paper, not results of this repository.",
                f"Data: {self.source.kind} at {self.source.path} ({data}).",
            ]
        )

    def runs_note(self, names: Sequence[str]) -> str:
        """One line per step: config, iterations, wall time."""
        lines = ["", "Runs:"]
        for n in names:
            if n in self.overridden:
                lines.append(f"- {n}: not run; genotype given with --genotype {self.args.genotype}")
                continue
            r = self.ran.get(n) or self.record(n)
            it = f", {r['max_iter']} iterations at batch {r['batch']}" if "max_iter" in r else ""
            ep = f", search epochs: {r['epochs']} at batch {r['batch']}" if "epochs" in r else ""
            lines.append(
                f"- {n}: {r['config']}{it}{ep}, {r['wall_s']:.0f} s on {r['num_gpus']} "
                "process(es)" + (f"; genotype {r['genotype']}" if r.get("genotype") else "")
            )
        return "\n".join(lines)

    def table_text(
        self,
        title: str,
        splits: Sequence[str],
        table: str,
        step_names: Sequence[str],
        notes: Sequence[str] = (),
    ) -> str:
        """A table's markdown: :meth:`header`, the table, each note after a blank line,
        :meth:`runs_note`."""
        parts = [self.header(title, splits), "", table]
        for note in notes:
            parts += ["", note]
        return "\n".join(parts + [self.runs_note(step_names)])

    def write_json(self, filename: str, obj) -> str:
        """``obj`` as indented JSON in the output folder, a dict with this run's ``provenance``
        added; returns the path."""
        if isinstance(obj, dict):
            obj = {**obj, "provenance": self.provenance()}
        path = os.path.join(self.output, filename)
        with PathManager.open(path, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
        return path

    def write(self, filename: str, text: str) -> str:
        """``text`` and this run's provenance line in the output folder; printed; returns the
        path."""
        from elixir_d2.provenance import provenance_line

        text += "\n\n" + provenance_line(self.provenance())
        path = os.path.join(self.output, filename)
        with PathManager.open(path, "w", encoding="utf-8") as f:
            f.write(text + "\n")
        print(text)
        print(f"[paper] written to {path}")
        return path


# ------------------------------------------------------------------------------ entry point
def recipe_main(
    doc: str, kind: str, step_list: Sequence, render, argv: Optional[Sequence[str]] = None
):
    """Parse the recipe arguments, prepare the data, run ``step_list``, return
    ``render(recipe)``."""
    parser = add_recipe_args(
        argparse.ArgumentParser(
            description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
        )
    )
    args = parser.parse_args(argv)
    if not logging.getLogger("elixir_d2.paper").handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter("[paper] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    source = prepare_data(kind, args.root, args.quick)
    # in process (argv given): the file of the recipe whose render this is, as the command's head
    recipe = Recipe(
        args, source, None if argv is None else [sys.modules[render.__module__].__file__, *argv]
    )
    recipe.run(step_list)
    return render(recipe)
