"""Cascade Mask R-CNN (models.detectors.cascade_rcnn, MODEL.DETECTION.DETECTOR 'cascade_mask_rcnn'):
the stages' refinement and test-time ensemble on hand-made RoIs with heads whose outputs are set by
construction, the Focal-T recipe at the paper's size, bad settings, rank 0's batch-norm statistics on
every process of an evaluation. test_detection.py runs the cascade as it runs Mask R-CNN
(DETECTOR_OPTS): a few steps of the demo's detector, resume after SIGKILL bit-identical, AMP and
TensorBoard, 2-process evaluation equal to 1-process with box and mask AP."""
import argparse
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops import MultiScaleRoIAlign

from config import ConfigError, get_config
from helpers import REPO, assert_ok, subprocess_env
from models.detectors.cascade_rcnn import CascadeRoIHeads
from tasks import build_task

WIDTH, CLASSES = 4, 3  # feature channels; classes with the background
IMAGE_SHAPES = [(64, 64), (64, 64)]
# Per stage: the class logits (background, 1, 2) and each class's deltas that the predictors answer
# for every RoI. Stage 0 moves class 1 right by a tenth of the width (dx 1 over the coder's weight 10)
# and class 2 down by a tenth of the height; its best foreground class is 2.
LOGITS = [[3.0, 0.0, 1.0], [0.0, 2.0, 1.0], [1.0, 1.0, 4.0]]
DELTAS = [[[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0]],
          [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]],
          [[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 15 * math.log(2), 0]]]  # stage 2 doubles class 2's width
MASK_LOGITS = [0.0, 2.0, -1.0]
GT_BOXES = torch.tensor([[10., 10., 30., 30.], [36., 36., 60., 56.]])
# Image 0: a proposal on each ground truth (IoU 0.82 and 0.92) and two on nothing; image 1 has no object.
PROPOSALS = [torch.tensor([[11., 11., 31., 31.], [37., 36., 61., 56.], [40., 2., 60., 20.], [2., 40., 20., 60.]]),
             torch.tensor([[5., 5., 25., 25.], [30., 30., 50., 50.]])]


def set_heads(stage_loss_weights=(1.0, 0.5, 0.25)):
    """Three stages of one-conv heads whose predictors ignore their input and answer LOGITS, DELTAS
    and MASK_LOGITS; 512 RoIs sampled per image, so that every candidate is kept."""
    box_predictors, mask_predictors = [], []
    for logits, deltas, mask_logit in zip(LOGITS, DELTAS, MASK_LOGITS):
        predictor = FastRCNNPredictor(8, CLASSES)
        mask_predictor = MaskRCNNPredictor(WIDTH, WIDTH, CLASSES)
        with torch.no_grad():
            for layer, bias in ((predictor.cls_score, logits), (predictor.bbox_pred, sum(deltas, [])),
                                (mask_predictor.mask_fcn_logits, [mask_logit] * CLASSES)):
                layer.weight.zero_()
                layer.bias.copy_(torch.tensor(bias, dtype=torch.float))
        box_predictors.append(predictor)
        mask_predictors.append(mask_predictor)
    return CascadeRoIHeads(
        MultiScaleRoIAlign(['0', '1', '2', '3'], 7, 0), MultiScaleRoIAlign(['0', '1', '2', '3'], 14, 0),
        [FastRCNNConvFCHead((WIDTH, 7, 7), [WIDTH], [8], nn.BatchNorm2d) for _ in range(3)], box_predictors,
        [MaskRCNNHeads(WIDTH, [WIDTH], 1) for _ in range(3)], mask_predictors,
        stage_loss_weights=stage_loss_weights)


def features():
    generator = torch.Generator().manual_seed(0)
    return {str(level): torch.randn(2, WIDTH, 64 >> (level + 2), 64 >> (level + 2), generator=generator)
            for level in range(4)}


def targets():
    masks = torch.zeros(2, 64, 64, dtype=torch.uint8)
    for mask, (x1, y1, x2, y2) in zip(masks, GT_BOXES.int().tolist()):
        mask[y1:y2, x1:x2] = 1
    return [{'boxes': GT_BOXES, 'labels': torch.tensor([1, 2]), 'masks': masks},
            {'boxes': torch.zeros(0, 4), 'labels': torch.zeros(0, dtype=torch.int64),
             'masks': torch.zeros(0, 64, 64, dtype=torch.uint8)}]


def spy_on_box_rois(heads):
    """The RoIs (a list per image) of every call of the box heads' RoIAlign."""
    calls, pool = [], heads.box_roi_pool.forward
    heads.box_roi_pool.forward = lambda maps, rois, shapes: calls.append([r.clone() for r in rois]) or \
        pool(maps, rois, shapes)
    return calls


def moved(boxes, dx=0.0, dy=0.0):
    """`boxes` shifted by the fractions `dx` of their width and `dy` of their height."""
    sizes = boxes[:, 2:] - boxes[:, :2]
    return boxes + torch.cat([sizes * torch.tensor([dx, dy])] * 2, dim=1)


