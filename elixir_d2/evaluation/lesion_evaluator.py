"""LesionEvaluator: DeepLesion / KiTS19 metrics (FROC with IoU and IoBB, COCO mAP, per type,
per size) as a detectron2 DatasetEvaluator (docs/design.md, Evaluation protocol)."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import math
import os
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from detectron2.config import configurable
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.structures import BoxMode
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager

from .froc import CRITERIA, MEAN_SENS_FPS, PAPER_FPS, check_convention, compute_froc
from .froc_inputs import FROC_INPUTS_FILE, write_froc_inputs
from .report import CRITERION_NAMES, fp_key, plot_froc

logger = logging.getLogger(__name__)

__all__ = ["LesionEvaluator", "coco_ap", "SIZE_BUCKETS", "TYPE_FP"]

# Per-type and per-size results are read at 3 FPs per image with IoU (paper Table 4).
TYPE_FP = 3.0
# Long-diameter buckets in mm: name, lower bound (inclusive), upper bound (inclusive; the first
# bucket's upper bound is exclusive: < 10).
SIZE_BUCKETS = (
    ("size<10", -math.inf, 10.0),
    ("size10to30", 10.0, 30.0),
    ("size>30", 30.0, math.inf),
)


def _size_bucket(diameter: Optional[float]) -> int:
    """Index into SIZE_BUCKETS, or -1 for a lesion without a usable long diameter."""
    if diameter is None or not np.isfinite(diameter) or diameter <= 0:
        return -1
    if diameter < 10.0:
        return 0
    return 1 if diameter <= 30.0 else 2


def coco_ap(
    gt_boxes: Sequence[np.ndarray],
    gt_classes: Sequence[np.ndarray],
    pred_boxes: Sequence[np.ndarray],
    pred_scores: Sequence[np.ndarray],
    pred_classes: Sequence[np.ndarray],
    num_classes: int = 1,
) -> Tuple[float, float]:
    """COCO AP@[.5:.95] and AP50 in % via pycocotools, per image lists of XYXY arrays.

    Category-agnostic when ``num_classes`` is 1 (every class id is mapped to one category).
    No detection or no ground truth gives (0.0, 0.0) instead of pycocotools' crash / -1.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def cat(c: np.ndarray) -> np.ndarray:
        if num_classes == 1:
            return np.zeros(len(c), dtype=np.int64)
        return np.asarray(c, dtype=np.int64)

    images, anns, dets = [], [], []
    for i, (gb, gc, pb, ps, pc) in enumerate(
        zip(gt_boxes, gt_classes, pred_boxes, pred_scores, pred_classes)
    ):
        images.append({"id": i + 1})
        for b, c in zip(np.asarray(gb, dtype=np.float64).reshape(-1, 4), cat(gc)):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": i + 1,
                    "category_id": int(c) + 1,
                    "bbox": [float(b[0]), float(b[1]), w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        for b, s, c in zip(np.asarray(pb, dtype=np.float64).reshape(-1, 4), ps, cat(pc)):
            dets.append(
                {
                    "image_id": i + 1,
                    "category_id": int(c) + 1,
                    "score": float(s),
                    "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                }
            )
    if not anns or not dets:
        return 0.0, 0.0
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco_gt = COCO()
        coco_gt.dataset = {
            "images": images,
            "annotations": anns,
            "categories": [{"id": k + 1, "name": str(k)} for k in range(num_classes)],
        }
        coco_gt.createIndex()
        coco_eval = COCOeval(coco_gt, coco_gt.loadRes(dets), "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    ap, ap50 = (max(float(v), 0.0) * 100.0 for v in coco_eval.stats[:2])
    return ap, ap50


class LesionEvaluator(DatasetEvaluator):
    """Sensitivity at FPs per image (IoU and IoBB), COCO mAP, per-type and per-size sensitivity.

    Ground truth comes from ``DatasetCatalog.get(dataset_name)``; detections are read as the model
    returns them, in the records' pixels (BodyCropRCNN has undone any body crop). Lesions flagged
    ``noisy`` (DeepLesion's Possibly_noisy) are removed from the ground truth and counted, and an
    image whose lesions are all noisy is left out with its detections, as 3DCE's test loading does
    (docs/evaluation.md); a detection on a noisy lesion of a kept image is a false positive. Only
    the images that went through :meth:`process` are evaluated (others are counted and logged). All
    metrics are in %. Binary FROC and mAP are class-agnostic. On typed datasets (metadata
    ``thing_classes`` with more than one class) the per-type sensitivity at 3 FPs (IoU) is
    class-aware (detections of class t against lesions with category_id t, FP axis = FPs of class-t
    detections); it is NaN in the returned dict and null in the JSON where the type has no lesion or
    its curve never reaches 3 FPs per image (Table 4's "-"). The per-size sensitivity at 3 FPs (IoU)
    uses the overall FP axis and counts the lesions of the bucket only: the fraction of the bucket's
    lesions found at the score threshold where the overall FP rate is 3/image. Every FROC is
    computed with one convention (``TEST.FROC_CONVENTION``; docs/evaluation.md). On an untyped
    dataset, detections an RTM model produced in its "typed" output mode (their ``rtm_typed`` field,
    see :func:`elixir_d2.modeling.roi_heads.rtm_output_mode`) are refused.
    """

    @configurable
    def __init__(
        self,
        dataset_name: str,
        output_dir: Optional[str] = None,
        *,
        distributed: bool = True,
        fps: Sequence[float] = PAPER_FPS,
        max_dets_per_image: Optional[int] = None,
        froc_convention: str = "continuous",
    ):
        """
        Args:
            dataset_name: a name registered in DatasetCatalog.
            output_dir: folder receiving froc.csv, froc.png and lesion_metrics.json (files are
                written directly in it); None writes nothing.
            distributed: gather predictions from all ranks to rank 0 before evaluating.
            fps: FP-per-image points reported.
            max_dets_per_image: keep only the top-scored detections of each image; None keeps
                all. Must be large enough for the curve to reach max(fps) FPs per image.
            froc_convention: ``"continuous"`` or ``"deeplesion"`` (the DeepLesion authors' pixel
                counts and curve reading, for comparison with published numbers).
        """
        self._dataset_name = dataset_name
        self._output_dir = output_dir
        self._distributed = distributed
        self._fps = tuple(float(f) for f in fps)
        if max_dets_per_image is not None and max_dets_per_image <= 0:
            raise ValueError(
                f"max_dets_per_image must be positive or None, got {max_dets_per_image}"
            )
        self._max_dets = max_dets_per_image
        self._convention = check_convention(
            froc_convention, "froc_convention (TEST.FROC_CONVENTION)"
        )
        meta = MetadataCatalog.get(dataset_name)
        self._classes = list(getattr(meta, "thing_classes", None) or ["lesion"])
        self.reset()

    @classmethod
    def from_config(cls, cfg, dataset_name: str, output_dir: Optional[str] = None):
        return {
            "dataset_name": dataset_name,
            "output_dir": output_dir or os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name),
            "fps": tuple(cfg.TEST.get("FROC_FPS", PAPER_FPS)),
            "max_dets_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            "froc_convention": cfg.TEST.get("FROC_CONVENTION", "continuous"),
        }

    @property
    def typed(self) -> bool:
        return len(self._classes) > 1

    def reset(self) -> None:
        self._predictions: List[dict] = []

    def process(self, inputs, outputs) -> None:
        for inp, out in zip(inputs, outputs):
            if "image_id" not in inp:
                raise ValueError(
                    f"LesionEvaluator needs 'image_id' in every input, got keys {sorted(inp)}"
                )
            if "instances" not in out:
                raise ValueError(f"output for image {inp['image_id']} has no 'instances'")
            inst = out["instances"].to("cpu")
            if not self.typed and inst.has("rtm_typed") and bool(inst.rtm_typed.any()):
                # Per-type scores split a lesion's probability over near-duplicate boxes.
                raise ValueError(
                    f"{self._dataset_name} is untyped but image {inp['image_id']} has an RTM "
                    "model's per-type detections: run the model under "
                    "rtm_output_mode(model, 'binary') (ElixirTrainer.test does)"
                )
            boxes = inst.pred_boxes.tensor.numpy().astype(np.float32)
            scores = inst.scores.numpy().astype(np.float32)
            classes = inst.pred_classes.numpy() if inst.has("pred_classes") else np.zeros(len(inst))
            classes = classes.astype(np.int64)
            bad = ~(np.isfinite(boxes).all(axis=1) & np.isfinite(scores))
            bad |= (boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])
            if bad.any():
                k = int(np.flatnonzero(bad)[0])
                raise ValueError(
                    f"prediction {k} for image_id {inp['image_id']} of {self._dataset_name} has a "
                    f"NaN/infinite or inverted box or score: box {boxes[k].tolist()}, score "
                    f"{scores[k]}"
                )
            if self._max_dets is not None and len(scores) > self._max_dets:
                keep = np.argsort(-scores, kind="stable")[: self._max_dets]
                boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
            self._predictions.append(
                {"image_id": inp["image_id"], "boxes": boxes, "scores": scores, "classes": classes}
            )

    def evaluate(self):
        if self._distributed:
            comm.synchronize()
            predictions = list(itertools.chain(*comm.gather(self._predictions, dst=0)))
            if not comm.is_main_process():
                return {}
        else:
            predictions = self._predictions
        if not predictions:
            logger.warning(
                f"[LesionEvaluator] {self._dataset_name}: no prediction received, "
                "nothing evaluated."
            )
            return {}
        data = self._collect(predictions)
        metrics, extra = self._compute(data)
        if self._output_dir:
            self._write(metrics, extra)
            write_froc_inputs(
                os.path.join(self._output_dir, FROC_INPUTS_FILE),
                self._dataset_name,
                self._convention,
                data["image_id"],
                data["patient"],
                data["pred_boxes"],
                data["pred_scores"],
                data["gt_boxes"],
            )
        return OrderedDict([("lesion", metrics)])

    # ------------------------------------------------------------------ internals
    def _collect(self, predictions: List[dict]) -> Dict[str, list]:
        """Pair predictions with ground truth, in dataset order (so ties and the split across
        ranks cannot change the result)."""
        records = DatasetCatalog.get(self._dataset_name)
        position = {}
        for i, r in enumerate(records):
            if r["image_id"] in position:
                raise ValueError(f"dataset {self._dataset_name} has image_id {r['image_id']} twice")
            position[r["image_id"]] = i
        by_pos = {}
        for p in predictions:
            if p["image_id"] not in position:
                raise ValueError(
                    f"prediction for image_id {p['image_id']} not in dataset {self._dataset_name}"
                )
            pos = position[p["image_id"]]
            if pos in by_pos:
                raise ValueError(
                    f"image_id {p['image_id']} of {self._dataset_name} was predicted twice"
                )
            by_pos[pos] = p
        data = {
            k: []
            for k in (
                "image_id",
                "patient",
                "pred_boxes",
                "pred_scores",
                "pred_classes",
                "gt_boxes",
                "gt_classes",
                "gt_size",
            )
        }
        data["num_noisy"] = data["num_images_noisy_only"] = 0
        for pos in sorted(by_pos):
            p, record = by_pos[pos], records[pos]
            anns = record.get("annotations", [])
            if anns and all(a.get("noisy", False) for a in anns):
                # 3DCE's filter_roidb: an image left without a lesion once the noisy ones are
                # removed leaves the test set, its detections and its FP denominator included.
                data["num_noisy"] += len(anns)
                data["num_images_noisy_only"] += 1
                continue
            boxes, classes, sizes = [], [], []
            for ann in anns:
                if ann.get("noisy", False):
                    data["num_noisy"] += 1
                    continue
                mode = ann.get("bbox_mode", BoxMode.XYXY_ABS)
                boxes.append(BoxMode.convert(list(ann["bbox"]), mode, BoxMode.XYXY_ABS))
                classes.append(int(ann.get("category_id", 0)))
                diameter = ann.get("diameter_mm")
                sizes.append(_size_bucket(float(diameter[0]) if diameter is not None else None))
            data["image_id"].append(record["image_id"])
            # The bootstrap's resampling unit; a set without patients resamples images.
            data["patient"].append(record.get("patient", record["image_id"]))
            data["pred_boxes"].append(p["boxes"])
            data["pred_scores"].append(p["scores"])
            data["pred_classes"].append(p["classes"])
            data["gt_boxes"].append(np.asarray(boxes, dtype=np.float64).reshape(-1, 4))
            data["gt_classes"].append(np.asarray(classes, dtype=np.int64))
            data["gt_size"].append(np.asarray(sizes, dtype=np.int64))
        data["num_missing"] = len(records) - len(by_pos)
        if data["num_missing"]:
            logger.warning(
                f"[LesionEvaluator] {self._dataset_name}: {data['num_missing']} of {len(records)} "
                "images were never processed and are left out of the evaluation."
            )
        return data

    def _compute(self, data: Dict[str, list]) -> Tuple["OrderedDict[str, float]", dict]:
        read_fps = sorted(set(self._fps) | set(MEAN_SENS_FPS) | {TYPE_FP})
        args = (data["pred_boxes"], data["pred_scores"], data["gt_boxes"])
        conv = self._convention
        froc = {
            "iou": compute_froc(
                *args, fps=read_fps, criterion="iou", gt_groups=data["gt_size"], convention=conv
            ),
            "iobb": compute_froc(*args, fps=read_fps, criterion="iobb", convention=conv),
        }
        m: "OrderedDict[str, float]" = OrderedDict()
        for crit in CRITERIA:
            sens = froc[crit]["sensitivity"]
            for f in self._fps:
                m[f"sens@{fp_key(f)}_{crit}"] = 100.0 * sens[f]
            m[f"mean_sens_{crit}"] = 100.0 * float(np.mean([sens[f] for f in MEAN_SENS_FPS]))
            if froc[crit]["max_fp_per_image"] < max(self._fps):
                logger.warning(
                    f"[LesionEvaluator] {self._dataset_name} ({crit}): the FROC curve ends at "
                    f"{froc[crit]['max_fp_per_image']:.2f} FPs/image < {max(self._fps):g}; "
                    "sensitivities beyond it repeat the last value. Raise "
                    "TEST.DETECTIONS_PER_IMAGE or lower the score threshold."
                )
        m["AP"], m["AP50"] = coco_ap(
            data["gt_boxes"],
            data["gt_classes"],
            data["pred_boxes"],
            data["pred_scores"],
            data["pred_classes"],
            num_classes=1,
        )
        per_type = OrderedDict()
        if self.typed:
            m["AP_typed"], m["AP50_typed"] = coco_ap(
                data["gt_boxes"],
                data["gt_classes"],
                data["pred_boxes"],
                data["pred_scores"],
                data["pred_classes"],
                num_classes=len(self._classes),
            )
            per_type = self._per_type(data)
            for name, v in per_type.items():
                m[f"sens@{fp_key(TYPE_FP)}_iou_{name}"] = math.nan if v is None else 100.0 * v
        per_size = OrderedDict()
        group_sens = froc["iou"].get("group_sensitivity", {})
        group_n = froc["iou"].get("group_num_gt", {})
        for b, (name, _, _) in enumerate(SIZE_BUCKETS):
            per_size[name] = group_sens[b][TYPE_FP] if group_n.get(b, 0) > 0 else None
            m[f"sens@{fp_key(TYPE_FP)}_iou_{name}"] = (
                math.nan if per_size[name] is None else 100.0 * per_size[name]
            )
        m["num_images"] = float(froc["iou"]["num_images"])
        m["num_lesions"] = float(froc["iou"]["num_gt"])
        m["num_noisy_left_out"] = float(data["num_noisy"])
        m["num_images_noisy_only_left_out"] = float(data["num_images_noisy_only"])
        extra = {
            "froc": froc,
            "per_type": per_type,
            "per_size": per_size,
            "counts": {
                "num_images": froc["iou"]["num_images"],
                "num_lesions": froc["iou"]["num_gt"],
                "num_noisy_left_out": data["num_noisy"],
                "num_images_noisy_only_left_out": data["num_images_noisy_only"],
                "num_images_not_processed": data["num_missing"],
                "num_detections": froc["iou"]["num_detections"],
                "num_lesions_without_size": int(sum(int((s < 0).sum()) for s in data["gt_size"])),
            },
        }
        return m, extra

    def _per_type(self, data: Dict[str, list]) -> "OrderedDict[str, Optional[float]]":
        """Class-aware sensitivity at 3 FPs (IoU) per lesion type; None where undefined."""
        out = OrderedDict()
        known = sum(int(((c >= 0) & (c < len(self._classes))).sum()) for c in data["gt_classes"])
        total = sum(len(c) for c in data["gt_classes"])
        if known < total:
            logger.warning(
                f"[LesionEvaluator] {self._dataset_name}: {total - known} lesions have "
                "no valid type and are left out of the per-type sensitivity only."
            )
        for t, name in enumerate(self._classes):
            pm = [c == t for c in data["pred_classes"]]
            gm = [c == t for c in data["gt_classes"]]
            res = compute_froc(
                [b[k] for b, k in zip(data["pred_boxes"], pm)],
                [s[k] for s, k in zip(data["pred_scores"], pm)],
                [g[k] for g, k in zip(data["gt_boxes"], gm)],
                fps=(TYPE_FP,),
                criterion="iou",
                convention=self._convention,
            )
            key = name.replace(" ", "_")
            if res["num_gt"] == 0 or res["max_fp_per_image"] < TYPE_FP:
                out[key] = None
            else:
                out[key] = res["sensitivity"][TYPE_FP]
        return out

    def _write(self, metrics: "OrderedDict[str, float]", extra: dict) -> None:
        PathManager.mkdirs(self._output_dir)
        froc = extra["froc"]
        header = (
            ["criterion"]
            + [f"sens@{fp_key(f)}" for f in self._fps]
            + ["mean_sens", "max_fp_per_image"]
        )
        lines = [",".join(header)]
        for crit in CRITERIA:
            vals = [f"{metrics[f'sens@{fp_key(f)}_{crit}']:.4f}" for f in self._fps]
            lines.append(
                ",".join(
                    [crit]
                    + vals
                    + [
                        f"{metrics[f'mean_sens_{crit}']:.4f}",
                        f"{froc[crit]['max_fp_per_image']:.4f}",
                    ]
                )
            )
        with PathManager.open(
            os.path.join(self._output_dir, "froc.csv"), "w", encoding="utf-8"
        ) as f:
            f.write("\n".join(lines) + "\n")

        def clean(v):
            return None if isinstance(v, float) and math.isnan(v) else v

        def pct(v):
            return None if v is None else 100.0 * v

        payload = {
            "dataset": self._dataset_name,
            "units": "%",
            "froc_convention": self._convention,
            "metrics": {k: clean(v) for k, v in metrics.items()},
            "per_type_sens@3_iou": {k: pct(v) for k, v in extra["per_type"].items()},
            "per_size_sens@3_iou": {k: pct(v) for k, v in extra["per_size"].items()},
            "counts": extra["counts"],
            "max_fp_per_image": {c: froc[c]["max_fp_per_image"] for c in CRITERIA},
        }
        with PathManager.open(
            os.path.join(self._output_dir, "lesion_metrics.json"), "w", encoding="utf-8"
        ) as f:
            json.dump(payload, f, indent=2)
        curves = {
            CRITERION_NAMES[c]: (froc[c]["fp_per_image"], froc[c]["sens_curve"]) for c in CRITERIA
        }
        plot_froc(
            curves,
            os.path.join(self._output_dir, "froc.png"),
            fps=self._fps,
            title=f"FROC on {self._dataset_name}",
        )
        logger.info(
            f"[LesionEvaluator] wrote froc.csv, froc.png, lesion_metrics.json to {self._output_dir}"
        )
