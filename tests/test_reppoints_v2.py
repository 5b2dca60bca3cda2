"""RepPointsV2 (models.detectors.reppoints_v2): corner pooling against a loop, the point-to-box
conversion, the three assigners and the foreground targets on hand-worked examples, the losses
against torchvision's focal loss and by hand, the damped gradient of the points, the test-time
corner snapping on constructed heatmaps, the recipe's size, and a few training steps on the
demo scenes through the task."""
import argparse
import math
import os

import pytest
import torch
from torchvision.ops import sigmoid_focal_loss

from config import ConfigError, get_config, with_classes
from helpers import REPO
from models.detectors import reppoints_v2
from models.detectors.atss import atss_assign
from models.detectors.reppoints_v2 import (CORNERS, RepPointsV2Head, corner_heatmap_targets,
                                           corner_pool, foreground_targets, gaussian_radius, level_points,
                                           point_assign, points_to_boxes, quality_focal_loss, snap_to_corners)
from tasks import build_task
from tasks.detection import Detection

DETECTION_CONFIGS = os.path.join(REPO, 'configs', 'detection')


def load_config(cfg, *opts, data_path=''):
    return get_config(argparse.Namespace(cfg=cfg, data_path=data_path, opts=list(opts)))


# ---------------------------------------------------------------------------------------------
# Geometry
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('corner', CORNERS)
def test_corner_pool_is_the_running_maximum_towards_the_object(corner):
    """Top-left: the maximum of the first map over the pixel and those below it plus the maximum
    of the second over the pixel and those to its right; bottom-right: above and to the left."""
    torch.manual_seed(0)
    vertical, horizontal = torch.randn(2, 3, 5, 6), torch.randn(2, 3, 5, 6)
    expected = torch.empty_like(vertical)
    for row in range(5):
        for col in range(6):
            rows = slice(row, None) if corner == 'top_left' else slice(0, row + 1)
            cols = slice(col, None) if corner == 'top_left' else slice(0, col + 1)
            expected[..., row, col] = (vertical[..., rows, col].amax(dim=-1)
                                       + horizontal[..., row, cols].amax(dim=-1))
    assert torch.equal(corner_pool(vertical, horizontal, corner), expected)


def test_points_to_boxes_reads_the_first_two_points_as_corners():
    """'exact_minmax': (y, x) pairs; the first point is the top-left, the second the bottom-right,
    whatever the other seven points are."""
    points = torch.tensor([[1., 2., 5., 7.] + [100., -100.] * 7,
                           [-3., -4., 0.5, 2.5] + [0., 0.] * 7])
    assert torch.equal(points_to_boxes(points), torch.tensor([[2., 1., 7., 5.], [-4., -3., 2.5, 0.5]]))
    # the head's maps (N, 18, H, W) read the same way after moving the points last
    maps = points.t().reshape(1, 18, 1, 2)
    assert torch.equal(points_to_boxes(maps.permute(0, 2, 3, 1)).reshape(2, 4), points_to_boxes(points))


def test_level_points_sit_at_the_top_left_of_their_cells():
    xy, strides, levels = level_points([(2, 3), (1, 2)], [8, 16], 'cpu')
    assert xy.tolist() == [[0, 0], [8, 0], [16, 0], [0, 8], [8, 8], [16, 8], [0, 0], [16, 0]]
    assert strides.tolist() == [8] * 6 + [16] * 2 and levels.tolist() == [0] * 6 + [1] * 2


# ---------------------------------------------------------------------------------------------
# Assigners and targets
# ---------------------------------------------------------------------------------------------
def test_point_assign_picks_the_level_by_size_and_the_nearest_location():
    """A 4x4 level of stride 8 and a 2x2 level of stride 16. A (12 px) belongs on stride 8
    (level int(log2(3)) = 1, clipped up to 3) at its centre (8, 8), location 5; B (64 px, level 4)
    at (16, 16) of stride 16, location 19; C (100x60, level 4) also nearest at (16, 16), but B is
    nearer there in units of the boxes' sizes (0.35 against 0.41), so C gets nothing; D (2 px,
    level -1 clipped to 3) at (24, 24), location 15."""
    points, strides, _ = level_points([(4, 4), (2, 2)], [8, 16], 'cpu')
    gt_boxes = torch.tensor([[2., 2., 14., 14.], [0., 0., 64., 64.], [0., 0., 100., 60.], [20., 20., 22., 22.]])
    expected = torch.full((20,), -1)
    expected[5], expected[19], expected[15] = 0, 1, 3
    assert torch.equal(point_assign(points, strides, gt_boxes), expected)
    assert torch.equal(point_assign(points, strides, gt_boxes[:0]), torch.full((20,), -1))


