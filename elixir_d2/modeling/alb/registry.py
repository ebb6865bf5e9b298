"""Adding to the Auto-lesion Block's search: new candidate ops and new search spaces
(docs/extending.md, "A new op in the search space").

An op is a builder ``(c_in, c_out, stride, norm, affine) -> nn.Module`` registered under a name
(:func:`register_alb_op`); it joins ``ops.py``'s table, which :func:`~.ops.build_op` reads for the
searchable head (every op of the space on every edge) and for the fixed head (the ops a genotype
names). A space is an ordered list of op names (:func:`register_search_space`); it joins
``spaces.py``'s ``SEARCH_SPACES``, read by MODEL.ALB.SEARCH_SPACE, genotype files (``space:``),
derivation and random sampling.

Both tables are process-wide, like detectron2's registries and DatasetCatalog: register in a
module that every process imports before it builds a model (docs/extending.md, "Where the code
goes"). The built-in ops and spaces cannot be replaced or removed, so existing genotypes and
checkpoints keep their meaning.
"""

import inspect
from typing import Callable, List, Optional, Sequence

import torch

from .ops import _BUILDERS, OpBuilder, build_op
from .spaces import SEARCH_SPACES, search_space_names

__all__ = [
    "register_alb_op",
    "unregister_alb_op",
    "alb_op_names",
    "check_alb_op",
    "register_search_space",
    "unregister_search_space",
]

_BUILT_IN_OPS = frozenset(_BUILDERS)
_BUILT_IN_SPACES = frozenset(SEARCH_SPACES)


def _check_name(name: object, what: str) -> str:
    # Names travel unquoted through genotype YAML and command-line config overrides.
    if not isinstance(name, str) or not name.isidentifier() or not name.isascii():
        raise ValueError(
            f"{what} must be a non-empty ASCII identifier (letters, digits, '_'), got {name!r}"
        )
    return name


def alb_op_names() -> List[str]:
    """Every registered op name, sorted: the built-in ones and those added since."""
    return sorted(_BUILDERS)


def register_alb_op(name: str, builder: Optional[OpBuilder] = None) -> Callable:
    """Register ``builder(c_in, c_out, stride, norm, affine)`` as the ALB op ``name``.

    Used as a decorator, ``@register_alb_op("conv_3x3")`` over a function or an ``ALBOp``
    subclass, or called, ``register_alb_op("conv_3x3", fn)``; returns the builder. The op's
    ``forward(x, num_per_image=None)`` maps (N, C_in, H, W) to (N, C_out, ceil(H / s), ceil(W / s))
    for stride s in {1, 2} (:func:`check_alb_op` tries it); ``norm`` is "BN", "GN" or ""
    (``ops.make_norm``) and ``affine`` is False while searching, as in DARTS. A name already
    registered, a builder that is not callable or cannot take those five arguments is refused.
    """
    _check_name(name, "ALB op name")
    if name in _BUILDERS:
        raise ValueError(f"ALB op {name!r} is already registered; registered: {alb_op_names()}")

    def register(fn: OpBuilder) -> OpBuilder:
        if not callable(fn):
            raise TypeError(f"ALB op {name!r}: the builder must be callable, got {fn!r}")
        try:
            inspect.signature(fn).bind(8, 8, 1, "BN", True)
        except TypeError as e:
            raise TypeError(
                f"ALB op {name!r}: the builder must take (c_in, c_out, stride, norm, affine): {e}"
            ) from None
        except ValueError:  # a callable without a signature to inspect: build_op will tell
            pass
        if name in _BUILDERS:  # taken between the decorator's creation and its use
            raise ValueError(f"ALB op {name!r} is already registered")
        _BUILDERS[name] = fn
        return fn

    return register if builder is None else register(builder)


def unregister_alb_op(name: str) -> None:
    """Remove an op added by :func:`register_alb_op`. Built-in ops stay, and so does an op of a
    registered space (unregister the space first)."""
    if name in _BUILT_IN_OPS:
        raise ValueError(f"ALB op {name!r} is built in and cannot be removed")
    if name not in _BUILDERS:
        raise ValueError(f"ALB op {name!r} is not registered")
    users = sorted(space for space, ops in SEARCH_SPACES.items() if name in ops)
    if users:
        raise ValueError(
            f"ALB op {name!r} is used by the search space(s) {users}: "
            "unregister_search_space them first"
        )
    del _BUILDERS[name]


