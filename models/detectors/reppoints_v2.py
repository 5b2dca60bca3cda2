"""RepPointsV2 (Chen et al., "RepPoints V2: Verification Meets Regression for Object Detection",
NeurIPS 2020) on any torchvision-style backbone, with the head, assigners and losses of Swin's 3x
recipe that the Focal Transformer paper trains.

    from functools import partial
    from models.detection import focal_fpn_backbone
    from models.detectors.bifpn import BiFPN
    backbone = focal_fpn_backbone(returned_stages=(1, 2, 3), neck=partial(BiFPN, out_channels=256))
    detector = RepPointsV2(backbone, num_classes=91, min_size=800, max_size=1333)
    losses = detector(images, targets)      # training: a dict of the six losses
    detections = detector(images)           # eval: [{'boxes', 'labels', 'scores'}], torchvision's format

Every location of the pyramid levels P3-P7 predicts nine points through two stages: the initial
points, from plain convolutions, and a refinement, from deformable convolutions that sample the
features at the initial points (their gradient multiplied by 0.1). A box is read from the first two
points of a set ('exact_minmax': top-left and bottom-right). Two verification branches help: a
per-class foreground map (a 1x1 convolution whose embedding is added to the classification,
points and corner features) and corner heatmaps with sub-pixel offsets (corner pooling: a running
maximum towards the box's inside); the heatmaps and offsets are concatenated to the features of
the classification and the refinement. At test time each box corner snaps to the strongest
heatmap peak of the 2x2 cells around it.

Training assigns the initial points by the nearest location to each box centre on the level that
the box's size picks (`point_assign`), the refined ones ATSS-style on the initial boxes
(models.detectors.atss's `atss_assign`, short levels repeated), and the corners as Gaussian bumps (`corner_heatmap_targets`); the losses are the
quality focal loss (`quality_focal_loss`), GIoU on boxes scaled by the level
(`point_box_loss`), the Gaussian focal loss on the heatmaps (`gaussian_focal_loss`), smooth L1 on
the offsets and a focal loss on the foreground map (`foreground_focal_loss`).

Sources: [swin] SwinTransformer/Swin-Transformer-Object-Detection @ c7b20110,
configs/_base_/models/reppointsv2_swin_bifpn.py and mmdet/models/dense_heads/reppoints_v2_head.py
with the assigners and losses it names; [paper] the RepPoints V2 paper.
"""
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import DeformConv2d, batched_nms, box_iou, generalized_box_iou_loss, sigmoid_focal_loss

from .atss import atss_assign
from .bifpn import group_norm

__all__ = ['RepPointsV2', 'RepPointsV2Head', 'corner_pool', 'points_to_boxes', 'point_assign',
           'gaussian_radius', 'corner_heatmap_targets', 'foreground_targets',
           'quality_focal_loss', 'point_box_loss', 'gaussian_focal_loss', 'foreground_focal_loss',
           'snap_to_corners']

POINT_STRIDES = (8, 16, 32, 64, 128)  # [swin] point_strides, P3-P7
POINT_BASE_SCALE = 4  # [swin] point_base_scale; also PointAssignerV2's scale
NUM_POINTS = 9  # [swin] num_points: a 3x3 deformable kernel
GRADIENT_MUL = 0.1  # [swin] gradient_mul on the points that place the deformable kernels
INIT_POSITIVES = 1  # [swin] PointAssignerV2 pos_num
ATSS_TOPK = 9  # [swin] ATSSAssignerV2 topk
GAUSSIAN_IOU = 0.7  # [swin] PointHMAssigner gaussian_iou
PRIOR_PROBABILITY = 0.01  # [swin] init_weights: bias_init_with_prob(0.01) of the score maps
STEM_INIT_STD = 0.01  # [swin] init_weights: normal_init(std=0.01) of the towers and outputs
QFL_BETA = 2.0  # [swin] RPDQualityFocalLoss beta
HEATMAP_ALPHA, HEATMAP_GAMMA = 2.0, 4.0  # [swin] GaussianFocalLoss alpha, gamma
OFFSET_BETA = 1 / 9  # [swin] SmoothL1Loss beta of the corner offsets
FOREGROUND_ALPHA, FOREGROUND_GAMMA = 0.25, 2.0  # [swin] SEPFocalLoss alpha, gamma
FOREGROUND_STRIDE = 8  # [swin] LoadRPDV2Annotations: the foreground map at 1/8 of the padded image
LOSS_WEIGHTS = {  # [swin] loss_weight of each loss
    'loss_cls': 1.0, 'loss_pts_init': 1.0, 'loss_pts_refine': 2.0,
    'loss_heatmap': 0.25, 'loss_offset': 1.0, 'loss_sem': 0.1,
}
# [swin] _get_bboxes_single: the heatmap level whose peaks the boxes of each level snap to (P3's
# boxes keep their points; P4-P5 snap to P3's heatmap, P6-P7 to P4's)
SNAP_LEVELS = (None, 0, 0, 1, 1)
CORNERS = ('top_left', 'bottom_right')
# The deformable classification convolution's initial weights: [swin]'s normal (std 0.01), or He's normal
# (fan out), with which a narrow head's class scores start to differ within a short run
CLASSIFIER_INITS = ('normal', 'kaiming')


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------
def corner_pool(vertical: torch.Tensor, horizontal: torch.Tensor, corner: str) -> torch.Tensor:
    """CornerNet's corner pooling of maps (N, C, H, W): for 'top_left', each pixel takes the
    maximum of `vertical` over itself and the pixels below it plus the maximum of `horizontal`
    over itself and the pixels to its right (a top-left corner sees its object below and to the
    right); for 'bottom_right', above and to the left. A running maximum (`cummax`) along the
    height or width, flipped first where it runs towards the start."""
    if corner not in CORNERS:
        raise ValueError(f'corner must be one of {CORNERS}, got {corner!r}')
    towards_end = corner == 'top_left'  # the maximum gathers from the far end of each axis

    def running_max(x, dim):
        if towards_end:
            return x.flip(dim).cummax(dim).values.flip(dim)
        return x.cummax(dim).values

    return running_max(vertical, 2) + running_max(horizontal, 3)


