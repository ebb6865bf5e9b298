"""projects/paper recipes: a --quick recipe end to end on a tiny synthetic set (Table 6: search in
the DARTS space, random genotype, three FPN + ALB trainings, evaluation, markdown), the shared
plumbing, and the paper's numbers against the improvements the paper prints."""

import json
import os
import re

import pytest
import yaml

from elixir_d2.data.synthetic import generate_deeplesion

import common  # projects/paper, on pytest's pythonpath
import paper_numbers as P

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ELIXIR_GENOTYPE = os.path.join(REPO, "configs", "genotypes", "figure3.yaml")


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("paper")
    generate_deeplesion(
        str(root / "synthetic"),
        num_patients=8,
        slices_per_series=(8, 10),
        keys_per_series=(1, 2),
        image_size=64,
        seed=3,
        val_frac=0.15,
        test_frac=0.15,
    )
    return root


def _cells(md: str, row: str):
    """The cells after the first column of the markdown row starting with ``row``."""
    for line in md.splitlines():
        if line.startswith(f"| {row} |"):
            return [c.strip() for c in line.strip().strip("|").split("|")][1:]
    raise AssertionError(f"no row {row!r} in\n{md}")


def test_table6_quick_end_to_end(tiny_root, capsys):
    import table6

    out = tiny_root / "out"
    # The medical-space search is given (--genotype); the DARTS-space search and the random draw
    # run. 4 images per batch: one search iteration per epoch on the 4-record weight half.
    argv = [
        "--quick",
        "--root",
        str(tiny_root),
        "--output",
        str(out),
        "--iters",
        "2",
        "--search-epochs",
        "1",
        "--genotype",
        ELIXIR_GENOTYPE,
        "SOLVER.IMS_PER_BATCH",
        "4",
        "INPUT.MAX_IMAGE_SIZE",
        "64",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
        "16",
        "MODEL.RPN.POST_NMS_TOPK_TEST",
        "50",
    ]
    paths = table6.main(argv)
    md = open(paths["table6"], encoding="utf-8").read()
    assert paths["table6"] == str(out / "table6.md")

    # Each "(this run)" row holds the numbers its run's evaluator wrote, the "(paper)" row the
    # paper's.
    for row, step, paper in (
        ("ElixirNet (ALB, our space, differentiable search)", "ablation_alb", ("83.88", "34.1")),
        ("ALB w/o our search space (DARTS space)", "ablation_alb_darts", ("81.06", "32.1")),
        ("random ALB", "ablation_alb_random", ("81.84", "32.1")),
    ):
        ds = [d for d in os.listdir(out / step / "inference")]
        assert len(ds) == 1 and ds[0].endswith("_test")
        m = json.load(
            open(out / step / "inference" / ds[0] / "lesion_metrics.json", encoding="utf-8")
        )["metrics"]
        assert _cells(md, f"{row} (this run)") == [f"{m['sens@3_iou']:.2f}", f"{m['AP']:.1f}"]
        assert tuple(_cells(md, f"{row} (paper)")) == paper
        cfg = yaml.safe_load(open(out / step / "config.yaml", encoding="utf-8"))
        assert cfg["SOLVER"]["MAX_ITER"] == 2 and cfg["MODEL"]["ROI_BOX_HEAD"]["NAME"] == "ALBHead"
        # 2 training iterations were logged (0 and 1; the evaluation is logged after them)
        logged = [json.loads(line) for line in open(out / step / "metrics.json", encoding="utf-8")]
        assert max(r["iteration"] for r in logged if "total_loss" in r) == 1

    # Each ALB run used the genotype of its own row.
    genotypes = {
        s: yaml.safe_load(open(out / s / "config.yaml", encoding="utf-8"))["MODEL"]["ALB"]
        for s in ("ablation_alb", "ablation_alb_darts", "ablation_alb_random")
    }
    assert genotypes["ablation_alb"]["GENOTYPE"] == ELIXIR_GENOTYPE
    assert genotypes["ablation_alb_darts"]["GENOTYPE"] == str(
        out / "search_darts" / "genotype.yaml"
    )
    assert genotypes["ablation_alb_darts"]["SEARCH_SPACE"] == "darts"
    assert genotypes["ablation_alb_random"]["GENOTYPE"] == str(out / "random_alb" / "genotype.yaml")
    darts = yaml.safe_load(open(out / "search_darts" / "genotype.yaml", encoding="utf-8"))
    assert darts["space"] == "darts"
    assert "RANDOM" in open(out / "random_alb" / "genotype.yaml", encoding="utf-8").read()
    # The search started from the FPN run's weights.
    search_cfg = yaml.safe_load(open(out / "search_darts" / "config.yaml", encoding="utf-8"))
    assert search_cfg["MODEL"]["WEIGHTS"] == str(out / "fpn" / "model_final.pth")
    assert search_cfg["SEARCH"]["EPOCHS"] == 1
    # What was run is stated: data sizes, the given genotype, each run's iterations.
    assert "train 7 images, test 1 images" in md
    assert f"search: not run; genotype given with --genotype {ELIXIR_GENOTYPE}" in md
    assert re.search(
        r"- ablation_alb_darts: configs/quickstart/ablation/alb_darts_space.yaml, 2 "
        r"iterations",
        md,
    )

    # A second call reuses every finished run and only rewrites the table.
    before = os.path.getmtime(out / "ablation_alb" / "model_final.pth")
    capsys.readouterr()
    table6.main(argv)
    printed = capsys.readouterr().out
    assert printed.count("finished earlier, reusing") == 6  # all steps but the given search
    assert os.path.getmtime(out / "ablation_alb" / "model_final.pth") == before


