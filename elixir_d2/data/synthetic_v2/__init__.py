"""A second synthetic CT lesion generator in DeepLesion format, designed independently of
:mod:`elixir_d2.data.synthetic` (it shares only the format plumbing: DL_info columns, the PNG
encoding and the atomic folder writer).

``python -m elixir_d2.data.synthetic_v2 --out datasets/synthetic_v2 --seed 0`` writes
``DL_info.csv`` and ``Images_png/<patient>_01_01/<slice:03d>.png``. Modules: :mod:`.shapes`
(superellipses, Fourier outlines and 3-D tubes varying along z), :mod:`.anatomy` (body walls,
organs, bones, great vessels per region), :mod:`.mimics` (vessels, bowel loops, normal nodes,
cyst-like organs, calcifications: never annotated), :mod:`.lesions` (lobulated hypo- and
hyperdense lesions of 3-30 mm, the 8 DeepLesion types, RECIST-like measurement),
:mod:`.scanner` (pixel spacing 0.6-1.0 mm at 512 px, the default image size, scaled so the field
stays a body at other sizes; slice interval 1-5 mm; thickness partial volume, blur, textured
noise, streaks),
:mod:`.series` and :mod:`.writer`.
"""

from .writer import (
    DEFAULT_IMAGE_SIZE,
    DEFAULT_PATIENTS,
    GENERATOR,
    generate_deeplesion_v2,
    write_deeplesion_v2,
)

__all__ = [
    "DEFAULT_IMAGE_SIZE",
    "DEFAULT_PATIENTS",
    "GENERATOR",
    "generate_deeplesion_v2",
    "write_deeplesion_v2",
]
