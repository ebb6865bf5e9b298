"""The GPU check's plan (which runs, their overrides and time caps), its subprocesses and its
report; scripts/gpu_check.py runs them. Standard library only."""

from __future__ import annotations

import glob
import json
import math
import os
import re
import signal
import statistics
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The check's synthetic set: the full default set on the GPU (generated on first use anyway);
# a tiny one in the dry run, so that one CPU core evaluates it in seconds.
DATA_SNIPPET = """
import os
from elixir_d2.data import datasets_root, ensure_synthetic
out = os.path.join(datasets_root(), "synthetic")
if {dry}:
    ensure_synthetic(out, num_patients=6, slices_per_series=(8, 10), keys_per_series=(1, 2),
                     image_size=64, seed=3)
else:
    ensure_synthetic(out)
"""


@dataclass
class Proc:
    rc: Optional[int]
    seconds: float
    timed_out: bool
    log: str


def run_proc(cmd: Sequence[str], log: str, timeout: float, env: Dict[str, str]) -> Proc:
    """Run ``cmd`` in the repository, output to ``log``; past ``timeout`` seconds its process
    group is killed (a trainer's data-loader workers with it)."""
    t0 = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        p = subprocess.Popen(
            list(cmd), cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            rc, timed_out = p.wait(timeout=timeout), False
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            rc, timed_out = None, True
    return Proc(rc, time.perf_counter() - t0, timed_out, log)


def read_json(path: str) -> Dict:
    """The JSON object in ``path``."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def junit_counts(path: str) -> Optional[Dict[str, int]]:
    """passed / failed / skipped counts of a pytest JUnit XML report (errors count as failed)."""
    if not os.path.isfile(path):
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    n = {
        k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")
    }
    failed = n["failures"] + n["errors"]
    return {"passed": n["tests"] - failed - n["skipped"], "failed": failed, "skipped": n["skipped"]}


def absent_test_modules() -> Dict[str, List[str]]:
    """Third-party modules some test file imports that this interpreter lacks -> those files
    (none of them is in the check's CUDA subset; listed so the report says what was not run)."""
    import importlib.util

    out: Dict[str, List[str]] = {}
    pattern = re.compile(r"^\s*(?:import|from)\s+([A-Za-z_]\w*)", re.M)
    for path in sorted(glob.glob(os.path.join(REPO, "tests", "test_*.py"))):
        for mod in sorted(set(pattern.findall(open(path, encoding="utf-8").read()))):
            if mod in ("SimpleITK", "pydicom", "highdicom", "selenium", "hypothesis"):
                if importlib.util.find_spec(mod) is None:
                    out.setdefault(mod, []).append(os.path.relpath(path, REPO))
    return out


def commit() -> str:
    """The checked-out commit (short), or "unknown" where the tree came without its git folder."""
    from elixir_d2.provenance import git_commit

    return (git_commit(REPO) or "unknown")[:7]


# ------------------------------------------------------------------ training runs
@dataclass
class TrainJob:
    """One train_net.py / search_net.py run; ``weights_from`` names the job whose
    model_final.pth becomes MODEL.WEIGHTS (the search starts from the trained FPN)."""

    name: str
    script: str
    config: str
    opts: List[str]
    weights_from: Optional[str] = None

    def not_run(self, why: str) -> Dict:
        return {"name": self.name, "config": self.config, "status": "not run", "why": why}

    def run(self, python: str, work: str, logs: str, env: Dict[str, str], timeout: float) -> Dict:
        out_dir = os.path.join(work, self.name)
        opts = list(self.opts)
        if self.weights_from:  # after the job's own opts: the last value of a key wins
            opts += ["MODEL.WEIGHTS", os.path.join(work, self.weights_from, "model_final.pth")]
        cmd = [
            python,
            os.path.join(REPO, self.script),
            "--config-file",
            self.config,
            *opts,
            "OUTPUT_DIR",
            out_dir,
        ]
        p = run_proc(cmd, os.path.join(logs, f"{self.name}.log"), timeout, env)
        res = {
            "name": self.name,
            "config": self.config,
            "script": self.script,
            "opts": opts,
            "seconds": round(p.seconds, 1),
            "log": os.path.basename(p.log),
        }
        res.update(read_run(out_dir, p.log, self.script))
        if p.timed_out:
            res.update(status="timeout", why=f"killed after {timeout:.0f} s")
        elif p.rc != 0:
            res.update(status="failed", why=f"exit code {p.rc}: {last_error(p.log)}")
        elif self.script == "search_net.py" and not res.get("genotype_written"):
            res.update(status="failed", why="no genotype.yaml written")
        elif self.script == "train_net.py" and not res.get("losses_finite", False):
            res.update(status="failed", why="no finite training losses in metrics.json")
        else:
            res["status"] = "ok"
        return res


def last_error(log: str) -> str:
    """The last line of ``log`` that names an error, else its last line."""
    lines = [ln.strip() for ln in open(log, encoding="utf-8").read().splitlines() if ln.strip()]
    errors = [ln for ln in lines if re.search(r"Error|error:|Exception", ln)]
    return (errors or lines or ["(empty log)"])[-1][:300]


def read_run(out_dir: str, log: str, script: str) -> Dict:
    """What a run left: iterations, s/iteration, last loss, peak memory, evaluation."""
    res: Dict = {}
    metrics = os.path.join(out_dir, "metrics.json")
    if os.path.isfile(metrics):
        rows = [
            json.loads(ln) for ln in open(metrics, encoding="utf-8") if ln.strip().startswith("{")
        ]
        losses = [r for r in rows if "total_loss" in r]
        if losses:
            res["iterations"] = losses[-1]["iteration"] + 1
            res["last_total_loss"] = losses[-1]["total_loss"]
            res["losses_finite"] = all(math.isfinite(r["total_loss"]) for r in losses)
            times = [r["time"] for r in losses if "time" in r]
            if times:
                res["s_per_iter"] = statistics.median(times)
    mem = (
        re.findall(r"max_mem: (\d+)M", open(log, encoding="utf-8").read())
        if os.path.isfile(log)
        else []
    )
    if mem:
        res["max_mem_mib"] = int(mem[-1])
    for path in glob.glob(os.path.join(out_dir, "inference", "*", "lesion_metrics.json")):
        with open(path, encoding="utf-8") as f:
            m = json.load(f)["metrics"]
        res["eval"] = {k: m.get(k) for k in ("mean_sens_iou", "sens@4_iou", "AP50")}
    if script == "search_net.py":
        res["genotype_written"] = os.path.isfile(os.path.join(out_dir, "genotype.yaml"))
    return res


def waves(jobs: Sequence[TrainJob]) -> List[List[TrainJob]]:
    """Jobs without ``weights_from`` first, then those that need another job's weights."""
    first = [j for j in jobs if j.weights_from is None]
    return [w for w in (first, [j for j in jobs if j.weights_from is not None]) if w]


def resolve(job: TrainJob, done: Sequence[Dict]) -> "TrainJob | _Skipped":
    """``job`` itself, unless the run whose weights it starts from did not train: then a
    stand-in that reports it as not run."""
    if job.weights_from is None:
        return job
    src = next((r for r in done if r["name"] == job.weights_from), None)
    if src is None or src["status"] != "ok":
        return _Skipped(job, f"needs the weights of {job.weights_from}, which did not train")
    return job


@dataclass
class _Skipped:
    job: TrainJob
    why: str

    def run(self, *args, **kwargs) -> Dict:
        return self.job.not_run(self.why)

    def not_run(self, why: str) -> Dict:
        return self.job.not_run(self.why)


@dataclass
class Plan:
    """Sizes, caps (seconds) and runs of one mode of the check."""

    dry: bool
    precision: str
    parallel: int
    tests_cap: float
    caps: Dict[str, float]
    jobs: Dict[str, List[TrainJob]] = field(default_factory=dict)
    speed_args: List[str] = field(default_factory=list)

    def describe(self) -> Dict:
        return {
            "precision": self.precision,
            "parallel": self.parallel,
            "caps_s": dict(self.caps, tests=self.tests_cap),
            "speed_args": self.speed_args,
            "jobs": {k: [j.name for j in v] for k, v in self.jobs.items()},
        }


def schedule(iters: int) -> List[str]:
    """Overrides for ``iters`` iterations: LR steps at 80%, short warm-up, no checkpoint or
    evaluation before the end (train_net.py evaluates after the last iteration)."""
    return [
        "SOLVER.MAX_ITER",
        str(iters),
        "SOLVER.STEPS",
        f"({max(1, int(0.8 * iters))},)",
        "SOLVER.WARMUP_ITERS",
        str(max(1, min(50, iters // 5))),
        "SOLVER.CHECKPOINT_PERIOD",
        "1000000",
        "TEST.EVAL_PERIOD",
        "0",
    ]


# From scratch (no ImageNet weights offline), a FrozenBN R-50 overflows float16 (random convs
# between identity norms, projects/benchmarks/models_speed.py): BatchNorm trains it instead.
R50_OPTS = [
    "MODEL.WEIGHTS",
    "",
    "MODEL.RESNETS.NORM",
    "BN",
    "MODEL.BACKBONE.FREEZE_AT",
    "0",
    "DATASETS.TRAIN",
    "('synthetic_train',)",
    "DATASETS.TEST",
    "('synthetic_test',)",
    "SOLVER.BASE_LR",
    "0.01",
    "SOLVER.CLIP_GRADIENTS.ENABLED",
    "True",
    "SOLVER.CLIP_GRADIENTS.CLIP_TYPE",
    "norm",
    "SOLVER.CLIP_GRADIENTS.CLIP_VALUE",
    "5.0",
]
# Trained first (the search starts from it, the paper's Table 1 pair next); KiTS19 last.
R50_FIRST = ("fpn_R_50_deeplesion", "elixirnet_R_50_FPN_deeplesion")


def r50_configs() -> List[str]:
    """configs/*R_50*.yaml, R50_FIRST first, the KiTS19 ones last."""
    names = sorted(
        os.path.basename(p)[:-5] for p in glob.glob(os.path.join(REPO, "configs", "*R_50*.yaml"))
    )
    return sorted(
        names,
        key=lambda n: (
            n not in R50_FIRST,
            "kits19" in n,
            R50_FIRST.index(n) if n in R50_FIRST else 0,
            n,
        ),
    )


def plan(dry: bool) -> Plan:
    """The GPU plan (sizes that fit the 460 s budget on one H100), or the CPU dry run's."""
    precision = "bfloat16" if dry else "float16"
    device = [
        "MODEL.DEVICE",
        "cpu" if dry else "cuda",
        "SOLVER.AMP.ENABLED",
        "True",
        "SOLVER.AMP.PRECISION",
        precision,
        "DATALOADER.NUM_WORKERS",
        "0" if dry else "2",
    ]
    # dry run: small images and few RoIs (the search head runs every op on every sampled RoI)
    small = (
        [
            "INPUT.MAX_IMAGE_SIZE",
            "96",
            "MODEL.RPN.POST_NMS_TOPK_TRAIN",
            "64",
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
            "16",
        ]
        if dry
        else []
    )
    p = Plan(
        dry,
        precision,
        parallel=2 if dry else 5,
        tests_cap=60 if dry else 100,
        caps={
            "train_quickstart": 60 if dry else 80,
            "train_r50": 90 if dry else 190,
            "speed": 30 if dry else 70,
        },
    )
    quick_iters, r50_iters = (2, 2) if dry else (300, 200)
    p.jobs["train_quickstart"] = [
        TrainJob(
            f"quickstart_{n}",
            "train_net.py",
            f"configs/quickstart/{n}.yaml",
            device + small + schedule(quick_iters),
        )
        for n in ("fpn", "elixirnet")
    ]
    batch = ["SOLVER.IMS_PER_BATCH", "2" if dry else "4"]
    names = r50_configs()
    if dry:  # one R-50 train_net.py run and the search that starts from it
        names = [R50_FIRST[0], "search_alb_R_50_FPN_deeplesion"]
    jobs = []
    for n in names:
        cfg = f"configs/{n}.yaml"
        if n.startswith("search_"):
            opts = (
                device
                + small
                + R50_OPTS
                + [
                    "SOLVER.IMS_PER_BATCH",
                    "2" if dry else "8",
                    "SEARCH.EPOCHS",
                    "1",
                    "SEARCH.WARMUP_EPOCHS",
                    "0",
                ]
            )
            jobs.append(TrainJob(n, "search_net.py", cfg, opts, weights_from=R50_FIRST[0]))
        else:
            jobs.append(
                TrainJob(
                    n, "train_net.py", cfg, device + small + R50_OPTS + batch + schedule(r50_iters)
                )
            )
    p.jobs["train_r50"] = jobs
    p.speed_args = (
        [
            "--device",
            "cpu",
            "--quick",
            "--size",
            "64",
            "--rounds",
            "1",
            "--warmup",
            "0",
            "--precisions",
            "float32",
            "--threads",
            "1",
        ]
        if dry
        else [
            "--device",
            "cuda",
            "--size",
            "512",
            "--rounds",
            "50",
            "--warmup",
            "10",
            "--precisions",
            "float32,float16",
            "--threads",
            "4",
        ]
    )
    return p


def markdown(rec: Dict) -> str:
    """The short report: stages, training runs, the speed table against the paper's."""
    st = rec["stages"]
    env = st.get("env", {}).get("info", {})
    lines = [
        f"# GPU check ({rec['mode']}, commit {rec['commit']})",
        "",
        f"Device: {env.get('gpu') or 'none (CPU)'}; torch {env.get('torch')}, CUDA "
        f"{env.get('cuda')}, Python {env.get('python')}. Budget {rec['budget_s']:.0f} s.",
        "",
        "| stage | status | s | detail |",
        "|:--|:--|--:|:--|",
    ]
    lines += [
        f"| {n} | {r['status']} | {r['seconds']:.0f} | {r['detail']} |" for n, r in st.items()
    ]
    tests, absent = st.get("tests", {}), st.get("deps", {}).get("absent_optional") or {}
    if tests.get("files"):
        lines += [
            "",
            f"Tests run: {', '.join(tests['files'])}. Not run: "
            f"{len(tests['not_run'])} other test files ({tests['not_run_reason']}).",
        ]
    if absent:
        lines += [
            "Not installed here (not bundled, see scripts/gpu_bundle.py): "
            + "; ".join(f"{m}, imported by {', '.join(f)}" for m, f in absent.items())
            + "."
        ]
    train = [r for n in ("train_quickstart", "train_r50") for r in st.get(n, {}).get("runs", [])]
    if train:
        lines += [
            "",
            f"Training ({rec['plan']['precision']} AMP; eval on the synthetic test "
            "split after the last iteration):",
            "",
            "| run | status | iters | s/iter | last loss | max mem MiB | mean sens IoU |",
            "|:--|:--|--:|--:|--:|--:|--:|",
        ]
        for r in train:
            ev = (r.get("eval") or {}).get("mean_sens_iou")
            cells = [
                r.get("iterations"),
                r.get("s_per_iter"),
                r.get("last_total_loss"),
                r.get("max_mem_mib"),
                ev,
            ]
            lines.append(
                f"| {r['name']} | {r['status']}"
                + (f" ({r['why']})" if r.get("why") else "")
                + " | "
                + " | ".join(
                    "-" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)
                    for v in cells
                )
                + " |"
            )
    speed = st.get("speed", {}).get("record")
    if speed:
        from_paper = speed["paper_ms"]
        lines += [
            "",
            f"Inference at {speed['size']}x{speed['size']}, batch 1, "
            f"{speed['rounds']} timed rounds after {speed['warmup']} warm-up, "
            f"{speed['weights']}, on {speed['device_name']}:",
            "",
        ]
        lines += ["| model | precision | ms/image | x FPN | peak MiB |", "|:--|:--|--:|--:|--:|"]
        for name, r in speed["models"].items():
            for prec, v in r["precisions"].items():
                mem = v["peak_memory_mib"]
                lines.append(
                    f"| {name} | {prec} | {v['ms_per_image']:.1f} | "
                    f"{v['ratio_to_fpn']:.2f} | {'-' if mem is None else f'{mem:.0f}'} |"
                )
        lines += [
            "",
            f"Paper, Table 1 ({from_paper['hardware']}): "
            + ", ".join(f"{k} {v:.0f} ms" for k, v in from_paper["values"].items())
            + " per image; not the same GPU, weights or input.",
        ]
    return "\n".join(lines) + "\n"
