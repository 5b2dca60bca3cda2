"""Dense prediction through other libraries: segmentation_models_pytorch's UPerNet with the
`tu-focal_*` encoder, and torchvision's Mask R-CNN / RetinaNet / FCOS on `models.detection`'s
backbone. Each trains a few steps on generated images of shapes (with their masks and boxes) and its
loss falls; a released-format classification checkpoint loads into the backbone strictly."""
import copy

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from torchvision.models.detection import FCOS, MaskRCNN, RetinaNet
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

import models  # noqa: F401  (registers the focal models with timm)
from helpers import TIMM_NAME, TIMM_TINY_ARCH
from models.backbone import load_pretrained, no_weight_decay_names
from models.detection import LastLevelP6P7, focal_fpn_backbone
from optimizer import parameter_groups

# (class id, colour) of the shapes: 1 disc, 2 square.
SHAPE_COLOURS = {1: (220, 60, 40), 2: (40, 200, 60)}


def shapes_scene(height, width, rng, max_objects=3):
    """(image (3, H, W) in [0, 1], class map (H, W), [(class id, instance mask)]) of discs and
    squares on noise. Later shapes cover earlier ones; every returned mask is non-empty."""
    image = rng.uniform(0, 0.35, (height, width, 3))
    instances = np.zeros((height, width), dtype=np.int64)
    classes = []
    rows, cols = np.mgrid[:height, :width]
    for index in range(1, rng.integers(1, max_objects + 1) + 1):
        label = int(rng.integers(1, 3))
        size = rng.uniform(0.12, 0.3) * min(height, width)
        centre_row, centre_col = rng.uniform(size, height - size), rng.uniform(size, width - size)
        if label == 1:
            inside = (rows - centre_row) ** 2 + (cols - centre_col) ** 2 < size ** 2
        else:
            inside = (abs(rows - centre_row) < size) & (abs(cols - centre_col) < size)
        instances[inside] = index
        image[inside] = np.array(SHAPE_COLOURS[label]) / 255 + rng.uniform(-0.1, 0.1, 3)
        classes.append(label)
    objects = [(label, instances == index) for index, label in enumerate(classes, start=1)
               if (instances == index).any()]
    class_map = np.zeros_like(instances)
    for label, mask in objects:
        class_map[mask] = label
    image = torch.from_numpy(image.clip(0, 1).transpose(2, 0, 1)).float()
    return image, torch.from_numpy(class_map), objects


def released_format_checkpoint(path, **arch):
    """Save a classifier's weights as the released files hold them: under 'model', with head.*,
    norm.* and the reference's integer index buffers (which no model of ours has)."""
    classifier = timm.create_model(TIMM_NAME, **arch)
    state = classifier.state_dict()
    block = 'layers.0.blocks.0.attn.'
    state[block + 'relative_position_index'] = torch.zeros(49, 49, dtype=torch.long)
    state[block + 'valid_ind_rolled'] = torch.zeros(72, dtype=torch.long)
    torch.save({'model': state}, path)
    return classifier