def test_atss_assign_thresholds_at_mean_plus_std_and_gives_a_shared_box_the_higher_iou():
    """Two levels of two boxes, top 2 per level. gt0 = [0,0,10,10]: candidate IoUs 1, 0, 0.111, 0:
    threshold 0.278 + 0.484 = 0.762, so only box 0 is positive; gt1 = [0,0,10,11]: IoUs 0.909, 0,
    0.122, 0: threshold 0.258 + 0.438 = 0.696, box 0 again; box 0 goes to gt0 (IoU 1 > 0.909),
    whichever order the boxes come in."""
    boxes = torch.tensor([[0., 0., 10., 10.], [30., 30., 40., 40.], [0., 0., 30., 30.], [50., 50., 80., 80.]])
    gt_boxes = torch.tensor([[0., 0., 10., 10.], [0., 0., 10., 11.]])
    assert atss_assign(boxes, [2, 2], gt_boxes, topk=2).tolist() == [0, -1, -1, -1]
    assert atss_assign(boxes, [2, 2], gt_boxes.flip(0), topk=2).tolist() == [1, -1, -1, -1]
    # a level with fewer boxes than topk repeats them; gt0's candidates: [0,0,10,10] (IoU 1) and
    # [0,0,12,12] (0.694) on the first level, [0,0,16,16] (0.391) twice on the second: threshold
    # 0.619 + 0.292 = 0.911; gt1 = [0,0,12,12] likewise takes box 1 alone
    boxes = torch.tensor([[0., 0., 10., 10.], [0., 0., 12., 12.], [40., 40., 50., 50.], [0., 0., 16., 16.]])
    gt_boxes = torch.tensor([[0., 0., 10., 10.], [0., 0., 12., 12.]])
    repeat = dict(topk=2, repeat_short_levels=True)  # RepPointsV2's refinement assigner
    assert atss_assign(boxes, [3, 1], gt_boxes, **repeat).tolist() == [0, 1, -1, -1]
    assert atss_assign(boxes, [3, 1], gt_boxes[:1], **repeat).tolist() == [0, -1, -1, -1]  # 0.694 < 0.911
    assert atss_assign(boxes, [3, 1], gt_boxes[:0], **repeat).tolist() == [-1] * 4
    # the repeat decides: IoUs 1, 0.8 and 0.1 give a threshold of 0.633 + 0.473 = 1.106 (no positive);
    # 1, 0.8, 0.1, 0.1 give 0.5 + 0.469 = 0.969, which box 0 reaches
    boxes = torch.tensor([[0., 0., 10., 10.], [0., 0., 10., 12.5], [40., 40., 50., 50.], [0., 0., 40., 25.]])
    assert atss_assign(boxes, [3, 1], gt_boxes[:1], topk=2).tolist() == [-1] * 4
    assert atss_assign(boxes, [3, 1], gt_boxes[:1], **repeat).tolist() == [0, -1, -1, -1]


def test_atss_assign_needs_the_box_centre_inside_the_ground_truth():
    """gt [0,0,10,10]; candidates [-10,0,10,10] (IoU 0.5, its centre on the gt's left edge),
    [0,0,3,10] (0.3) and two far boxes (0): threshold 0.2 + 0.245 = 0.445, which only the first
    reaches, and its centre is not inside by more than 0.01: no positive."""
    boxes = torch.tensor([[-10., 0., 10., 10.], [0., 0., 3., 10.], [40., 40., 50., 50.], [60., 60., 70., 70.]])
    assert atss_assign(boxes, [2, 2], torch.tensor([[0., 0., 10., 10.]]), topk=2).tolist() == [-1] * 4


def test_gaussian_radius_is_cornernets():
    """A 100x100 box at IoU 0.7: the three cases give 9.25, 8.17 and 9.76; the smallest wins."""
    radius = gaussian_radius(torch.tensor([100.]), torch.tensor([100.]), 0.7)
    assert radius.item() == pytest.approx(8.1670, abs=1e-3)


