"""Reading detectron2 model-zoo ``.pkl`` weights without running code from the file.

``pickle.load`` calls whatever callable a pickle names (``os.system`` included). The model-zoo
files hold only dicts of numpy arrays, numbers and strings, so :func:`load_weights_pickle` uses an
unpickler that resolves no global except the few numpy needs to rebuild arrays; anything else is
a :class:`UnsafePickleError` naming the file and the global it asked for.
"""

from __future__ import annotations

import pickle
from typing import Any, BinaryIO

__all__ = ["UnsafePickleError", "RestrictedUnpickler", "load_weights_pickle"]

# (module, name) pairs an array pickle may name. numpy >= 2 moved numpy.core to numpy._core;
# _codecs.encode rebuilds the bytes of arrays written by Python 2 (it only encodes text).
_ALLOWED = {
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),  # pickle protocol 5
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle that asks for something other than arrays, numbers, strings and containers."""


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler resolving only the globals numpy arrays need (see ``_ALLOWED``)."""

    def __init__(self, file: BinaryIO, source: str, **kwargs: Any):
        super().__init__(file, **kwargs)
        self._source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise UnsafePickleError(
                f"{self._source} asks to load {module}.{name}; weights pickles may hold only numpy "
                "arrays, numbers, strings and containers, so it was not loaded (nothing in it ran)"
            )
        return super().find_class(module, name)


def load_weights_pickle(f: BinaryIO, source: str) -> Any:
    """Unpickle ``f`` (named ``source`` in errors) as detectron2 reads model-zoo files (latin1
    for Python 2 pickles), admitting only numpy arrays, numbers, strings and containers."""
    return RestrictedUnpickler(f, source, encoding="latin1").load()
