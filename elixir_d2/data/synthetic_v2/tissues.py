"""Tissue labels and the scene element of the second synthetic generator.

A scene is an ordered list of :class:`Structure` (later ones paint over earlier ones); a
structure with a ``mimic`` kind is a normal structure that looks lesion-like on one slice and is
never annotated (vessel, bowel, node, cyst-like, calcification).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

(
    AIR,
    SUBCUT_FAT,
    MUSCLE,
    VISCERAL_FAT,
    MEDIASTINAL_FAT,
    LUNG,
    LIVER,
    SPLEEN,
    KIDNEY,
    BONE,
    CORTEX,
    VESSEL,
    BOWEL,
    HEART,
    FLUID,
    CALCIFIC,
    NODE,
    PANCREAS,
    LESION,
    PELVIC_FAT,
) = range(20)

HU_AIR = -1000.0
MIMIC_KINDS = ("vessel", "bowel", "node", "cyst", "calcification")


@dataclass
class Structure:
    """One solid of the scene: tissue ``label``, attenuation ``hu``, and organ texture amplitude
    ``texture`` (HU) added by the scanner model."""

    name: str
    label: int
    hu: float
    shape: object
    mimic: Optional[str] = None
    texture: float = 4.0
