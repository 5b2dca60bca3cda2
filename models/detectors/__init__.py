"""The detectors of the paper's table beyond torchvision's Mask R-CNN and RetinaNet, one module each."""
from .reppoints_v2 import RepPointsV2
