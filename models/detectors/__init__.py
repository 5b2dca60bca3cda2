"""The paper's other detectors on the Focal FPN, one module each, built from torchvision's pieces."""
from .atss import ATSS  # noqa: F401
from .cascade_rcnn import CascadeMaskRCNN  # noqa: F401
from .reppoints_v2 import RepPointsV2  # noqa: F401
from .sparse_rcnn import SparseRCNN  # noqa: F401
