"""ElixirNet components; importing a module registers it with detectron2."""

# Imported to register them.
from . import backbone, box_head, meta_arch, roi_heads, rpn_head, trpn  # noqa: F401
