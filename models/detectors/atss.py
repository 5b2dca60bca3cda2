"""ATSS (Zhang et al., "Bridging the Gap Between Anchor-based and Anchor-free Detection via Adaptive
Training Sample Selection", CVPR 2020) as torchvision's FCOS with ATSS's assignment, box coding and losses.

    from models.detection import LastLevelP6P7, focal_fpn_backbone
    from models.detectors.atss import ATSS

    backbone = focal_fpn_backbone(returned_stages=(1, 2, 3), extra_blocks=LastLevelP6P7(256, 256))
    detector = ATSS(backbone, num_classes=91)

What comes from torchvision unchanged: the forward pass (normalising and batching transform, anchors,
mapping detections back to the input images) and the classification tower (4 GroupNorm 3x3 convs, focal
prior 0.01). What ATSS changes: one square anchor per location of `anchor_scale` x the level's stride;
the adaptive assignment (`atss_assign`); box deltas on the anchor (BoxCoder (10, 10, 5, 5)) scaled by a
learnable factor per level; the GIoU loss weighted by the centerness targets; score = class x centerness.
Facts from mmdetection's ATSSHead / ATSSAssigner and FocalNet's atss_focalnet_fpn.py ([mmdet] below).
"""
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.models.detection import FCOS
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.fcos import FCOSClassificationHead
from torchvision.ops import box_iou, boxes as box_ops, generalized_box_iou_loss, sigmoid_focal_loss

from .loss_normaliser import mean_over_processes

__all__ = ['ATSS', 'ATSSHead', 'atss_assign']

GROUP_NORM_GROUPS = 32  # [mmdet] norm_cfg GN, num_groups 32, in both towers


