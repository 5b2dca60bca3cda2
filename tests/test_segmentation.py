"""Semantic segmentation: the ADE20K layout and its augmentation, UPerNet with the auxiliary head,
mIoU and pixel accuracy (by hand, and exact under torchrun), training under main.py with AMP,
TensorBoard and the bad-sample policy, preemption and resume on the iteration schedule, the
recipes' parameter counts and --pretrained into them, and bad input as one line naming the file."""
import os
import re
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchvision import tv_tensors

import lifecycle
import main
import models  # noqa: F401  (registers the focal models with timm)
from data import DataError
from data.ade20k import (IGNORE_INDEX, ADE20KSegmentation, CategoryBalancedCrop, eval_transform, rescaled_size,
                         train_transform)
from data.digit_scenes import ADE_CLASSES, draw_scene
from helpers import REPO, TIMM_TINY_ARCH, assert_ok, assert_same_training_state, run_main, start_main, stop_when
from models.segmentation import FocalUPerNet
from tasks.segmentation import build_segmenter, confusion_matrix, segmentation_loss, segmentation_scores

NUM_CLASSES = len(ADE_CLASSES)


def write_ade_folder(root, counts=(('training', 6), ('validation', 5)), size=32, seed=0):
    """An ADEChallengeData2016-style folder of digit scenes (`size` px), as the real layout."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    for split, count in counts:
        for folder in ('images', 'annotations'):
            os.makedirs(os.path.join(root, folder, split), exist_ok=True)
        for index in range(count):
            image, label, _ = draw_scene(size, digits.images, digits.target, np.arange(500), rng)
            name = f'ADE_{split}_{index:08d}'
            Image.fromarray(image).save(os.path.join(root, 'images', split, name + '.jpg'), quality=95)
            Image.fromarray(label).save(os.path.join(root, 'annotations', split, name + '.png'))
    return str(root)


# ---------------------------------------------------------------- metrics

def test_miou_and_pixel_accuracy_by_hand():
    # rows: labelled class, columns: predicted class
    confusion = torch.tensor([[5, 1, 0, 0],
                              [2, 3, 0, 0],
                              [0, 0, 0, 0],   # class 2: neither labelled nor predicted
                              [0, 1, 0, 0]])  # class 3: labelled once, never predicted right
    miou, aacc, iou = segmentation_scores(confusion)
    # IoU = hits / (labelled + predicted - hits)
    expected = [5 / (6 + 7 - 5), 3 / (5 + 5 - 3), float('nan'), 0 / (1 + 0 - 0)]
    torch.testing.assert_close(iou, 100 * torch.tensor(expected, dtype=torch.float64), equal_nan=True)
    assert miou == pytest.approx(100 * (5 / 8 + 3 / 7 + 0) / 3)
    assert aacc == pytest.approx(100 * 8 / 12)


def test_confusion_matrix_counts_pairs_and_leaves_out_ignored():
    label = torch.tensor([[0, 1, IGNORE_INDEX], [2, 2, 1]])
    prediction = torch.tensor([[0, 2, 1], [2, 0, 1]])
    expected = torch.zeros(3, 3, dtype=torch.int64)
    for true, predicted in ((0, 0), (1, 2), (2, 2), (2, 0), (1, 1)):
        expected[true, predicted] += 1
    assert torch.equal(confusion_matrix(prediction, label, 3), expected)


# ---------------------------------------------------------------- data

def test_labels_shift_down_and_zero_is_ignored(tmp_path):
    root = write_ade_folder(tmp_path / 'ade')
    dataset = ADE20KSegmentation(root, 'val', NUM_CLASSES, eval_transform())
    assert len(dataset) == 5
    image, target = dataset[0]
    stored = np.asarray(Image.open(os.path.join(root, 'annotations', 'validation', 'ADE_validation_00000000.png')))
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and target.dtype == torch.int64
    expected = stored.astype(np.int64) - 1
    expected[stored == 0] = IGNORE_INDEX
    assert np.array_equal(target.numpy(), expected) and (stored == 0).any() and (stored == 1).any()
    assert abs(image.mean().item()) < 3  # normalised


def test_rescale_fits_the_scale_in_either_orientation():
    # mmcv's rescale_size: the factor that fits (long, short) = (2048, 512)
    assert rescaled_size(512, 683, (2048, 512)) == (512, 683)
    assert rescaled_size(683, 512, (2048, 512)) == (683, 512)
    assert rescaled_size(256, 1600, (2048, 512)) == (328, 2048)  # the long side caps it
    assert rescaled_size(512, 683, (1024, 256)) == (256, 342)


def test_training_crops_move_the_label_with_the_image_and_pad_to_the_crop(tmp_path):
    # An image whose red channel is 20 x its label (stripes 8 px wide): after the random rescale,
    # crop and flip the label still sits under its own colour.
    root = tmp_path / 'ade'
    for folder in ('images', 'annotations'):
        os.makedirs(root / folder / 'training')
    label = (np.arange(48)[None, :].repeat(40, 0) // 8 + 1).astype(np.uint8)
    image = np.zeros((40, 48, 3), np.uint8)
    image[..., 0] = label * 20
    Image.fromarray(image).save(root / 'images' / 'training' / 'a.png')
    Image.fromarray(label).save(root / 'annotations' / 'training' / 'a.png')
    transform = train_transform(64, (96, 40), (0.5, 2.0), 0.75, 0.5, photometric=False)
    dataset = ADE20KSegmentation(str(root), 'train', 6, transform)
    torch.manual_seed(0)
    sizes = set()
    for _ in range(12):
        crop, target = dataset[0]
        assert crop.shape == (3, 64, 64) and target.shape == (64, 64)
        labelled = target != IGNORE_INDEX
        sizes.add(int(labelled.sum()))
        red = crop[0] * 0.229 + 0.485  # undo the normalisation
        inside = labelled & (torch.nn.functional.max_pool2d(
            (~labelled).float()[None, None], 5, 1, 2)[0, 0] == 0)  # away from the crop's edge
        colour_of_label = ((target + 1) * 20 / 255.0)
        agree = ((red - colour_of_label).abs() < 0.04)[inside].float().mean()
        assert agree > 0.9, agree
        assert (crop[:, ~labelled] == 0).all()  # the padding: 0 after normalisation
    assert len(sizes) > 1  # the rescale varies: sometimes smaller than the crop, then padded


def test_crop_avoids_one_dominant_class_where_it_can():
    label = torch.zeros(1, 100, 100, dtype=torch.int64)
    label[:, 60:, 60:] = 1  # a corner of a second class
    label[:, :5] = IGNORE_INDEX  # ignored pixels count for neither

    def balanced_crops(cat_max_ratio):
        crop = CategoryBalancedCrop(40, cat_max_ratio)
        torch.manual_seed(0)
        balanced = 0
        for _ in range(30):
            _, cropped = crop(tv_tensors.Image(torch.zeros(3, 100, 100)), tv_tensors.Mask(label))
            assert cropped.shape == (1, 40, 40)
            counts = torch.bincount(cropped[cropped != IGNORE_INDEX].flatten(), minlength=2)
            balanced += counts.max().item() < 0.75 * counts.sum().item()
        return balanced

    # a uniformly random crop is balanced about 1 time in 8; ten tries make it most of the time
    assert balanced_crops(1.0) <= 8 and balanced_crops(0.75) >= 20


def test_bad_ade20k_input_is_one_line_naming_the_file(tmp_path):
    root = tmp_path / 'ade'
    write_ade_folder(root, counts=(('training', 3),))
    images, labels = root / 'images' / 'training', root / 'annotations' / 'training'

    def error_of(num_classes=NUM_CLASSES, index=None):
        with pytest.raises(DataError) as info:
            dataset = ADE20KSegmentation(str(root), 'train', num_classes, eval_transform())
            if index is not None:
                dataset[index]
        message = str(info.value)
        assert '\n' not in message
        return message, info.value.path

    # a label of another size than its image: found before training, from the headers
    Image.fromarray(np.ones((20, 32), np.uint8)).save(labels / 'ADE_training_00000001.png')
    message, path = error_of()
    assert message == (f"ADE20K label {labels / 'ADE_training_00000001.png'} is 32x20, its image "
                       f"{images / 'ADE_training_00000001.jpg'} is 32x32")
    # a missing label file
    os.remove(labels / 'ADE_training_00000001.png')
    message, _ = error_of()
    assert message == f"ADE20K label file missing: {labels / 'ADE_training_00000001.png'}"
    # a class value beyond the classes: found when read, with the file for the bad-sample policy
    Image.fromarray(np.full((32, 32), 12, np.uint8)).save(labels / 'ADE_training_00000001.png')
    message, path = error_of(index=1)
    assert message.startswith(f"ADE20K label {labels / 'ADE_training_00000001.png'} holds the value 12, "
                              f"more than the 11 classes")
    assert path == str(labels / 'ADE_training_00000001.png')
    # a colour label
    Image.fromarray(np.ones((32, 32, 3), np.uint8)).save(labels / 'ADE_training_00000001.png')
    message, _ = error_of(index=1)
    assert 'is a RGB image, not one byte of class value per pixel' in message
    # an image that is not an image
    (images / 'ADE_training_00000002.jpg').write_bytes(b'not a jpeg')
    message, path = error_of()
    assert message.startswith(f"cannot read {images / 'ADE_training_00000002.jpg'}")
    # no folder
    with pytest.raises(DataError, match=r'^ADE20K folder not found: .*images/validation$'):
        ADE20KSegmentation(str(root), 'val', NUM_CLASSES, eval_transform())


# ---------------------------------------------------------------- model

def tiny_upernet(**kwargs):
    return FocalUPerNet('focal_tiny_patch4_window7_224', NUM_CLASSES, decoder_channels=32, aux_channels=16,
                        img_size=64, **{**TIMM_TINY_ARCH, **kwargs})


def test_upernet_with_auxiliary_head_trains_on_digit_scenes(tmp_path):
    root = write_ade_folder(tmp_path / 'ade', counts=(('training', 4),), size=64)
    dataset = ADE20KSegmentation(root, 'train', NUM_CLASSES,
                                 train_transform(64, (256, 64), (0.75, 1.5), 0.75, 0.0, True))
    torch.manual_seed(0)
    samples = [dataset[index] for index in range(4)]
    images, targets = torch.stack([s[0] for s in samples]), torch.stack([s[1] for s in samples])
    model = tiny_upernet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    model.train()
    for _ in range(10):
        outputs = model(images)
        assert isinstance(outputs, tuple) and [o.shape for o in outputs] == [(4, NUM_CLASSES, 64, 64)] * 2
        loss = segmentation_loss(outputs, targets, 0.4)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-2:]) < 0.6 * np.mean(losses[:2]), losses
    # every parameter trains (DistributedDataParallel requires it), the auxiliary head included
    assert [name for name, p in model.named_parameters() if p.grad is None] == []
    model.eval()
    with torch.no_grad():  # any size: padded to the output stride inside, cropped back
        assert model(images[:1, :, :50, :45]).shape == (1, NUM_CLASSES, 50, 45)


def test_loss_weights_the_auxiliary_head_and_counts_ignored_pixels_as_zero():
    logits, aux = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    targets = torch.randint(0, 3, (2, 4, 4))
    targets[0] = IGNORE_INDEX
    per_pixel = torch.nn.functional.cross_entropy(logits, targets.clamp(max=2), reduction='none')
    per_pixel_aux = torch.nn.functional.cross_entropy(aux, targets.clamp(max=2), reduction='none')
    valid = targets != IGNORE_INDEX
    expected = (per_pixel * valid).sum() / 32 + 0.4 * (per_pixel_aux * valid).sum() / 32
    torch.testing.assert_close(segmentation_loss((logits, aux), targets, 0.4), expected)
    all_ignored = torch.full((1, 4, 4), IGNORE_INDEX)
    assert segmentation_loss(logits[:1], all_ignored, 0.4).item() == 0.0


# ---------------------------------------------------------------- main.py

TINY_SEGMENTATION = """\
TASK: segmentation
DATA:
  DATASET: ade20k
  IMG_SIZE: 32
  SEG_SCALE: [128, 32]
  SEG_RATIO_RANGE: [0.75, 1.5]
  BATCH_SIZE: 2
  NUM_WORKERS: 0
