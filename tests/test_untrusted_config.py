"""Every config read in the repository goes through the safe loader (issue 17 point 2): a YAML
with a Python tag runs nothing from the benchmark scripts, and no script calls merge_from_file."""

import os
import runpy
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(REPO, "configs", "quickstart", "fpn.yaml")


def _evil(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.yaml"
    path.write_text(
        f'_BASE_: "{QUICKSTART}"\nSEED: !!python/object/apply:os.system ["touch {marker}"]\n',
        encoding="utf-8",
    )
    return str(path), marker


@pytest.mark.parametrize(
    "script, flag", [("predict_speed.py", "--config-file"), ("trpn_speed.py", "--config")]
)
def test_benchmark_scripts_do_not_run_yaml_code(tmp_path, monkeypatch, script, flag):
    path, marker = _evil(tmp_path)
    monkeypatch.setattr(sys, "argv", [script, flag, path])
    with pytest.raises(Exception) as info:
        runpy.run_path(os.path.join(REPO, "projects", "benchmarks", script), run_name="__main__")
    assert "python/object/apply" in str(info.value) or isinstance(info.value, yaml.YAMLError)
    assert not marker.exists()


def test_no_merge_from_file_outside_the_safe_loader():
    hits = []
    for top in ("elixir_d2", "projects", "tests", "datasets", "scripts", "."):
        base = os.path.join(REPO, top)
        for root, dirs, files in os.walk(base):
            dirs[:] = [d for d in dirs if not d.startswith(".")] if top != "." else []
            for f in files:
                if not f.endswith(".py") or f == os.path.basename(__file__):
                    continue
                path = os.path.join(root, f)
                with open(path, encoding="utf-8", errors="replace") as fh:
                    for i, line in enumerate(fh, 1):
                        if "merge_from_file(" in line and os.path.relpath(
                            path, REPO
                        ) != os.path.join("elixir_d2", "config.py"):
                            hits.append(f"{os.path.relpath(path, REPO)}:{i}")
    assert not hits, f"config read without the safe loader elixir_d2.load_config: {hits}"
