"""A predict_net case folder's manifest: written last into the folder, it lists every file with its
size and SHA-256, and fingerprints of the settings and of the input. ``--overwrite`` removes only
folders that hold one; ``--resume`` keeps a folder only if its manifest still matches
(runner.py's module docstring)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from typing import Any, Dict, List, Optional

from ..atomic_io import atomic_write_text
from ..cli import escape_name
from .volume_io import CaseSource

__all__ = [
    "CASE_MARKER",
    "is_case_folder",
    "settings_fingerprint",
    "input_fingerprint",
    "write_manifest",
    "verified_case",
]

# Written last into every case folder: what --overwrite may remove, what --resume verifies.
CASE_MARKER = ".elixir_d2_case"
_MANIFEST_VERSION = 1


def is_case_folder(path: str) -> bool:
    """A case folder some run of this tool wrote (it holds :data:`CASE_MARKER`)."""
    return (
        os.path.isdir(path)
        and not os.path.islink(path)
        and os.path.isfile(os.path.join(path, CASE_MARKER))
    )


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def settings_fingerprint(cfg, opts: Any) -> str:
    """What a case's outputs depend on besides its input: the config, the weights' content, the
    drawing / grouping / spacing options and the ground truth file (drawn on the overlays)."""
    weights = cfg.MODEL.WEIGHTS
    opt = {
        k: v
        for k, v in asdict(opts).items()
        if k not in ("batch_size", "progress", "max_voxels", "overwrite", "resume")
    }
    opt["anonymize_ids"] = bool(opts.anonymize_ids)
    opt["gt"] = _sha256(opts.gt) if opts.gt and os.path.isfile(opts.gt) else opts.gt
    doc = {
        "config": cfg.dump(),
        "weights": _sha256(weights) if weights and os.path.isfile(weights) else weights,
        "options": opt,
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def input_fingerprint(case: CaseSource, shown: str) -> Dict[str, Any]:
    """The case's input as found on disk (sizes and modification times): a case folder made from
    another version of the input is not reused."""

    def stamp(p: str) -> List[int]:
        st = os.stat(p)
        return [st.st_size, st.st_mtime_ns]

    files = (
        {
            escape_name(e): stamp(os.path.join(case.path, e))
            for e in sorted(os.listdir(case.path))
            if os.path.isfile(os.path.join(case.path, e))
        }
        if os.path.isdir(case.path)
        else {"": stamp(case.path)}
    )
    return {"path": shown, "kind": case.kind, "key_slice": case.key_slice, "files": files}


def write_manifest(case_dir: str, settings: str, input_fp: Dict[str, Any]) -> None:
    """Every file of the case folder with its size and SHA-256; written last, atomically."""
    files = {}
    for folder, _, names in os.walk(case_dir):
        for n in names:
            p = os.path.join(folder, n)
            if n != CASE_MARKER:
                files[os.path.relpath(p, case_dir)] = [os.path.getsize(p), _sha256(p)]
    doc = {
        "written_by": "elixir_d2 predict_net.py",
        "version": _MANIFEST_VERSION,
        "settings": settings,
        "input": input_fp,
        "files": dict(sorted(files.items())),
    }
    atomic_write_text(os.path.join(case_dir, CASE_MARKER), json.dumps(doc, indent=1))


def verified_case(case_dir: str, settings: str, input_fp: Dict[str, Any]) -> Optional[Dict]:
    """The ``detections.json`` document of a finished case folder whose manifest matches the
    settings and input and whose every file has the size and hash recorded, else None."""
    if not is_case_folder(case_dir):
        return None
    try:
        with open(os.path.join(case_dir, CASE_MARKER), encoding="utf-8") as f:
            doc = json.load(f)
        if (
            not isinstance(doc, dict)
            or doc.get("version") != _MANIFEST_VERSION
            or doc.get("settings") != settings
            or doc.get("input") != input_fp
            or not isinstance(doc.get("files"), dict)
            or "detections.json" not in doc["files"]
        ):
            return None
        for rel, (size, digest) in doc["files"].items():
            p = os.path.normpath(os.path.join(case_dir, rel))
            if (
                os.path.isabs(rel)
                or not p.startswith(case_dir + os.sep)
                or os.path.islink(p)
                or not os.path.isfile(p)
                or os.path.getsize(p) != size
                or _sha256(p) != digest
            ):
                return None
        with open(os.path.join(case_dir, "detections.json"), encoding="utf-8") as f:
            case_doc = json.load(f)
    except (OSError, ValueError, TypeError):  # unreadable or malformed: the case is done again
        return None
    return case_doc if isinstance(case_doc, dict) else None