MODEL:
  NAME: tiny_upernet
  NUM_CLASSES: 11
  DROP_PATH_RATE: 0.0
  SEGMENTATION:
    DECODER_CHANNELS: 16
    AUX_CHANNELS: 8
  FOCAL:
    EMBED_DIM: 16
    DEPTHS: [1, 1, 1, 1]
    NUM_HEADS: [1, 1, 2, 2]
    WINDOW_SIZE: 2
    EXPAND_SIZES: [1, 1, 1, 1]
    FOCAL_LEVELS: [2, 2, 2, 2]
    FOCAL_WINDOWS: [3, 3, 1, 1]
TRAIN:
  EPOCHS: 1
  STEPS_PER_EPOCH: 3
  BASE_BATCH_SIZE: 16
  BASE_LR: 1e-2
  WARMUP_STEPS: 1
  MIN_LR: 0.0
  LR_SCHEDULER:
    NAME: poly
AUG:
  HFLIP: 0.0
TEST:
  MULTI_SCALE: True
  SEG_SCALES: [1.0, 1.5]
PRINT_FREQ: 50
"""
SUMMARY = re.compile(r' \* mIoU (\d+\.\d\d) aAcc (\d+\.\d\d)')
SUMMARY_MS = re.compile(r' \* mIoU\(MS\) (\d+\.\d\d) aAcc\(MS\) (\d+\.\d\d)')


def test_trains_under_main_and_two_process_evaluation_equals_one_process(tmp_path):
    # main.py trains 3 iterations with --amp (bf16 autocast through the encoder and smp's heads)
    # past a training label with a class value beyond the 11 classes (DATA.MAX_BAD_SAMPLES 1: the
    # bad-sample policy replaces it by the next pair, names it once, counts it in TensorBoard and
    # in the checkpoint) and saves; its checkpoint evaluated by one process and by two (7
    # validation images: 4 + 3) gives the same figures, those the training run printed.
    data = write_ade_folder(tmp_path / 'ade', counts=(('training', 4), ('validation', 7)))
    bad_label = os.path.join(data, 'annotations', 'training', 'ADE_training_00000002.png')
    Image.fromarray(np.full((32, 32), 12, np.uint8)).save(bad_label)
    cfg = tmp_path / 'tiny.yaml'
    cfg.write_text(TINY_SEGMENTATION)
    common = ['--cfg', str(cfg), '--data-path', data, '--output', str(tmp_path / 'out'), '--amp']
    trained = run_main(tmp_path, [*common, '--opts', 'DATA.MAX_BAD_SAMPLES', '1'])
    assert_ok(trained)
    assert 'mixed precision: autocast bf16 on cpu' in trained.stdout
    assert re.search(r'Train: \[0/1\]\[2/3\].*loss \d+\.\d+', trained.stdout), trained.stdout[-2000:]
    replaced = re.findall(r'WARNING ADE20K label (\S+) holds the value 12, .*; replaced by the next readable '
                          r'training image', trained.stdout)
    assert replaced == [bad_label], trained.stdout[-3000:]
    run = os.path.join(str(tmp_path / 'out'), 'tiny_upernet', 'default')
    checkpoint = os.path.join(run, 'ckpt_epoch_0.pth')
    assert torch.load(checkpoint, weights_only=True)['bad_samples'] == [bad_label]
    events = EventAccumulator(os.path.join(run, 'tensorboard'))
    events.Reload()
    for tag in ('train/loss', 'train/lr', 'train/grad_norm'):
        assert [event.step for event in events.Scalars(tag)] == [0, 1, 2], tag
    assert [event.value for event in events.Scalars('train/bad_samples')] == [1]
    assert events.Scalars('val/mIoU')[0].value == pytest.approx(float(SUMMARY.findall(trained.stdout)[0][0]), abs=5e-3)
    assert [event.step for event in events.Scalars('val/mIoU_MS')] == [0]
    figures = {}
    for nproc in (1, 2):
        result = run_main(tmp_path, [*common, '--eval', '--resume', checkpoint, '--tag', f'eval{nproc}'],
                          nproc=nproc)
        assert_ok(result)
        figures[nproc] = (SUMMARY.findall(result.stdout), SUMMARY_MS.findall(result.stdout))
    assert len(figures[1][0]) == len(figures[1][1]) == 1, figures
    assert figures[1] == figures[2]
    assert figures[1][0] == SUMMARY.findall(trained.stdout) and figures[1][0] != figures[1][1]


def test_sigterm_on_the_iteration_schedule_saves_the_step_and_resumes_bit_identical(tmp_path):
    # The 160k recipes' schedule in small: epochs of STEPS_PER_EPOCH batches drawn from the data
    # repeated (6 training images, 5 batches of 2 an epoch: two passes chained), a step checkpoint
    # every 2 steps, flips, photometric distortion and drop path. SIGTERM to the job in epoch 1
    # saves the step it reached (3, or later if the signal lands late; 5 is the epoch's last) and
    # exits 75; the same command continues there and ends with the weights, optimizer and schedule
    # of a run never stopped.
    data = write_ade_folder(tmp_path / 'ade', counts=(('training', 6), ('validation', 2)))
    cfg = tmp_path / 'tiny.yaml'
    cfg.write_text(TINY_SEGMENTATION)
    args = ['--cfg', str(cfg), '--data-path', data, '--opts', 'TRAIN.EPOCHS', '3', 'TRAIN.STEPS_PER_EPOCH', '5',
            'TRAIN.SAVE_EVERY_STEPS', '2', 'AUG.HFLIP', '0.5', 'MODEL.DROP_PATH_RATE', '0.1',
            'TEST.MULTI_SCALE', 'False', 'PRINT_FREQ', '1']
    straight = run_main(tmp_path, [*args[:4], '--output', str(tmp_path / 'straight'), *args[4:]])
    assert_ok(straight)
    run = os.path.join(str(tmp_path / 'stopped'), 'tiny_upernet', 'default')
    command = [*args[:4], '--output', str(tmp_path / 'stopped'), *args[4:]]
    log = tmp_path / 'stopped.log'
    process = start_main(tmp_path, command, log_path=log, new_session=True)
    stop_when(process, lambda: os.path.exists(os.path.join(run, 'ckpt_epoch_1_step_2.pth')),
              lambda: os.killpg(process.pid, signal.SIGTERM))
    output = log.read_text()
    assert process.returncode == lifecycle.EXIT_PREEMPTED, output[-3000:]
    saved = re.findall(r'ckpt_epoch_1_step_([345])\.pth', output.strip().splitlines()[-1])
    assert len(saved) == 1, output[-3000:]
    restarted = run_main(tmp_path, command)
    assert_ok(restarted)
    assert f'continuing at epoch 1 step {saved[0]}' in restarted.stdout, restarted.stdout[-3000:]
    assert_same_training_state(os.path.join(str(tmp_path / 'straight'), 'tiny_upernet', 'default',
                                            'ckpt_epoch_2.pth'), os.path.join(run, 'ckpt_epoch_2.pth'))


def test_class_count_that_does_not_fit_is_one_line(tmp_path):
    data = write_ade_folder(tmp_path / 'ade', counts=(('training', 2), ('validation', 2)))
    cfg = tmp_path / 'tiny.yaml'
    cfg.write_text(TINY_SEGMENTATION.replace('NUM_CLASSES: 11', 'NUM_CLASSES: 5'))
    result = run_main(tmp_path, ['--cfg', str(cfg), '--data-path', data, '--output', str(tmp_path / 'out'),
                                 '--eval', '--opts', 'TRAIN.EPOCHS', '2'])
    assert result.returncode == 2
    line = result.stderr.strip()
    assert re.fullmatch(r"error: ADE20K label .*/annotations/validation/ADE_validation_0000000\d\.png holds "
                        r"the value \d+, more than the 5 classes \(1\.\.5; 0 is ignored\)", line), line


# ---------------------------------------------------------------- recipes

# Millions of parameters of each recipe's model with ADE20K's 150 classes: 60,844,352 / 83,105,912 /
# 123,740,844 (UPerNet and the auxiliary head on the released Focal-T/S/B). Counted by hand, the
# same heads on Swin-T/S/B give Swin's published 60M / 81M / 121M; the paper's table says 62M /
# 85M / 126M for Focal.
RECIPES = {'tiny': 61, 'small': 83, 'base': 124}


@pytest.mark.parametrize('size', sorted(RECIPES))
def test_recipe_builds_its_upernet_with_the_counted_parameters(size):
    recipe = os.path.join(REPO, 'configs', 'segmentation', f'upernet_focal_{size}_160k.yaml')
    _, config = main.parse_option(['--cfg', recipe])
    config.defrost()
    config.MODEL.NUM_CLASSES = 150  # what the ADE20K data fills in
    model = build_segmenter(config)
    count = sum(p.numel() for p in model.parameters())
    assert round(count / 1e6) == RECIPES[size], count


def test_pretrained_released_classifier_fills_the_recipes_encoder(tmp_path, caplog):
    """--pretrained with a released-format Focal-T into the 160k recipe's UPerNet: built for 512 px
    crops, its last stage (16 x 16 tokens, over the 7 px window) has neighbour keys the 224 px
    classifier lacks; that table starts fresh and every other tensor is copied (depths cut to one
    block a stage to keep the test small; the geometry is the recipe's)."""
    import logging
    import timm
    from utils import load_pretrained
    classifier = timm.create_model('focal_tiny_patch4_window7_224', depths=(1, 1, 1, 1))
    path = str(tmp_path / 'focal-tiny-is224-ws7.pth')
    torch.save({'model': classifier.state_dict()}, path)
    recipe = os.path.join(REPO, 'configs', 'segmentation', 'upernet_focal_tiny_160k.yaml')
    _, config = main.parse_option(['--cfg', recipe, '--pretrained', path,
                                   '--opts', 'MODEL.FOCAL.DEPTHS', '[1, 1, 1, 1]'])
    config.defrost()
    config.MODEL.NUM_CLASSES = 150
    model = build_segmenter(config)
    with caplog.at_level(logging.INFO, logger='test_pretrained'):
        load_pretrained(config, model, logging.getLogger('test_pretrained'))
    assert re.search(r'resized 0 tensors .*, fresh 1 tensors', caplog.text), caplog.text
    encoder, released = model.upernet.encoder.model.model.state_dict(), classifier.state_dict()
    assert [key for key in encoder if key not in released] == [
        'layers.3.blocks.0.attn.relative_position_bias_table_to_neighbors']
    for key, value in encoder.items():
        if key in released:
            assert torch.equal(value, released[key]), key