def atss_assign(anchors: Tensor, num_anchors_per_level: list, gt_boxes: Tensor, topk: int = 9,
                repeat_short_levels: bool = False) -> Tensor:
    """Index of the ground-truth box each anchor learns (-1: background), by ATSS's rule.

    Per ground truth: the `topk` anchors of each level whose centres lie nearest its centre are its
    candidates; those with an IoU at least the mean plus the (unbiased) standard deviation of the
    candidates' IoUs, and whose centre lies inside the box, are positive. An anchor positive for
    several boxes learns the one it overlaps most. `anchors` (A, 4) xyxy, ordered level by level as
    `num_anchors_per_level` counts them; `gt_boxes` (G, 4) xyxy. A level with fewer than `topk`
    anchors gives them all ([mmdet] ATSSAssigner); with `repeat_short_levels` it repeats them, in
    order, up to `topk` candidates, as RepPointsV2's refinement assigner does ([swin] ATSSAssignerV2
    repeats randomly drawn ones; here the same ones every run).
    """
    matched = torch.full((len(anchors),), -1, dtype=torch.int64, device=anchors.device)
    if len(gt_boxes) == 0 or len(anchors) == 0:
        return matched
    ious = box_iou(anchors, gt_boxes)  # (A, G)
    anchor_centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    distances = torch.cdist(anchor_centres, (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2)  # (A, G)
    candidates, start = [], 0
    for count in num_anchors_per_level:
        if count >= topk or not repeat_short_levels:
            nearest = distances[start:start + count].topk(min(topk, count), dim=0, largest=False).indices
            candidates.append(nearest + start)
        elif count > 0:
            repeated = torch.arange(topk, device=anchors.device) % count + start
            candidates.append(repeated[:, None].expand(topk, len(gt_boxes)))
        start += count
    candidates = torch.cat(candidates)  # (C, G): anchor indices, distinct within a column unless repeated
    candidate_ious = ious.gather(0, candidates)
    threshold = candidate_ious.mean(0) + candidate_ious.std(0)  # [mmdet] torch.std: unbiased
    centres = anchor_centres[candidates]  # (C, G, 2)
    margins = torch.cat([centres - gt_boxes[:, :2], gt_boxes[:, 2:] - centres], dim=-1)
    positive = (candidate_ious >= threshold) & (margins.amin(-1) > 0.01)  # [mmdet] eps 0.01
    # each anchor's IoU with the boxes it is positive for, -1 elsewhere: the largest wins
    positive_ious = torch.full_like(ious, -1).scatter_(0, candidates, candidate_ious.where(positive, -1))
    best_iou, best_box = positive_ious.max(dim=1)
    return matched.where(best_iou < 0, best_box)


class ATSSRegressionHead(nn.Module):
    """The regression tower: 4 GroupNorm 3x3 convs, then the box deltas (times a learnable scale per
    pyramid level, [mmdet] Scale(1.0)) and the centerness logit, both from the tower's output."""

    def __init__(self, in_channels: int, num_levels: int, num_convs: int = 4):
        super().__init__()
        layers = []
        for _ in range(num_convs):
            layers += [nn.Conv2d(in_channels, in_channels, 3, padding=1),
                       nn.GroupNorm(GROUP_NORM_GROUPS, in_channels), nn.ReLU()]
        self.conv = nn.Sequential(*layers)
        self.bbox_reg = nn.Conv2d(in_channels, 4, 3, padding=1)
        self.bbox_ctrness = nn.Conv2d(in_channels, 1, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(num_levels))
        for layer in self.modules():  # [mmdet] normal_init std 0.01, bias 0
            if isinstance(layer, nn.Conv2d):
                nn.init.normal_(layer.weight, std=0.01)
                nn.init.zeros_(layer.bias)

    def forward(self, features: list) -> tuple:
        if len(features) != len(self.scales):
            raise ValueError(f'ATSS was built for {len(self.scales)} pyramid levels, got {len(features)}')
        deltas, centerness = [], []
        for scale, level in zip(self.scales, features):
            tower = self.conv(level)
            # (N, K, H, W) -> (N, HW, K), anchors ordered as torchvision's AnchorGenerator lists them
            deltas.append((scale * self.bbox_reg(tower)).flatten(2).transpose(1, 2))
            centerness.append(self.bbox_ctrness(tower).flatten(2).transpose(1, 2))
        return torch.cat(deltas, dim=1), torch.cat(centerness, dim=1)


class ATSSHead(nn.Module):
    """The classification and regression towers and ATSS's losses on the assigned anchors."""

    def __init__(self, in_channels: int, num_classes: int, num_levels: int = 5, num_convs: int = 4):
        super().__init__()
        if in_channels % GROUP_NORM_GROUPS:
            raise ValueError(f"ATSS's GroupNorm({GROUP_NORM_GROUPS}) needs a pyramid width divisible by "
                             f"{GROUP_NORM_GROUPS}, got {in_channels}")
        self.box_coder = det_utils.BoxCoder((10.0, 10.0, 5.0, 5.0))  # [mmdet] target_stds (.1, .1, .2, .2)
        # [mmdet] convs normal std 0.01, the classifier's bias at prior 0.01: torchvision's FCOS tower
        self.classification_head = FCOSClassificationHead(in_channels, 1, num_classes, num_convs)
        self.regression_head = ATSSRegressionHead(in_channels, num_levels, num_convs)

    def forward(self, features: list) -> dict:
        deltas, centerness = self.regression_head(features)
        return {'cls_logits': self.classification_head(features), 'bbox_regression': deltas,
                'bbox_ctrness': centerness}

    def compute_loss(self, targets: list, head_outputs: dict, anchors: list, matched_idxs: list) -> dict:
        """[mmdet] ATSSHead.loss: focal loss over every anchor and centerness BCE over the positives,
        both per positive; GIoU (weight 2) of the decoded positives weighted by their centerness
        targets, per unit of those weights (at least 1). Counts are averaged over the processes."""
        logits = head_outputs['cls_logits'].float()
        deltas = head_outputs['bbox_regression'].float()
        centerness = head_outputs['bbox_ctrness'].float().squeeze(-1)
        class_targets = torch.zeros_like(logits)
        positive_boxes, positive_anchors, positive_deltas, positive_centerness = [], [], [], []
        for image, (target, matched) in enumerate(zip(targets, matched_idxs)):
            positive = torch.nonzero(matched >= 0).squeeze(1)
            class_targets[image, positive, target['labels'][matched[positive]]] = 1.0
            positive_boxes.append(target['boxes'][matched[positive]].float())
            positive_anchors.append(anchors[image][positive])
            positive_deltas.append(deltas[image, positive])
            positive_centerness.append(centerness[image, positive])
        gt_boxes, anchor_boxes = torch.cat(positive_boxes), torch.cat(positive_anchors)
        predicted = self.box_coder.decode_single(torch.cat(positive_deltas), anchor_boxes)
        centerness = torch.cat(positive_centerness)
        centerness_targets = centerness_target(anchor_boxes, gt_boxes)

        num_positive = mean_over_processes(logits.new_tensor(float(len(gt_boxes)))).clamp(min=1)
        weight_sum = mean_over_processes(centerness_targets.sum().detach()).clamp(min=1)
        giou = generalized_box_iou_loss(predicted, gt_boxes, reduction='none')
        return {
            # [mmdet] FocalLoss gamma 2, alpha 0.25, weight 1
            'classification': sigmoid_focal_loss(logits, class_targets, reduction='sum') / num_positive,
            'bbox_regression': 2.0 * (giou * centerness_targets).sum() / weight_sum,  # [mmdet] GIoU weight 2
            'bbox_ctrness': F.binary_cross_entropy_with_logits(centerness, centerness_targets,
                                                               reduction='sum') / num_positive,
        }


def centerness_target(anchors: Tensor, gt_boxes: Tensor) -> Tensor:
    """FCOS's centerness of each anchor centre in its box: sqrt(min(l, r) / max(l, r) x min(t, b) / max(t, b))."""
    centres = (anchors[:, :2] + anchors[:, 2:]) / 2
    left_top, right_bottom = centres - gt_boxes[:, :2], gt_boxes[:, 2:] - centres
    ratios = torch.minimum(left_top, right_bottom) / torch.maximum(left_top, right_bottom)
    return ratios.prod(dim=1).sqrt()


class ATSS(FCOS):
    """ATSS on a backbone whose pyramid maps have `strides` (P3-P7, from LastLevelP6P7), returning
    torchvision's losses in training and `[{'boxes', 'labels', 'scores'}]` at evaluation.

    `anchor_scale`: each level's square anchor side in units of its stride ([mmdet] octave_base_scale 8,
    strides 8-128). `topk`: candidates per level and ground truth ([mmdet] ATSSAssigner topk 9).
    Test ([mmdet] test_cfg): `topk_candidates` per level before NMS (nms_pre 1000) among the class scores
    above `score_thresh` (0.05), those times the centerness, NMS at `nms_thresh` (0.6),
    `detections_per_img` (100) kept. The remaining keyword arguments go to torchvision's
    GeneralizedRCNNTransform (min_size, max_size, _skip_resize...).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, strides: tuple = (8, 16, 32, 64, 128),
                 anchor_scale: float = 8.0, topk: int = 9, score_thresh: float = 0.05, nms_thresh: float = 0.6,
                 detections_per_img: int = 100, topk_candidates: int = 1000, head: Optional[nn.Module] = None,
                 **kwargs):
        if anchor_scale <= 0:
            raise ValueError(f"ATSS's anchor scale must be positive, got {anchor_scale}")
        anchors = AnchorGenerator(tuple((anchor_scale * stride,) for stride in strides), ((1.0,),) * len(strides))
        head = head or ATSSHead(backbone.out_channels, num_classes, len(strides))
        super().__init__(backbone, num_classes, anchor_generator=anchors, head=head, score_thresh=score_thresh,
                         nms_thresh=nms_thresh, detections_per_img=detections_per_img,
                         topk_candidates=topk_candidates, **kwargs)
        self.box_coder = self.head.box_coder
        self.topk = topk

    def compute_loss(self, targets: list, head_outputs: dict, anchors: list, num_anchors_per_level: list) -> dict:
        matched_idxs = [atss_assign(image_anchors, num_anchors_per_level, target['boxes'], self.topk)
                        for image_anchors, target in zip(anchors, targets)]
        return self.head.compute_loss(targets, head_outputs, anchors, matched_idxs)

    def postprocess_detections(self, head_outputs: dict, anchors: list, image_shapes: list) -> list:
        """Per level the `topk_candidates` best (anchor, class) scores above `score_thresh`, each
        times its anchor's centerness and its box decoded and clipped; then NMS per class."""
        detections = []
        for index, image_shape in enumerate(image_shapes):
            boxes, scores, labels = [], [], []
            for logits, deltas, centerness, level_anchors in zip(
                    head_outputs['cls_logits'], head_outputs['bbox_regression'], head_outputs['bbox_ctrness'],
                    anchors[index]):
                num_classes = logits.shape[-1]
                level_scores = torch.sigmoid(logits[index].float()).flatten()
                kept = torch.nonzero(level_scores > self.score_thresh).squeeze(1)
                level_scores, order = level_scores[kept].topk(min(self.topk_candidates, len(kept)))
                kept = kept[order]
                anchor_index = kept // num_classes
                scores.append(level_scores * torch.sigmoid(centerness[index, anchor_index, 0].float()))
                labels.append(kept % num_classes)
                level_boxes = self.box_coder.decode_single(deltas[index, anchor_index].float(),
                                                           level_anchors[anchor_index])
                boxes.append(box_ops.clip_boxes_to_image(level_boxes, image_shape))
            boxes, scores, labels = torch.cat(boxes), torch.cat(scores), torch.cat(labels)
            keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[:self.detections_per_img]
            detections.append({'boxes': boxes[keep], 'scores': scores[keep], 'labels': labels[keep]})
        return detections

