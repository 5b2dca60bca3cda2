"""ATSS and Sparse R-CNN (models/detectors): ATSS's assignment on a hand-worked example; Sparse R-CNN's
Hungarian matching against brute force and its stages passing boxes on without gradient; a training step of
each on images without a box; the 3x recipes' models at the paper's sizes; their settings refused under
another detector; ATSS evaluated by two processes as by one. (A few training steps of each demo detector
lowering the loss: tests/test_detection.py.)"""
import argparse
import itertools
import os
import re

import pytest
import torch
from torchvision.ops import box_iou, generalized_box_iou

from config import ConfigError, get_config, with_classes
from helpers import REPO, assert_ok, run_main
from models.detectors.atss import atss_assign
from models.detectors.sparse_rcnn import match_predictions
from tasks import build_task
from test_detection import TINY_DETECTION, write_coco

DETECTION_CONFIGS = os.path.join(REPO, 'configs', 'detection')


def load_config(cfg, data, *opts, **flags):
    return get_config(argparse.Namespace(cfg=cfg, data_path=data, opts=list(opts), **flags))


# ---------------------------------------------------------------------------------------------
# ATSS's assignment
# ---------------------------------------------------------------------------------------------
# Two levels along one row. Level 0: four 10 px anchors a0..a3 = [0,0,10,10], [10,0,20,10], [20,0,30,10],
# [30,0,40,10], centres (5,5) (15,5) (25,5) (35,5). Level 1: two 20 px anchors b0 = [0,0,20,20] and
# b1 = [20,0,40,20], centres (10,10) (30,10). Three candidates per level (topk 3; level 1 has only two).
ANCHORS = torch.tensor([[0, 0, 10, 10], [10, 0, 20, 10], [20, 0, 30, 10], [30, 0, 40, 10],
                        [0, 0, 20, 20], [20, 0, 40, 20]], dtype=torch.float)
A0, A1, A2, A3, B0, B1 = range(6)
# A = [0,0,9,20], centre (4.5,10), area 180.
#   level 0 distances: a0 5.03, a1 11.63, a2 21.10, a3 30.91 -> a0 a1 a2; level 1: b0 5.5, b1 25.5 -> both.
#   IoUs: a0 90/190 = .4737, a1 0, a2 0, b0 180/400 = .45, b1 0.
#   mean .1847, unbiased std sqrt(.2562 / 4) = .2531, threshold .4378: a0 and b0 pass;
#   a0's centre (5,5) lies inside A, b0's (10,10) does not (x 10 > 9): A's positive is a0.
BOX_A = [0, 0, 9, 20]
# B = [2,2,12,16], centre (7,9), area 140.
#   level 0: a0 4.47, a1 8.94, a2 18.44, a3 28.28 -> a0 a1 a2; level 1: b0 3.16, b1 23.02 -> both.
#   IoUs: a0 64/176 = .3636, a1 16/224 = .0714, a2 0, b0 140/400 = .35, b1 0.
#   mean .1570, std sqrt(.1366 / 4) = .1848, threshold .3418: a0 and b0 pass, both centres inside B.
BOX_B = [2, 2, 12, 16]
# C = [20,0,36,13], centre (28,6.5), area 208.
#   level 0: a2 3.35, a3 7.16, a1 13.09, a0 23.05 -> a2 a3 a1; level 1: b1 4.03, b0 18.34 -> both.
#   IoUs: a2 100/208 = .4808, a3 60/248 = .2419, a1 0, b1 208/400 = .52, b0 0.
#   mean .2485, unbiased std sqrt(.2512 / 4) = .2506, threshold .4991: only b1 passes (centre inside C).
#   (The biased std, sqrt(.2512 / 5) = .2241, would give .4727 and let a2 in too.)
BOX_C = [20, 0, 36, 13]
# a0 is positive for A (IoU .4737) and B (.3636): the higher IoU, A, takes it. So:
#   a0 -> A, b0 -> B, b1 -> C, a1 a2 a3 background.