def test_schedule_scaled_to_iters():
    assert common._schedule_opts(12) == [
        "SOLVER.MAX_ITER",
        "12",
        "SOLVER.STEPS",
        "(8,11)",
        "SOLVER.WARMUP_ITERS",
        "3",
        "SOLVER.CHECKPOINT_PERIOD",
        "12",
    ]
    # steps at 1.33 -> 1 and 1.83 -> 2 (= MAX_ITER, dropped)
    assert common._schedule_opts(2)[3] == "(1,)"
    assert common._schedule_opts(1)[3] == "()"
    with pytest.raises(ValueError, match="--iters"):
        common._schedule_opts(0)


def test_cells_and_tables():
    assert (
        common.fmt(None) == "-"
        and common.fmt(float("nan")) == "-"
        and common.fmt(83.876) == "83.88"
    )
    assert (
        common.markdown_table(["Method", "a"], [["x", "1"]])
        == "| Method | a |\n|:--|--:|\n| x | 1 |"
    )


def test_missing_dataset_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="DeepLesion/DL_info.csv"):
        common.prepare_data("deeplesion", str(tmp_path), quick=False)


def test_paper_numbers_match_the_improvements_printed_in_the_paper():
    t1, t2 = P.TABLE1, P.TABLE2
    # Table 1 prints ElixirNet's gains over its baseline at 0.5 FPs and on mAP.
    for eli, base, d05, dmap in (
        ("ElixirNet", "FRCNN", 4.49, 2.9),
        ("ElixirNet w FPN", "FPN", 5.82, 3.7),
        ("ElixirNet w Deformv2", "Deformv2", 2.48, 2.0),
    ):
        assert t1[eli]["sens"][0.5] - t1[base]["sens"][0.5] == pytest.approx(d05, abs=0.006)
        assert t1[eli]["mAP"] - t1[base]["mAP"] == pytest.approx(dmap, abs=0.06)
    # Table 2 (IoBB): +6.50 at 0.5 FPs and +4.09 at 8 FPs for ElixirNet w FPN over FPN.
    assert t2["ElixirNet w FPN"]["sens"][0.5] - t2["FPN"]["sens"][0.5] == pytest.approx(
        6.50, abs=0.006
    )
    assert t2["ElixirNet w FPN"]["sens"][8] - t2["FPN"]["sens"][8] == pytest.approx(4.09, abs=0.006)
    # Table 5's FPN and ElixirNet rows are Table 1's FPN / ElixirNet w FPN at 3 FPs; Table 6's first
    # row is Table 5's ALB row; the text: RTM adds 1.91 points at 3 FPs over TRPN + ALB.
    assert P.TABLE5["FPN"]["sens3"] == t1["FPN"]["sens"][3]
    assert P.TABLE5["ElixirNet (TRPN + ALB + RTM)"]["sens3"] == t1["ElixirNet w FPN"]["sens"][3]
    assert P.TABLE5["ElixirNet (TRPN + ALB + RTM)"]["sens3"] - P.TABLE5["TRPN + ALB"][
        "sens3"
    ] == pytest.approx(1.91)
    assert P.TABLE6["ElixirNet (ALB, our space, differentiable search)"] == P.TABLE5["ALB"]
    # Table 6 prints -2.82 / -2.04 points for the DARTS space / random ALB.
    base = P.TABLE6["ElixirNet (ALB, our space, differentiable search)"]["sens3"]
    assert base - P.TABLE6["ALB w/o our search space (DARTS space)"]["sens3"] == pytest.approx(2.82)
    assert base - P.TABLE6["random ALB"]["sens3"] == pytest.approx(2.04)
    # Table 3: 61.20 = FPN's 58.46 + 2.74; Deformv2 + 0.7 mAP.
    assert P.TABLE3["ElixirNet w FPN"]["sens"][2] - P.TABLE3["FPN"]["sens"][2] == pytest.approx(
        2.74
    )
    assert P.TABLE3["ElixirNet w Deformv2"]["mAP"] - P.TABLE3["Deformv2"]["mAP"] == pytest.approx(
        0.7
    )


