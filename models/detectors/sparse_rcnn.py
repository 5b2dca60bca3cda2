"""Sparse R-CNN (Sun et al., "Sparse R-CNN: End-to-End Object Detection with Learnable Proposals", CVPR 2021)
on a torchvision feature pyramid.

    from models.detection import focal_fpn_backbone
    from models.detectors.sparse_rcnn import SparseRCNN

    detector = SparseRCNN(focal_fpn_backbone(), num_classes=91, num_proposals=300)

A fixed set of learnable proposal boxes and features goes through `num_stages` dynamic instance interactive
stages; each pools its boxes from P2-P5 (torchvision's MultiScaleRoIAlign; the backbone's max-pooled fifth
level, if any, is not read), lets the proposals attend to each other, convolves each proposal's RoI with
kernels made from its own feature, and predicts class logits (sigmoid) and refined boxes, which the next stage
starts from. Training matches each stage's predictions one-to-one to the ground truth (Hungarian matching,
scipy's linear_sum_assignment); evaluation takes the last stage's best (proposal, class) scores, without NMS.
Facts from mmdetection's SparseRoIHead / DIIHead / DynamicConv / EmbeddingRPNHead and FocalNet's
sparse_rcnn_focalnet_fpn.py ([mmdet] below) and the authors' PeizeSun/SparseR-CNN ([sparse]).
"""
import math

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import (MultiScaleRoIAlign, box_convert, boxes as box_ops, generalized_box_iou,
                             generalized_box_iou_loss, sigmoid_focal_loss)

from .loss_normaliser import mean_over_processes

__all__ = ['SparseRCNN', 'InteractiveStage', 'DynamicConv', 'match_predictions']

# [mmdet] HungarianAssigner costs and the DIIHead losses: the same weights in both
CLASS_WEIGHT, L1_WEIGHT, GIOU_WEIGHT = 2.0, 5.0, 2.0
FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0  # [mmdet] FocalLossCost and FocalLoss
ROI_SIZE = 7  # [mmdet] RoIAlign output_size 7, sampling_ratio 2
PRIOR_PROBABILITY = 0.01  # [mmdet] the classifier's bias: bias_init_with_prob(0.01)


class DynamicConv(nn.Module):
    """Each proposal's feature becomes two kernels (channels x dynamic_channels, dynamic_channels x channels)
    applied over its RoI's positions, LayerNorm and ReLU after each; the positions flattened and projected back
    to `channels` (Linear, LayerNorm, ReLU)."""

    def __init__(self, channels: int = 256, dynamic_channels: int = 64, roi_size: int = ROI_SIZE):
        super().__init__()
        self.channels, self.dynamic_channels = channels, dynamic_channels
        self.kernels = nn.Linear(channels, 2 * channels * dynamic_channels)
        self.norm_in, self.norm_out = nn.LayerNorm(dynamic_channels), nn.LayerNorm(channels)
        self.projection = nn.Linear(channels * roi_size ** 2, channels)
        self.projection_norm = nn.LayerNorm(channels)

    def forward(self, proposal_features: Tensor, roi_features: Tensor) -> Tensor:
        """`proposal_features` (B, C), `roi_features` (B, C, S, S) -> (B, C)."""
        kernels = self.kernels(proposal_features)
        split = self.channels * self.dynamic_channels
        kernel_in = kernels[:, :split].view(-1, self.channels, self.dynamic_channels)
        kernel_out = kernels[:, split:].view(-1, self.dynamic_channels, self.channels)
        positions = roi_features.flatten(2).transpose(1, 2)  # (B, S*S, C)
        positions = torch.relu(self.norm_in(torch.bmm(positions, kernel_in)))
        positions = torch.relu(self.norm_out(torch.bmm(positions, kernel_out)))
        return torch.relu(self.projection_norm(self.projection(positions.flatten(1))))


def fc_norm_relu(channels: int, layers: int) -> nn.Sequential:
    """`layers` x (Linear without bias, LayerNorm, ReLU): [mmdet] DIIHead's cls_fcs and reg_fcs."""
    return nn.Sequential(*[module for _ in range(layers) for module in
                           (nn.Linear(channels, channels, bias=False), nn.LayerNorm(channels), nn.ReLU())])


