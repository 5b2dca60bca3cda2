"""Cascade Mask R-CNN (Cai and Vasconcelos, "Cascade R-CNN: High Quality Object Detection and Instance
Segmentation", TPAMI 2019) from torchvision's R-CNN pieces, in the form of the paper's 3x recipe.

    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from models.detection import focal_fpn_backbone
    from models.detectors.cascade_rcnn import CascadeMaskRCNN

    anchors = AnchorGenerator([(32,), (64,), (128,), (256,), (512,)], [(0.5, 1.0, 2.0)] * 5)
    detector = CascadeMaskRCNN(focal_fpn_backbone(), num_classes=91, anchor_generator=anchors,
                               min_size=800, max_size=1333)

Torchvision's RPN proposes; three box stages follow, each trained at a stricter IoU on the boxes the one
before it moved, each with its own mask head. The model is a torchvision `GeneralizedRCNN`: a dict of
losses in training, `[{'boxes', 'labels', 'scores', 'masks'}]` at evaluation.
"""
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import MultiScaleRoIAlign, boxes as box_ops, generalized_box_iou_loss

__all__ = ['CascadeMaskRCNN', 'CascadeRoIHeads']

# Per stage, the recipe's (mmdetection's cascade_mask_rcnn_r50_fpn.py, which Swin's and FocalNet's
# 3x configs inherit): matching IoU, box-coder weights (target_stds .1/.1/.2/.2, .05/.05/.1/.1,
# .033/.033/.067/.067 as torchvision's inverse weights) and loss weight
IOU_THRESHOLDS = (0.5, 0.6, 0.7)
BOX_CODER_WEIGHTS = ((10., 10., 5., 5.), (20., 20., 10., 10.), (30., 30., 15., 15.))
STAGE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)
GIOU_LOSS_WEIGHT = 10.0  # Swin's 3x "giou_4conv1f" recipe: loss_bbox GIoULoss(loss_weight=10)
FEATURE_MAPS = ['0', '1', '2', '3']  # P2-P5 feed the RoIAlign; P6 only the RPN, as in Mask R-CNN


