"""The case report (report.html) and run index (index.html) in a real browser: headless Chromium
through selenium opens them from file://, scrolls slices, moves the threshold, clicks findings,
and the console stays free of errors. Chromium and chromedriver come from scripts/install.sh."""

import json
import os
import shutil

import numpy as np
import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import WebDriverWait

from elixir_d2.inference import (
    CTVolume,
    PredictOptions,
    SlicePrediction,
    VolumePrediction,
    group_detections,
    run_prediction,
)
from elixir_d2.inference.outputs import case_summary, detection_rows, flat_detections
from elixir_d2.inference.report import PRESETS, ground_truth_matches, write_case_report
from elixir_d2.inference.runner import CASE_MARKER

from test_predict_io import phantom, write_nifti
from test_predict_net import OracleModel, quickstart_cfg

SLICES = 40


def _chromium_paths():
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver") or "/usr/lib/chromium/chromedriver"
    if not binary or not os.path.isfile(driver):
        pytest.fail(
            "Chromium / chromedriver missing: run scripts/install.sh (installs Debian's "
            "chromium and chromium-driver)"
        )
    return binary, driver


@pytest.fixture(scope="module")
def browser():
    binary, driver_path = _chromium_paths()
    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--window-size=1200,900",
        "--disable-dev-shm-usage",
        "--allow-file-access-from-files",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    drv = webdriver.Chrome(service=Service(driver_path), options=opts)
    yield drv
    drv.quit()


def _open(drv, path, ready="window.reportReady === true"):
    drv.get_log("browser")  # drop what earlier pages logged
    drv.get("file://" + os.path.abspath(path))
    WebDriverWait(drv, 20).until(lambda d: d.execute_script("return " + ready))