def same_rows(a, b):
    """a and b hold the same boxes, in any order."""
    assert a.shape == b.shape, (a, b)
    key = lambda boxes: boxes[torch.argsort(boxes[:, 0] * 1000 + boxes[:, 1])]  # noqa: E731
    torch.testing.assert_close(key(a), key(b))


def test_each_stage_trains_on_the_boxes_the_one_before_moved_without_the_ground_truth_rois():
    """Stage 0 samples the proposals and the ground truth; stage 1 sees stage 0's RoIs that were not
    ground-truth boxes, moved by stage 0's deltas of the matched class (class 1 right, class 2
    down) or, for background, of the best foreground class (2: down), and the ground truth again."""
    torch.manual_seed(0)
    heads = set_heads().train()
    calls = spy_on_box_rois(heads)
    heads(features(), PROPOSALS, IMAGE_SHAPES, targets())
    assert len(calls) == 3
    same_rows(calls[0][0], torch.cat([PROPOSALS[0], GT_BOXES]))
    same_rows(calls[0][1], PROPOSALS[1])
    right, down = moved(PROPOSALS[0][:1], dx=0.1), moved(PROPOSALS[0][1:], dy=0.1)
    same_rows(calls[1][0], torch.cat([right, down, GT_BOXES]))
    same_rows(calls[1][1], moved(PROPOSALS[1], dy=0.1))
    # stage 1 moves nothing (zero deltas): stage 2 sees its RoIs without the ground truth's copies, and those again
    same_rows(calls[2][0], torch.cat([right, down, GT_BOXES]))


def test_no_gradient_flows_through_the_refined_boxes():
    """The later stages' losses (GIoU of boxes decoded from the moved RoIs included) leave the stage
    that moved those RoIs without gradient; its own loss reaches it."""
    torch.manual_seed(0)
    heads = set_heads().train()
    losses = heads(features(), PROPOSALS, IMAGE_SHAPES, targets())[1]
    later = sum(value for name, value in losses.items() if not name.endswith('_0'))
    later.backward(retain_graph=True)
    first_stage = list(heads.box_heads[0].parameters()) + list(heads.box_predictors[0].parameters())
    assert all(parameter.grad is None for parameter in first_stage)
    assert heads.box_predictors[1].bbox_pred.bias.grad.abs().sum() > 0
    losses['loss_box_giou_0'].backward()
    assert heads.box_predictors[0].bbox_pred.bias.grad.abs().sum() > 0


def test_stage_losses_are_weighted_1_05_025():
    """Every loss of stage t is stage_loss_weights[t] times the unweighted one (same samples)."""
    found = {}
    for weights in ((1.0, 0.5, 0.25), (1.0, 1.0, 1.0)):
        torch.manual_seed(0)
        found[weights] = set_heads(weights).train()(features(), PROPOSALS, IMAGE_SHAPES, targets())[1]
    weighted, plain = found.values()
    assert sorted(weighted) == sorted(f'loss_{kind}_{stage}' for kind in ('classifier', 'box_giou', 'mask')
                                      for stage in range(3))
    for name, value in weighted.items():
        assert plain[name] > 0, name
        assert value.item() == pytest.approx([1.0, 0.5, 0.25][int(name[-1])] * plain[name].item(), rel=1e-6), name


def test_detections_average_the_stages_logits_and_masks_and_take_the_last_stages_boxes():
    """At evaluation each proposal moves down by stage 0 (its best foreground class is 2) and not by
    stage 1; class 2's box is then doubled in width by stage 2. Scores are the softmax of the three
    stages' logits averaged; masks the three mask heads' probabilities averaged."""
    heads = set_heads().eval()
    with torch.no_grad():
        detections, losses = heads(features(), PROPOSALS, IMAGE_SHAPES)
    assert losses == {}
    scores = torch.softmax(torch.tensor(LOGITS).mean(0), 0)
    mask = sum(torch.sigmoid(torch.tensor(logit)) for logit in MASK_LOGITS) / 3
    for proposals, found in zip(PROPOSALS, detections):
        assert found['labels'].tolist() == [2] * len(proposals) + [1] * len(proposals)
        torch.testing.assert_close(found['scores'], scores[found['labels']])
        down = moved(proposals, dy=0.1)
        centre, width = (down[:, 0] + down[:, 2]) / 2, down[:, 2] - down[:, 0]
        wide = torch.stack([centre - width, down[:, 1], centre + width, down[:, 3]], 1).clamp(0, 64)
        same_rows(found['boxes'][:len(proposals)], wide)
        same_rows(found['boxes'][len(proposals):], down)
        assert found['masks'].shape == (2 * len(proposals), 1, 28, 28)
        torch.testing.assert_close(found['masks'], torch.full_like(found['masks'], mask.item()))


# ---------------------------------------------------------------------------------------------
# The recipes
# ---------------------------------------------------------------------------------------------
DETECTION_CONFIGS = os.path.join(REPO, 'configs', 'detection')


