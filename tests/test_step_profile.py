"""projects/benchmarks/step_profile.py: which group an op's time goes to, and a real profile of
one quickstart training step."""

from types import SimpleNamespace

import step_profile as sp  # projects/benchmarks, on pytest's pythonpath


def test_ops_fall_in_their_groups():
    assert sp.op_group("aten::convolution_backward") == "convolution"
    assert sp.op_group("aten::mkldnn_convolution") == "convolution"
    assert sp.op_group("aten::native_batch_norm_backward") == "BatchNorm"
    assert sp.op_group("torchvision::_roi_align_backward") == "RoIAlign"
    assert sp.op_group("aten::addmm") == "matrix products"
    assert sp.op_group("torchvision::nms") == "NMS"
    assert sp.op_group("aten::add_") == "other"


def test_group_times_sum_self_times_and_keep_the_optimizer_total_apart():
    ev = [
        SimpleNamespace(key=k, self_cpu_time_total=s, cpu_time_total=t)
        for k, s, t in (
            ("aten::convolution_backward", 3_000_000, 3_500_000),
            ("aten::mkldnn_convolution", 1_000_000, 1_000_000),
            ("aten::native_batch_norm", 500_000, 500_000),
            ("aten::add_", 250_000, 250_000),
            ("Optimizer.step#SGD.step", 100_000, 900_000),  # its children are counted above
            ("ProfilerStep#3", 10_000, 6_000_000),
        )
    ]
    got = sp.group_times(ev)
    assert got["convolution"] == 4.0 and got["BatchNorm"] == 0.5 and got["other"] == 0.25
    assert got["optimizer step (total)"] == 0.9
    assert got["RoIAlign"] == got["NMS"] == got["matrix products"] == 0.0


def test_profile_of_one_small_step_puts_time_in_convolutions():
    row = sp.profile_config(
        "fpn.yaml",
        "float32",
        steps=1,
        warmup=1,
        opts=["INPUT.LESION_CROP.SIZE", "64", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "16"],
    )
    groups = [g for g, _ in sp.GROUPS] + ["other"]
    assert row["s/it"] > 0 and row["convolution"] > 0 and row["RoIAlign"] > 0
    assert row["optimizer step (total)"] > 0
    table = sp.format_table({"fpn.yaml": row})
    assert table.count("\n") == 2 and all(g in table for g in groups)