def points_to_boxes(points: torch.Tensor) -> torch.Tensor:
    """Boxes (..., 4) as (x1, y1, x2, y2) of point sets (..., 2 * num_points) laid out (y, x) per
    point, as the deformable convolution reads its offsets: 'exact_minmax', the first point is the
    top-left corner and the second the bottom-right."""
    y1, x1, y2, x2 = points[..., 0], points[..., 1], points[..., 2], points[..., 3]
    return torch.stack([x1, y1, x2, y2], dim=-1)


def level_points(sizes: list, strides, device) -> tuple:
    """(xy (N, 2), stride (N,), level (N,)) of every location of the levels of `sizes` [(H, W)]
    with `strides`, level by level, row-major: location (i, j) of a level of stride s sits at
    (j * s, i * s), the top-left of its cell, as mmdetection's PointGenerator places them."""
    xy, stride, level = [], [], []
    for index, ((height, width), step) in enumerate(zip(sizes, strides)):
        rows, cols = torch.meshgrid(torch.arange(height, device=device), torch.arange(width, device=device),
                                    indexing='ij')
        xy.append(torch.stack([cols.reshape(-1), rows.reshape(-1)], dim=1).float() * step)
        stride.append(torch.full((height * width,), float(step), device=device))
        level.append(torch.full((height * width,), index, device=device, dtype=torch.long))
    return torch.cat(xy), torch.cat(stride), torch.cat(level)


def valid_points(sizes: list, strides, image_size, size_divisible: int = 32) -> torch.Tensor:
    """(N,) bool: the locations inside the image's own padded extent (its size rounded up to
    `size_divisible`), not in the padding that batching added to a larger image."""
    height, width = (math.ceil(side / size_divisible) * size_divisible for side in image_size)
    flags = []
    for (rows, cols), step in zip(sizes, strides):
        flags.append(((torch.arange(rows) < math.ceil(height / step))[:, None]
                      & (torch.arange(cols) < math.ceil(width / step))[None, :]).reshape(-1))
    return torch.cat(flags)


# ---------------------------------------------------------------------------------------------
# Assigners: each returns the index of the ground-truth box of every point, or -1
# ---------------------------------------------------------------------------------------------
def point_assign(points: torch.Tensor, strides: torch.Tensor, gt_boxes: torch.Tensor,
                 scale: float = POINT_BASE_SCALE, pos_num: int = INIT_POSITIVES) -> torch.Tensor:
    """The initial stage's assignment ([swin] PointAssignerV2): a box of width w and height h
    belongs on level int((log2(w / scale) + log2(h / scale)) / 2) (truncated, then clipped to the
    levels there are); on it, the `pos_num` locations nearest its centre (in units of the box's
    width and height) are its positives; a location that several boxes pick goes to the nearest."""
    assigned = torch.full((len(points),), -1, dtype=torch.long, device=points.device)
    if len(gt_boxes) == 0 or len(points) == 0:
        return assigned
    point_levels = torch.log2(strides).int()
    sizes = (gt_boxes[:, 2:] - gt_boxes[:, :2]).clamp(min=1e-6)
    gt_levels = ((torch.log2(sizes[:, 0] / scale) + torch.log2(sizes[:, 1] / scale)) / 2).int()
    gt_levels = gt_levels.clamp(int(point_levels.min()), int(point_levels.max()))
    centres = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    distances = ((points[:, None, :] - centres[None]) / sizes[None]).norm(dim=2)
    distances[point_levels[:, None] != gt_levels[None, :]] = math.inf
    nearest_distances, nearest = distances.topk(min(pos_num, len(points)), dim=0, largest=False)
    chosen = torch.full_like(distances, math.inf).scatter_(0, nearest, nearest_distances)
    best, best_gt = chosen.min(dim=1)
    return torch.where(torch.isfinite(best), best_gt, assigned)