def test_finished_step_is_reused_only_with_the_same_settings(tmp_path):
    import argparse

    from steps import STEPS

    args = argparse.Namespace(
        quick=True,
        output=str(tmp_path),
        num_gpus=1,
        opts=[],
        iters=None,
        finetune_iters=None,
        search_epochs=None,
        genotype=None,
        force=False,
        speed_images=None,
    )
    recipe = common.Recipe(args, common.DataSource("deeplesion", str(tmp_path), "unused"))
    assert args.iters is None  # --quick keeps the quickstart configs' schedules
    fpn = STEPS["fpn"]
    sig = recipe._signature(fpn, ["SOLVER.MAX_ITER", "2"])
    os.makedirs(tmp_path / "fpn")
    recipe._finish("fpn", {"config": "x"}, 0.0, sig)
    assert recipe._done("fpn", sig)
    assert not recipe._done("fpn", recipe._signature(fpn, ["SOLVER.MAX_ITER", "3"]))
    # A step reading from fpn becomes stale when fpn finishes again.
    search = STEPS["search"]
    s1 = recipe._signature(search, [])
    recipe._finish("fpn", {"config": "x"}, 0.0, sig)
    assert recipe._signature(search, []) != s1
    args.force = True
    assert not recipe._done("fpn", sig)


def test_tables_and_step_records_carry_the_provenance(tmp_path, capsys):
    """table*.json gets the run's provenance beside its rows, table*.md ends with its line, and a
    finished step's recipe_step.json holds the provenance of the run that trained it (a later
    table may reuse it)."""
    import argparse

    args = argparse.Namespace(
        quick=True,
        output=str(tmp_path),
        num_gpus=1,
        opts=[],
        iters=None,
        finetune_iters=None,
        search_epochs=None,
        genotype=None,
        force=False,
        speed_images=None,
    )
    command = ["projects/paper/table6.py", "--quick"]
    recipe = common.Recipe(args, common.DataSource("deeplesion", str(tmp_path), "unused"), command)
    rows = {"FPN": {"AP": 1.0}}
    doc = json.load(open(recipe.write_json("table9.json", rows), encoding="utf-8"))
    assert doc.pop("provenance")["command"] == command and doc == rows
    md = open(recipe.write("table9.md", "| a |"), encoding="utf-8").read().splitlines()
    assert md[0] == "| a |" and md[-1].startswith("commit ")
    assert md[-1].endswith("command: projects/paper/table6.py --quick")
    os.makedirs(tmp_path / "fpn")
    recipe._finish("fpn", {"config": "x"}, 0.0, "sig")
    step = recipe.record("fpn")
    assert step["provenance"]["command"] == command and step["provenance"]["started"].startswith(
        "1970-01-01"
    )
    assert recipe._done("fpn", "sig")  # the provenance does not make the step stale


def test_finished_step_is_stale_after_its_config_or_base_changes(tmp_path):
    """Editing a step's YAML, or a _BASE_ file under it, reruns the step even though the path and
    the options are the same."""
    import argparse

    from steps import Train

    base = tmp_path / "Base.yaml"
    child = tmp_path / "child.yaml"
    base.write_text(
        f'_BASE_: "{os.path.join(common.ROOT, "configs/quickstart/fpn.yaml")}"\n'
        "SOLVER:\n  BASE_LR: 0.04\n",
        encoding="utf-8",
    )
    child.write_text('_BASE_: "Base.yaml"\nSOLVER:\n  MAX_ITER: 7\n', encoding="utf-8")
    args = argparse.Namespace(
        quick=True,
        output=str(tmp_path / "out"),
        num_gpus=1,
        opts=[],
        iters=None,
        finetune_iters=None,
        search_epochs=None,
        genotype=None,
        force=False,
        speed_images=None,
    )
    recipe = common.Recipe(args, common.DataSource("deeplesion", str(tmp_path), "unused"))
    step = Train("edited", str(child), str(child))
    sig = recipe._signature(step, [])
    os.makedirs(tmp_path / "out" / "edited")
    recipe._finish("edited", {"config": str(child)}, 0.0, sig)
    assert recipe._done("edited", recipe._signature(step, []))
    child.write_text('_BASE_: "Base.yaml"\nSOLVER:\n  MAX_ITER: 8\n', encoding="utf-8")
    assert not recipe._done("edited", recipe._signature(step, []))
    child.write_text('_BASE_: "Base.yaml"\nSOLVER:\n  MAX_ITER: 7\n', encoding="utf-8")
    assert recipe._done("edited", recipe._signature(step, []))  # back to what ran
    base.write_text(base.read_text(encoding="utf-8").replace("0.04", "0.02"), encoding="utf-8")
    assert not recipe._done("edited", recipe._signature(step, []))