def test_corner_heatmap_targets_peak_at_the_nearest_location_with_offsets_in_strides():
    """Box [3, 2, 103, 102] on a 14x14 level of stride 8: the top-left corner (3, 2) is nearest
    location (0, 0), offset (0.375, 0.25); the bottom-right (103, 102) nearest (104, 104), offset
    (-0.125, -0.25); the locations within the radius (8.17 px for 100x100) of a corner get
    exp(-d^2 / 2 sigma^2), sigma = (2 radius + 1) / 6: (8, 0), 5.39 px from the top-left, gets
    exp(-29 / 16.69) = 0.176; the rest 0."""
    points, strides, levels = level_points([(14, 14)], [8], 'cpu')
    box = torch.tensor([[3., 2., 103., 102.]])
    heat, offsets, peaks = corner_heatmap_targets(points, strides, levels, box)
    assert peaks[:, 0].nonzero().flatten().tolist() == [0] and peaks[:, 1].nonzero().flatten().tolist() == [195]
    assert offsets[0].tolist() == [0.375, 0.25, 0, 0] and offsets[195].tolist() == [0, 0, -0.125, -0.25]
    assert offsets.abs().sum() == 1.0
    assert heat[1, 0].item() == pytest.approx(0.1761, abs=1e-3)
    radius = gaussian_radius(torch.tensor([100.]), torch.tensor([100.]))
    sigma = (2 * radius + 1) / 6
    # around the top-left: (8, 0), (0, 8), (8, 8); around the bottom-right: (96, 104), (104, 96)
    for column, (corner, peak, bumps) in enumerate((([3., 2.], 0, 3), ([103., 102.], 195, 2))):
        distances = (points - torch.tensor(corner)).norm(dim=1)
        expected = torch.where(distances < radius, torch.exp(-distances ** 2 / (2 * sigma ** 2)), 0.)
        expected[peak] = 1
        assert torch.allclose(heat[:, column], expected)
        assert ((heat[:, column] > 0) & (heat[:, column] < 1)).sum() == bumps


def test_foreground_targets_mark_the_cells_of_each_box_weighted_by_the_smaller_area():
    """Stride 8: box [4, 4, 20, 12] covers cells x 0..2, y 0..1; box [8, 8, 16, 16] (smaller,
    same class) cells 1..2 both ways and wins the weight where they overlap; another class's
    box its own channel."""
    boxes = torch.tensor([[4., 4., 20., 12.], [8., 8., 16., 16.], [24., 24., 31., 31.]])
    target, weights = foreground_targets(boxes, torch.tensor([1, 1, 2]), 3, (4, 4))
    expected = torch.zeros(3, 4, 4)
    expected[1, 0:2, 0:3] = 1
    expected[1, 1:3, 1:3] = 1
    expected[2, 3, 3] = 1
    assert torch.equal(target, expected)
    assert weights[1, 0, 0] == 1 / 128 and weights[1, 1, 1] == 1 / 64 and weights[1, 2, 2] == 1 / 64
    assert weights[2, 3, 3] == 1 / 49 and weights[0].sum() == 0


# ---------------------------------------------------------------------------------------------
# Losses and the damped gradient
# ---------------------------------------------------------------------------------------------
def test_quality_focal_loss_is_torchvisions_focal_loss_at_quality_one_and_scales_by_the_gap():
    torch.manual_seed(0)
    logits = torch.randn(6, 4)
    labels = torch.tensor([-1, 2, 0, -1, 3, 1])
    one_hot = torch.zeros(6, 4)
    one_hot[[1, 2, 4, 5], [2, 0, 3, 1]] = 1
    expected = sigmoid_focal_loss(logits, one_hot, alpha=-1, gamma=2, reduction='sum')
    assert torch.allclose(quality_focal_loss(logits, labels, torch.ones(6)), expected)
    # one positive of quality 0.3 at logit 0 (p = 0.5): BCE(0.5 -> 0.3) times 0.2 ** 2
    single = quality_focal_loss(torch.zeros(1, 1), torch.tensor([0]), torch.tensor([0.3]))
    assert single.item() == pytest.approx(-(0.3 * math.log(0.5) + 0.7 * math.log(0.5)) * 0.04, rel=1e-6)