def gaussian_radius(heights: torch.Tensor, widths: torch.Tensor, min_overlap: float = GAUSSIAN_IOU) -> torch.Tensor:
    """CornerNet's radius (Law and Deng, 2018) around each box corner within which a corner pair
    still makes a box of IoU >= `min_overlap` with the box: the smallest root of its three cases
    (both corners inside, both outside, one of each)."""
    b1 = heights + widths
    c1 = widths * heights * (1 - min_overlap) / (1 + min_overlap)
    r1 = (b1 - torch.sqrt(b1 ** 2 - 4 * c1)) / 2
    b2 = 2 * (heights + widths)
    c2 = (1 - min_overlap) * widths * heights
    r2 = (b2 - torch.sqrt(b2 ** 2 - 16 * c2)) / 8
    a3 = 4 * min_overlap
    b3 = -2 * min_overlap * (heights + widths)
    c3 = (min_overlap - 1) * widths * heights
    r3 = (b3 + torch.sqrt(b3 ** 2 - 4 * a3 * c3)) / (2 * a3)
    return torch.minimum(torch.minimum(r1, r2), r3)


def corner_heatmap_targets(points: torch.Tensor, strides: torch.Tensor, levels: torch.Tensor,
                           gt_boxes: torch.Tensor, min_overlap: float = GAUSSIAN_IOU) -> tuple:
    """Targets of the corner heatmaps ([swin] PointHMAssigner, gaussian_bump): on every level,
    each ground-truth corner's nearest location is a peak (heat 1, offset = corner minus location
    in units of the stride), and the locations within `gaussian_radius` of it get the Gaussian
    exp(-d^2 / (2 sigma^2)), sigma = (2 radius + 1) / 6, the highest where corners overlap.

    Returns (heat (N, 2), offsets (N, 4), peaks (N, 2) bool), top-left first, then bottom-right.
    """
    heat = points.new_zeros(len(points), 2)
    offsets = points.new_zeros(len(points), 4)
    if len(gt_boxes) == 0:
        return heat, offsets, heat > 0
    sizes = gt_boxes[:, 2:] - gt_boxes[:, :2]
    radius = gaussian_radius(sizes[:, 1], sizes[:, 0], min_overlap)
    sigma = (2 * radius + 1) / 6
    for level in levels.unique().tolist():
        index = (levels == level).nonzero().squeeze(1)
        stride = strides[index[0]]
        for corner in range(2):
            corners = gt_boxes[:, 2 * corner:2 * corner + 2]
            distances = torch.cdist(points[index], corners)  # (n, G)
            bumps = torch.exp(-distances ** 2 / (2 * sigma ** 2))
            bumps = torch.where(distances < radius, bumps, torch.zeros_like(bumps))
            heat[index, corner] = bumps.max(dim=1).values
            nearest = index[distances.argmin(dim=0)]
            heat[nearest, corner] = 1.0
            offsets[nearest, 2 * corner:2 * corner + 2] = (corners - points[nearest]) / stride
    return heat, offsets, heat == 1


def foreground_targets(gt_boxes: torch.Tensor, labels: torch.Tensor, num_classes: int, size,
                       stride: int = FOREGROUND_STRIDE) -> tuple:
    """The foreground map ([swin] LoadRPDV2Annotations) on a grid of `size` (H, W) cells of
    `stride` pixels: channel `label` is 1 on the cells from int(y1 / stride) to int(y2 / stride)
    and from int(x1 / stride) to int(x2 / stride) of each box, and its weight there is 1 / the box's
    area, the smallest box's where boxes overlap. Returns (map, weights), both (C, H, W)."""
    target = gt_boxes.new_zeros(num_classes, *size)
    weights = gt_boxes.new_zeros(num_classes, *size)
    areas = (gt_boxes[:, 2] - gt_boxes[:, 0]) * (gt_boxes[:, 3] - gt_boxes[:, 1])
    cells = (gt_boxes / stride).int().tolist()
    for index in areas.argsort(descending=True).tolist():
        x1, y1, x2, y2 = cells[index]
        target[labels[index], y1:y2 + 1, x1:x2 + 1] = 1
        weights[labels[index], y1:y2 + 1, x1:x2 + 1] = 1 / areas[index]
    return target, weights


