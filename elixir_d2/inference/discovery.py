"""Which files under ``--input`` a prediction run reads: the folder walk, symbolic links, and file
names that are not valid UTF-8.

Policy (docs/inference.md, "Symbolic links and file names"):

* the input path itself may be a link: the user named it;
* below it, a link to a file is followed when its target lies inside the input folder (the real
  path of ``--input``), else it is listed under ``ignored``; a link to a folder is never followed
  (listed under ``ignored``), so no walk can loop or leave the input; a folder already visited
  (a bind mount) is not walked twice;
* a case folder (DICOM series, DeepLesion slices) holding a link whose target leaves the input is
  refused when the case is read (:func:`check_case_paths`), as the readers would follow it;
* every name is kept as the bytes the file system holds (Python's surrogate escapes); a case whose
  path, or a DICOM series whose file names, are not valid UTF-8 is refused when it is read (ITK
  cannot take such a name and aborts the process): the case is listed as failed with the name
  escaped (:func:`elixir_d2.cli.escape_name`) and the others go on.
"""

from __future__ import annotations

import logging
import os
from typing import List, Set, Tuple

from .case_ids import unique_case_ids
from .volume_io import (
    _MAX_DEPTH,
    _NIFTI_EXT,
    CaseSource,
    CTInputError,
    _classify_dir,
    _strip_nifti_ext,
    single_file_case,
)

logger = logging.getLogger(__name__)

__all__ = ["discover_cases", "check_case_paths", "is_utf8_name"]


def is_utf8_name(path: str) -> bool:
    """Whether ``path`` is valid UTF-8 on disk (what SimpleITK / ITK can be given)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: bytes os.fsdecode could not decode
        return False
    return True


def _inside(path: str, root: str) -> bool:
    real = os.path.realpath(path)
    return real == root or real.startswith(root + os.sep)


def discover_cases(path: str) -> Tuple[List[CaseSource], List[str]]:
    """Cases under ``path`` and the entries that were ignored (not CT, links not followed,
    unreadable folders), by the policy of the module docstring.

    Raises:
        CTInputError: ``path`` does not exist, is a file of an unsupported type, or holds no case.
    """
    path = os.path.normpath(path)
    if not os.path.isdir(path):  # a single file (or nothing): no walk, the user named it
        return single_file_case(path)
    root = os.path.realpath(path)
    cases: List[CaseSource] = []
    ignored: List[str] = []
    _walk(path, root, cases, ignored, depth=0, seen=set())
    if not cases:
        raise CTInputError(
            f"{path}: no CT input found (DeepLesion PNG slices, NIfTI volumes or DICOM series)"
        )
    for c, name in zip(cases, unique_case_ids([c.name for c in cases])):
        c.name = name  # output folder names: safe and unique by construction
    return cases, ignored


def _walk(
    folder: str,
    root: str,
    cases: List[CaseSource],
    ignored: List[str],
    depth: int,
    seen: Set[Tuple[int, int]],
) -> None:
    st = os.stat(folder)
    if (st.st_dev, st.st_ino) in seen:  # the same folder mounted twice
        ignored.append(folder)
        return
    seen.add((st.st_dev, st.st_ino))
    try:
        kind = _classify_dir(folder)
        entries = sorted(os.listdir(folder))
    except OSError as e:  # unreadable (permissions): listed, the rest of the walk goes on
        logger.warning(f"cannot list {folder!r}: {e.strerror or e}")
        ignored.append(folder)
        return
    if kind is not None:
        cases.append(CaseSource(os.path.basename(os.path.abspath(folder)), folder, kind))
        return
    for entry in entries:
        child = os.path.join(folder, entry)
        if os.path.islink(child):
            # Folders behind links are never walked (no loops, nothing outside the input);
            # files behind links only when they stay inside it.
            if os.path.isdir(child) or not os.path.isfile(child) or not _inside(child, root):
                ignored.append(child)
                continue
        if os.path.isdir(child):
            before = len(cases)
            if depth + 1 <= _MAX_DEPTH:
                _walk(child, root, cases, ignored, depth + 1, seen)
                if len(cases) == before and not _listable_nonempty(child):
                    ignored.append(child)
            else:
                ignored.append(child)
        elif entry.lower().endswith(_NIFTI_EXT):
            cases.append(CaseSource(_strip_nifti_ext(entry), child, "nifti"))
        else:
            ignored.append(child)


def _listable_nonempty(folder: str) -> bool:
    try:
        return bool(os.listdir(folder))
    except OSError:
        return True  # already listed as unreadable by _walk


def check_case_paths(case: CaseSource, root: str) -> None:
    """Refuse, before any reader sees it, a case ITK cannot be given or whose folder links out
    of the input folder ``root`` (a real path); messages name the entry, escaped by the caller.

    Raises:
        CTInputError: naming the case path or the entry at fault.
    """
    if not is_utf8_name(os.path.abspath(case.path)):
        raise CTInputError(
            f"{case.path}: file name is not valid UTF-8; rename it (the CT "
            "readers cannot open such a name)"
        )
    if case.kind == "nifti" or not os.path.isdir(case.path):
        return
    for entry in sorted(os.listdir(case.path)):
        child = os.path.join(case.path, entry)
        if case.kind == "dicom" and not is_utf8_name(entry):  # GDCM lists the folder itself
            raise CTInputError(
                f"{case.path}: file name {entry} in the series is not valid "
                "UTF-8; rename it (the DICOM reader cannot open such a name)"
            )
        if os.path.islink(child) and not _inside(child, root):
            raise CTInputError(
                f"{case.path}: {entry} is a link to a file outside the input "
                "folder; copy the file in, or give its folder as --input"
            )
