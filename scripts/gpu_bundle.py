"""Fill .gpu_bundle/ with what the GPU check needs and the lent GPU machine lacks (it has no
network): cp3XX manylinux wheels of the packages below, at the versions of this checkout's .venv
(tested together), and detectron2 v0.6 as a pure-Python wheel. Run by scripts/gpu_bundle.sh on a
machine with PyPI access; scripts/gpu_check.sh installs from it, offline, what is missing.

detectron2 comes from the PyPI source release pb1-detectron2==0.6 (as scripts/install.sh), with
two changes in the bundle's copy only: ``detectron2/_C.py``, a Python module holding the two
version queries of detectron2.utils.collect_env (install.sh builds the same as C++; a compiled one
would not load under the GPU machine's torch and Python), and ``Image.LINEAR`` -> ``Image.BILINEAR``
(the same filter, the old name removed in Pillow 10; the GPU machine has a newer Pillow).
"""

from __future__ import annotations

import argparse
import base64
import datetime
import glob
import hashlib
import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from typing import Dict, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
D2_SDIST = ("pb1-detectron2", "0.6")
# import name -> distribution; the wheels pip can download for the target Python / platform.
WHEELS = {
    "iopath": "iopath",
    "yacs": "yacs",
    "termcolor": "termcolor",
    "cloudpickle": "cloudpickle",
    "omegaconf": "omegaconf",
    "portalocker": "portalocker",
    "tabulate": "tabulate",
    "pycocotools": "pycocotools",
    "tensorboard": "tensorboard",
    "google.protobuf": "protobuf",
    "absl": "absl-py",
    "markdown": "Markdown",
    "werkzeug": "Werkzeug",
    "pkg_resources": "setuptools",
}
# Published as source only, pure Python: built into py3-none-any wheels here.
SDISTS = {"fvcore": "fvcore", "antlr4": "antlr4-python3-runtime"}
# Left out, and why (gpu_check.sh's report lists the test files that need them).
NOT_BUNDLED = {
    "SimpleITK": "a 50 MB wheel; only NIfTI / DICOM reading (KiTS19, predict_net) and their tests "
    "use it, none of them in the check",
    "pydicom, highdicom": "DICOM SR output and its tests; not in the check",
    "hypothesis, selenium": "property and browser tests of the CPU suite; not in the check",
}
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
C_STUB = '''"""Python stand-in for detectron2's compiled extension (ElixirNet GPU bundle): the
version queries of detectron2.utils.collect_env; none of the compiled ops (ElixirNet uses
torchvision's)."""


def get_compiler_version():
    return "not built (Python-only detectron2)"


def get_cuda_version():
    return "not built (Python-only detectron2)"


def has_cuda():
    return False
'''


def say(line: str) -> None:
    print(f"[gpu_bundle] {line}", flush=True)


def pin(dist: str) -> str:
    """``dist==version`` at the version installed in this interpreter."""
    try:
        return f"{dist}=={md.version(dist)}"
    except md.PackageNotFoundError:
        raise SystemExit(
            f"[gpu_bundle] error: {dist} is not installed in {sys.executable}; run "
            "`make install` first (the bundle pins this environment's versions)"
        )


def pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", *args], check=True)


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def make_pure_wheel(package_dir: str, dist: str, version: str, out_dir: str) -> str:
    """Zip the package folder ``package_dir`` into ``{dist}-{version}-py3-none-any.whl``."""
    norm = re.sub(r"[-_.]+", "_", dist)
    info = f"{norm}-{version}.dist-info"
    path = os.path.join(out_dir, f"{norm}-{version}-py3-none-any.whl")
    root = os.path.dirname(package_dir)
    files = sorted(
        p
        for p in glob.glob(os.path.join(package_dir, "**", "*"), recursive=True)
        if os.path.isfile(p) and "__pycache__" not in p
    )
    meta = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: elixir_d2 gpu_bundle\n"
        "Root-Is-Purelib: true\nTag: py3-none-any\n",
        f"{info}/top_level.txt": os.path.basename(package_dir) + "\n",
    }
    record = []
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for f in files:
            name = os.path.relpath(f, root).replace(os.sep, "/")
            data = open(f, "rb").read()
            z.writestr(name, data)
            record.append(_record_line(name, data))
        for name, text in meta.items():
            z.writestr(name, text)
            record.append(_record_line(name, text.encode()))
        record.append(f"{info}/RECORD,,")
        z.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return path