# ---------------------------------------------------------------------------------------------
# Losses: each returns a sum, which the head divides by its count of positives
# ---------------------------------------------------------------------------------------------
def quality_focal_loss(logits: torch.Tensor, labels: torch.Tensor, quality: torch.Tensor,
                       beta: float = QFL_BETA) -> torch.Tensor:
    """Generalized Focal Loss's quality focal loss (Li et al., 2020), summed: logits (N, C) against
    a target that is the IoU `quality` (N,) at each positive's class `labels` (N,) (-1: none) and
    0 elsewhere; binary cross-entropy scaled by |target - sigmoid(logit)| ** beta (the scale keeps
    its gradient, as the authors')."""
    target = torch.zeros_like(logits)
    positive = labels >= 0
    target[positive.nonzero().squeeze(1), labels[positive]] = quality[positive].to(logits.dtype)
    scale = (target - logits.sigmoid()).abs().pow(beta)
    return (F.binary_cross_entropy_with_logits(logits, target, reduction='none') * scale).sum()


def point_box_loss(boxes: torch.Tensor, gt_boxes: torch.Tensor, normaliser: torch.Tensor) -> torch.Tensor:
    """Summed GIoU loss of boxes (N, 4) divided by `normaliser` (N,) (base scale x stride) and
    measured, as the authors' GIoU (RPDGIoULoss: ATSS's formula), with one unit added to each width
    and height: the first two points start unordered, and the added unit keeps an inverted box's
    area positive so that its gradient pushes the corners apart."""
    far_corner = boxes.new_tensor([0.0, 0.0, 1.0, 1.0])
    normaliser = normaliser[:, None]
    return generalized_box_iou_loss(boxes / normaliser + far_corner, gt_boxes / normaliser + far_corner,
                                    reduction='sum')


def gaussian_focal_loss(probabilities: torch.Tensor, targets: torch.Tensor, alpha: float = HEATMAP_ALPHA,
                        gamma: float = HEATMAP_GAMMA) -> torch.Tensor:
    """CornerNet's focal loss for Gaussian heatmaps, summed: -log(p) (1 - p)^alpha at the peaks
    (target 1), -log(1 - p) p^alpha (1 - target)^gamma elsewhere."""
    eps = 1e-12
    peaks = targets.eq(1).to(probabilities.dtype)
    positive = -(probabilities + eps).log() * (1 - probabilities).pow(alpha) * peaks
    negative = -(1 - probabilities + eps).log() * probabilities.pow(alpha) * (1 - targets).pow(gamma)
    return (positive + negative).sum()


def foreground_focal_loss(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                          alpha: float = FOREGROUND_ALPHA, gamma: float = FOREGROUND_GAMMA) -> torch.Tensor:
    """The foreground map's focal loss ([swin] SEPFocalLoss): sigmoid focal loss over the
    foreground cells weighted by `weights` and divided by their sum, plus the loss over the other
    cells divided by the number of foreground cells (at least 1)."""
    losses = sigmoid_focal_loss(logits, targets, alpha=alpha, gamma=gamma)
    foreground = targets == 1
    positive = (losses[foreground] * weights[foreground]).sum() / weights[foreground].sum().clamp(min=1e-12)
    return positive + losses[~foreground].sum() / foreground.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------
# Test time
# ---------------------------------------------------------------------------------------------
def snap_to_corners(boxes: torch.Tensor, heatmaps: torch.Tensor, offsets: torch.Tensor, stride: int,
                    image_size) -> torch.Tensor:
    """Boxes (K, 4) with each corner moved to the strongest heatmap location of the 2x2 cells
    around it, plus that location's offset ([swin] _get_bboxes_single, select): `heatmaps` (2, H, W)
    are the top-left and bottom-right logits of one level of `stride`, `offsets` (4, H, W) their
    sub-pixel offsets; the corners stay inside `image_size` (H, W). A map narrower than 2 cells
    leaves the boxes as they are."""
    height, width = heatmaps.shape[-2:]
    if height < 2 or width < 2:
        return boxes
    _, peaks = F.max_pool2d_with_indices(heatmaps[:, None], kernel_size=2, stride=1)  # (2, 1, H-1, W-1)
    limits = boxes.new_tensor([image_size[1], image_size[0]])
    snapped = []
    for corner in range(2):
        xy = boxes[:, 2 * corner:2 * corner + 2] / stride
        col = xy[:, 0].clamp(0, width - 2).floor().long()
        row = xy[:, 1].clamp(0, height - 2).floor().long()
        peak = peaks[corner, 0, row, col]
        peak_row, peak_col = peak // width, peak % width
        shift = offsets[2 * corner:2 * corner + 2, peak_row, peak_col].t()
        location = torch.stack([peak_col, peak_row], dim=1).to(boxes.dtype)
        snapped.append(torch.minimum(((location + shift) * stride).clamp(min=0), limits))
    return torch.cat(snapped, dim=1)