def test_deformable_convolutions_pass_a_tenth_of_the_gradient_to_the_initial_points(monkeypatch):
    """The classification's gradient reaching the initial points' layer is 0.1 of what it is
    without the damping (the initial points' own loss is untouched)."""
    torch.manual_seed(0)
    head = RepPointsV2Head(5, channels=32, stacked_convs=1, corner_channels=32)
    torch.nn.init.normal_(head.points_init_out.weight, std=0.3)  # points a few cells away: a real gradient
    features = torch.randn(1, 32, 6, 6)

    def points_gradient():
        head.zero_grad()
        head.forward_level(features)['cls'].pow(2).sum().backward()
        return head.points_init_out.bias.grad.clone()

    damped = points_gradient()
    monkeypatch.setattr(reppoints_v2, 'GRADIENT_MUL', 1.0)
    full = points_gradient()
    assert full.abs().sum() > 0 and torch.allclose(damped, 0.1 * full, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Test time
# ---------------------------------------------------------------------------------------------
def test_snap_to_corners_moves_each_corner_to_the_peak_of_its_2x2_cells_plus_its_offset():
    """A 4x4 heatmap of stride 8. The top-left map peaks at (row 1, col 2) with offset (+0.25,
    -0.5): a corner at (13, 10) (cells 1..2 both ways) snaps to ((2 + 0.25) * 8, (1 - 0.5) * 8) =
    (18, 4); corners at (2, 2) and at (4.8, 4.8) (0.6 of a cell: the floor, not the nearest cell)
    see cells 0..1 only and snap to their best, (0, 0). The
    bottom-right map peaks at (3, 3), offset (+0.5, +0.5), which lands outside a 28 px image and
    is clipped to it."""
    heatmaps = torch.full((2, 4, 4), -5.)
    offsets = torch.zeros(4, 4, 4)
    heatmaps[0, 1, 2], heatmaps[0, 0, 0] = 3., 1.
    offsets[0:2, 1, 2] = torch.tensor([0.25, -0.5])
    heatmaps[1, 3, 3], heatmaps[1, 2, 1] = 2., 1.
    offsets[2:4, 3, 3] = torch.tensor([0.5, 0.5])
    boxes = torch.tensor([[13., 10., 27., 26.], [2., 2., 9., 17.], [4.8, 4.8, 27., 26.]])
    snapped = snap_to_corners(boxes, heatmaps, offsets, 8, (28, 28))
    assert snapped.tolist() == [[18., 4., 28., 28.], [0., 0., 8., 16.], [0., 0., 28., 28.]]
    # a map of one row leaves the boxes alone
    assert torch.equal(snap_to_corners(boxes, heatmaps[:, :1], offsets[:, :1], 8, (28, 28)), boxes)


def test_detect_snaps_boxes_from_p4_up_to_p3s_corners_and_leaves_p3s_boxes():
    """Constructed head outputs for a 64x64 image: one confident location on P3 and one on P4,
    each with a box [10, 12, 30, 36] from its refined points; P3's heatmaps peak at cells next to
    those corners with offsets. The P4 detection takes the snapped corners, the P3 one its own."""
    sizes = [(8, 8), (4, 4), (2, 2), (1, 1), (1, 1)]
    outputs = [{'cls': torch.full((1, 3, h, w), -9.), 'points_refine': torch.zeros(1, 18, h, w),
                'heatmaps': torch.full((1, 2, h, w), -9.), 'offsets': torch.zeros(1, 4, h, w)}
               for h, w in sizes]
    box = torch.tensor([10., 12., 30., 36.])
    for level, (row, col), label in ((0, (2, 2), 1), (1, (1, 1), 2)):
        stride = reppoints_v2.POINT_STRIDES[level]
        outputs[level]['cls'][0, label, row, col] = 5.
        x1, y1, x2, y2 = ((box - torch.tensor([col, row, col, row]) * stride) / stride).tolist()
        outputs[level]['points_refine'][0, :4, row, col] = torch.tensor([y1, x1, y2, x2])
    p3 = outputs[0]
    p3['heatmaps'][0, 0, 2, 1], p3['heatmaps'][0, 1, 4, 4] = 4., 4.  # cells (x 8, y 16), (x 32, y 32)
    p3['offsets'][0, 0:2, 2, 1] = torch.tensor([0.25, -0.25])
    p3['offsets'][0, 2:4, 4, 4] = torch.tensor([-0.25, 0.5])
    head = RepPointsV2Head(3, channels=32, stacked_convs=1, corner_channels=32)
    found = head.detect(outputs, [(64, 64)], topk_candidates=1000, score_thresh=0.05, nms_thresh=0.6,
                        detections_per_img=100)[0]
    by_label = dict(zip(found['labels'].tolist(), found['boxes'].tolist()))
    assert sorted(by_label) == [1, 2] and found['scores'].min() > 0.99
    assert by_label[1] == pytest.approx(box.tolist())
    assert by_label[2] == pytest.approx([10., 14., 30., 36.])


# ---------------------------------------------------------------------------------------------
# Configuration, recipe size, training through the task
# ---------------------------------------------------------------------------------------------
def test_recipe_builds_the_papers_45m_model():
    """The tiny 3x recipe (Focal-T with the detection focal windows, BiFPN 256 x 2 repeats, the
    head of Swin's config) within 1.5M of the paper's 45M; small and base are the same detector."""
    config = load_config(os.path.join(DETECTION_CONFIGS, 'reppoints_v2_focal_tiny_3x.yaml'))
    assert config.MODEL.FOCAL.FOCAL_WINDOWS == [15, 13, 9, 7] and config.MODEL.NUM_CLASSES == 81
    assert config.DATA.MIN_SIZES == list(range(480, 961, 32)) and config.AUG.DET_CROP_MIN_SIZES == []
    assert (config.TRAIN.EPOCHS, config.TRAIN.LR_SCHEDULER.MILESTONES) == (36, [27, 33])
    model = Detection(config).build_model(config)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 1e6 - 45) < 1.5, count
    for size, depths in (('small', [2, 2, 18, 2]), ('base', [2, 2, 18, 2])):
        other = load_config(os.path.join(DETECTION_CONFIGS, f'reppoints_v2_focal_{size}_3x.yaml'))
        assert other.MODEL.DETECTION.DETECTOR == 'reppoints_v2' and other.MODEL.FOCAL.DEPTHS == depths