def _console_errors(drv):
    return [e for e in drv.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def _slice(drv) -> int:
    return int(drv.find_element(By.TAG_NAME, "body").get_attribute("data-slice"))


def _shown(drv):
    """data-det ids of the detection boxes displayed on the current slice."""
    return sorted(
        int(r.get_attribute("data-det"))
        for r in drv.find_elements(By.CSS_SELECTOR, "#overlay rect.det")
        if r.is_displayed()
    )


# ----------------------------------------------------------------------------- hand-made case
# slice -> (box, score); slices 3-5 one lesion (finding 0), an FP on 3, a lone box on 9.
DETS = {
    3: [([20, 20, 40, 40], 0.9), ([2, 50, 10, 60], 0.3)],
    4: [([21, 20, 41, 40], 0.85)],
    5: [([22, 21, 40, 41], 0.8)],
    9: [([45, 5, 60, 15], 0.6)],
}
# Slice 3: IoU 0.82 with the 0.9 box (hit); 4: IoU 0.16 (miss + FP); 9: apart (miss + FP);
# 7: annotated, no lesion.
GT = {
    3: np.array([[20, 22, 40, 42]]),
    4: np.array([[30, 30, 50, 50]]),
    9: np.array([[10, 10, 20, 20]]),
    7: np.zeros((0, 4)),
}


def _hand_volume():
    return CTVolume(
        name="case_a",
        source="case_a.nii.gz",
        kind="nifti",
        hu=phantom(slices=SLICES, size=64, lesion=(3, 6, 20, 40, 20, 40)).astype(np.float32),
        slice_numbers=list(range(SLICES)),
        spacing=(0.8, 0.8),
        slice_interval=2.5,
    )


def _hand_case(case_dir, gt=GT):
    vol = _hand_volume()
    pred = VolumePrediction(vol)
    for n in range(SLICES):
        boxes = np.array([b for b, _ in DETS.get(n, [])], dtype=np.float64).reshape(-1, 4)
        scores = np.array([s for _, s in DETS.get(n, [])])
        pred.slices.append(
            SlicePrediction(n, boxes, scores, np.zeros(len(scores), int), None, (64, 64))
        )
    slices, boxes, scores = flat_detections(pred)
    findings = group_detections(slices, boxes, scores, vol.spacing, vol.slice_interval)
    dets = detection_rows(pred, {i: f.finding_id for f in findings for i in f.members})
    doc = json.loads(json.dumps(case_summary(pred, dets, findings)))
    os.makedirs(case_dir, exist_ok=True)
    write_case_report(case_dir, doc, vol, gt)
    return doc


def test_ground_truth_matches_use_iou():
    m = ground_truth_matches(np.array([[20, 20, 40, 40], [21, 20, 41, 40]]), GT[3])
    assert m == [[0], [0]]
    assert ground_truth_matches(np.array([[21, 20, 41, 40]]), GT[4]) == [[]]
    assert ground_truth_matches(np.zeros((2, 4)), np.zeros((0, 4))) == [[], []]


def test_report_page_in_chromium(tmp_path, browser):
    case_dir = str(tmp_path / "case_a")
    doc = _hand_case(case_dir)
    assert [(f["best_slice"], f["slice_first"], f["slice_last"]) for f in doc["findings"]] == [
        (3, 3, 5),
        (9, 9, 9),
        (3, 3, 3),
    ]
    for key, _, _ in PRESETS:  # every slice once per preset, beside the report
        assert len(os.listdir(f"{case_dir}/report/{key}")) == SLICES
    drv = browser
    _open(drv, f"{case_dir}/report.html")
    # Opens at the best finding's key slice; only it and 3 slices either side were requested.
    assert _slice(drv) == 3
    requested = "return window.reportRequested.map(n => n.split('/').slice(-2).join('/'))"
    assert sorted(set(drv.execute_script(requested))) == [
        f"soft/slice_{n:03d}.jpg" for n in range(0, 7)
    ]

    # Detection ids follow detections.json order: 0, 1 on slice 3; 2 on 4; 3 on 5; 4 on 9.
    assert _shown(drv) == [0, 1]
    assert drv.find_element(By.ID, "shown-count").text.startswith("2 of 2")
    cls = {
        int(r.get_attribute("data-det")): r.get_attribute("class")
        for r in drv.find_elements(By.CSS_SELECTOR, "#overlay rect.det")
    }
    assert cls == {0: "det tp", 1: "det fp"}
    assert drv.find_element(By.CSS_SELECTOR, "#overlay rect.gt").get_attribute("class") == "gt hit"
    summary = drv.find_element(By.ID, "gt-summary")
    assert [summary.get_attribute(a) for a in ("data-hits", "data-lesions", "data-fps")] == [
        "1",
        "3",
        "3",
    ]

    # Threshold slider by keyboard: 50 steps of 0.01 -> 0.50 hides the 0.3 box.
    slider = drv.find_element(By.ID, "thresh")
    slider.send_keys(*([Keys.ARROW_RIGHT] * 50))
    assert drv.find_element(By.ID, "thresh-value").text == "0.50"
    assert _shown(drv) == [0]
    assert drv.find_element(By.ID, "shown-count").text.startswith("1 of 2")
    assert summary.get_attribute("data-fps") == "2"
    f2 = drv.find_element(By.CSS_SELECTOR, '#findings tr[data-finding="2"]')
    assert "below" in f2.get_attribute("class")
    slider.send_keys(*([Keys.ARROW_RIGHT] * 45))  # 0.95: nothing shown, the lesion now missed
    assert _shown(drv) == [] and summary.get_attribute("data-hits") == "0"
    assert drv.find_element(By.CSS_SELECTOR, "#overlay rect.gt").get_attribute("class") == "gt miss"
    slider.send_keys(Keys.HOME)
    assert _shown(drv) == [0, 1]

    # Mouse wheel over the picture: one slice per notch, down = next.
    viewer = drv.find_element(By.ID, "viewer")
    ActionChains(drv).scroll_from_origin(ScrollOrigin.from_element(viewer), 0, 100).perform()
    WebDriverWait(drv, 5).until(lambda d: _slice(d) == 4)
    assert _shown(drv) == [2]
    assert drv.find_element(By.CSS_SELECTOR, "#overlay rect.gt").get_attribute("class") == "gt miss"
    assert drv.find_element(By.CSS_SELECTOR, "#overlay rect.det").get_attribute("class") == "det fp"
    ActionChains(drv).scroll_from_origin(ScrollOrigin.from_element(viewer), 0, -100).perform()
    WebDriverWait(drv, 5).until(lambda d: _slice(d) == 3)
    # Arrow keys on the page.
    viewer.click()
    actions = ActionChains(drv)
    actions.send_keys(Keys.ARROW_DOWN, Keys.ARROW_DOWN).perform()
    assert _slice(drv) == 5
    actions = ActionChains(drv)
    actions.send_keys(Keys.ARROW_UP).perform()
    assert _slice(drv) == 4
    ActionChains(drv).send_keys(Keys.END).perform()
    assert _slice(drv) == SLICES - 1 and _shown(drv) == []
    # Still lazy: around slices 3, 4, 5, 4, 39 only.
    assert sorted({int(n[-7:-4]) for n in drv.execute_script(requested)}) == [
        *range(0, 9),
        *range(SLICES - 4, SLICES),
    ]
    ActionChains(drv).send_keys(Keys.PAGE_UP).perform()
    assert _slice(drv) == SLICES - 11
    # The range input.
    rng = drv.find_element(By.ID, "slice-range")
    rng.send_keys(Keys.HOME)
    assert _slice(drv) == 0 and rng.get_attribute("value") == "0"
    rng.send_keys(Keys.ARROW_RIGHT)
    assert _slice(drv) == 1
    assert drv.find_element(By.ID, "slice-label").text.startswith("slice 1 (2 / 40)")

    # A findings row jumps to its key slice.
    drv.find_element(By.CSS_SELECTOR, '#findings tr[data-finding="1"]').click()
    assert _slice(drv) == 9 and _shown(drv) == [4]
    row = drv.find_element(By.CSS_SELECTOR, '#findings tr[data-finding="1"]')
    assert "current" in row.get_attribute("class")
    cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
    assert cells == ["1", "9\u20139", "2.5", "12.0", "0.600", "9"]  # 15 px * 0.8 mm = 12 mm
    drv.find_element(By.CSS_SELECTOR, '#findings tr[data-finding="0"]').click()
    assert _slice(drv) == 3

    # Window presets: key 2 = lung, a click = bone; the picture is that preset's file.
    ActionChains(drv).send_keys("2").perform()
    src = drv.find_element(By.ID, "slice-img").get_attribute("src")
    assert src.endswith("/report/lung/slice_003.jpg")
    drv.find_element(By.CSS_SELECTOR, '#presets button[data-preset="bone"]').click()
    WebDriverWait(drv, 5).until(
        lambda d: d.execute_script(
            "var i = document.getElementById('slice-img'); return i.complete && i.naturalWidth"
        )
    )
    assert (
        drv.find_element(By.ID, "slice-img")
        .get_attribute("src")
        .endswith("/report/bone/slice_003.jpg")
    )
    # FROC of the case drawn from numbers: 3 lesions on the 4 annotated slices.
    assert drv.find_elements(By.CSS_SELECTOR, "#froc path.curve")
    assert "3 lesions on 4 annotated slices" in drv.find_element(By.ID, "froc-panel").text
    assert drv.save_screenshot(str(tmp_path / "report.png"))
    assert _console_errors(drv) == []


def test_report_without_ground_truth(tmp_path, browser):
    case_dir = str(tmp_path / "case_a")
    doc = _hand_case(case_dir, gt=None)
    # Text in the data cannot close the data block or become markup.
    warning = "odd </script><b id=injected>name</b> & <!-- x"
    doc["warnings"] = [warning]
    write_case_report(case_dir, doc, _hand_volume(), None)
    _open(browser, f"{case_dir}/report.html")
    assert browser.find_element(By.CSS_SELECTOR, "#warnings li").text == warning
    assert not browser.find_elements(By.ID, "injected")
    cls = sorted(
        r.get_attribute("class") for r in browser.find_elements(By.CSS_SELECTOR, "#overlay rect")
    )
    assert cls == ["det", "det"]  # no hit / FP marking, no ground truth boxes
    assert browser.find_element(By.ID, "gt-summary").text == ""
    assert not browser.find_elements(By.ID, "froc")
    assert _console_errors(browser) == []


def test_run_writes_reports_and_index(tmp_path, browser):
    """predict_net's runner writes report.html per case, lists it in the case manifest (a resumed
    run verifies it) and writes index.html; --report none writes neither."""
    cases = tmp_path / "cases"
    cases.mkdir()
    write_nifti(
        cases / "ct_a.nii.gz",
        phantom(slices=7, lesion=(1, 5, 10, 22, 14, 30)),
        spacing=(2.0, 2.0, 2.5),
    )
    write_nifti(
        cases / "ct_b.nii.gz", phantom(slices=5, lesion=(0, 0, 0, 0, 0, 0)), spacing=(2.0, 2.0, 2.5)
    )
    (cases / "broken.nii.gz").write_bytes(b"not a volume")
    gt = tmp_path / "gt.json"
    gt.write_text(json.dumps({"ct_a": {"2": [[13, 9, 31, 23]], "6": []}}), encoding="utf-8")
    cfg = quickstart_cfg()
    lo, hi = cfg.INPUT.HU_WINDOW
    model = OracleModel((80 - lo) * 255 / (hi - lo))
    out = str(tmp_path / "out")
    run_prediction(cfg, str(cases), out, PredictOptions(gt=str(gt), progress=False), model=model)
    manifest = json.load(open(f"{out}/ct_a/{CASE_MARKER}", encoding="utf-8"))["files"]
    assert "report.html" in manifest and "report/soft/slice_003.jpg" in manifest
    assert sum(k.startswith("report/") for k in manifest) == 3 * 7

    _open(browser, f"{out}/index.html", ready="document.readyState === 'complete'")
    rows = browser.find_elements(By.CSS_SELECTOR, "#cases tbody tr")
    assert [
        (r.get_attribute("data-case"), r.find_element(By.CSS_SELECTOR, ".findings").text)
        for r in rows
    ] == [("ct_a", "1"), ("ct_b", "0")]
    failed = browser.find_elements(By.CSS_SELECTOR, "#failed tbody tr")
    assert [r.get_attribute("data-case") for r in failed] == ["broken"]
    assert "unreadable" in failed[0].text
    assert browser.execute_script(
        "var i = document.getElementById('froc'); return i.complete && i.naturalWidth > 0"
    )
    assert _console_errors(browser) == []
    browser.find_element(By.LINK_TEXT, "ct_a").click()
    WebDriverWait(browser, 20).until(lambda d: d.execute_script("return window.reportReady"))
    assert _slice(browser) == 1  # the finding's key slice: its best (first equal) score
    assert [
        r.get_attribute("class")
        for r in browser.find_elements(By.CSS_SELECTOR, "#overlay rect.det")
    ] == ["det"]
    browser.find_element(By.CSS_SELECTOR, "body").send_keys(Keys.ARROW_DOWN)
    assert _slice(browser) == 2
    assert (
        browser.find_element(By.CSS_SELECTOR, "#overlay rect.gt").get_attribute("class") == "gt hit"
    )
    assert _console_errors(browser) == []

    # --resume: a changed report picture fails the manifest check, so that case is done again.
    with open(f"{out}/ct_a/report/lung/slice_000.jpg", "ab") as f:
        f.write(b"x")
    mtime_b = os.path.getmtime(f"{out}/ct_b/report.html")
    run_prediction(
        cfg, str(cases), out, PredictOptions(gt=str(gt), progress=False, resume=True), model=model
    )
    assert manifest == json.load(open(f"{out}/ct_a/{CASE_MARKER}", encoding="utf-8"))["files"]
    assert os.path.getmtime(f"{out}/ct_b/report.html") == mtime_b  # verified, kept

    none = str(tmp_path / "none")
    run_prediction(
        cfg, str(cases), none, PredictOptions(report="none", progress=False), model=model
    )
    assert not os.path.exists(f"{none}/index.html")
    assert not os.path.exists(f"{none}/ct_a/report.html")
    assert not os.path.exists(f"{none}/ct_a/report")
    with pytest.raises(ValueError, match="report must be one of"):
        run_prediction(
            cfg,
            str(cases),
            str(tmp_path / "bad"),
            PredictOptions(report="pdf", progress=False),
            model=model,
        )