@pytest.mark.parametrize('order', [(0, 1, 2), (1, 0, 2), (2, 1, 0)])
def test_atss_assigns_the_hand_worked_example(order):
    """In any order of the boxes (so that neither the first nor the last box wins a shared anchor by
    position): a0 to A, b0 to B, b1 to C."""
    boxes = [BOX_A, BOX_B, BOX_C]
    matched = atss_assign(ANCHORS, [4, 2], torch.tensor([boxes[i] for i in order], dtype=torch.float), topk=3)
    index = {box: order.index(box) for box in range(3)}
    assert matched.tolist() == [index[0], -1, -1, -1, index[1], index[2]]


def test_atss_assigns_nothing_without_boxes_and_only_near_candidates():
    """No box: every anchor is background. With topk 1, B's candidates are a0 and b0 alone (threshold
    .3568 + .0096 = .3665 from their IoUs .3636 and .35): neither passes, and B gets nothing."""
    assert atss_assign(ANCHORS, [4, 2], torch.zeros(0, 4)).tolist() == [-1] * 6
    assert atss_assign(ANCHORS, [4, 2], torch.tensor([BOX_B], dtype=torch.float), topk=1).tolist() == [-1] * 6
    assert torch.allclose(box_iou(ANCHORS, torch.tensor([BOX_A, BOX_B, BOX_C], dtype=torch.float)),
                          torch.tensor([[90 / 190, 64 / 176, 0], [0, 16 / 224, 0], [0, 0, 100 / 208],
                                        [0, 0, 60 / 248], [180 / 400, 140 / 400, 0], [0, 0, 208 / 400]]))


# ---------------------------------------------------------------------------------------------
# Sparse R-CNN's Hungarian matching
# ---------------------------------------------------------------------------------------------
def reference_cost(logit, box, label, gt_box, whwh):
    """One prediction's cost for one ground truth, written out: 2 x (focal loss of the class being
    right - of it being wrong) + 5 x L1 of the boxes over the image size - 2 x GIoU."""
    p = torch.sigmoid(logit[label]).item()
    right = -0.25 * (1 - p) ** 2 * torch.log(torch.tensor(p)).item()
    wrong = -0.75 * p ** 2 * torch.log(torch.tensor(1 - p)).item()
    l1 = (box / whwh - gt_box / whwh).abs().sum().item()
    giou = generalized_box_iou(box[None], gt_box[None])[0, 0].item()
    return 2 * (right - wrong) + 5 * l1 - 2 * giou


def random_boxes(generator, count, width, height):
    corners = torch.rand(count, 2, 2, generator=generator) * torch.tensor([width, height])
    return torch.cat([corners.amin(1), corners.amax(1) + 1], dim=1)


@pytest.mark.parametrize('num_predictions, num_truths', [(5, 3), (4, 4), (6, 2), (3, 5)])
def test_hungarian_matching_is_the_cheapest_assignment(num_predictions, num_truths):
    """On 20 random problems each: the matching is one-to-one, min(P, G) pairs, and its total cost (by
    the written-out cost above) is the least over every injective assignment, found by brute force."""
    generator = torch.Generator().manual_seed(num_predictions * 10 + num_truths)
    whwh = torch.tensor([60.0, 40.0, 60.0, 40.0])
    for _ in range(20):
        logits = torch.randn(num_predictions, 5, generator=generator) * 2
        boxes = random_boxes(generator, num_predictions, 60, 40)
        labels = torch.randint(0, 5, (num_truths,), generator=generator)
        gt_boxes = random_boxes(generator, num_truths, 60, 40)
        cost = [[reference_cost(logits[p], boxes[p], labels[g], gt_boxes[g], whwh) for g in range(num_truths)]
                for p in range(num_predictions)]
        if num_predictions >= num_truths:  # each truth a distinct prediction
            best = min(sum(cost[p][g] for g, p in enumerate(chosen))
                       for chosen in itertools.permutations(range(num_predictions), num_truths))
        else:  # each prediction a distinct truth
            best = min(sum(cost[p][g] for p, g in enumerate(chosen))
                       for chosen in itertools.permutations(range(num_truths), num_predictions))
        predictions, truths = match_predictions(logits, boxes, labels, gt_boxes, whwh)
        assert len(predictions) == len(truths) == min(num_predictions, num_truths)
        assert len(set(predictions.tolist())) == len(set(truths.tolist())) == len(truths)
        assert truths.tolist() == sorted(truths.tolist())
        assert sum(cost[p][g] for p, g in zip(predictions.tolist(), truths.tolist())) == pytest.approx(best, abs=1e-4)