def test_the_fpn_neck_and_the_kaiming_classifier_init_are_config_choices():
    """MODEL.DETECTION.REPPOINTS_V2.NECK 'fpn' gives the head P3-P7 of torchvision's FPN with P6 from
    the last stage's map; CLASSIFIER_INIT 'kaiming' starts the deformable classification convolution
    at He's scale, sqrt(2 / fan out), where 'normal' starts it at std 0.01; other values are named."""
    config = load_config(os.path.join(DETECTION_CONFIGS, 'reppoints_v2_focal_micro_digits.yaml'))
    assert (config.MODEL.DETECTION.REPPOINTS_V2.NECK, config.MODEL.DETECTION.REPPOINTS_V2.CLASSIFIER_INIT) == \
        ('fpn', 'kaiming')
    torch.manual_seed(0)
    model = Detection(config).build_model(config)
    fpn = model.backbone.fpn
    assert fpn.extra_blocks.p6.in_channels == 256 and fpn.extra_blocks.p6.out_channels == 64
    levels = model.backbone(torch.zeros(1, 3, 256, 256))
    assert [tuple(level.shape[-2:]) for level in levels.values()] == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2)]
    weight = model.head.cls_conv.weight
    assert weight.std().item() == pytest.approx(math.sqrt(2 / (weight.shape[0] * 9)), rel=0.05)
    assert RepPointsV2Head(3, channels=64).cls_conv.weight.std().item() == pytest.approx(0.01, rel=0.05)
    with pytest.raises(ValueError, match=r"classifier_init must be one of \('normal', 'kaiming'\), got 'he'"):
        RepPointsV2Head(3, channels=64, classifier_init='he')
    with pytest.raises(ConfigError, match=r"'MODEL.DETECTION.REPPOINTS_V2.NECK' must be one of \['bifpn', 'fpn'\], "
                                          r"got 'pafpn'"):
        load_config(None, 'TASK', 'detection', 'MODEL.DETECTION.DETECTOR', 'reppoints_v2',
                    'MODEL.DETECTION.REPPOINTS_V2.NECK', 'pafpn')


@pytest.mark.parametrize('detector, key, value', [('reppoints_v2', 'MODEL.DETECTION.ROI_SAMPLES', '64'),
                                                  ('mask_rcnn', 'MODEL.DETECTION.REPPOINTS_V2.STACKED_CONVS', '1')])
def test_a_key_the_detector_does_not_read_is_named(detector, key, value):
    with pytest.raises(ConfigError, match=rf"'{key}' in --opts is not read by MODEL.DETECTION.DETECTOR '{detector}'"):
        load_config(None, 'TASK', 'detection', 'MODEL.DETECTION.DETECTOR', detector, key, value)
    # at its default it changes nothing (a run's dumped config.yaml holds every key)
    default = get_config(None)
    for part in key.split('.'):
        default = default[part]
    load_config(None, 'TASK', 'detection', 'MODEL.DETECTION.DETECTOR', detector, key, str(default))


