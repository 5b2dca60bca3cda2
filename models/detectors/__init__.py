"""The paper's other detectors on the Focal FPN, each built from torchvision's pieces."""
from .cascade_rcnn import CascadeMaskRCNN  # noqa: F401