class InteractiveStage(nn.Module):
    """One dynamic instance interactive head ([mmdet] DIIHead): self-attention over the proposals, dynamic
    convolution with the RoI features, a feed-forward network, each with a residual and a LayerNorm; then the
    class logits (1 fc layer, Linear) and the box deltas (3 fc layers, Linear) of every proposal."""

    def __init__(self, num_classes: int, channels: int = 256, num_heads: int = 8, dynamic_channels: int = 64,
                 ffn_channels: int = 2048, class_layers: int = 1, box_layers: int = 3):
        super().__init__()
        self.attention = nn.MultiheadAttention(channels, num_heads, batch_first=True)  # [mmdet] dropout 0
        self.attention_norm = nn.LayerNorm(channels)
        self.interaction = DynamicConv(channels, dynamic_channels)
        self.interaction_norm = nn.LayerNorm(channels)
        self.ffn = nn.Sequential(nn.Linear(channels, ffn_channels), nn.ReLU(), nn.Linear(ffn_channels, channels))
        self.ffn_norm = nn.LayerNorm(channels)
        self.class_branch = nn.Sequential(fc_norm_relu(channels, class_layers), nn.Linear(channels, num_classes))
        self.box_branch = nn.Sequential(fc_norm_relu(channels, box_layers), nn.Linear(channels, 4))
        for parameter in self.parameters():  # [mmdet] DIIHead.init_weights: xavier on every matrix
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)
        nn.init.constant_(self.class_branch[-1].bias, -math.log((1 - PRIOR_PROBABILITY) / PRIOR_PROBABILITY))

    def forward(self, roi_features: Tensor, proposal_features: Tensor) -> tuple:
        """`roi_features` (N*P, C, S, S), `proposal_features` (N, P, C) -> logits (N, P, K), box deltas
        (N, P, 4), the proposals' new features (N, P, C)."""
        num_images, num_proposals, channels = proposal_features.shape
        attended = self.attention(proposal_features, proposal_features, proposal_features, need_weights=False)[0]
        features = self.attention_norm(proposal_features + attended).reshape(-1, channels)
        features = self.interaction_norm(features + self.interaction(features, roi_features))
        features = self.ffn_norm(features + self.ffn(features))
        logits = self.class_branch(features).view(num_images, num_proposals, -1)
        deltas = self.box_branch(features).view(num_images, num_proposals, 4)
        return logits, deltas, features.view(num_images, num_proposals, channels)


def focal_cost(logits: Tensor, labels: Tensor) -> Tensor:
    """(P, G): the focal loss of calling each proposal the class of each ground truth, less that of calling
    it not that class ([mmdet] FocalLossCost)."""
    probabilities = logits.sigmoid()[:, labels]
    positive = -FOCAL_ALPHA * (1 - probabilities) ** FOCAL_GAMMA * (probabilities + 1e-12).log()
    negative = -(1 - FOCAL_ALPHA) * probabilities ** FOCAL_GAMMA * (1 - probabilities + 1e-12).log()
    return positive - negative


@torch.no_grad()
def match_predictions(logits: Tensor, boxes: Tensor, gt_labels: Tensor, gt_boxes: Tensor,
                      image_whwh: Tensor) -> tuple:
    """One image's one-to-one matching of predictions to ground truths at the least total cost: focal class
    cost x 2 + L1 of the xyxy boxes divided by the image's (w, h, w, h) x 5 + negative GIoU x 2.
    `logits` (P, K), `boxes` (P, 4), `gt_labels` (G,), `gt_boxes` (G, 4). Returns (prediction indices,
    ground-truth indices), min(P, G) each, ordered by ground truth."""
    cost = (CLASS_WEIGHT * focal_cost(logits.float(), gt_labels)
            + L1_WEIGHT * torch.cdist(boxes.float() / image_whwh, gt_boxes.float() / image_whwh, p=1)
            - GIOU_WEIGHT * generalized_box_iou(boxes.float(), gt_boxes.float()))
    # a non-finite prediction must not stop scipy: the loss it makes shows it to the training loop
    cost = cost.nan_to_num(nan=1e8, posinf=1e8, neginf=-1e8).cpu().numpy()
    predictions, truths = linear_sum_assignment(cost)
    order = np.argsort(truths)
    return (torch.as_tensor(predictions[order], device=boxes.device),
            torch.as_tensor(truths[order], device=boxes.device))


