#!/usr/bin/env python
"""Case report (report.html) of a 200-slice case: write time, weight on disk, open time in
headless Chromium (targets: opens in < 2 s, files < 30 MB).

    python projects/benchmarks/report_speed.py [--slices 200] [--size 512] [--repeats 5]
        [--screenshot docs/images/report.png]

The case is predict_speed.py's CT-like phantom (body, lungs, spine, three lesions, 15 HU noise;
0.7 mm pixels, 2.5 mm slices), with detections drawn by hand around the lesions (plus a false
positive every 10th slice) and ground truth on each lesion's middle slice, so the page shows
hits, misses and a FROC curve; no model runs. Open time: from ``driver.get`` of the file:// URL
to the page's ``window.reportReady`` flag (first slice picture loaded and boxes drawn), a fresh
tab each time; also the page's own ``performance.now()`` at that moment (ms since navigation
start). Needs Chromium, chromedriver and selenium (scripts/install.sh).
"""

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import numpy as np
from predict_speed import phantom_volume

from elixir_d2.inference import CTVolume, SlicePrediction, VolumePrediction, group_detections
from elixir_d2.inference.outputs import case_summary, detection_rows, flat_detections
from elixir_d2.inference.report import write_case_report, write_slice_images

# predict_speed.phantom_volume's lesions: (cx, cy, r, z0, z1) as fractions of size / slices.
LESIONS = [(0.3, 0.3, 0.03, 0.2, 0.4), (0.6, 0.55, 0.05, 0.5, 0.7), (0.45, 0.6, 0.02, 0.7, 0.8)]


def build_case(slices: int, size: int, seed: int = 0):
    """(volume, detections.json document, ground truth) of the phantom case."""
    rng = np.random.default_rng(seed)
    vol = CTVolume(
        name="phantom",
        source="phantom.nii.gz",
        kind="nifti",
        hu=phantom_volume(slices, size, rng).astype(np.float32),
        slice_numbers=list(range(slices)),
        spacing=(0.7, 0.7),
        slice_interval=2.5,
    )
    pred, gt = VolumePrediction(vol), {}
    for n in range(slices):
        boxes, scores = [], []
        for k, (cx, cy, r, z0, z1) in enumerate(LESIONS):
            if z0 * slices <= n < z1 * slices:
                box = np.array([cx - r, cy - r, cx + r, cy + r]) * size
                boxes.append(box + rng.normal(0, 1.0, 4))
                scores.append(float(np.clip(0.95 - 0.1 * k - rng.random() * 0.2, 0, 1)))
                if n == int((z0 + z1) / 2 * slices):
                    gt.setdefault(n, []).append(box)
        if n % 10 == 5:  # a false positive in the body
            boxes.append(np.array([0.7, 0.35, 0.75, 0.4]) * size)
            scores.append(float(0.3 + rng.random() * 0.4))
        pred.slices.append(
            SlicePrediction(
                n,
                np.array(boxes).reshape(-1, 4),
                np.array(scores),
                np.zeros(len(scores), int),
                None,
                (size, size),
            )
        )
    if LESIONS:  # a lesion the "model" misses
        gt.setdefault(slices // 10, []).append(np.array([0.55, 0.3, 0.6, 0.35]) * size)
    s, b, sc = flat_detections(pred)
    findings = group_detections(s, b, sc, vol.spacing, vol.slice_interval)
    dets = detection_rows(pred, {i: f.finding_id for f in findings for i in f.members})
    doc = json.loads(json.dumps(case_summary(pred, dets, findings)))
    return vol, doc, {n: np.array(v) for n, v in gt.items()}


def folder_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(path) for f in fs) / 1e6


def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1280,1000",
        "--disable-dev-shm-usage",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = shutil.which("chromedriver") or "/usr/lib/chromium/chromedriver"
    return webdriver.Chrome(service=Service(driver), options=opts)


def open_times(page: str, repeats: int, screenshot: str = None, shot_slice: int = 0):
    """[(wall s from get() to reportReady, page's performance.now() ms)] and console errors."""
    drv = browser()
    try:
        out, errors = [], []
        for _ in range(repeats):
            drv.switch_to.new_window("tab")  # a fresh document each time
            t0 = time.perf_counter()
            drv.get("file://" + os.path.abspath(page))
            while not drv.execute_script("return window.reportReady === true"):
                if time.perf_counter() - t0 > 60:
                    raise TimeoutError("report not ready after 60 s")
                time.sleep(0.005)
            out.append(
                (time.perf_counter() - t0, drv.execute_script("return window.reportReadyMs"))
            )
            errors += [e for e in drv.get_log("browser") if e["level"] == "SEVERE"]
        if screenshot:
            drv.execute_script(
                "var r = document.getElementById('slice-range'); r.value = "
                "arguments[0]; r.dispatchEvent(new Event('input'))",
                doc_index(drv, shot_slice),
            )
            time.sleep(0.5)
            drv.save_screenshot(screenshot)
        return out, errors
    finally:
        drv.quit()


def doc_index(drv, slice_number: int) -> int:
    """Index of a slice number in the page's slice list."""
    return drv.execute_script(
        "return JSON.parse(document.getElementById('report-data')"
        ".textContent).slices.indexOf(arguments[0])",
        slice_number,
    )


def shrink_png(path: str, limit: int = 300_000) -> None:
    """A screenshot for the docs: 256-colour palette PNG when the full-colour one is too big."""
    from PIL import Image

    if os.path.getsize(path) > limit:
        Image.open(path).convert("RGB").quantize(256).save(path, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--screenshot", default=None, help="save a screenshot of the page here")
    args = ap.parse_args()
    vol, doc, gt = build_case(args.slices, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        case_dir = os.path.join(tmp, "phantom")
        os.makedirs(case_dir)
        t0 = time.perf_counter()
        write_case_report(case_dir, doc, vol, gt)
        write_s = time.perf_counter() - t0
        png_dir = os.path.join(tmp, "png")
        write_slice_images(png_dir, vol, ext="png")
        # the screenshot: the first annotated slice with a detection (hit / miss marks)
        shot = min(n for n in gt if any(d["slice_index"] == n for d in doc["detections"]))
        times, errors = open_times(
            os.path.join(case_dir, "report.html"), args.repeats, args.screenshot, shot
        )
        if args.screenshot:
            shrink_png(args.screenshot)
        walls = [w for w, _ in times]
        pages = [p for _, p in times]
        print(
            f"case: {args.slices} slices of {args.size} x {args.size}, "
            f"{len(doc['detections'])} detections, {len(doc['findings'])} findings, "
            f"ground truth on {len(gt)} slices"
        )
        print(f"write report: {write_s:.2f} s (3 presets x {args.slices} JPEG q90 + report.html)")
        print(
            f"files: {folder_mb(case_dir):.2f} MB (report.html "
            f"{os.path.getsize(os.path.join(case_dir, 'report.html')) / 1e6:.3f} MB); the same "
            f"pictures as PNG: {folder_mb(png_dir):.2f} MB"
        )
        print(
            f"open to reportReady, {args.repeats} fresh tabs: wall median "
            f"{statistics.median(walls):.3f} s (first {walls[0]:.3f}, max {max(walls):.3f}); "
            f"page performance.now() median {statistics.median(pages):.0f} ms"
        )
        print(f"console errors: {len(errors)}")
        ok = max(walls) < 2.0 and folder_mb(case_dir) < 30 and not errors
        print("targets (< 2 s, < 30 MB, no console error):", "met" if ok else "NOT met")


if __name__ == "__main__":
    main()
