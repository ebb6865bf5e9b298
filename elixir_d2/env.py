"""Plain-words report of the installed detectron2 and which of its compiled ops exist."""

from __future__ import annotations

import importlib
import platform
from typing import Dict

# detectron2's compiled ops (functions of detectron2._C) and what ElixirNet uses instead.
_D2_OPS = {
    "deform_conv_forward": "DeformConv (ElixirNet uses torchvision.ops.deform_conv2d instead)",
    "modulated_deform_conv_forward": "ModulatedDeformConv (torchvision.ops.deform_conv2d instead)",
    "nms_rotated": "rotated NMS (not needed by ElixirNet)",
    "box_iou_rotated": "rotated box IoU (not needed by ElixirNet)",
    "roi_align_rotated_forward": "ROIAlignRotated (not needed by ElixirNet)",
    "COCOevalAccumulate": "fast COCO evaluation (ElixirNet uses pycocotools, use_fast_impl=False)",
}


def compiled_ops() -> Dict[str, bool]:
    """Map each of detectron2's compiled op names to whether it is available."""
    try:
        c_ext = importlib.import_module("detectron2._C")
    except ImportError:
        c_ext = None
    return {name: bool(c_ext is not None and hasattr(c_ext, name)) for name in _D2_OPS}


def print_env() -> None:
    """Print which detectron2 is installed and which of its compiled ops are missing."""
    import torch
    import torchvision

    print(f"Python       {platform.python_version()}")
    print(f"torch        {torch.__version__} (CUDA available: {torch.cuda.is_available()})")
    print(f"torchvision  {torchvision.__version__}")
    try:
        import detectron2
    except ImportError:
        print("detectron2   NOT INSTALLED: run `make install`")
        return
    print(f"detectron2   {detectron2.__version__} at {detectron2.__file__}")
    ops = compiled_ops()
    missing = [name for name, ok in ops.items() if not ok]
    if not missing:
        print("             all of detectron2's compiled ops are present")
    else:
        print(
            f"             {len(missing)} of detectron2's compiled ops are missing (a "
            "Python-only build):"
        )
        for name in missing:
            print(f"               - {name}: {_D2_OPS[name]}")
        print("             ElixirNet does not need them; everything it uses runs without them.")
    import elixir_d2

    print(f"elixir_d2    at {elixir_d2.__file__}")