def test_hungarian_matching_of_non_finite_predictions_still_matches():
    """NaN or infinite logits (a diverged run) do not stop scipy: every truth is still matched, so that the
    loss, not the matcher, reports the divergence to the training loop."""
    logits = torch.tensor([[float('nan'), 0.0], [float('inf'), 1.0], [0.0, -float('inf')]])
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 20.0, 20.0], [0.0, 0.0, 30.0, 30.0]])
    predictions, truths = match_predictions(logits, boxes, torch.tensor([0, 1]), boxes[:2],
                                            torch.tensor([40.0, 40.0, 40.0, 40.0]))
    assert truths.tolist() == [0, 1] and len(set(predictions.tolist())) == 2


# ---------------------------------------------------------------------------------------------
# Training steps
# ---------------------------------------------------------------------------------------------
def demo_model_and_batch(detector, data_path):
    """The demo recipe's detector on the smallest digit scenes (32 px), seeded, in training mode, and the
    first batch of its training loader (which also sets the classes the model needs)."""
    config = load_config(os.path.join(DETECTION_CONFIGS, f'{detector}_focal_micro_digits.yaml'), str(data_path),
                         'DATA.IMG_SIZE', '32', 'DATA.MIN_SIZES', '[32]', 'DATA.TEST_MIN_SIZE', '32',
                         'DATA.MAX_SIZE', '32')
    task = build_task(config)
    loader, _, class_names = task.build_loaders(config)
    loader.sampler.set_epoch(0)
    samples, targets, _ = next(iter(loader))
    torch.manual_seed(0)
    return task, task.build_model(with_classes(config, class_names)).train(), samples, targets


@pytest.mark.parametrize('detector', ['atss', 'sparse_rcnn'])
def test_a_training_step_with_images_without_a_box(tmp_path, detector):
    """A batch where one image has no box (a crop of the 3x recipes can leave none), then one where none
    has: finite losses, and a finite gradient for every parameter, as DDP needs, even from no positive."""
    task, model, samples, targets = demo_model_and_batch(detector, tmp_path)
    empty = dict(targets[0], boxes=torch.zeros(0, 4), labels=torch.zeros(0, dtype=torch.int64))
    for batch_targets in ([empty] + targets[1:], [empty] * len(targets)):
        model.zero_grad(set_to_none=True)
        loss = task.training_loss(model, samples, batch_targets, torch.device('cpu'))
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters()
                   if p.requires_grad)


def test_sparse_rcnn_stages_refine_boxes_without_the_next_stages_gradient(tmp_path):
    """The last stage's losses reach the earlier stages through the proposal features, never through the
    boxes they pass on: the earlier stages' box branches get no gradient from it, their attention does."""
    _, model, samples, targets = demo_model_and_batch('sparse_rcnn', tmp_path)
    losses = model(samples, targets)
    last = len(model.stages) - 1
    assert sorted(losses) == sorted(f'stage{stage}_{kind}' for stage in range(last + 1)
                                    for kind in ('classification', 'l1', 'giou'))
    sum(value for key, value in losses.items() if key.startswith(f'stage{last}_')).backward()
    for stage in model.stages[:last]:
        assert all(p.grad is None or not p.grad.any() for p in stage.box_branch.parameters())
        assert stage.attention.in_proj_weight.grad.abs().sum() > 0
    assert model.stages[last].box_branch[-1].weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------------------------------
