"""ElixirNet components; importing a module registers it with detectron2."""
from . import trpn  # noqa: F401
from . import backbone  # noqa: F401
from . import box_head, roi_heads  # noqa: F401