def load_config(cfg, data='', *opts, **flags):
    return get_config(argparse.Namespace(cfg=cfg, data_path=data, opts=list(opts), **flags))


def test_tiny_recipe_builds_the_papers_87m_model_and_the_sizes_share_its_recipe():
    """The Focal-T 3x recipe's detector (81 classes: COCO's 80 and the background, 3 x 4conv1fc box
    heads, class-specific boxes, 3 mask heads) is within 1.5M of the paper's 87M parameters; the
    three sizes train 36 epochs divided at 27 and 33, with Swin's crop policy and the stages' facts."""
    config = load_config(os.path.join(DETECTION_CONFIGS, 'cascade_mask_rcnn_focal_tiny_3x.yaml'))
    model = build_task(config).build_model(config)
    count = sum(parameter.numel() for parameter in model.parameters())
    assert abs(count / 1e6 - 87) < 1.5, count
    assert len(model.roi_heads.box_heads) == len(model.roi_heads.mask_heads) == 3
    for size in ('tiny', 'small', 'base'):
        recipe = load_config(os.path.join(DETECTION_CONFIGS, f'cascade_mask_rcnn_focal_{size}_3x.yaml'))
        detection = recipe.MODEL.DETECTION
        assert (recipe.MODEL.NAME, detection.DETECTOR) == (f'cascade_mask_rcnn_focal_{size}_3x', 'cascade_mask_rcnn')
        assert (recipe.TRAIN.EPOCHS, recipe.TRAIN.LR_SCHEDULER.MILESTONES) == (36, [27, 33])
        assert (recipe.TRAIN.BASE_LR, recipe.TRAIN.WEIGHT_DECAY, recipe.TRAIN.BASE_BATCH_SIZE) == (1e-4, 0.05, 16)
        assert recipe.AUG.DET_CROP_MIN_SIZES == [400, 500, 600] and recipe.MODEL.FOCAL.FOCAL_WINDOWS == [15, 13, 9, 7]
        assert (detection.ROI_SAMPLES, detection.PROPOSALS, detection.CASCADE.BOX_HEAD_CONVS) == (512, [2000, 1000], 4)
        assert detection.CASCADE.IOU_THRESHOLDS == [0.5, 0.6, 0.7]
        assert detection.CASCADE.STAGE_LOSS_WEIGHTS == [1.0, 0.5, 0.25]


@pytest.mark.parametrize('opts, message', [
    (('MODEL.DETECTION.CASCADE.IOU_THRESHOLDS', '[0.5, 0.6]'), r"must have one entry per stage"),
    (('MODEL.DETECTION.CASCADE.BOX_CODER_WEIGHTS', '[[10, 10, 5], [20, 20, 10, 10], [30, 30, 15, 15]]'),
     r"each box-coder entry 4 weights"),
    (('MODEL.DETECTION.DETECTOR', 'mask_rcnn', 'MODEL.DETECTION.CASCADE.GIOU_LOSS_WEIGHT', '2.0'),
     r"'MODEL\.DETECTION\.CASCADE\.GIOU_LOSS_WEIGHT' in --opts is not read by MODEL\.DETECTION\.DETECTOR 'mask_rcnn'"),
])
def test_bad_cascade_settings_are_one_line(opts, message):
    with pytest.raises(ConfigError, match=message):
        load_config(os.path.join(DETECTION_CONFIGS, 'cascade_mask_rcnn_focal_micro_digits.yaml'), '', *opts)


# Two processes, each with batch-norm statistics of its own (its rank), then broadcast_batch_norm_statistics
SHARE_STATISTICS = """\
import os, sys
import torch
import torch.distributed as dist
from distributed import broadcast_batch_norm_statistics
dist.init_process_group('gloo')
rank = dist.get_rank()
head = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU())
head[1].running_mean.fill_(rank)
head[1].running_var.fill_(rank + 1)
head[1].num_batches_tracked.fill_(rank + 10)
broadcast_batch_norm_statistics(head)
torch.save(head.state_dict(), os.path.join(sys.argv[1], f'{rank}.pt'))
dist.destroy_process_group()
"""


def test_every_process_evaluates_with_rank_0s_batch_norm_statistics(tmp_path):
    """Without SyncBN (CPU, gloo) each process's box heads keep their own statistics; before
    evaluating, every process takes rank 0's, which its checkpoint keeps (torchrun, 2 processes)."""
    script = tmp_path / 'share.py'
    script.write_text(SHARE_STATISTICS)
    result = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                             str(script), str(tmp_path)], cwd=REPO, env=dict(subprocess_env(tmp_path), PYTHONPATH=REPO),
                            capture_output=True, text=True, timeout=120)
    assert_ok(result)
    states = [torch.load(tmp_path / f'{rank}.pt', weights_only=True) for rank in (0, 1)]
    for key in ('1.running_mean', '1.running_var', '1.num_batches_tracked'):
        assert torch.equal(states[0][key], states[1][key]), key
    assert states[1]['1.running_mean'].eq(0).all() and states[1]['1.num_batches_tracked'] == 10