class SparseRCNN(nn.Module):
    """Sparse R-CNN on a backbone whose `out_channels`-wide pyramid maps `featmap_names` have strides 4-32,
    returning a dict of losses (each stage's classification, L1 and GIoU) in training and torchvision's
    `[{'boxes', 'labels', 'scores'}]` at evaluation: the `detections_per_img` best of the last stage's
    (proposal, class) sigmoid scores.

    `num_proposals`, `num_stages`, `num_heads`, `dynamic_channels`, `ffn_channels`: [mmdet] 100 or 300
    (the 3x recipe), 6, 8, 64, 2048. The remaining keyword arguments go to torchvision's
    GeneralizedRCNNTransform (min_size, max_size, _skip_resize...).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, num_proposals: int = 100, num_stages: int = 6,
                 num_heads: int = 8, dynamic_channels: int = 64, ffn_channels: int = 2048,
                 featmap_names: tuple = ('0', '1', '2', '3'), detections_per_img: int = 100,
                 min_size: int = 800, max_size: int = 1333, image_mean=None, image_std=None, **kwargs):
        super().__init__()
        if num_proposals < 1 or num_stages < 1:
            raise ValueError(f'Sparse R-CNN needs at least one proposal and one stage, got {num_proposals} '
                             f'proposals and {num_stages} stages')
        channels = backbone.out_channels
        self.backbone = backbone
        # the image's ImageNet normalisation, as torchvision's detectors
        self.transform = GeneralizedRCNNTransform(min_size, max_size, image_mean or [0.485, 0.456, 0.406],
                                                  image_std or [0.229, 0.224, 0.225], **kwargs)
        # [mmdet] EmbeddingRPNHead: boxes (cx, cy, w, h) in image fractions, all the whole image at first
        self.proposal_boxes = nn.Embedding(num_proposals, 4)
        nn.init.constant_(self.proposal_boxes.weight[:, :2], 0.5)
        nn.init.constant_(self.proposal_boxes.weight[:, 2:], 1.0)
        self.proposal_features = nn.Embedding(num_proposals, channels)
        self.roi_align = MultiScaleRoIAlign(list(featmap_names), ROI_SIZE, sampling_ratio=2)
        self.stages = nn.ModuleList(InteractiveStage(num_classes, channels, num_heads, dynamic_channels,
                                                     ffn_channels) for _ in range(num_stages))
        self.box_coder = det_utils.BoxCoder((2.0, 2.0, 1.0, 1.0))  # [mmdet] target_stds (.5, .5, 1, 1)
        self.detections_per_img = detections_per_img

    def forward(self, images: list, targets: list = None):
        original_sizes = [tuple(image.shape[-2:]) for image in images]
        images, targets = self.transform(images, targets)
        features = self.backbone(images.tensors)
        whwh = torch.tensor([[width, height, width, height] for height, width in images.image_sizes],
                            dtype=torch.float32, device=images.tensors.device)
        num_images, num_proposals = len(whwh), len(self.proposal_boxes.weight)
        boxes = box_convert(self.proposal_boxes.weight, 'cxcywh', 'xyxy')[None] * whwh[:, None]
        proposal_features = self.proposal_features.weight[None].expand(num_images, -1, -1)
        stage_outputs = []
        for stage in self.stages:
            roi_features = self.roi_align(features, list(boxes), images.image_sizes)
            logits, deltas, proposal_features = stage(roi_features, proposal_features)
            # [mmdet] clip_border False: boxes may leave the image between stages
            boxes = self.box_coder.decode_single(deltas.reshape(-1, 4).float(), boxes.reshape(-1, 4))
            boxes = boxes.view(num_images, num_proposals, 4)
            stage_outputs.append((logits.float(), boxes))
            boxes = boxes.detach()  # [mmdet] each stage refines the last one's boxes without its gradient
        if self.training:
            return self.compute_loss(stage_outputs, targets, whwh)
        detections = self.postprocess_detections(*stage_outputs[-1], images.image_sizes)
        return self.transform.postprocess(detections, images.image_sizes, original_sizes)

    def compute_loss(self, stage_outputs: list, targets: list, whwh: Tensor) -> dict:
        """[mmdet] DIIHead.loss for every stage (weight 1 each): focal loss over every (proposal, class) x 2,
        L1 of the matched boxes divided by the image size x 5, their GIoU loss x 2, each per matched box
        (averaged over the processes)."""
        losses = {}
        for stage, (logits, boxes) in enumerate(stage_outputs):
            class_targets = torch.zeros_like(logits)
            matched_boxes, matched_truths, matched_whwh = [], [], []
            for image, target in enumerate(targets):
                predictions, truths = match_predictions(logits[image].detach(), boxes[image].detach(),
                                                        target['labels'], target['boxes'], whwh[image])
                class_targets[image, predictions, target['labels'][truths]] = 1.0
                matched_boxes.append(boxes[image, predictions])
                matched_truths.append(target['boxes'][truths].float())
                matched_whwh.append(whwh[image].expand(len(truths), 4))
            predicted, truths = torch.cat(matched_boxes), torch.cat(matched_truths)
            scale = torch.cat(matched_whwh)
            num_matched = mean_over_processes(logits.new_tensor(float(len(truths)))).clamp(min=1)
            losses[f'stage{stage}_classification'] = CLASS_WEIGHT * sigmoid_focal_loss(
                logits, class_targets, FOCAL_ALPHA, FOCAL_GAMMA, reduction='sum') / num_matched
            losses[f'stage{stage}_l1'] = L1_WEIGHT * (predicted / scale - truths / scale).abs().sum() / num_matched
            losses[f'stage{stage}_giou'] = GIOU_WEIGHT * generalized_box_iou_loss(
                predicted, truths, reduction='sum') / num_matched
        return losses

    def postprocess_detections(self, logits: Tensor, boxes: Tensor, image_sizes: list) -> list:
        """Each image's `detections_per_img` best (proposal, class) sigmoid scores with their proposals'
        boxes, clipped to the image as the authors' detectron2 postprocessing does ([sparse])."""
        detections = []
        for image_logits, image_boxes, image_size in zip(logits, boxes, image_sizes):
            num_classes = image_logits.shape[-1]
            scores, indices = image_logits.sigmoid().flatten().topk(min(self.detections_per_img,
                                                                        image_logits.numel()))
            detections.append({'boxes': box_ops.clip_boxes_to_image(image_boxes[indices // num_classes], image_size),
                               'scores': scores, 'labels': indices % num_classes})
        return detections

