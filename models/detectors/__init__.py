"""The paper's other detectors on the Focal FPN, one module each."""
from .atss import ATSS
from .sparse_rcnn import SparseRCNN
