"""The GPU check (issue 35), run by scripts/gpu_check.sh: one command, at most --budget seconds.

Stages, each printing one line with its time: env (torch, CUDA, the GPU), deps (what is missing
installed offline from the bundle of scripts/gpu_bundle.sh), data (the synthetic set), tests
(the suite's CUDA-aware tests under pytest), train_quickstart (quickstart FPN and ElixirNet),
train_r50 (every configs/*R_50*.yaml on the synthetic set: train_net.py, then the two search
configs with search_net.py from the trained R-50 FPN), speed (projects/benchmarks/gpu_speed.py:
ms/image at 512x512 and peak memory). Training runs under float16 AMP (SOLVER.AMP). Results:
<out>/gpu_check.json and gpu_check.md; each subprocess's output in <out>/logs/.

Without CUDA it stops at once (exit code 3) unless --cpu-dry-run, which runs every stage at
minimal size on the CPU (bfloat16 autocast instead of float16) to check the plumbing.
Only the standard library is imported here: the packages may not be installed yet.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_check_runs as runs  # noqa: E402

REPO = runs.REPO
EXIT_NO_CUDA = 3
STAGES = ("env", "deps", "data", "tests", "train_quickstart", "train_r50", "speed")
# The test files that add CUDA cases when a GPU is present (the rest of the suite pins
# MODEL.DEVICE cpu; CI runs it).
CUDA_TEST_FILES = (
    "tests/test_amp.py",
    "tests/test_amp_configs.py",
    "tests/test_amp_training.py",
    "tests/test_backbones.py",
    "tests/test_search_amp.py",
    "tests/test_cuda_agreement.py",
)
DRY_TEST_FILES = ("tests/test_amp.py",)
# import name -> why the check needs it (the bundle's manifest maps import names to wheels)
NEEDED = {
    "detectron2": "the framework",
    "fvcore": "detectron2, TRPN's focal loss",
    "iopath": "detectron2's PathManager",
    "yacs": "detectron2's CfgNode",
    "termcolor": "detectron2's logger",
    "tabulate": "detectron2's tables",
    "cloudpickle": "detectron2.utils.serialize",
    "omegaconf": "detectron2.engine.defaults",
    "antlr4": "omegaconf",
    "portalocker": "iopath",
    "pycocotools": "the lesion evaluator's AP",
    "tensorboard": "DefaultTrainer's TensorboardXWriter",
    "google.protobuf": "tensorboard",
    "cv2": "detectron2's transforms",
    "matplotlib": "FROC plots",
    "yaml": "configs",
    "tqdm": "iopath",
    "PIL": "detectron2",
    "pytest": "the tests stage",
}


def say(line: str) -> None:
    print(f"[gpu_check] {line}", flush=True)


def stage_line(name: str, status: str, seconds: float, detail: str) -> None:
    say(f"{name:17s} {status:8s} {seconds:6.1f} s  {detail}")


# ------------------------------------------------------------------ deps
def missing_modules(names: Sequence[str]) -> List[str]:
    """The import names of ``names`` that this interpreter cannot find."""
    out = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


def unpack_wheel(wheel: str, target: str) -> None:
    """Install ``wheel`` into ``target`` without pip (a wheel is a zip of the installed tree;
    a ``*.data/purelib`` or ``platlib`` part belongs at the top)."""
    with zipfile.ZipFile(wheel) as z:
        z.extractall(target)
        data_dirs = {n.split("/")[0] for n in z.namelist() if n.split("/")[0].endswith(".data")}
    for data in data_dirs:
        for lib in ("purelib", "platlib"):
            src = os.path.join(target, data, lib)
            if os.path.isdir(src):
                shutil.copytree(src, target, dirs_exist_ok=True)
        shutil.rmtree(os.path.join(target, data))


def install_from_bundle(
    bundle: str, target: str, names: Sequence[str], use_pip: Optional[bool] = None
) -> List[str]:
    """Install offline into ``target`` the bundle wheels of the import names ``names`` (with pip
    where this Python has it, else by unpacking them); returns the wheel files installed.
    ValueError naming what the bundle lacks or a bundle made for another Python."""
    manifest_path = os.path.join(bundle, "manifest.json")
    if not os.path.isfile(manifest_path):
        raise ValueError(
            f"{manifest_path} not found: run scripts/gpu_bundle.sh on a machine with "
            "network access first (it fills the bundle folder)"
        )
    with open(manifest_path, encoding="utf-8") as f:
        manifest = json.load(f)
    wheels = manifest["wheels"]
    lacking = [n for n in names if n not in wheels]
    if lacking:
        raise ValueError(
            f"{manifest_path} has no wheel for {', '.join(lacking)} (needed by "
            f"{'; '.join(NEEDED.get(n, '?') for n in lacking)})"
        )
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    made_for = manifest.get("python_version", here)
    if made_for != here:
        raise ValueError(
            f"{manifest_path} was made for Python {made_for}, this is {here}: run "
            f"scripts/gpu_bundle.sh --python-version {here}"
        )
    files = sorted({os.path.join(bundle, wheels[n]) for n in names})
    absent = [w for w in files if not os.path.isfile(w)]
    if absent:
        raise ValueError(f"bundle wheel {absent[0]} listed in {manifest_path} is missing")
    os.makedirs(target, exist_ok=True)
    if use_pip is None:
        use_pip = importlib.util.find_spec("pip") is not None
    if use_pip:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--disable-pip-version-check",
                "--target",
                target,
                *files,
            ],
            check=True,
        )
    else:  # a venv made without pip (uv makes them so)
        for w in files:
            unpack_wheel(w, target)
    return [os.path.basename(w) for w in files]


# ------------------------------------------------------------------ stages
class Check:
    """The state of one run of the check: options, environment, deadline, stage results."""

    def __init__(self, args: argparse.Namespace, info: Dict):
        self.args, self.dry, self.info = args, args.cpu_dry_run, info
        self.out = os.path.abspath(args.out)
        self.work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="elixir_gpu_check_"))
        self.logs = os.path.join(self.out, "logs")
        os.makedirs(self.logs, exist_ok=True)
        self.deadline = time.monotonic() + args.budget - info["probe_s"]
        self.results: Dict[str, Dict] = {}
        self.env = dict(os.environ)
        self.env["PYTHONPATH"] = os.pathsep.join(
            p for p in (REPO, self.env.get("PYTHONPATH", "")) if p
        )
        self.env.setdefault("OMP_NUM_THREADS", "1" if self.dry else "2")
        self.env.setdefault("MPLBACKEND", "Agg")
        if self.dry:
            self.env["DETECTRON2_DATASETS"] = os.path.join(self.work, "datasets")
        self.env.setdefault("DETECTRON2_DATASETS", os.path.join(REPO, "datasets"))
        self.plan = runs.plan(self.dry)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def cap(self, seconds: float) -> float:
        """A stage's time limit: its own cap, within what is left of the budget."""
        return max(1.0, min(seconds, self.left() - 5))

    def python(self, args: Sequence[str], name: str, timeout: float) -> runs.Proc:
        return runs.run_proc(
            [sys.executable, *args], os.path.join(self.logs, f"{name}.log"), timeout, self.env
        )

    def record(self, name: str, status: str, t0: float, detail: str, **extra) -> bool:
        seconds = time.perf_counter() - t0 + (self.info["probe_s"] if name == "env" else 0.0)
        self.results[name] = {
            "status": status,
            "seconds": round(seconds, 1),
            "detail": detail,
            **extra,
        }
        stage_line(name, status, seconds, detail)
        return status == "ok"

    # Each stage returns whether it passed; a failed env / deps / data stage stops the check.
    def env_stage(self, t0: float) -> bool:
        info = self.info
        gpu = info.get("gpu") or "no GPU (CPU dry run)"
        return self.record(
            "env",
            "ok",
            t0,
            f"{gpu}; torch {info['torch']}, CUDA {info['cuda']}, Python {info['python']}",
            info=info,
        )

    def deps_stage(self, t0: float) -> bool:
        # The bundle's wheels hold what NEEDED imports in turn (tensorboard's absl ...): every
        # import name of its manifest is checked too.
        manifest = os.path.join(self.args.bundle, "manifest.json")
        bundled = runs.read_json(manifest).get("wheels", {}) if os.path.isfile(manifest) else {}
        missing = missing_modules(sorted(set(NEEDED) | set(bundled)))
        installed: List[str] = []
        if missing:
            target = os.path.join(self.work, "site")
            try:
                installed = install_from_bundle(self.args.bundle, target, missing)
            except (ValueError, subprocess.CalledProcessError) as e:
                return self.record("deps", "failed", t0, f"missing {', '.join(missing)}: {e}")
            sys.path.insert(0, target)
            importlib.invalidate_caches()
            self.env["PYTHONPATH"] = os.pathsep.join((target, self.env["PYTHONPATH"]))
            still = missing_modules(missing)
            if still:
                return self.record(
                    "deps",
                    "failed",
                    t0,
                    f"still missing after installing the bundle: {', '.join(still)}",
                )
        absent = runs.absent_test_modules()
        detail = (
            f"installed from the bundle: {', '.join(missing)}"
            if missing
            else "every needed package already importable"
        )
        return self.record("deps", "ok", t0, detail, installed=installed, absent_optional=absent)

    def data_stage(self, t0: float) -> bool:
        p = self.python(["-c", runs.DATA_SNIPPET.format(dry=self.dry)], "data", self.cap(120))
        if p.rc != 0:
            return self.record("data", "failed", t0, f"synthetic set not written (see {p.log})")
        return self.record(
            "data", "ok", t0, f"synthetic set at {self.env['DETECTRON2_DATASETS']}/synthetic"
        )

    def tests_stage(self, t0: float) -> bool:
        files = list(DRY_TEST_FILES if self.dry else CUDA_TEST_FILES)
        junit = os.path.join(self.logs, "pytest.xml")
        args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *files]
        if not self.dry and not missing_modules(["xdist"]):
            args += ["-n", str(min(8, os.cpu_count() or 1))]
        p = self.python(args, "tests", self.cap(self.plan.tests_cap))
        counts = runs.junit_counts(junit)
        detail = (
            f"{counts['passed']} passed, {counts['failed']} failed, "
            f"{counts['skipped']} skipped (test files: {len(files)})"
            if counts
            else f"no JUnit report (see {p.log})"
        )
        status = "timeout" if p.timed_out else ("ok" if p.rc == 0 else "failed")
        not_run = sorted(set(glob.glob("tests/test_*.py", root_dir=REPO)) - set(files))
        return self.record(
            "tests",
            status,
            t0,
            detail,
            files=files,
            counts=counts,
            not_run=not_run,
            not_run_reason="they pin MODEL.DEVICE cpu or use no "
            "device; CI runs them; not repeated within the time budget",
        )

    def train_stage(self, name: str, jobs: List[runs.TrainJob], t0: float) -> bool:
        cap = self.cap(self.plan.caps[name])
        stop_at = time.monotonic() + cap
        done: List[Dict] = []

        def one(job: runs.TrainJob) -> Dict:
            left = stop_at - time.monotonic()
            if left < 5:
                return job.not_run("stage time cap reached before it started")
            return job.run(sys.executable, self.work, self.logs, self.env, left)

        waves = runs.waves(jobs)
        for wave in waves:
            with ThreadPoolExecutor(self.plan.parallel) as pool:
                done += list(pool.map(one, [runs.resolve(j, done) for j in wave]))
        ok = sum(r["status"] == "ok" for r in done)
        status = "ok" if ok == len(done) else "failed"
        return self.record(
            name, status, t0, f"{ok}/{len(done)} runs ok ({self.plan.precision} AMP)", runs=done
        )

    def speed_stage(self, t0: float) -> bool:
        rec_path = os.path.join(self.out, "gpu_speed.json")
        p = self.python(
            [
                os.path.join(REPO, "projects", "benchmarks", "gpu_speed.py"),
                "--json",
                rec_path,
                *self.plan.speed_args,
            ],
            "speed",
            self.cap(self.plan.caps["speed"]),
        )
        if p.rc != 0 or not os.path.isfile(rec_path):
            status = "timeout" if p.timed_out else "failed"
            return self.record("speed", status, t0, f"no timing (see {p.log})")
        with open(rec_path, encoding="utf-8") as f:
            rec = json.load(f)
        detail = "; ".join(
            f"{n} {prec} {v['ms_per_image']:.1f} ms"
            for n, r in rec["models"].items()
            for prec, v in r["precisions"].items()
        )
        return self.record("speed", "ok", t0, detail, record=rec)

    def run(self) -> int:
        try:
            return self._run()
        finally:  # also when interrupted: checkpoints of 14 R-50 runs are large
            if not self.args.keep_work and not self.args.work:
                shutil.rmtree(self.work, ignore_errors=True)

    def _run(self) -> int:
        wanted = [s for s in STAGES if s in self.args.only] if self.args.only else list(STAGES)
        required = ("env", "deps", "data")
        for name in STAGES:
            if name not in wanted and name not in required:
                continue
            t0 = time.perf_counter()
            if self.left() < 10:
                self.record(name, "skipped", t0, "time budget spent")
                continue
            if name in ("train_quickstart", "train_r50"):
                ok = self.train_stage(name, self.plan.jobs[name], t0)
            else:
                ok = getattr(self, f"{name}_stage")(t0)
            if not ok and name in required:
                break
        return self.finish()

    def finish(self) -> int:
        rec = {
            "mode": "cpu-dry-run" if self.dry else "gpu",
            "budget_s": self.args.budget,
            "plan": self.plan.describe(),
            "stages": self.results,
            "commit": runs.commit(),
        }
        with open(os.path.join(self.out, "gpu_check.json"), "w", encoding="utf-8") as f:
            json.dump(rec, f, indent=1)
        md = runs.markdown(rec)
        with open(os.path.join(self.out, "gpu_check.md"), "w", encoding="utf-8") as f:
            f.write(md)
        failed = [n for n, r in self.results.items() if r["status"] != "ok"]
        say(
            f"results: {os.path.join(self.out, 'gpu_check.md')} and gpu_check.json; "
            + (f"not ok: {', '.join(failed)}" if failed else "every stage ok")
        )
        return 1 if failed else 0


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="scripts/gpu_check.sh",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--out",
        default=os.environ.get("OUT") or os.path.join(REPO, "output", "gpu_check"),
        help="results folder (default $OUT, else output/gpu_check)",
    )
    ap.add_argument(
        "--cpu-dry-run",
        action="store_true",
        help="every stage at minimal size on the CPU (no GPU needed)",
    )
    ap.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole check (default 460; dry run 150)",
    )
    ap.add_argument(
        "--bundle",
        default=os.path.join(REPO, ".gpu_bundle"),
        help="folder written by scripts/gpu_bundle.sh",
    )
    ap.add_argument(
        "--work",
        default=None,
        help="scratch folder for checkpoints (default: a temporary one, removed)",
    )
    ap.add_argument("--keep-work", action="store_true", help="keep the temporary scratch folder")
    ap.add_argument(
        "--only",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        default=None,
        help=f"comma-separated stages of {', '.join(STAGES)} (env, deps and data always run)",
    )
    args = ap.parse_args(argv)
    if args.budget is None:
        args.budget = 150.0 if args.cpu_dry_run else 460.0
    if args.budget <= 0:
        ap.error(f"--budget must be > 0 seconds, got {args.budget:g}")
    unknown = [s for s in args.only or [] if s not in STAGES]
    if unknown:
        ap.error(f"--only: unknown stage {unknown[0]!r}; stages: {', '.join(STAGES)}")
    return args


def probe_env() -> Optional[Dict]:
    """scripts/gpu_env.py's record (Python, torch, CUDA, the GPU), None where torch fails."""
    p = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "gpu_env.py")],
        capture_output=True,
        text=True,
    )
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if p.returncode == 0 and lines else None


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    info = probe_env()
    if info is None:
        say(
            f"error: {sys.executable} cannot import torch; set PYTHON to an interpreter with "
            "torch (and CUDA)"
        )
        return 2
    if not info["cuda_available"] and not args.cpu_dry_run:
        say(
            f"error: no CUDA device (torch {info['torch']}, CUDA {info['cuda']} sees none): "
            "this check needs a GPU; --cpu-dry-run runs every stage at minimal size on the CPU"
        )
        return EXIT_NO_CUDA
    info["probe_s"] = time.perf_counter() - t0
    mode = "CPU dry run" if args.cpu_dry_run else "GPU"
    say(f"{mode} check, budget {args.budget:.0f} s, results in {os.path.abspath(args.out)}")
    return Check(args, info).run()


if __name__ == "__main__":
    sys.exit(main())