def detectron2_wheel(out_dir: str, tmp: str) -> str:
    """detectron2 v0.6 from its PyPI sdist, patched as the module docstring says."""
    dist, version = D2_SDIST
    pip("download", "-q", "--no-deps", "--no-binary", ":all:", f"{dist}=={version}", "-d", tmp)
    (sdist,) = glob.glob(os.path.join(tmp, f"{dist}-{version}.tar.gz"))
    with tarfile.open(sdist) as t:
        t.extractall(tmp, filter="data")
    pkg = os.path.join(tmp, f"{dist}-{version}", "detectron2")
    transform = os.path.join(pkg, "data", "transforms", "transform.py")
    text = open(transform, encoding="utf-8").read()
    if text.count("Image.LINEAR") != 1:
        raise SystemExit(
            f"[gpu_bundle] error: {transform}: expected one Image.LINEAR to rename, "
            f"found {text.count('Image.LINEAR')} (a different sdist?)"
        )
    with open(transform, "w", encoding="utf-8") as f:
        f.write(text.replace("Image.LINEAR", "Image.BILINEAR"))
    with open(os.path.join(pkg, "_C.py"), "w", encoding="utf-8") as f:
        f.write(C_STUB)
    return make_pure_wheel(pkg, dist, version, out_dir)


def only_file(folder: str, before: set) -> str:
    """The one file pip added to ``folder``."""
    new = sorted(set(os.listdir(folder)) - before)
    if len(new) != 1:
        raise SystemExit(f"[gpu_bundle] error: expected one new file in {folder}, got {new}")
    return new[0]


def build(out: str, python_version: str, max_mib: float) -> Dict:
    """Write the wheels and manifest.json into ``out`` (emptied first); returns the manifest."""
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    wheels: Dict[str, str] = {}
    target = [
        "--python-version",
        python_version,
        "--implementation",
        "cp",
        "--only-binary=:all:",
    ] + [a for p in PLATFORMS for a in ("--platform", p)]
    for name, dist in WHEELS.items():
        before = set(os.listdir(out))
        pip("download", "-q", "--no-deps", *target, "-d", out, pin(dist))
        wheels[name] = only_file(out, before)
    with tempfile.TemporaryDirectory() as tmp:
        for name, dist in SDISTS.items():
            before = set(os.listdir(out))
            pip(
                "wheel",
                "-q",
                "--no-deps",
                "--no-build-isolation",
                "--no-binary",
                dist,
                "-w",
                out,
                pin(dist),
            )
            wheels[name] = only_file(out, before)
        wheels["detectron2"] = os.path.basename(detectron2_wheel(out, tmp))
    bad = [w for w in wheels.values() if not w.endswith(".whl")]
    if bad:
        raise SystemExit(f"[gpu_bundle] error: not a wheel: {bad[0]}")
    sizes = {w: os.path.getsize(os.path.join(out, w)) for w in sorted(set(wheels.values()))}
    total = sum(sizes.values())
    manifest = {
        "python_version": python_version,
        "platforms": list(PLATFORMS),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wheels": wheels,
        "bytes": sizes,
        "total_bytes": total,
        "not_bundled": NOT_BUNDLED,
    }
    with open(os.path.join(out, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    for w, n in sizes.items():
        say(f"{n / 2**20:7.2f} MiB  {w}")
    say(f"{total / 2**20:7.2f} MiB  in {len(sizes)} wheels at {out}")
    if total > max_mib * 2**20:
        raise SystemExit(
            f"[gpu_bundle] error: the bundle is {total / 2**20:.1f} MiB, over "
            f"--max-mib {max_mib:g} (the device copy carries 64 MiB in all)"
        )
    return manifest


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="scripts/gpu_bundle.sh",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--out",
        default=os.path.join(REPO, ".gpu_bundle"),
        help="bundle folder (emptied first; default .gpu_bundle)",
    )
    ap.add_argument(
        "--python-version",
        default="3.12",
        help="the GPU machine's Python, MAJOR.MINOR (default 3.12)",
    )
    ap.add_argument(
        "--max-mib", type=float, default=50.0, help="refuse a bundle larger than this (default 50)"
    )
    args = ap.parse_args(argv)
    if not re.fullmatch(r"3\.\d{1,2}", args.python_version):
        ap.error(f"--python-version {args.python_version!r}: expected MAJOR.MINOR, e.g. 3.12")
    if args.max_mib <= 0:
        ap.error(f"--max-mib must be > 0, got {args.max_mib:g}")
    out = os.path.abspath(args.out)
    if out in (REPO, os.path.dirname(REPO)) or os.path.isfile(out):
        ap.error(f"--out {args.out!r}: must be a folder of its own (it is emptied)")
    if (
        os.path.isdir(out)
        and os.listdir(out)
        and not os.path.isfile(os.path.join(out, "manifest.json"))
    ):
        ap.error(
            f"--out {args.out!r} holds files but no manifest.json: not a bundle folder, "
            "not emptying it"
        )
    args.out = out
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        build(args.out, args.python_version, args.max_mib)
    except subprocess.CalledProcessError as e:
        say(
            f"error: {' '.join(e.cmd[2:5])} ... failed (exit code {e.returncode}); is PyPI "
            "reachable from here?"
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
