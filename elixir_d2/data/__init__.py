"""CT datasets (DeepLesion, KiTS19, synthetic) and the CT dataset mapper.

Importing registers, lazily, under ``$DETECTRON2_DATASETS`` (default ``./datasets``):
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


def datasets_root() -> str:
    """Root of all datasets: ``$DETECTRON2_DATASETS`` as detectron2 uses it, default ./datasets."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


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
    "load_kits19_dicts",
    "register_kits19",
    "ensure_synthetic",
]
