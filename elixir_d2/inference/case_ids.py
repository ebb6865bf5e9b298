"""Case ids from untrusted file names, input paths shown relative to ``--input``, and an output
folder no path can escape.

A case id is the case's file or folder name (NIfTI extension removed) with every character
outside ``[A-Za-z0-9._-]`` replaced by ``_``, leading dots removed (so ``..`` or ``.`` never
name a folder), at most 80 characters; an empty result becomes ``case``. Ids that would collide
(equal ignoring case, as on macOS / Windows file systems) or equal one of the run's own output
files get ``~N``: ``~`` never survives sanitising, so a suffixed id cannot equal another case's id.
"""

from __future__ import annotations

import csv
import io
import os
import re
from typing import Dict, List, Optional, Sequence

__all__ = [
    "RUN_FILES",
    "UnsafeOutputError",
    "sanitize_case_id",
    "unique_case_ids",
    "InputNames",
    "OutputDir",
]

# Files a run writes at the top of the output folder: no case may be named like one of them.
RUN_FILES = (
    "summary.json",
    "detections.csv",
    "findings.csv",
    "coco_results.json",
    "coco_images.json",
    "froc.png",
    "froc.json",
    "index.html",
)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_LEN = 80


class UnsafeOutputError(ValueError):
    """An output path that would leave the output folder."""


def sanitize_case_id(name: str) -> str:
    """The id of a case named ``name`` (module docstring); may need a ``~N`` suffix to be unique."""
    safe = _UNSAFE.sub("_", name).lstrip(".")[:_MAX_LEN]
    return safe or "case"


def unique_case_ids(names: Sequence[str]) -> List[str]:
    """Sanitised ids of ``names`` in order, unique by construction (module docstring)."""
    base = [sanitize_case_id(n) for n in names]
    counts: Dict[str, int] = {}
    for b in base:
        counts[b.lower()] = counts.get(b.lower(), 0) + 1
    reserved = {f.lower() for f in RUN_FILES}
    seen: Dict[str, int] = {}
    out = []
    for b in base:
        key = b.lower()
        if counts[key] == 1 and key not in reserved:
            out.append(b)
            continue
        seen[key] = seen.get(key, 0) + 1
        out.append(f"{b}~{seen[key]}")
    return out


class InputNames:
    """How outputs and logs name inputs: relative to ``--input`` (a file input: to its folder),
    or, anonymised, by case id only."""

    def __init__(self, input_path: str, anonymize: bool = False):
        given = os.path.normpath(input_path)
        self.root = (
            os.path.dirname(os.path.abspath(given))
            if os.path.isfile(given)
            else os.path.abspath(given)
        )
        self.anonymize = anonymize
        self._given_root = os.path.dirname(given) if os.path.isfile(given) else given

    def relative(self, path: str) -> str:
        rel = os.path.relpath(os.path.abspath(path), self.root)
        return os.path.basename(os.path.abspath(path)) if rel == "." else rel

    def shown(self, path: str, case_id: str) -> str:
        """How a case's path appears in outputs."""
        return case_id if self.anonymize else self.relative(path)

    def scrub(self, text: str, path: Optional[str] = None, case_id: Optional[str] = None) -> str:
        """``text`` with the case's path (and, anonymised, the names inside it) replaced by how
        it is shown, and every other path under the input made relative."""
        if path is not None and case_id is not None:
            shown = self.shown(path, case_id)
            for form in sorted(
                {os.path.abspath(path), os.path.normpath(path)}, key=len, reverse=True
            ):
                text = text.replace(form, shown)
            if self.anonymize and os.path.isdir(path):  # scanners name files after the patient
                for entry in sorted(os.listdir(path), key=len, reverse=True):
                    if len(entry) >= 3:
                        text = text.replace(entry, "<file>")
        for root in sorted(
            {self.root, os.path.abspath(self._given_root), self._given_root}, key=len, reverse=True
        ):
            if root and root != ".":
                text = text.replace(root + os.sep, "")
        return text

    @staticmethod
    def mapping_csv(rows: Sequence[Dict[str, str]]) -> str:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=["case_id", "input"], lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
        return buf.getvalue()


class OutputDir:
    """The output folder; :meth:`path` refuses any path that resolves (symbolic links followed)
    outside it."""

    def __init__(self, root: str):
        self.given = root
        self.root = os.path.realpath(root)

    def path(self, *parts: str) -> str:
        p = os.path.realpath(os.path.join(self.root, *parts))
        if p == self.root or not p.startswith(self.root + os.sep):
            raise UnsafeOutputError(
                f"refusing to write {os.path.join(*parts)!r}: it resolves to "
                f"{p}, outside the output folder {self.given}"
            )
        return p

    def contains(self, path: str) -> bool:
        p = os.path.realpath(path)
        return p == self.root or p.startswith(self.root + os.sep)