def train_steps(model, batch, loss_of, steps, lr=2e-3):
    """Losses of `steps` AdamW steps on one batch (no weight decay where the training recipe has none)."""
    groups = parameter_groups(model, 0.05, skip_names=no_weight_decay_names(model))
    optimizer = torch.optim.AdamW(groups, lr=lr)
    model.train()
    losses = []
    for _ in range(steps):
        loss = loss_of(model, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def assert_falls(losses, factor):
    start, end = np.mean(losses[:2]), np.mean(losses[-2:])
    assert end < factor * start, f'loss did not fall enough: {[round(x, 3) for x in losses]}'


# ---------------------------------------------------------------- segmentation (smp UPerNet)

def upernet(**arch):
    return smp.UPerNet(f'tu-{TIMM_NAME}', encoder_weights=None, classes=3, decoder_channels=32,
                       **{**TIMM_TINY_ARCH, **arch})


def segmentation_loss(model, batch):
    images, targets = batch
    return torch.nn.functional.cross_entropy(model(images), targets)


# 512x512, the recipe's crop, in the slow run; 256x416 keeps a non-square map in the default one
@pytest.mark.parametrize('size', [pytest.param((512, 512), id='512x512', marks=pytest.mark.slow),
                                  pytest.param((256, 416), id='256x416')])
def test_upernet_trains(size):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = upernet()
    scenes = [shapes_scene(*size, rng) for _ in range(2)]
    batch = (torch.stack([image for image, _, _ in scenes]), torch.stack([labels for _, labels, _ in scenes]))
    losses = train_steps(model, batch, segmentation_loss, steps=8)
    assert_falls(losses, 0.6)
    # below the best prediction that ignores the image (each pixel the class frequencies)
    frequencies = torch.bincount(batch[1].flatten(), minlength=3).double() / batch[1].numel()
    assert losses[-1] < 0.7 * -(frequencies * frequencies.clamp(min=1e-12).log()).sum().item(), losses
    model.eval()
    with torch.no_grad():
        assert model(batch[0]).shape == (2, 3, *size)


def test_released_checkpoint_loads_into_upernet_encoder(tmp_path):
    path = tmp_path / 'focal-tiny.pth'
    classifier = released_format_checkpoint(path, **TIMM_TINY_ARCH)
    model = upernet()
    report = load_pretrained(model, path)
    left_out = [entry.key for entry in report.entries if entry.action == 'ignored']
    assert set(left_out) <= {'head.weight', 'head.bias', 'norm.weight', 'norm.bias'}
    assert report.count('resized') == report.count('fresh') == (0, 0)
    loaded, saved = model.encoder.model.model.state_dict(), classifier.state_dict()
    assert set(loaded) | set(left_out) == set(saved)
    for key, value in loaded.items():
        torch.testing.assert_close(value, saved[key], rtol=0, atol=0, msg=key)


def test_checkpoint_of_another_architecture_names_keys(tmp_path):
    path = tmp_path / 'wider.pth'
    released_format_checkpoint(path, **{**TIMM_TINY_ARCH, 'embed_dim': 24})
    with pytest.raises(ValueError, match=r'wider\.pth does not fit the Focal backbone .*wrong shape \(checkpoint '
                                         r'vs model\): .*patch_embed\.proj\.weight \(24, 3, 4, 4\) vs \(16, 3, 4, 4\)'):
        load_pretrained(upernet(), path)

    deeper = tmp_path / 'deeper.pth'
    released_format_checkpoint(deeper, **{**TIMM_TINY_ARCH, 'depths': (1, 1, 2, 1)})
    with pytest.raises(ValueError, match=r'unexpected keys: layers\.2\.blocks\.1\.'):
        load_pretrained(upernet(), deeper)

    with pytest.raises(ValueError, match=r'checkpoint not found: .*absent\.pth'):
        load_pretrained(upernet(), tmp_path / 'absent.pth')


# ---------------------------------------------------------------- detection (torchvision)

# (height, width) of the generated images: a batch of different sizes and aspect ratios.
DETECTION_SIZES = ((160, 224), (224, 160), (192, 192))
SMALL_DETECTOR = dict(min_size=128, max_size=192)
FPN_WIDTH = 32


def small_mask_rcnn(backbone, **kwargs):
    """torchvision's Mask R-CNN with narrow heads and few proposals: seconds on a CPU."""
    return MaskRCNN(backbone, rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100,
                    rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50, box_batch_size_per_image=64,
                    box_detections_per_img=20,
                    box_head=TwoMLPHead(FPN_WIDTH * 7 * 7, 64), box_predictor=FastRCNNPredictor(64, 3),
                    mask_head=MaskRCNNHeads(FPN_WIDTH, (32, 32), dilation=1),
                    mask_predictor=MaskRCNNPredictor(32, 32, 3), **SMALL_DETECTOR, **kwargs)


def detection_sample(height, width, rng):
    image, _, objects = shapes_scene(height, width, rng)
    masks = torch.stack([torch.from_numpy(mask) for _, mask in objects])
    rows, cols = masks.any(dim=2), masks.any(dim=1)
    boxes = [[c.nonzero().min(), r.nonzero().min(), c.nonzero().max() + 1, r.nonzero().max() + 1]
             for r, c in zip(rows, cols)]
    return image, {'boxes': torch.tensor(boxes, dtype=torch.float32),
                   'labels': torch.tensor([label for label, _ in objects]),
                   'masks': masks.to(torch.uint8)}


def detection_batch(seed=0):
    rng = np.random.default_rng(seed)
    samples = [detection_sample(height, width, rng) for height, width in DETECTION_SIZES]
    return [image for image, _ in samples], [target for _, target in samples]


def detection_loss(model, batch):
    images, targets = batch
    return sum(model(images, targets).values())


def tiny_backbone(**kwargs):
    return focal_fpn_backbone(TIMM_NAME, out_channels=FPN_WIDTH, **{**TIMM_TINY_ARCH, **kwargs})


def test_mask_rcnn_trains_on_images_of_different_sizes():
    torch.manual_seed(0)
    model = small_mask_rcnn(tiny_backbone(), box_score_thresh=0.0)
    batch = detection_batch()
    losses = train_steps(model, batch, detection_loss, steps=8, lr=1e-3)
    assert_falls(losses, 0.6)
    model.eval()
    with torch.no_grad():
        outputs = model(batch[0])
    for image, output in zip(batch[0], outputs):
        assert len(output['boxes']) > 0 and output['boxes'].shape[1] == 4
        assert output['masks'].shape[1:] == (1, *image.shape[1:])
        assert output['labels'].shape == output['scores'].shape == (len(output['boxes']),)


@pytest.mark.parametrize('detector', [RetinaNet, FCOS], ids=['retinanet', 'fcos'])
def test_single_stage_detectors_train(detector):
    torch.manual_seed(0)
    backbone = tiny_backbone(returned_stages=(1, 2, 3), extra_blocks=LastLevelP6P7(FPN_WIDTH, FPN_WIDTH))
    model = detector(backbone, num_classes=3, score_thresh=0.0, **SMALL_DETECTOR)
    batch = detection_batch()
    losses = train_steps(model, batch, detection_loss, steps=3, lr=1e-3)
    assert all(np.isfinite(losses)), losses
    model.eval()
    with torch.no_grad():
        outputs = model(batch[0])
    assert [len(output['boxes']) > 0 for output in outputs] == [True] * len(DETECTION_SIZES)


@pytest.mark.parametrize('width', [1, 2])
def test_extra_levels_train_in_bf16_autocast_from_a_one_or_two_column_map(width):
    """oneDNN's bf16 weight gradient of a stride-2 convolution over a one-column map (P6 of a map one
    column wide, P7 of a map two) leaves the taps that only see padding unwritten, and a step took
    whatever memory held there (the digit demos under AMP stopped on a NaN gradient at their first
    step). Memory full of NaN is freed before each backward (without the float32 levels, 9 backwards
    in 10 then take NaN): the gradients must be float32's, up to the bf16 rounding of the maps'."""
    torch.manual_seed(0)
    extra = LastLevelP6P7(16, 16)
    float32 = copy.deepcopy(extra)
    p5 = torch.randn(2, 16, 3, width).bfloat16()  # the pyramid's maps come out of autocast's convolutions
    weight = torch.randn(2, 16, 1, 1)

    def gradients(module, autocast):
        module.zero_grad(set_to_none=True)
        level = p5 if autocast else p5.float()
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=autocast):
            maps, names = module([level], [level], ['0'])
        assert names == ['0', 'p6', 'p7'] and maps[1].dtype == maps[2].dtype == level.dtype
        loss = sum((extra_map.float() * weight).sum() for extra_map in maps[1:])
        for numel in (16 * 16 * 9, 2 * 16 * 16 * 9, 4096, 65536):
            for dtype in (torch.float32, torch.bfloat16):
                torch.full((numel,), float('nan'), dtype=dtype)  # freed at once, NaN left in the memory
        loss.backward()
        return [parameter.grad for parameter in module.parameters()]

    expected = gradients(float32, autocast=False)
    for _ in range(3):
        for got, wanted in zip(gradients(extra, autocast=True), expected):
            assert torch.isfinite(got).all() and torch.allclose(got, wanted, rtol=5e-2, atol=5e-2)