class CascadeRoIHeads(RoIHeads):
    """The cascade's box and mask stages in place of torchvision's RoIHeads, called as it is.

    Training, stage t: the RoIs (the RPN's proposals for the first stage, the boxes stage t-1 moved
    for the others) and the ground truth are matched at IoU `iou_thresholds[t]` (as many positives
    as negatives thresholds, no low-quality matches) and `batch_size_per_image` of them sampled at
    `positive_fraction`. The stage adds `stage_loss_weights[t]` times its cross-entropy, its
    `giou_loss_weight` x GIoU loss (the box decoded with the positive's class, summed over the
    positives, over the sampled RoIs) and its mask head's loss on the positives. Its sampled RoIs,
    less those that were ground-truth boxes, then move by its regression (the matched class for
    positives, the best foreground class for the others) to become the next stage's RoIs, without
    gradient.

    Evaluation: the RPN's proposals move through the stages (each by its best foreground class);
    the classes' scores are the softmax of the stages' logits averaged (mmdetection's
    CascadeRoIHead, which the paper's recipe ran), the boxes the last stage's class-specific ones,
    kept above `score_thresh`, after NMS at `nms_thresh`, `detections_per_img` at most; each box's
    mask is the average of the mask heads' probabilities for its class.

    `box_heads`, `box_predictors` (FastRCNNPredictor-like: `(class logits, class-specific deltas)`),
    `mask_heads`, `mask_predictors`: one per stage.
    """

    def __init__(self, box_roi_pool: MultiScaleRoIAlign, mask_roi_pool: MultiScaleRoIAlign,
                 box_heads: Sequence[nn.Module], box_predictors: Sequence[nn.Module],
                 mask_heads: Sequence[nn.Module], mask_predictors: Sequence[nn.Module],
                 iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
                 box_coder_weights: Sequence[Sequence[float]] = BOX_CODER_WEIGHTS,
                 stage_loss_weights: Sequence[float] = STAGE_LOSS_WEIGHTS,
                 batch_size_per_image: int = 512, positive_fraction: float = 0.25,
                 giou_loss_weight: float = GIOU_LOSS_WEIGHT, score_thresh: float = 0.05,
                 nms_thresh: float = 0.5, detections_per_img: int = 100):
        per_stage = [len(box_heads), len(box_predictors), len(mask_heads), len(mask_predictors),
                     len(iou_thresholds), len(box_coder_weights), len(stage_loss_weights)]
        if len(set(per_stage)) != 1 or not per_stage[0]:
            raise ValueError(f'the heads, iou_thresholds, box_coder_weights and stage_loss_weights must '
                             f'have one entry per stage, got {per_stage}')
        # The parent keeps the sampler, the last stage's box coder and its post-processing (which
        # the final boxes go through as torchvision's); its single-stage heads stay unset.
        super().__init__(box_roi_pool, None, None, iou_thresholds[0], iou_thresholds[0],
                         batch_size_per_image, positive_fraction, tuple(box_coder_weights[-1]),
                         score_thresh, nms_thresh, detections_per_img, mask_roi_pool=mask_roi_pool)
        del self.proposal_matcher  # one per stage instead
        self.box_heads = nn.ModuleList(box_heads)
        self.box_predictors = nn.ModuleList(box_predictors)
        self.mask_heads = nn.ModuleList(mask_heads)
        self.mask_predictors = nn.ModuleList(mask_predictors)
        self.matchers = [det_utils.Matcher(iou, iou, allow_low_quality_matches=False) for iou in iou_thresholds]
        self.box_coders = [det_utils.BoxCoder(tuple(weights)) for weights in box_coder_weights]
        self.stage_loss_weights = list(stage_loss_weights)
        self.giou_loss_weight = giou_loss_weight

    @property
    def num_stages(self) -> int:
        return len(self.box_heads)

    def forward(self, features, proposals, image_shapes, targets=None):
        if self.training:
            if targets is None:
                raise ValueError('targets should not be None in training')
            return [], self.losses(features, proposals, image_shapes, targets)
        return self.detect(features, proposals, image_shapes), {}

    def box_forward(self, stage: int, features, rois: list, image_shapes) -> tuple:
        """Stage `stage`'s class logits (R, C) and class-specific box deltas (R, C, 4) of `rois`."""
        pooled = self.box_roi_pool(features, rois, image_shapes)
        class_logits, deltas = self.box_predictors[stage](self.box_heads[stage](pooled))
        return class_logits, deltas.reshape(len(class_logits), -1, 4)

    def move_boxes(self, stage: int, deltas: torch.Tensor, rois: list, classes: torch.Tensor,
                   image_shapes) -> list:
        """`rois` (a list per image) decoded by stage `stage` with each one's class of `classes`,
        clipped to its image, as float32 (under autocast the deltas may be bfloat16)."""
        picked = deltas[torch.arange(len(classes), device=classes.device), classes]
        moved = self.box_coders[stage].decode_single(picked.float(), torch.cat(rois).float())
        return [box_ops.clip_boxes_to_image(boxes, shape)
                for boxes, shape in zip(moved.split([len(r) for r in rois]), image_shapes)]

    def sample(self, stage: int, proposals: list, gt_boxes: list, gt_labels: list) -> tuple:
        """Per image: the sampled RoIs of `proposals` with the ground truth added, the index of the
        ground truth each one matched at stage `stage`'s IoU, its class (0: background), and
        whether it was a ground-truth box."""
        labels, matches, candidates, from_gt = [], [], [], []
        for boxes, gt, classes in zip(proposals, gt_boxes, gt_labels):
            boxes = torch.cat([boxes, gt])
            is_gt = torch.arange(len(boxes), device=boxes.device) >= len(boxes) - len(gt)
            if len(gt):
                match = self.matchers[stage](box_ops.box_iou(gt, boxes))
                label = torch.where(match >= 0, classes[match.clamp(min=0)], 0)
            else:  # every RoI of an image without objects is background
                match = label = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
            candidates.append(boxes)
            from_gt.append(is_gt)
            labels.append(label)
            matches.append(match.clamp(min=0))
        positives, negatives = self.fg_bg_sampler(labels)
        kept = [torch.where(positive | negative)[0] for positive, negative in zip(positives, negatives)]
        return ([values[keep] for values, keep in zip(candidates, kept)],
                [values[keep] for values, keep in zip(matches, kept)],
                [values[keep] for values, keep in zip(labels, kept)],
                [values[keep] for values, keep in zip(from_gt, kept)])

    def losses(self, features, proposals: list, image_shapes, targets: list) -> dict:
        gt_boxes = [target['boxes'].float() for target in targets]
        gt_labels = [target['labels'] for target in targets]
        losses = {}
        for stage, weight in enumerate(self.stage_loss_weights):
            rois, matches, labels, from_gt = self.sample(stage, proposals, gt_boxes, gt_labels)
            class_logits, deltas = self.box_forward(stage, features, rois, image_shapes)
            all_labels = torch.cat(labels)
            positive = torch.where(all_labels > 0)[0]
            matched_boxes = torch.cat([gt[match] if len(gt) else gt.new_zeros(len(match), 4)
                                       for gt, match in zip(gt_boxes, matches)])
            predicted = self.box_coders[stage].decode_single(
                deltas[positive, all_labels[positive]].float(), torch.cat(rois)[positive])
            box_loss = generalized_box_iou_loss(predicted, matched_boxes[positive], reduction='sum')
            losses[f'loss_classifier_{stage}'] = weight * F.cross_entropy(class_logits.float(), all_labels)
            losses[f'loss_box_giou_{stage}'] = weight * self.giou_loss_weight * box_loss / max(len(all_labels), 1)
            losses[f'loss_mask_{stage}'] = weight * self.mask_loss(stage, features, rois, matches, labels,
                                                                   image_shapes, targets)
            if stage + 1 < self.num_stages:
                with torch.no_grad():
                    classes = torch.where(all_labels > 0, all_labels, class_logits[:, 1:].argmax(1) + 1)
                    moved = self.move_boxes(stage, deltas, rois, classes, image_shapes)
                    proposals = [boxes[~is_gt] for boxes, is_gt in zip(moved, from_gt)]
        return losses

    def mask_loss(self, stage: int, features, rois: list, matches: list, labels: list, image_shapes,
                  targets: list) -> torch.Tensor:
        """Stage `stage`'s mask head on its positive RoIs, against their ground truth's masks."""
        positives = [torch.where(label > 0)[0] for label in labels]
        mask_rois = [boxes[positive] for boxes, positive in zip(rois, positives)]
        pooled = self.mask_roi_pool(features, mask_rois, image_shapes)
        logits = self.mask_predictors[stage](self.mask_heads[stage](pooled))
        return maskrcnn_loss(logits.float(), mask_rois, [target['masks'] for target in targets],
                             [target['labels'] for target in targets],
                             [match[positive] for match, positive in zip(matches, positives)])

    def detect(self, features, proposals: list, image_shapes) -> list:
        rois, logit_sum = proposals, 0
        for stage in range(self.num_stages):
            class_logits, deltas = self.box_forward(stage, features, rois, image_shapes)
            logit_sum = logit_sum + class_logits.float()
            if stage + 1 < self.num_stages:
                rois = self.move_boxes(stage, deltas, rois, class_logits[:, 1:].argmax(1) + 1, image_shapes)
        boxes, scores, labels = self.postprocess_detections(logit_sum / self.num_stages,
                                                            deltas.flatten(1).float(), rois, image_shapes)
        pooled = self.mask_roi_pool(features, boxes, image_shapes)
        probabilities = sum(predictor(head(pooled)).float().sigmoid()
                            for head, predictor in zip(self.mask_heads, self.mask_predictors)) / self.num_stages
        chosen = probabilities[torch.arange(len(probabilities)), torch.cat(labels)][:, None]
        return [{'boxes': found, 'labels': label, 'scores': score, 'masks': masks}
                for found, label, score, masks in zip(boxes, labels, scores,
                                                      chosen.split([len(found) for found in boxes]))]


