"""CT datasets (DeepLesion, KiTS19, synthetic) and the CT dataset mapper.

Importing registers, lazily, under :func:`datasets_root` (``$DETECTRON2_DATASETS``, else the
repository's ``datasets/`` in a source checkout, else ``./datasets``):
deeplesion_{train,val,test}, deeplesion_{val,test}_typed from ``DeepLesion/``; the same names with
prefix ``synthetic`` from ``synthetic/`` (written by ``python -m elixir_d2.data.synthetic``, or
generated on first use when missing), prefix ``synthetic_seed7`` from ``synthetic_seed7/`` (the
same generator, seed 7) and prefix ``synthetic_v2`` from ``synthetic_v2/`` (the second, independent
generator ``python -m elixir_d2.data.synthetic_v2``, seed 0), both also generated on first use;
kits19_{train,test} from ``kits19/``.
"""

import os

from .ct_mapper import CTDatasetMapper
from .deeplesion import load_deeplesion_dicts, register_deeplesion
from .kits19 import load_kits19_dicts, register_kits19
from .synthetic_first_use import ensure_synthetic

# The repository's datasets/ holds this file; an installed package has no such folder beside it.
_CHECKOUT_MARKER = "prepare_deeplesion.py"


def default_datasets_root(package_parent: str) -> str:
    """The root used when ``$DETECTRON2_DATASETS`` is unset, given the folder that holds the
    ``elixir_d2`` package: in a source checkout its ``datasets/`` (absolute, so a run from any
    working directory reads and writes the same sets instead of scattering new ones), otherwise
    detectron2's ``./datasets``."""
    checkout = os.path.join(package_parent, "datasets")
    if os.path.isfile(os.path.join(checkout, _CHECKOUT_MARKER)):
        return os.path.abspath(checkout)
    return "datasets"


def datasets_root() -> str:
    """Root of all datasets: ``$DETECTRON2_DATASETS`` as detectron2 uses it, else
    :func:`default_datasets_root` of this package."""
    env = os.getenv("DETECTRON2_DATASETS")
    if env:
        return os.path.expanduser(env)
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return default_datasets_root(here)


def register_all(root: str) -> None:
    """Register every dataset this project knows under ``root`` (lazy: nothing is read yet)."""
    register_deeplesion(os.path.join(root, "DeepLesion"), prefix="deeplesion")
    # (folder and prefix, generator, seed): the tuned-on set, a fresh seed, a second generator
    for name, kind, seed in (
        ("synthetic", "deeplesion", 0),
        ("synthetic_seed7", "deeplesion", 7),
        ("synthetic_v2", "deeplesion_v2", 0),
    ):
        folder = os.path.join(root, name)
        register_deeplesion(
            folder,
            prefix=name,
            prepare=lambda f=folder, k=kind, s=seed: ensure_synthetic(f, k, seed=s),
        )
    register_kits19(os.path.join(root, "kits19"), prefix="kits19")


register_all(datasets_root())

__all__ = [
    "CTDatasetMapper",
    "load_deeplesion_dicts",
    "register_deeplesion",
    "register_all",
    "datasets_root",
    "default_datasets_root",
    "load_kits19_dicts",
    "register_kits19",
    "ensure_synthetic",
]