def test_backbone_options(tmp_path):
    """frozen stages stay fixed and in eval mode, the drop path rate reaches the blocks, a
    released-format checkpoint loads, and no_weight_decay names the bias tables in the detector."""
    path = tmp_path / 'focal-tiny.pth'
    classifier = released_format_checkpoint(path, **TIMM_TINY_ARCH)
    backbone = tiny_backbone(pretrained=str(path), frozen_stages=1, drop_path_rate=0.3)
    model = small_mask_rcnn(backbone)
    body = backbone.body
    for key, value in body.state_dict().items():
        torch.testing.assert_close(value, classifier.state_dict()[key], rtol=0, atol=0, msg=key)
    assert body.layers[-1].blocks[-1].drop_path.drop_prob == pytest.approx(0.3)

    frozen = {name: param.clone() for name, param in model.named_parameters()
              if name.startswith(('backbone.body.patch_embed.', 'backbone.body.layers.0.'))}
    assert frozen and not any(param.requires_grad for name, param in model.named_parameters() if name in frozen)
    assert all(param.requires_grad for name, param in model.named_parameters() if name not in frozen)
    train_steps(model, detection_batch(), detection_loss, steps=1)
    # every trainable parameter is used (DistributedDataParallel requires it)
    assert [name for name, param in model.named_parameters() if param.requires_grad and param.grad is None] == []
    assert not body.layers[0].training and body.layers[1].training
    for name, param in model.named_parameters():
        if name in frozen:
            assert torch.equal(param, frozen[name]), name

    skipped = no_weight_decay_names(model)
    assert 'backbone.body.layers.1.blocks.0.attn.relative_position_bias_table' in skipped
    assert all(name.startswith('backbone.body.') and 'relative_position_bias_table' in name for name in skipped)
    assert backbone.no_weight_decay() == {name[len('backbone.'):] for name in skipped}