class CascadeMaskRCNN(GeneralizedRCNN):
    """Cascade Mask R-CNN on `backbone` (a torchvision FPN backbone with P2-P5 as '0'-'3' and `out_channels`).

    `num_classes`: with the background, as torchvision counts. The RPN is torchvision's Faster
    R-CNN one on `anchor_generator` (keeping `proposals` = (training, evaluation) per image after
    its NMS); each stage's box head is `box_head_convs` 3x3 convolutions with batch norm and one fully
    connected layer of `box_head_width` (Swin's "4conv1fc"), its box predictor class-specific,
    its mask head torchvision's Mask R-CNN one with `mask_head_layers` convolutions. `min_size`,
    `max_size` and `transform_kwargs` (e.g. `_skip_resize`) go to GeneralizedRCNNTransform;
    the rest to `CascadeRoIHeads`.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, anchor_generator, min_size: int, max_size: int,
                 proposals: Sequence[int] = (2000, 1000), roi_samples: int = 512, box_head_convs: int = 4,
                 box_head_width: int = 1024, mask_head_layers: int = 4,
                 iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
                 box_coder_weights: Sequence[Sequence[float]] = BOX_CODER_WEIGHTS,
                 stage_loss_weights: Sequence[float] = STAGE_LOSS_WEIGHTS,
                 giou_loss_weight: float = GIOU_LOSS_WEIGHT, detections_per_img: int = 100, **transform_kwargs):
        width = backbone.out_channels
        # torchvision's Faster R-CNN RPN (IoU 0.7 / 0.3, 256 anchors at half positives, NMS 0.7,
        # 2000 / 1000 per level before it), which matches mmdetection's rpn of the recipe
        rpn = RegionProposalNetwork(anchor_generator, RPNHead(width, anchor_generator.num_anchors_per_location()[0]),
                                    0.7, 0.3, 256, 0.5, dict(training=2000, testing=1000),
                                    dict(training=proposals[0], testing=proposals[1]), 0.7)
        roi_size = 7  # RoIAlign side of the box heads (14 for the mask heads), torchvision's and mmdetection's
        stages = range(len(iou_thresholds))
        # sampling_ratio 0 (samples per bin as the RoI's size needs) as the recipe's RoIAlign layers
        roi_heads = CascadeRoIHeads(
            MultiScaleRoIAlign(FEATURE_MAPS, roi_size, sampling_ratio=0),
            MultiScaleRoIAlign(FEATURE_MAPS, 2 * roi_size, sampling_ratio=0),
            [FastRCNNConvFCHead((width, roi_size, roi_size), [width] * box_head_convs, [box_head_width],
                                norm_layer=nn.BatchNorm2d) for _ in stages],
            [FastRCNNPredictor(box_head_width, num_classes) for _ in stages],
            [MaskRCNNHeads(width, [width] * mask_head_layers, 1) for _ in stages],
            [MaskRCNNPredictor(width, width, num_classes) for _ in stages],
            iou_thresholds, box_coder_weights, stage_loss_weights, batch_size_per_image=roi_samples,
            giou_loss_weight=giou_loss_weight, detections_per_img=detections_per_img)
        # normalised with ImageNet's mean and deviation, as torchvision's detectors and the backbone's training
        transform = GeneralizedRCNNTransform(min_size, max_size, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225],
                                             **transform_kwargs)
        super().__init__(backbone, rpn, roi_heads, transform)