# The recipes
# ---------------------------------------------------------------------------------------------
# The paper's table (Focal-T, 3x), millions of parameters.
PAPER_PARAMETERS = {'atss': 37, 'sparse_rcnn': 111}


@pytest.mark.parametrize('detector', sorted(PAPER_PARAMETERS))
def test_tiny_recipe_has_the_papers_parameter_count(detector):
    config = load_config(os.path.join(DETECTION_CONFIGS, f'{detector}_focal_tiny_3x.yaml'), '')
    assert config.MODEL.DETECTION.DETECTOR == detector and config.TRAIN.EPOCHS == 36
    model = build_task(config).build_model(config)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 1e6 - PAPER_PARAMETERS[detector]) < 1.5, count


@pytest.mark.parametrize('detector, foreign', [('atss', ('MODEL.DETECTION.PROPOSALS', '[10, 5]')),
                                               ('atss', ('MODEL.DETECTION.SPARSE_RCNN.NUM_STAGES', '2')),
                                               ('sparse_rcnn', ('MODEL.DETECTION.ATSS.ANCHOR_SCALE', '4.0')),
                                               ('sparse_rcnn', ('MODEL.DETECTION.ANCHOR_SIZES', '[8]'))])
def test_a_setting_of_another_detector_is_refused_in_one_line(detector, foreign):
    with pytest.raises(ConfigError, match=rf"'{re.escape(foreign[0])}' in --opts is not read by "
                                          rf"MODEL\.DETECTION\.DETECTOR '{detector}'"):
        load_config(os.path.join(DETECTION_CONFIGS, f'{detector}_focal_micro_digits.yaml'), '', *foreign)


# ---------------------------------------------------------------------------------------------
# Evaluation on any number of processes
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow  # a training run and three evaluations through main.py: about 30 s on 2 cores
def test_atss_two_processes_score_what_one_does(tmp_path):
    """A micro ATSS trained two epochs through main.py; --eval --resume of it under torchrun (2 processes,
    5 val images split 3 + 2) logs the same COCO table and detection count as one process."""
    data = write_coco(tmp_path / 'coco')
    cfg = tmp_path / 'tiny_atss.yaml'
    cfg.write_text(TINY_DETECTION.replace('  NAME: tiny_mask_rcnn', '  NAME: tiny_atss').replace(
        '    FPN_CHANNELS: 16\n    BOX_HEAD_WIDTH: 32\n    MASK_HEAD_LAYERS: 1\n    ROI_SAMPLES: 16\n'
        '    PROPOSALS: [50, 30]\n    ANCHOR_SIZES: [8, 16, 32, 64, 128]\n',
        '    DETECTOR: atss\n    FPN_CHANNELS: 64\n    ATSS:\n      ANCHOR_SCALE: 2.0\n'))
    output = str(tmp_path / 'train')
    assert_ok(run_main(tmp_path, ['--cfg', str(cfg), '--data-path', data, '--output', output]))
    checkpoint = os.path.join(output, 'tiny_atss', 'default', 'ckpt_epoch_1.pth')
    summaries = []
    for nproc in (1, 2):
        result = run_main(tmp_path, ['--cfg', str(cfg), '--data-path', data, '--eval', '--resume', checkpoint,
                                     '--output', str(tmp_path / f'eval_{nproc}')], nproc=nproc)
        assert_ok(result)
        summaries.append([line.split('INFO ')[-1] for line in result.stdout.splitlines()
                          if 'Average' in line or ' * bbox AP' in line or 'detections on' in line])
    assert len(summaries[0]) == 14 and summaries[0] == summaries[1]
    found, images = re.search(r'COCO bbox: (\d+) detections on (\d+) images', '\n'.join(summaries[0])).groups()
    assert int(found) > 0 and images == '5'