@pytest.fixture(scope='module')
def demo_batch(tmp_path_factory):
    """The demo config at 32 px and its first training batch (the digit scenes written once)."""
    config = load_config(os.path.join(DETECTION_CONFIGS, 'reppoints_v2_focal_micro_digits.yaml'),
                         'DATA.IMG_SIZE', '32', 'DATA.MIN_SIZES', '[32]', 'DATA.TEST_MIN_SIZE', '32',
                         'DATA.MAX_SIZE', '32', data_path=str(tmp_path_factory.mktemp('scenes')))
    task = build_task(config)
    loader, _, class_names = task.build_loaders(config)
    loader.sampler.set_epoch(0)
    samples, targets, _ = next(iter(loader))
    return with_classes(config, class_names), task, samples, targets


def test_a_few_training_steps_on_the_demo_scenes_lower_the_losses(demo_batch):
    """Eight steps on one batch of the demo scenes: the points, corner and foreground losses all
    fall, each box loss and the offsets' by a tenth or more. (The classification loss rises: its
    targets are the IoUs of the refined boxes, which start near 0 and grow.)"""
    config, task, samples, targets = demo_batch
    torch.manual_seed(0)
    model = task.build_model(config)
    assert config.MODEL.NUM_CLASSES == 11 and model.head.cls_out.out_channels == 11
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    history = []
    for _ in range(8):
        images = list(samples)
        losses = model(images, [dict(target) for target in targets])
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
        history.append({name: value.item() for name, value in losses.items()})
    first, last = history[0], history[-1]
    for name in ('loss_heatmap', 'loss_sem'):
        assert last[name] < first[name], (name, history)
    for name in ('loss_pts_init', 'loss_pts_refine', 'loss_offset'):
        assert last[name] < 0.9 * first[name], (name, history)


def test_an_image_without_a_box_trains_every_parameter_and_eval_gives_torchvisions_format(demo_batch):
    """A batch of one image with boxes and one without (a crop that kept none): finite losses and
    a gradient (zero where no positive reaches it) for every parameter, as DDP needs; in eval mode
    boxes inside each image, labels and scores, at most DETECTIONS_PER_IMAGE."""
    config, task, samples, targets = demo_batch
    torch.manual_seed(0)
    model = task.build_model(config)
    model.train()
    empty = {'boxes': torch.zeros(0, 4), 'labels': torch.zeros(0, dtype=torch.long), 'image_id': 0}
    for batch in ([targets[0], empty], [empty, empty]):
        model.zero_grad()
        losses = model(list(samples[:2]), [dict(target) for target in batch])
        sum(losses.values()).backward()
        assert all(torch.isfinite(value) for value in losses.values()), losses
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():  # one image a call, as the evaluation runs: P6 and P7 are 1x1
        found = [model([image])[0] for image in (samples[0], samples[1][:, :24, :20])]
    for output, (height, width) in zip(found, [(32, 32), (24, 20)]):
        assert set(output) == {'boxes', 'labels', 'scores'} and len(output['boxes']) <= 20
        assert (output['boxes'] >= 0).all() and (output['boxes'][:, [0, 2]] <= width).all()
        assert (output['boxes'][:, [1, 3]] <= height).all()


def test_a_training_step_under_bfloat16_autocast(demo_batch):
    """--amp on the CPU: bfloat16 autocast through the backbone and head (the deformable
    convolutions in float32, which torchvision's CPU kernel needs) gives finite float32 losses and
    gradients."""
    config, task, samples, targets = demo_batch
    # The BiFPN neck: the demo's FPN computes P7 with a 3x3 stride-2 convolution of a 1x1 P6, whose
    # weight gradient PyTorch's CPU bf16 convolution leaves non-finite for about half the seeds (the
    # taps that read only padding)
    config = config.clone()
    config.defrost()
    config.MODEL.DETECTION.REPPOINTS_V2.NECK = 'bifpn'
    config.freeze()
    torch.manual_seed(0)
    model = task.build_model(config)
    model.train()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        losses = model(list(samples[:2]), [dict(target) for target in targets[:2]])
    sum(losses.values()).backward()
    assert all(value.dtype == torch.float32 and torch.isfinite(value) for value in losses.values()), losses
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
