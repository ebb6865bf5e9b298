"""ElixirNet components; importing a module registers it with detectron2."""
from . import backbone, box_head, roi_heads, rpn_head, trpn  # noqa: F401  (imported to register them)
