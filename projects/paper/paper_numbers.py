"""The paper's own numbers (ElixirNet, AAAI 2020), typed in from the paper's text.

Every value here is THE PAPER'S, never a result of this repository; the recipes print them in
rows labelled "(paper)". Values are as printed (%, or ms / M where said), including the paper's
own inconsistencies (e.g. Table 1's "+4.12" next to 86.63 - 81.51 = 5.12; Table 3's 80.05 marked
"+2.4" over 71.21). ``None`` = a cell the paper leaves empty ("-") or that our copy of the paper
lost (Table 3, row "ElixirNet w FPN": only its 2-FP sensitivity survived).
"""

from typing import Dict, Optional, Sequence

__all__ = [
    "FPS",
    "KITS_FPS",
    "TABLE1",
    "TABLE2",
    "TABLE3",
    "TABLE4",
    "TABLE5",
    "TABLE6",
    "TYPE_ABBREV",
    "sens_row",
]

FPS = (0.5, 1, 2, 3, 4, 6, 8)  # Tables 1 and 2: sensitivity at these FPs per image
KITS_FPS = (0.5, 1, 2)  # Table 3
TYPE_ABBREV = ("BN", "AB", "ME", "LV", "LU", "KD", "ST", "PV")  # Table 4 columns


def sens_row(values: Sequence[Optional[float]], fps: Sequence[float] = FPS, **extra) -> Dict:
    """{"sens": {fp: value}, **extra} for one paper row."""
    if len(values) != len(fps):
        raise ValueError(f"{len(values)} sensitivities for {len(fps)} FP points")
    return {"sens": dict(zip(fps, values)), **extra}


# Table 1: sensitivity (IoU) at 0.5..8 FPs, mAP (%), speed (ms per image; the paper's header
# reads "img/ms" but the values are milliseconds per image, 4 GTX1080), parameters (M).
TABLE1 = {
    "3DCE, 3 slices": sens_row(
        [56.49, 67.65, 76.89, 80.56, 82.76, 85.71, 87.03], mAP=25.6, ms=42, params=17.2
    ),
    "3DCE, 9 slices": sens_row(
        [59.32, 70.68, 79.09, 82.78, 84.34, 86.77, 87.81], mAP=27.9, ms=56, params=19.2
    ),
    "3DCE, 27 slices": sens_row(
        [62.48, 73.37, 80.70, 83.61, 85.65, 87.26, 89.09], mAP=29.2, ms=114, params=25.2
    ),
    "FRCNN": sens_row(
        [55.94, 66.25, 74.69, 79.17, 79.87, 79.87, 79.87], mAP=27.9, ms=54, params=33.0
    ),
    "FPN": sens_row(
        [60.57, 70.34, 77.65, 81.51, 83.55, 85.67, 85.67], mAP=31.5, ms=68, params=41.4
    ),
    "Deformv2": sens_row(
        [63.16, 72.35, 81.04, 84.47, 86.52, 87.76, 87.76], mAP=34.3, ms=74, params=42.2
    ),
    "ElixirNet": sens_row(
        [60.43, 69.38, 77.20, 80.52, 82.72, 83.74, 83.74], mAP=30.8, ms=78, params=19.9
    ),
    "ElixirNet w FPN": sens_row(
        [66.39, 75.41, 82.05, 86.63, 87.75, 88.36, 88.36], mAP=35.2, ms=90, params=28.4
    ),
    "ElixirNet w Deformv2": sens_row(
        [65.64, 75.84, 83.70, 86.92, 88.91, 91.37, 91.37], mAP=36.3, ms=102, params=29.3
    ),
}

# Table 2: sensitivity (IoBB) at 0.5..8 FPs (no mAP column).
TABLE2 = {
    "3DCE, 3 slices": sens_row([58.43, 70.95, 80.64, 85.12, 87.30, 90.72, 92.37]),
    "3DCE, 9 slices": sens_row([62.64, 74.37, 83.29, 86.99, 89.15, 91.61, 92.90]),
    "3DCE, 27 slices": sens_row([64.01, 75.69, 83.71, 87.52, 88.25, 91.47, 92.85]),
    "FRCNN": sens_row([57.59, 68.46, 77.36, 81.96, 82.43, 82.43, 82.43]),
    "FPN": sens_row([62.17, 72.35, 80.29, 83.82, 86.03, 87.68, 87.68]),
    "Deformv2": sens_row([65.09, 74.49, 83.34, 86.84, 88.86, 89.71, 89.71]),
    "ElixirNet": sens_row([63.36, 73.21, 81.38, 85.06, 86.53, 87.50, 87.50]),
    "ElixirNet w FPN": sens_row([68.67, 77.93, 84.83, 88.62, 90.59, 91.77, 91.77]),
    "ElixirNet w Deformv2": sens_row([67.33, 77.89, 86.00, 90.13, 91.66, 93.55, 93.55]),
}

# Table 3 (KiTS19): sensitivity at 0.5, 1, 2 FPs, mAP. The "ElixirNet w FPN" row is lost in our
# copy except "61.20 (+2.74)" in the 2-FP column (58.46 + 2.74); the text's "+40.3% over FPN on
# mAP" is relative and not a printed cell, so it is not typed in.
TABLE3 = {
    "FPN": sens_row([53.68, 56.71, 58.46], KITS_FPS, mAP=21.1),
    "Deformv2": sens_row([67.18, 68.31, 71.21], KITS_FPS, mAP=32.9),
    "ElixirNet w FPN": sens_row([None, None, 61.20], KITS_FPS, mAP=None),
    "ElixirNet w Deformv2": sens_row([67.28, 69.02, 80.05], KITS_FPS, mAP=33.6),
}

# Table 4: per-type sensitivity at 3 FPs (IoU), columns TYPE_ABBREV; None = the paper's "-"
# ("too low recall to evaluate sensitivity").
TABLE4 = {
    "FPN w finetune": dict(
        zip(TYPE_ABBREV, [None, 79.58, 71.34, 78.05, 83.32, None, 57.96, 72.21])
    ),
    "ElixirNet w/o RTM": dict(
        zip(TYPE_ABBREV, [56.52, 84.14, 83.41, 82.99, 87.10, 60.70, 75.67, 80.64])
    ),
    "ElixirNet": dict(zip(TYPE_ABBREV, [57.38, 85.41, 84.62, 83.94, 88.72, 65.51, 77.24, 83.07])),
}

# Table 5: sensitivity at 3 FPs (IoU) and mAP, FPN baseline plus modules.
TABLE5 = {
    "FPN": {"sens3": 81.51, "mAP": 31.5},
    "TRPN": {"sens3": 83.61, "mAP": 33.9},
    "ALB": {"sens3": 83.88, "mAP": 34.1},
    "ALB, 9 slices": {"sens3": 84.19, "mAP": 34.0},
    "TRPN + ALB": {"sens3": 84.72, "mAP": 34.8},
    "TRPN + RTM": {"sens3": 85.43, "mAP": 34.4},
    "ElixirNet (TRPN + ALB + RTM)": {"sens3": 86.63, "mAP": 35.2},
}

# Table 6: sensitivity at 3 FPs (IoU) and mAP of FPN + ALB with three ways to get the genotype.
TABLE6 = {
    "ElixirNet (ALB, our space, differentiable search)": {"sens3": 83.88, "mAP": 34.1},
    "ALB w/o our search space (DARTS space)": {"sens3": 81.06, "mAP": 32.1},
    "random ALB": {"sens3": 81.84, "mAP": 32.1},
}
