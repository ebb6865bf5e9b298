"""The GPU check's CPU-checkable parts (issue 35): scripts/gpu_check.sh refuses without CUDA and
runs every stage at minimal size with --cpu-dry-run; its plan covers every R-50 config; the
offline install from a bundle; scripts/gpu_bundle.sh's argument checks (no network here);
projects/benchmarks/gpu_speed.py on the CPU."""

import glob
import importlib
import json
import os
import re
import subprocess
import sys
import zipfile

import pytest

from detectron2.modeling import build_model

from elixir_d2 import load_config

import gpu_speed
import models_speed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "scripts"))
gpu_check = importlib.import_module("gpu_check")
runs = importlib.import_module("gpu_check_runs")
gpu_bundle = importlib.import_module("gpu_bundle")

NO_CUDA = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")


def _sh(script, *args, env=NO_CUDA, timeout=300):
    return subprocess.run(
        ["bash", os.path.join(REPO, "scripts", script), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# ------------------------------------------------------------------ gpu_check.sh
def test_refuses_without_cuda_in_one_line_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    p = _sh("gpu_check.sh", "--out", str(out), timeout=120)
    assert p.returncode == gpu_check.EXIT_NO_CUDA == 3
    lines = (p.stdout + p.stderr).strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--cpu-dry-run" in lines[0]
    assert not out.exists()


def test_bad_arguments_are_one_line_errors(tmp_path):
    p = _sh("gpu_check.sh", "--only", "train,speed", "--out", str(tmp_path), timeout=60)
    assert p.returncode == 2 and "--only: unknown stage 'train'" in p.stderr


def test_cpu_dry_run_runs_every_stage(tmp_path):
    out = tmp_path / "out"
    p = _sh("gpu_check.sh", "--cpu-dry-run", "--out", str(out), "--work", str(tmp_path / "w"))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    stage_lines = [
        ln for ln in p.stdout.splitlines() if ln.split()[1:2] and ln.split()[1] in gpu_check.STAGES
    ]
    assert [ln.split()[1] for ln in stage_lines] == list(gpu_check.STAGES)
    assert all(ln.split()[2] == "ok" and ln.split()[4] == "s" for ln in stage_lines)
    rec = json.loads((out / "gpu_check.json").read_text(encoding="utf-8"))
    assert rec["mode"] == "cpu-dry-run" and set(rec["stages"]) == set(gpu_check.STAGES)
    tests = rec["stages"]["tests"]
    assert tests["counts"]["passed"] > 0 and tests["counts"]["failed"] == 0
    assert "tests/test_gpu_check.py" in tests["not_run"]
    trained = rec["stages"]["train_quickstart"]["runs"] + rec["stages"]["train_r50"]["runs"]
    by_name = {r["name"]: r for r in trained}
    assert set(by_name) == {
        "quickstart_fpn",
        "quickstart_elixirnet",
        "fpn_R_50_deeplesion",
        "search_alb_R_50_FPN_deeplesion",
    }
    for name, r in by_name.items():
        assert r["status"] == "ok", r
        if r["script"] == "train_net.py":
            assert r["iterations"] == 2 and r["losses_finite"], r
            assert "SOLVER.AMP.PRECISION" in r["opts"] and "eval" in r
    search = by_name["search_alb_R_50_FPN_deeplesion"]
    assert search["genotype_written"]
    opts = search["opts"]
    last = len(opts) - 1 - opts[::-1].index("MODEL.WEIGHTS")  # the value that takes effect
    assert opts[last + 1].endswith(os.path.join("fpn_R_50_deeplesion", "model_final.pth"))
    speed = rec["stages"]["speed"]["record"]
    assert set(speed["models"]) == {"FPN", "ElixirNet w FPN"}
    assert all(
        v["ms_per_image"] > 0 for r in speed["models"].values() for v in r["precisions"].values()
    )
    md = (out / "gpu_check.md").read_text(encoding="utf-8")
    assert "| speed | ok |" in md and "Paper, Table 1 (4 GTX1080): FPN 68 ms" in md
    assert {"tests.log", "pytest.xml", "quickstart_fpn.log", "speed.log"} <= set(
        os.listdir(out / "logs")
    )


# ------------------------------------------------------------------ the plan
def test_gpu_plan_trains_every_r50_config_under_float16_amp():
    plan = runs.plan(dry=False)
    expected = {
        os.path.basename(p)[:-5]
        for p in os.listdir(os.path.join(REPO, "configs"))
        if "R_50" in p and p.endswith(".yaml")
    }
    jobs = plan.jobs["train_r50"]
    assert {j.name for j in jobs} == expected and len(jobs) == len(expected)
    assert [j.name for j in jobs[:2]] == ["fpn_R_50_deeplesion", "elixirnet_R_50_FPN_deeplesion"]
    for job in jobs + plan.jobs["train_quickstart"]:
        search = job.name.startswith("search_")
        assert job.script == ("search_net.py" if search else "train_net.py")
        assert job.weights_from == ("fpn_R_50_deeplesion" if search else None)
        cfg = load_config(os.path.join(REPO, job.config), job.opts)
        assert (cfg.MODEL.DEVICE, cfg.SOLVER.AMP.ENABLED, cfg.SOLVER.AMP.PRECISION) == (
            "cuda",
            True,
            "float16",
        )
        if job in plan.jobs["train_quickstart"]:
            assert cfg.SOLVER.MAX_ITER == 300
        else:
            assert cfg.DATASETS.TRAIN == ("synthetic_train",) and cfg.MODEL.WEIGHTS == ""
            assert cfg.SOLVER.MAX_ITER == 200 or search
    caps = plan.describe()["caps_s"]
    assert sum(caps.values()) <= 460  # the whole check fits its default budget


@pytest.mark.parametrize("job", runs.plan(dry=False).jobs["train_r50"], ids=lambda j: j.name)
def test_every_r50_run_of_the_gpu_plan_builds_with_its_overrides(job):
    # On the CPU: the device is the only override changed.
    opts = ["cpu" if o == "cuda" else o for o in job.opts]
    cfg = load_config(os.path.join(REPO, job.config), opts)
    model = build_model(cfg)
    norms = [type(m).__name__ for m in model.backbone.modules()]
    assert "FrozenBatchNorm2d" not in norms and "BatchNorm2d" in norms
    assert all(p.requires_grad for p in model.backbone.parameters())


def test_junit_counts(tmp_path):
    xml = tmp_path / "r.xml"
    xml.write_text(
        '<testsuites><testsuite tests="7" failures="1" errors="1" skipped="2"/></testsuites>',
        encoding="utf-8",
    )
    assert runs.junit_counts(str(xml)) == {"passed": 3, "failed": 2, "skipped": 2}
    assert runs.junit_counts(str(tmp_path / "none.xml")) is None


def test_test_files_needing_an_absent_module_are_listed(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "SimpleITK" else real(name, *a),
    )
    importing = re.compile(r"^\s*import SimpleITK", re.M)
    expected = sorted(
        os.path.relpath(p, REPO)
        for p in glob.glob(os.path.join(REPO, "tests", "test_*.py"))
        if importing.search(open(p, encoding="utf-8").read())
    )
    assert runs.absent_test_modules() == {"SimpleITK": expected} and expected


# ------------------------------------------------------------------ the bundle
def _fake_bundle(tmp_path):
    pkg = tmp_path / "src" / "elixir_fake_pkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("VALUE = 42\n", encoding="utf-8")
    (pkg / "data.txt").write_text("x", encoding="utf-8")
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    wheel = gpu_bundle.make_pure_wheel(str(pkg), "elixir-fake-pkg", "1.0", str(bundle))
    (bundle / "manifest.json").write_text(
        json.dumps({"wheels": {"elixir_fake_pkg": os.path.basename(wheel)}}), encoding="utf-8"
    )
    return bundle, wheel


@pytest.mark.parametrize("use_pip", [True, False], ids=["pip", "unpacked"])
def test_install_from_bundle_offline(tmp_path, use_pip):
    bundle, wheel = _fake_bundle(tmp_path)
    assert os.path.basename(wheel) == "elixir_fake_pkg-1.0-py3-none-any.whl"
    target = tmp_path / "site"
    assert gpu_check.install_from_bundle(
        str(bundle), str(target), ["elixir_fake_pkg"], use_pip=use_pip
    ) == [os.path.basename(wheel)]
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import elixir_fake_pkg as m, os; print(m.VALUE,"
            " os.path.isfile(os.path.join(os.path.dirname(m.__file__), "
            "'data.txt')))",
        ],
        env=dict(os.environ, PYTHONPATH=str(target)),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.split() == ["42", "True"]


def test_unpacked_wheel_puts_its_data_purelib_at_the_top(tmp_path):
    wheel = tmp_path / "extra-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("extra/__init__.py", "")
        z.writestr("extra-1.0.data/purelib/extra_top.py", "X = 1\n")
        z.writestr("extra-1.0.dist-info/RECORD", "")
    gpu_check.unpack_wheel(str(wheel), str(tmp_path / "site"))
    assert sorted(os.listdir(tmp_path / "site")) == ["extra", "extra-1.0.dist-info", "extra_top.py"]


def test_install_from_bundle_names_what_is_missing(tmp_path):
    bundle, _ = _fake_bundle(tmp_path)
    with pytest.raises(ValueError, match=r"has no wheel for detectron2 \(needed by the framework"):
        gpu_check.install_from_bundle(str(bundle), str(tmp_path / "t"), ["detectron2"])
    manifest = json.loads((bundle / "manifest.json").read_text(encoding="utf-8"))
    (bundle / "manifest.json").write_text(
        json.dumps(dict(manifest, python_version="3.2")), encoding="utf-8"
    )
    with pytest.raises(
        ValueError,
        match=r"made for Python 3\.2, this is 3\.\d+: run "
        r"scripts/gpu_bundle.sh --python-version 3\.\d+",
    ):
        gpu_check.install_from_bundle(str(bundle), str(tmp_path / "t"), ["elixir_fake_pkg"])
    with pytest.raises(
        ValueError,
        match=r"nowhere/manifest.json not found: run "
        r"scripts/gpu_bundle.sh",
    ):
        gpu_check.install_from_bundle(str(tmp_path / "nowhere"), str(tmp_path / "t"), ["x"])


@pytest.mark.parametrize(
    "args,message",
    [
        (["--python-version", "3.x"], "--python-version '3.x': expected MAJOR.MINOR"),
        (["--max-mib", "0"], "--max-mib must be > 0"),
    ],
)
def test_bundle_argument_errors(args, message):
    p = _sh("gpu_bundle.sh", *args, timeout=60)
    assert p.returncode == 2 and message in p.stderr.strip().splitlines()[-1]


def test_bundle_refuses_to_empty_a_folder_that_is_not_a_bundle(tmp_path):
    (tmp_path / "keep.txt").write_text("mine", encoding="utf-8")
    p = _sh("gpu_bundle.sh", "--out", str(tmp_path), timeout=60)
    assert p.returncode == 2 and "not a bundle folder" in p.stderr
    assert (tmp_path / "keep.txt").read_text(encoding="utf-8") == "mine"


# ------------------------------------------------------------------ gpu_speed.py
def test_gpu_speed_on_the_cpu(tmp_path):
    path = tmp_path / "speed.json"
    argv = [
        "--device",
        "cpu",
        "--quick",
        "--size",
        "64",
        "--rounds",
        "3",
        "--warmup",
        "1",
        "--threads",
        "1",
        "--json",
        str(path),
    ]
    gpu_speed.main(argv)
    rec = json.loads(path.read_text(encoding="utf-8"))
    prov = rec["provenance"]
    assert prov["command"] == [gpu_speed.__file__, *argv] and prov["threads"] == rec["threads"]
    assert prov["torch"] == rec["torch"] and "started" in prov
    assert (rec["device"], rec["size"], rec["rounds"], rec["quick"]) == ("cpu", 64, 3, True)
    assert rec["paper_ms"]["values"] == {"FPN": 68.0, "ElixirNet w FPN": 90.0}
    for name in ("FPN", "ElixirNet w FPN"):
        r = rec["models"][name]
        spec = next(s for s in models_speed.MODELS if s.name == name)
        model = build_model(models_speed.load_cfg(spec.quick_config))
        assert r["config"] == spec.quick_config
        assert r["params"] == sum(p.numel() for p in model.parameters())
        p = r["precisions"]["float32"]
        assert 0 < p["ms_p10"] <= p["ms_per_image"] <= p["ms_p90"]
        assert p["peak_memory_mib"] is None  # CPU: no CUDA allocator to ask
        assert set(p["stages_ms"]) == {"backbone", "proposals", "roi_heads"}
        assert all(v > 0 for v in p["stages_ms"].values())
    assert rec["models"]["FPN"]["precisions"]["float32"]["ratio_to_fpn"] == 1.0


def test_gpu_speed_refuses_float16_on_the_cpu():
    with pytest.raises(SystemExit) as e:
        gpu_speed.main(["--device", "cpu", "--precisions", "float16"])
    assert e.value.code == 2
