"""What the user-facing scripts share: expected failures become one line and exit code 2.

Every entry point (``train_net.py``, ``search_net.py``, ``predict_net.py``,
``datasets/prepare_*.py``, the paper recipes) runs its ``main`` through :func:`run_cli`. A
:class:`UserInputError` (a missing or unreadable config, weights file, genotype, dataset root or
input; an unknown config key) is printed as ``<prog>: error: <message>`` on stderr and the process
exits with 2. Anything else is a bug or an environment failure and keeps its traceback.

    from elixir_d2.cli import run_cli

    if __name__ == "__main__":
        run_cli(main)                 # main() -> int | None; argv is read by main itself
"""

from __future__ import annotations

import difflib
import os
import sys
import unicodedata
from typing import Any, Callable, Iterable, List, NoReturn, Optional, Sequence, Tuple, Type

__all__ = [
    "EXIT_USER_ERROR",
    "UserInputError",
    "MissingFileError",
    "UnknownKeyError",
    "closest",
    "did_you_mean",
    "one_line",
    "escape_name",
    "require_file",
    "check_datasets",
    "check_froc_convention",
    "run_cli",
]

EXIT_USER_ERROR = 2  # argparse's code for a bad command line: the same kind of mistake


class UserInputError(Exception):
    """An expected failure caused by what the user gave: the message alone says what to do."""

    def __str__(self) -> str:  # KeyError subclasses would otherwise print the message quoted
        return str(self.args[0]) if self.args else ""


class MissingFileError(UserInputError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class UnknownKeyError(UserInputError, KeyError):
    """A config key (or dataset name) that does not exist."""


def closest(word: str, candidates: Iterable[str]) -> Optional[str]:
    """The candidate most like ``word`` (difflib), or None when nothing is close."""
    found = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return found[0] if found else None


def did_you_mean(word: str, candidates: Iterable[str]) -> str:
    """ "; did you mean X?" when a candidate is close, else ""."""
    best = closest(word, candidates)
    return f"; did you mean {best}?" if best else ""


_NAMED_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
# Bidirectional overrides and isolates: they reorder how the rest of a line is displayed.
_BIDI = set(range(0x202A, 0x202F)) | set(range(0x2066, 0x206A)) | {0x200E, 0x200F, 0x061C}


def escape_name(text: str) -> str:
    """``text`` (a file name, a path, or a message holding them) safe to print on one line:
    control characters and line / paragraph separators as ``\\n``, ``\\xNN``, ``\\uNNNN``, bidi
    controls as ``\\uNNNN``, and the bytes of a name that is not valid UTF-8 (which Python keeps as
    lone surrogates) as ``\\xNN``, so the result also encodes as UTF-8.

    Printable text, backslashes included, is left as it is: escaping an escaped text changes
    nothing, so every layer that prints a path can call this without double escapes."""
    out = []
    for ch in str(text):
        o = ord(ch)
        if ch in _NAMED_ESCAPES:
            out.append(_NAMED_ESCAPES[ch])
        elif 0xDC80 <= o <= 0xDCFF:  # os.fsdecode's surrogateescape of byte o - 0xDC00
            out.append(f"\\x{o - 0xDC00:02x}")
        elif 0xD800 <= o <= 0xDFFF or o in _BIDI or unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")
        else:
            out.append(ch)
    return "".join(out)


def require_file(path: str, what: str, hint: str) -> str:
    """``path`` if it is a local file (URLs pass unchecked); else :class:`MissingFileError`
    naming ``what`` (e.g. "weights file MODEL.WEIGHTS") and ``hint`` (what to do)."""
    if not path or "://" in path:
        return path
    shown = escape_name(path)
    if os.path.isdir(path):
        raise MissingFileError(f"{what} {shown} is a folder, not a file; {hint}")
    if not os.path.isfile(path):
        raise MissingFileError(f"{what} {shown} not found; {hint}")
    if not os.access(path, os.R_OK):
        raise MissingFileError(f"{what} {shown} is not readable (permissions); {hint}")
    return path


def check_datasets(names: Sequence[str], key: str) -> None:
    """Every dataset in ``names`` is registered and its folder exists, else one clear error.

    ``key`` names the config key listing them (DATASETS.TRAIN / DATASETS.TEST)."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    known = DatasetCatalog.list()
    for name in names:
        if name not in known:
            raise UnknownKeyError(
                f"{key}: dataset {name!r} is not "
                f"registered{did_you_mean(name, known)} (the names are listed in "
                "README.md, section Data)"
            )
        root = MetadataCatalog.get(name).get("dataset_root", None)
        if name.startswith("synthetic"):  # generated on first use when missing
            continue
        if root and not os.path.isdir(root):
            raise MissingFileError(
                f"{key}: dataset {name} reads {root}, which does not exist; prepare it as "
                "datasets/README.md says, or point $DETECTRON2_DATASETS at the folder holding it"
            )


def check_froc_convention(cfg: Any) -> None:
    """``cfg.TEST.FROC_CONVENTION`` is one the evaluator knows, else one clear error: checked when
    a run starts rather than when its first evaluation builds the FROC."""
    from .evaluation.froc import check_convention

    try:
        check_convention(cfg.TEST.FROC_CONVENTION, "TEST.FROC_CONVENTION")
    except ValueError as e:
        raise UserInputError(str(e)) from None


def _expected_errors() -> Tuple[Type[BaseException], ...]:
    # Errors raised by the package's validators whose messages already name the file and entry.
    from .modeling.alb.genotype import GenotypeError

    return (UserInputError, GenotypeError)


def run_cli(
    main: Callable[..., Any],
    *args: Any,
    prog: Optional[str] = None,
    expected: Sequence[Type[BaseException]] = (),
) -> NoReturn:
    """Call ``main(*args)`` and exit: with its int result (None = 0), or with code 2 after one
    line ``<prog>: error: <message>`` on stderr when it raises a :class:`UserInputError` (or
    one of ``expected``). Other exceptions propagate with their traceback."""
    prog = prog or os.path.basename(sys.argv[0] or "elixir_d2")
    try:
        rc = main(*args)
    except tuple(_expected_errors()) + tuple(expected) as e:
        print(f"{prog}: error: {escape_name(one_line(e))}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    sys.exit(rc if isinstance(rc, int) else 0)


def one_line(e: BaseException) -> str:
    """The exception's message on one line (continuation lines joined with '; ')."""
    lines: List[str] = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return "; ".join(lines) or type(e).__name__