def check_alb_op(
    name: str, channels: Sequence[int] = (8, 12), sizes: Sequence[Sequence[int]] = ((7, 7), (4, 5))
) -> None:
    """Try op ``name`` as the ALB heads use it and raise a ValueError at the first failure.

    Builds it from ``channels[0]`` to each of ``channels`` channels at strides 1 and 2, norm "BN",
    "GN" and "", affine or not, runs it on 3 RoIs (2 of one image, 1 of another) of each (H, W)
    of ``sizes``, and checks the output is finite with shape (3, C_out, ceil(H / s), ceil(W / s)).
    """
    c_in = channels[0]
    for c_out in channels:
        for stride in (1, 2):
            for norm in ("BN", "GN", ""):
                for affine in (True, False):
                    op = build_op(name, c_in, c_out, stride, norm, affine)
                    _check_forward_signature(name, op)
                    for h, w in sizes:
                        y = op(torch.randn(3, c_in, h, w), [2, 1])
                        want = (3, c_out, -(-h // stride), -(-w // stride))
                        case = (
                            f"ALB op {name!r} ({c_in} -> {c_out} channels, stride {stride}, "
                            f"norm {norm!r}, affine {affine}) on 3 RoIs of {h}x{w}"
                        )
                        if tuple(y.shape) != want:
                            raise ValueError(
                                f"{case}: output shape {tuple(y.shape)}, expected {want}"
                            )
                        if not torch.isfinite(y).all():
                            raise ValueError(f"{case}: output not finite")


def _check_forward_signature(name: str, op: torch.nn.Module) -> None:
    try:
        inspect.signature(op.forward).bind(None, None)
    except TypeError:
        raise ValueError(
            f"ALB op {name!r}: {type(op).__name__}.forward must take (x, "
            "num_per_image=None), as ALBOp's does"
        ) from None
    except ValueError:  # nothing to inspect: the call below tells
        pass


def register_search_space(name: str, ops: Sequence[str]) -> List[str]:
    """Register the search space ``name`` with the op names ``ops``, in alpha column order.

    ``ops`` starts with ``"none"`` (the zero op the search weighs against the others; derivation
    and random sampling never pick it, as in the built-in spaces), followed by at least one more
    registered op, each listed once. The order is part of the space: a search checkpoint's alphas
    are indexed by it. Returns the op list stored.
    """
    _check_name(name, "search space name")
    if name in SEARCH_SPACES:
        raise ValueError(
            f"ALB search space {name!r} is already registered; registered: {search_space_names()}"
        )
    if isinstance(ops, str) or not isinstance(ops, Sequence):
        raise ValueError(f"search space {name!r}: ops must be a list of op names, got {ops!r}")
    ops = list(ops)
    if len(ops) < 2 or ops[0] != "none":
        raise ValueError(
            f"search space {name!r}: ops must be 'none' followed by at least one more op, got {ops}"
        )
    repeated = sorted({str(o) for o in ops if ops.count(o) > 1})
    if repeated:
        raise ValueError(f"search space {name!r}: ops listed more than once: {repeated}")
    unknown = [o for o in ops if not isinstance(o, str) or o not in _BUILDERS]
    if unknown:
        raise ValueError(
            f"search space {name!r}: unknown ALB ops {unknown}; register them first "
            f"with register_alb_op (registered: {alb_op_names()})"
        )
    SEARCH_SPACES[name] = ops
    return list(ops)


def unregister_search_space(name: str) -> None:
    """Remove a space added by :func:`register_search_space`; the built-in ones stay."""
    if name in _BUILT_IN_SPACES:
        raise ValueError(f"ALB search space {name!r} is built in and cannot be removed")
    if name not in SEARCH_SPACES:
        raise ValueError(
            f"ALB search space {name!r} is not registered; registered: {search_space_names()}"
        )
    del SEARCH_SPACES[name]