# ---------------------------------------------------------------------------------------------
# Modules
# ---------------------------------------------------------------------------------------------
def conv_norm_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """Convolution without bias, GroupNorm, ReLU: mmcv's ConvModule with the recipe's norm_cfg."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
                         group_norm(out_channels), nn.ReLU(inplace=True))


def deformable(conv: DeformConv2d, features: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """`conv` in float32 under any autocast: torchvision's autocast runs deform_conv2d in float32 on
    CUDA, and its CPU kernel has no bfloat16."""
    with torch.autocast(features.device.type, enabled=False):
        return conv(features.float(), offsets.float())


class CornerPoolBranch(nn.Module):
    """The corner features of one corner ([swin] TLPool / BRPool, CornerNet's corner pooling
    module): two 3x3 projections to `corner_channels`, pooled along the height and the width
    (`corner_pool`) and summed, a 3x3 convolution back with GroupNorm, added to a 1x1 shortcut with
    GroupNorm, ReLU, and a 1x1 convolution with GroupNorm and ReLU."""

    def __init__(self, channels: int, corner_channels: int, corner: str):
        super().__init__()
        self.corner = corner
        self.vertical = conv_norm_relu(channels, corner_channels, 3)  # [swin] first_kernel_size 3
        self.horizontal = conv_norm_relu(channels, corner_channels, 3)
        self.merge = nn.Sequential(nn.Conv2d(corner_channels, channels, 3, padding=1, bias=False),
                                   group_norm(channels))
        self.shortcut = nn.Sequential(nn.Conv2d(channels, channels, 1, bias=False), group_norm(channels))
        self.out = conv_norm_relu(channels, channels, 1)  # [swin] kernel_size 1
        for branch in (self.vertical, self.horizontal, self.out):  # mmcv ConvModule's kaiming init
            nn.init.kaiming_normal_(branch[0].weight, mode='fan_out', nonlinearity='relu')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = corner_pool(self.vertical(x), self.horizontal(x), self.corner)
        return self.out(F.relu(self.merge(pooled) + self.shortcut(x)))


class RepPointsV2Head(nn.Module):
    """The head, shared by all levels: classification and points towers of `stacked_convs` 3x3
    convolutions (GroupNorm, ReLU), one more on the points tower for the verification branches, the
    foreground map and its embedding, the corner branches with their heatmaps and offsets, the
    initial points, and the deformable classification and refinement convolutions.

    `num_classes` counts the classes as the labels number them (torchvision's: category ids, 0 the
    background); each has a sigmoid score. `channels`: the pyramid's width ([swin] 256),
    `corner_channels`: the corner projections' ([swin] corner_dim 64). `classifier_init`: one of
    CLASSIFIER_INITS, the deformable classification convolution's initial weights.
    """

    def __init__(self, num_classes: int, channels: int = 256, stacked_convs: int = 3, corner_channels: int = 64,
                 classifier_init: str = 'normal'):
        super().__init__()
        if classifier_init not in CLASSIFIER_INITS:
            raise ValueError(f'classifier_init must be one of {CLASSIFIER_INITS}, got {classifier_init!r}')
        self.num_classes = num_classes
        kernel = int(math.isqrt(NUM_POINTS))
        self.cls_convs = nn.Sequential(*(conv_norm_relu(channels, channels, 3) for _ in range(stacked_convs)))
        self.reg_convs = nn.Sequential(*(conv_norm_relu(channels, channels, 3) for _ in range(stacked_convs)))
        self.shared_convs = conv_norm_relu(channels, channels, 3)  # [swin] shared_stacked_convs 1
        self.sem_out = nn.Conv2d(channels, num_classes, 1)
        self.sem_embedding = conv_norm_relu(channels, channels, 1)
        self.corner_branches = nn.ModuleList(CornerPoolBranch(channels, corner_channels, corner) for corner in CORNERS)
        self.corner_scores = nn.ModuleList(nn.Conv2d(channels, 1, 3, padding=1) for _ in CORNERS)
        self.corner_offsets = nn.ModuleList(nn.Conv2d(channels, 2, 3, padding=1) for _ in CORNERS)
        self.points_init_conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.points_init_out = nn.Conv2d(channels, 2 * NUM_POINTS, 1)
        verified = channels + 3 * len(CORNERS)  # the features and each corner's heatmap and offsets
        # mmcv's DeformConv2d has no bias
        self.cls_conv = DeformConv2d(verified, channels, kernel, padding=kernel // 2, bias=False)
        self.cls_out = nn.Conv2d(channels, num_classes, 1)
        self.points_refine_conv = DeformConv2d(verified, channels, kernel, padding=kernel // 2, bias=False)
        self.points_refine_out = nn.Conv2d(channels, 2 * NUM_POINTS, 1)
        # the kernel's own sampling grid, (y, x) per position row-major, which the points replace
        grid = torch.arange(kernel, dtype=torch.float32) - kernel // 2
        rows, cols = torch.meshgrid(grid, grid, indexing='ij')
        self.register_buffer('kernel_grid', torch.stack([rows, cols], dim=-1).reshape(1, -1, 1, 1),
                             persistent=False)
        self._init_weights(classifier_init)

    def _init_weights(self, classifier_init: str):
        prior = -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY)
        towers = [block[0] for block in (*self.cls_convs, *self.reg_convs, self.shared_convs)]
        outputs = [self.cls_conv, self.points_init_conv, self.points_init_out, self.points_refine_conv,
                   self.points_refine_out, *self.corner_offsets]
        scores = [self.cls_out, self.sem_out, *self.corner_scores]
        for conv in towers + outputs + scores:
            nn.init.normal_(conv.weight, std=STEM_INIT_STD)
            if conv.bias is not None:
                nn.init.constant_(conv.bias, prior if conv in scores else 0.0)
        if classifier_init == 'kaiming':
            nn.init.kaiming_normal_(self.cls_conv.weight, mode='fan_out', nonlinearity='relu')

    def forward_level(self, x: torch.Tensor) -> dict:
        """One level's maps: 'cls' (N, C, H, W) logits, 'points_init' and 'points_refine'
        (N, 18, H, W) points in strides from each location, (y, x) per point, 'heatmaps' (N, 2, H, W)
        corner logits, 'offsets' (N, 4, H, W), 'sem' (N, C, H, W) foreground logits."""
        cls_feat = self.cls_convs(x)
        points_feat = self.reg_convs(x)
        shared = self.shared_convs(points_feat)
        sem = self.sem_out(shared)
        embedding = self.sem_embedding(shared)
        cls_feat, points_feat, corner_feat = cls_feat + embedding, points_feat + embedding, shared + embedding
        corner_maps = [branch(corner_feat) for branch in self.corner_branches]
        heatmaps = torch.cat([score(feat) for score, feat in zip(self.corner_scores, corner_maps)], dim=1)
        offsets = torch.cat([offset(feat) for offset, feat in zip(self.corner_offsets, corner_maps)], dim=1)
        points_init = self.points_init_out(F.relu(self.points_init_conv(points_feat)))
        # the deformable kernels sample at the initial points; their gradient from there is damped
        damped = GRADIENT_MUL * points_init + (1 - GRADIENT_MUL) * points_init.detach()
        kernel_offsets = damped - self.kernel_grid.to(damped.dtype)
        verification = torch.cat([heatmaps, offsets], dim=1)
        cls = self.cls_out(F.relu(deformable(self.cls_conv, torch.cat([cls_feat, verification], dim=1),
                                             kernel_offsets)))
        refine = self.points_refine_out(F.relu(deformable(self.points_refine_conv,
                                                          torch.cat([points_feat, verification], dim=1),
                                                          kernel_offsets)))
        return {'cls': cls, 'points_init': points_init, 'points_refine': refine + points_init.detach(),
                'heatmaps': heatmaps, 'offsets': offsets, 'sem': sem}

    def forward(self, features: list) -> list:
        return [self.forward_level(level) for level in features]

    # -----------------------------------------------------------------------------------------
    def loss(self, outputs: list, image_sizes: list, targets: list) -> dict:
        """The six weighted losses of a batch: `outputs` of `forward`, `image_sizes` [(H, W)] of
        each image before batch padding, `targets` [{'boxes' (G, 4) xyxy, 'labels' (G,)}]."""
        device = outputs[0]['cls'].device
        sizes = [tuple(level['cls'].shape[-2:]) for level in outputs]
        points, strides, levels = level_points(sizes, POINT_STRIDES, device)
        flat = {key: torch.cat([level[key].float().permute(0, 2, 3, 1).flatten(1, 2) for level in outputs], dim=1)
                for key in ('cls', 'points_init', 'points_refine', 'heatmaps', 'offsets')}
        origins = points.repeat(1, 2)
        scaled = strides[:, None]
        init_boxes = points_to_boxes(flat['points_init']) * scaled + origins
        refine_boxes = points_to_boxes(flat['points_refine']) * scaled + origins

        names = ['init', 'refine'] + [f'heatmap_{corner}' for corner in CORNERS] + \
            [f'offset_{corner}' for corner in CORNERS]
        totals, counts = dict.fromkeys(names + ['cls'], 0.0), dict.fromkeys(['init', 'refine', *CORNERS], 0)
        sem_targets, sem_weights = [], []
        for index, (image_size, target) in enumerate(zip(image_sizes, targets)):
            gt_boxes, gt_labels = target['boxes'].float(), target['labels']
            valid = valid_points(sizes, POINT_STRIDES, image_size).to(device).nonzero().squeeze(1)
            valid_levels = levels[valid]

            init_gt = point_assign(points[valid], strides[valid], gt_boxes)
            positive = init_gt >= 0
            selected = valid[positive]
            totals['init'] += point_box_loss(init_boxes[index, selected], gt_boxes[init_gt[positive]],
                                             POINT_BASE_SCALE * strides[selected])
            counts['init'] += max(int(positive.sum()), 1)

            num_per_level = torch.bincount(valid_levels, minlength=len(sizes)).tolist()
            refine_gt = atss_assign(init_boxes[index, valid].detach(), num_per_level, gt_boxes, ATSS_TOPK,
                                    repeat_short_levels=True)
            positive = refine_gt >= 0
            selected = valid[positive]
            matched = gt_boxes[refine_gt[positive]]
            totals['refine'] += point_box_loss(refine_boxes[index, selected], matched,
                                               POINT_BASE_SCALE * strides[selected])
            labels = torch.where(positive, gt_labels[refine_gt.clamp(min=0)], -1) if len(gt_boxes) else refine_gt
            quality = torch.zeros(len(valid), device=device)
            quality[positive] = box_iou(refine_boxes[index, selected].detach(), matched).diagonal().clamp(min=0)
            totals['cls'] += quality_focal_loss(flat['cls'][index, valid], labels, quality)
            counts['refine'] += max(int(positive.sum()), 1)

            heat, offsets, peaks = corner_heatmap_targets(points[valid], strides[valid], valid_levels, gt_boxes)
            probabilities = flat['heatmaps'][index, valid].sigmoid()
            for column, corner in enumerate(CORNERS):
                at_peaks = peaks[:, column]
                counts[corner] += max(int(at_peaks.sum()), 1)
                totals[f'heatmap_{corner}'] += gaussian_focal_loss(probabilities[:, column], heat[:, column])
                pair = slice(2 * column, 2 * column + 2)
                totals[f'offset_{corner}'] += F.smooth_l1_loss(flat['offsets'][index, valid[at_peaks], pair],
                                                               offsets[at_peaks, pair], beta=OFFSET_BETA,
                                                               reduction='sum')

            sem_target, sem_weight = foreground_targets(gt_boxes, gt_labels, self.num_classes, sizes[0])
            sem_targets.append(sem_target)
            sem_weights.append(sem_weight)

        # each corner's losses are divided by its own count of peaks, then the two averaged ([swin] loss_single)
        losses = {'loss_cls': totals['cls'] / counts['refine'],
                  'loss_pts_init': totals['init'] / counts['init'],
                  'loss_pts_refine': totals['refine'] / counts['refine'],
                  'loss_heatmap': sum(totals[f'heatmap_{corner}'] / counts[corner] for corner in CORNERS) / 2,
                  'loss_offset': sum(totals[f'offset_{corner}'] / counts[corner] for corner in CORNERS) / 2,
                  'loss_sem': self._foreground_loss(outputs, torch.stack(sem_targets), torch.stack(sem_weights))}
        return {name: LOSS_WEIGHTS[name] * value for name, value in losses.items()}

    @staticmethod
    def _foreground_loss(outputs: list, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """The foreground focal loss over every level, the stride-8 targets resized (nearest) to each."""
        logits, level_targets, level_weights = [], [], []
        for level in outputs:
            size = level['sem'].shape[-2:]
            logits.append(level['sem'].float().reshape(-1))
            level_targets.append(F.interpolate(targets, size=size, mode='nearest').reshape(-1))
            level_weights.append(F.interpolate(weights, size=size, mode='nearest').reshape(-1))
        return foreground_focal_loss(torch.cat(logits), torch.cat(level_targets), torch.cat(level_weights))

    # -----------------------------------------------------------------------------------------
    @torch.no_grad()
    def detect(self, outputs: list, image_sizes: list, topk_candidates: int, score_thresh: float,
               nms_thresh: float, detections_per_img: int) -> list:
        """[{'boxes', 'labels', 'scores'}] per image: on each level the `topk_candidates`
        locations of highest class score, their refined boxes clipped to the image and, from P4 up,
        snapped to the corner heatmaps (`SNAP_LEVELS`); then every (box, class) above
        `score_thresh`, class-wise NMS at `nms_thresh`, the best `detections_per_img`."""
        device = outputs[0]['cls'].device
        sizes = [tuple(level['cls'].shape[-2:]) for level in outputs]
        detections = []
        for index, image_size in enumerate(image_sizes):
            limits = torch.tensor([image_size[1], image_size[0]] * 2, device=device, dtype=torch.float32)
            boxes, scores = [], []
            for level, (maps, size, stride) in enumerate(zip(outputs, sizes, POINT_STRIDES)):
                points, _, _ = level_points([size], [stride], device)
                level_scores = maps['cls'][index].float().permute(1, 2, 0).reshape(-1, self.num_classes).sigmoid()
                refine = maps['points_refine'][index].float().permute(1, 2, 0).reshape(-1, 2 * NUM_POINTS)
                if len(level_scores) > topk_candidates:
                    keep = level_scores.max(dim=1).values.topk(topk_candidates).indices
                    level_scores, refine, points = level_scores[keep], refine[keep], points[keep]
                level_boxes = points_to_boxes(refine) * stride + points.repeat(1, 2)
                level_boxes = torch.minimum(level_boxes.clamp(min=0), limits)
                if SNAP_LEVELS[level] is not None:
                    source = outputs[SNAP_LEVELS[level]]
                    level_boxes = snap_to_corners(level_boxes, source['heatmaps'][index].float(),
                                                  source['offsets'][index].float(), POINT_STRIDES[SNAP_LEVELS[level]],
                                                  image_size)
                boxes.append(level_boxes)
                scores.append(level_scores)
            boxes, scores = torch.cat(boxes), torch.cat(scores)
            box_index, labels = (scores > score_thresh).nonzero(as_tuple=True)
            kept_boxes, kept_scores = boxes[box_index], scores[box_index, labels]
            keep = batched_nms(kept_boxes, kept_scores, labels, nms_thresh)[:detections_per_img]
            detections.append({'boxes': kept_boxes[keep], 'labels': labels[keep], 'scores': kept_scores[keep]})
        return detections


class RepPointsV2(nn.Module):
    """RepPointsV2 in torchvision's detector interface: `forward(images, targets=None)` takes a
    list of (3, H, W) images in [0, 1] and, in training, targets [{'boxes' (G, 4) xyxy, 'labels' (G,)}],
    and returns the dict of losses in training, or [{'boxes', 'labels', 'scores'}] per image in
    eval mode, in the images' coordinates.

    `backbone`: a module whose forward gives an OrderedDict of the five levels P3-P7 (strides
    8..128) and that says their width in `out_channels` (e.g. `FocalFPN` with a BiFPN neck).
    Images go through torchvision's `GeneralizedRCNNTransform` (ImageNet normalisation; batches
    padded to multiples of 32); `_skip_resize=True` leaves training images at the size the data
    pipeline gave them, and evaluation resizes to `min_size` (longer side at most `max_size`) and
    maps the detections back. The test settings are [swin]'s test_cfg, named as torchvision's
    RetinaNet names them.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, min_size: int = 800, max_size: int = 1333,
                 stacked_convs: int = 3, corner_channels: int = 64, classifier_init: str = 'normal',
                 topk_candidates: int = 1000,  # [swin] test_cfg nms_pre
                 score_thresh: float = 0.05,  # [swin] score_thr
                 nms_thresh: float = 0.6,  # [swin] nms iou_threshold
                 detections_per_img: int = 100,  # [swin] max_per_img
                 image_mean: Optional[list] = None, image_std: Optional[list] = None, **transform_kwargs):
        super().__init__()
        self.backbone = backbone
        self.head = RepPointsV2Head(num_classes, backbone.out_channels, stacked_convs, corner_channels,
                                    classifier_init)
        self.transform = GeneralizedRCNNTransform(min_size, max_size, image_mean or [0.485, 0.456, 0.406],
                                                  image_std or [0.229, 0.224, 0.225], **transform_kwargs)
        self.test_settings = dict(topk_candidates=topk_candidates, score_thresh=score_thresh,
                                  nms_thresh=nms_thresh, detections_per_img=detections_per_img)

    def forward(self, images: list, targets: Optional[list] = None):
        if self.training and targets is None:
            raise ValueError('RepPointsV2 needs targets in training mode')
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        batch, targets = self.transform(images, targets)
        features = list(self.backbone(batch.tensors).values())
        if len(features) != len(POINT_STRIDES):
            raise ValueError(f'RepPointsV2 needs {len(POINT_STRIDES)} pyramid levels (strides {POINT_STRIDES}), '
                             f'the backbone gave {len(features)}')
        outputs = self.head(features)
        if self.training:
            return self.head.loss(outputs, batch.image_sizes, targets)
        detections = self.head.detect(outputs, batch.image_sizes, **self.test_settings)
        return self.transform.postprocess(detections, batch.image_sizes, original_sizes)

