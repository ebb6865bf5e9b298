"""Reading what a module computed, through forward hooks scoped to a ``with`` block.

The one mechanism by which intermediate results leave the model: the box head takes the relation
graphs E of its region_nonlocal this way within its own forward, and
:func:`elixir_d2.modeling.capture.capture` builds the named captures (TRPN confidence, relations)
on it. Modules keep no results between calls for anyone to read later. Kept apart from
``capture.py``, which imports the model modules, so that those modules can import this one.
"""

import contextlib
from typing import Any, Callable, Iterator, List

from torch import nn

__all__ = ["capture_outputs"]


def _output(module: nn.Module, inputs: tuple, output: Any) -> Any:
    return output


@contextlib.contextmanager
def capture_outputs(
    module: nn.Module, keep: Callable[[nn.Module, tuple, Any], Any] = _output
) -> Iterator[List[Any]]:
    """Within the block, every forward of ``module`` appends ``keep(module, inputs, output)``
    (by default the output itself, still in the autograd graph) to the yielded list. The hook
    is removed on exit, exceptions included."""
    store: List[Any] = []
    handle = module.register_forward_hook(lambda m, i, o: store.append(keep(m, i, o)))
    try:
        yield store
    finally:
        handle.remove()
