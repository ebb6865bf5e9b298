"""ElixirNet (AAAI 2020) as a detectron2 extension.

Importing this package registers every component with detectron2's registries
(META_ARCHITECTURE ``BodyCropRCNN``, PROPOSAL_GENERATOR ``TRPN``, ROI_BOX_HEAD ``ALBHead`` /
``ALBSearchHead``, ROI_HEADS ``ElixirROIHeads``, the datasets in DatasetCatalog).
"""

from .config import add_elixirnet_config, load_config
from .env import print_env

# isort: split
from . import data, modeling  # noqa: F401  (imported last, to register the datasets and models)

__all__ = ["add_elixirnet_config", "load_config", "print_env"]
