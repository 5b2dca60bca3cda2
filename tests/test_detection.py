"""Detection through main.py (TASK detection): COCO files read by torchvision's CocoDetection,
Mask R-CNN (and each other detector of DETECTOR_OPTS) on the Focal FPN, COCO AP from pycocotools
gathered over every process, AMP and TensorBoard, resume after SIGKILL, COCO files of one's own at any
paths with any category ids, one-line errors for bad COCO input, the recipes' models at the paper's
sizes with --pretrained filling their focal windows, and the 3x recipes' random crop."""
import argparse
import contextlib
import io
import json
import logging
import math
import os
import re
import shutil
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchvision import tv_tensors

import main
from config import ConfigError, get_config, with_classes
from data import DataError
from data.coco import collate_detection_training, detection_transform
from lr_scheduler import build_scheduler
from optimizer import build_optimizer
from helpers import REPO, assert_ok, assert_same_training_state, run_main, start_main, stop_when
from tasks import build_task
from tasks.detection import Detection
from utils import load_pretrained

# A micro Mask R-CNN for 32 px images: four one-block stages, a 16-channel pyramid, small heads.
TINY_DETECTION = """\
TASK: detection
DATA:
  DATASET: coco
  IMG_SIZE: 32
  MIN_SIZES: [28, 32]
  TEST_MIN_SIZE: 32
  MAX_SIZE: 40
  BATCH_SIZE: 2
  NUM_WORKERS: 0
  PIN_MEMORY: False
MODEL:
  NAME: tiny_mask_rcnn
  DROP_PATH_RATE: 0.1
  DETECTION:
    FPN_CHANNELS: 16
    BOX_HEAD_WIDTH: 32
    MASK_HEAD_LAYERS: 1
    ROI_SAMPLES: 16
    PROPOSALS: [50, 30]
    ANCHOR_SIZES: [8, 16, 32, 64, 128]
  FOCAL:
    EMBED_DIM: 8
    DEPTHS: [1, 1, 1, 1]
    NUM_HEADS: [1, 1, 2, 2]
    WINDOW_SIZE: 2
    FOCAL_POOL: fc
    FOCAL_LEVELS: [2, 2, 2, 2]
    FOCAL_WINDOWS: [3, 1, 1, 1]
    EXPAND_SIZES: [1, 1, 1, 1]
TRAIN:
  EPOCHS: 2
  BASE_BATCH_SIZE: 16
  BASE_LR: 1e-2
  WARMUP_STEPS: 2
  WARMUP_LR: 1e-4
  LR_SCHEDULER:
    NAME: multistep
    MILESTONES: [1]
AUG:
  HFLIP: 0.5
PRINT_FREQ: 2
"""
# The same detector as RetinaNet: without the keys only Mask R-CNN reads, which RetinaNet refuses.
TINY_RETINANET = re.sub(r'    (BOX_HEAD_WIDTH|MASK_HEAD_LAYERS|ROI_SAMPLES|PROPOSALS): .*\n', '', TINY_DETECTION)
CATEGORIES = [{'id': 1, 'name': 'disc'}, {'id': 3, 'name': 'square'}]  # ids need not be dense
LABELS = {1: 1, 3: 2}  # the detector's label of each category id: the categories in id order
COLOURS = {1: (220, 60, 40), 3: (40, 200, 60)}


def scene(size, rng):
    """(RGB image, [(category id, mask)]): one or two large shapes on noise, not overlapping."""
    image = rng.integers(0, 80, (size, size, 3))
    rows, cols = np.mgrid[:size, :size]
    objects = []
    for index in range(int(rng.integers(1, 3))):
        category = CATEGORIES[int(rng.integers(0, 2))]['id']
        half = size // 4
        row, col = size // 4 + 2, size // 4 + 2 + index * (size // 2 - 2)
        row += int(rng.integers(-2, 3))
        if category == 1:
            inside = (rows - row - half // 2) ** 2 + (cols - col) ** 2 < (half * 0.9) ** 2
        else:
            inside = (abs(rows - row - half // 2) < half * 0.8) & (abs(cols - col) < half * 0.8)
        image[inside] = COLOURS[category]
        objects.append((category, inside))
    return image.astype(np.uint8), objects


def write_coco(root, splits=(('train', 8), ('val', 5)), size=32, seed=0):
    """root/{train2017,val2017}/*.png and root/annotations/instances_*.json (RLE masks)."""
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, 'annotations'), exist_ok=True)
    annotation_id = 1
    for split, count in splits:
        folder = os.path.join(root, f'{split}2017')
        os.makedirs(folder, exist_ok=True)
        images, annotations = [], []
        for image_id in range(1, count + 1):
            image, objects = scene(size, rng)
            name = f'{image_id:06d}.png'
            Image.fromarray(image).save(os.path.join(folder, name))
            images.append({'id': image_id, 'file_name': name, 'height': size, 'width': size})
            for category, mask in objects:
                rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
                x, y, w, h = coco_mask.toBbox(rle).tolist()
                annotations.append({'id': annotation_id, 'image_id': image_id, 'category_id': category,
                                    'bbox': [x, y, w, h], 'area': float(coco_mask.area(rle)),
                                    'iscrowd': 0, 'segmentation': {'size': rle['size'],
                                                                   'counts': rle['counts'].decode()}})
                annotation_id += 1
        with open(os.path.join(root, 'annotations', f'instances_{split}2017.json'), 'w') as f:
            json.dump({'images': images, 'annotations': annotations, 'categories': CATEGORIES}, f)
    return str(root)


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp('detection')
    cfg = root / 'tiny_detection.yaml'
    cfg.write_text(TINY_DETECTION)
    return root, write_coco(root / 'coco'), str(cfg)


def load_config(cfg, data, *opts, **flags):
    return get_config(argparse.Namespace(cfg=cfg, data_path=data, opts=list(opts), **flags))


def run_folder(output):
    return os.path.join(output, 'tiny_mask_rcnn', 'default')


# --opts that make TINY_DETECTION's micro detector each detector that main.py is tested with
DETECTOR_OPTS = {
    'mask_rcnn': ['MODEL.DETECTION.DETECTOR', 'mask_rcnn'],
    'cascade_mask_rcnn': ['MODEL.DETECTION.DETECTOR', 'cascade_mask_rcnn',
                          'MODEL.DETECTION.CASCADE.BOX_HEAD_CONVS', '1'],
}


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------
class KnownDetections(torch.nn.Module):
    """A stand-in Mask R-CNN that answers each image (by its first pixel) with set detections."""

    def __init__(self, detections):
        super().__init__()
        self.detections = detections

    def forward(self, images):
        return [self.detections[int(round(image[0, 0, 0].item() * 255))] for image in images]


def test_ap_of_known_detections_is_pycocotools_own(workspace, tmp_path, caplog):
    """The evaluation of set detections (exact, shifted, wrong class, spurious) reports the AP
    that pycocotools computes from the same detections, box and mask, and its summary table: the
    detector's labels 1 and 2 are the file's category ids 1 and 3."""
    _, data, cfg = workspace
    data = shutil.copytree(data, tmp_path / 'coco')
    gt = COCO(os.path.join(data, 'annotations', 'instances_val2017.json'))
    detections, results = {}, {'bbox': [], 'segm': []}
    for image_id in gt.getImgIds():
        # mark the image so that the stand-in knows which one it is given
        path = os.path.join(data, 'val2017', gt.loadImgs(image_id)[0]['file_name'])
        pixels = np.array(Image.open(path))
        pixels[0, 0] = image_id
        Image.fromarray(pixels).save(path)
        boxes, labels, scores, masks = [], [], [], []
        for n, annotation in enumerate(gt.loadAnns(gt.getAnnIds(imgIds=image_id))):
            x, y, w, h = annotation['bbox']
            shift = [0, 0, 0, 2, 5][(image_id + n) % 5]  # some exact, some off by a few pixels
            category = annotation['category_id'] if (image_id + n) % 4 else 4 - annotation['category_id']
            boxes.append([x + shift, y, x + w + shift, y + h])
            labels.append(LABELS[category])
            scores.append(0.9 - 0.1 * n)
            mask = torch.from_numpy(gt.annToMask(annotation)).float().roll(shift, dims=1)
            masks.append(mask[None])
        boxes.append([0, 0, 10, 10])  # spurious
        labels.append(1)
        scores.append(0.3)
        masks.append(torch.zeros(1, 32, 32))
        masks[-1][:, :10, :10] = 1
        detections[image_id] = {'boxes': torch.tensor(boxes, dtype=torch.float),
                                'labels': torch.tensor(labels), 'scores': torch.tensor(scores),
                                'masks': torch.stack(masks)}
        for box, label, score, mask in zip(boxes, labels, scores, masks):
            rle = coco_mask.encode(np.asfortranarray((mask[0] > 0.5).numpy().astype(np.uint8)))
            rle['counts'] = rle['counts'].decode()
            category = CATEGORIES[label - 1]['id']
            results['bbox'].append({'image_id': image_id, 'category_id': category, 'score': score,
                                    'bbox': [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
            results['segm'].append({'image_id': image_id, 'category_id': category, 'score': score,
                                    'segmentation': rle})
    expected = {}
    for kind in ('bbox', 'segm'):
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator = COCOeval(gt, gt.loadRes(results[kind]), kind)
            evaluator.evaluate()
            evaluator.accumulate()
            evaluator.summarize()
        expected[kind] = 100 * evaluator.stats[0]
    assert 20 < expected['bbox'] < 95 and 20 < expected['segm'] < 95  # neither trivial

    config = load_config(cfg, str(data), eval=True)
    task = Detection(config)
    _, loader, _ = task.build_loaders(config)

    with caplog.at_level(logging.INFO, logger='test_ap'):
        metrics, headline = task.evaluate(config, KnownDetections(detections), loader,
                                          torch.device('cpu'), contextlib.nullcontext,
                                          logging.getLogger('test_ap'))
    assert headline == pytest.approx(expected['bbox'], abs=1e-9)
    assert metrics['segm_ap'] == pytest.approx(expected['segm'], abs=1e-9)
    assert f" * bbox AP {expected['bbox']:.3f} segm AP {expected['segm']:.3f}" in caplog.text
    assert caplog.text.count('Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all') == 2


def test_own_coco_files_at_any_paths_with_any_category_ids(workspace, tmp_path):
    """COCO files anywhere (DATA.TRAIN_* under DATA.DATA_PATH, DATA.VAL_* absolute elsewhere) with the
    category ids 7 and 0: the detector learns them as labels 2 and 1 (0 stays the background), the class
    names are the categories' (the log line counts 3 classes), and detections of the labels reach
    pycocotools as the file's ids (a perfect answer scores 100). Files that list other categories, or
    one id twice, are one line."""
    _, data, cfg = workspace
    own, elsewhere = tmp_path / 'own', tmp_path / 'elsewhere'
    shutil.copytree(os.path.join(data, 'train2017'), own / 'pictures')
    shutil.copytree(os.path.join(data, 'val2017'), elsewhere / 'val')
    renamed = {1: 7, 3: 0}
    files = {'train': own / 'labels.json', 'val': elsewhere / 'val.json'}
    for split, path in files.items():
        with open(os.path.join(data, 'annotations', f'instances_{split}2017.json')) as f:
            content = json.load(f)
        for annotation in content['annotations']:
            annotation['category_id'] = renamed[annotation['category_id']]
        content['categories'] = [{'id': 7, 'name': 'disc'}, {'id': 0, 'name': 'square'}]
        path.write_text(json.dumps(content))
    opts = ['DATA.TRAIN_IMAGES', 'pictures', 'DATA.TRAIN_ANNOTATIONS', 'labels.json',
            'DATA.VAL_IMAGES', str(elsewhere / 'val'), 'DATA.VAL_ANNOTATIONS', str(files['val'])]
    config = load_config(cfg, str(own), *opts)
    task = Detection(config)
    train_loader, val_loader, class_names = task.build_loaders(config)
    assert class_names == ['background', 'square', 'disc']
    recorded = with_classes(config, class_names)  # what main.py builds the model from and logs
    assert task.describe(recorded, task.build_model(recorded)).endswith(', 3 classes')
    train_loader.sampler.set_epoch(0)
    labels = {label for _, targets, _ in train_loader for target in targets for label in target['labels'].tolist()}
    assert labels == {1, 2}

    gt = COCO(str(files['val']))
    detections = {}
    for image_id in gt.getImgIds():
        path = elsewhere / 'val' / gt.loadImgs(image_id)[0]['file_name']
        pixels = np.array(Image.open(path))
        pixels[0, 0] = image_id  # for the stand-in to know the image
        Image.fromarray(pixels).save(path)
        annotations = gt.loadAnns(gt.getAnnIds(imgIds=image_id))
        detections[image_id] = {
            'boxes': torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (a['bbox'] for a in annotations)]),
            'labels': torch.tensor([{0: 1, 7: 2}[a['category_id']] for a in annotations]),
            'scores': torch.ones(len(annotations)),
            'masks': torch.stack([torch.from_numpy(gt.annToMask(a)).float()[None] for a in annotations])}
    metrics, headline = task.evaluate(config, KnownDetections(detections), val_loader, torch.device('cpu'),
                                      contextlib.nullcontext, logging.getLogger('test_own_coco'))
    assert headline == pytest.approx(100.0) and metrics['segm_ap'] == pytest.approx(100.0)

    content = json.loads(files['val'].read_text())
    content['categories'].append({'id': 9, 'name': 'star'})
    files['val'].write_text(json.dumps(content))
    with pytest.raises(DataError, match=r"labels\.json and .*val\.json list other categories \(e\.g\. id 9 in "
                                        r"one only\): their labels would not match$"):
        task.build_loaders(config)
    content['categories'][-1]['id'] = 0
    files['val'].write_text(json.dumps(content))
    with pytest.raises(DataError, match=r"val\.json: 'categories' lists the id 0 more than once$"):
        task.build_loaders(config)


# the default run keeps Mask R-CNN's; Cascade Mask R-CNN's (about 30 s) runs under -m slow
@pytest.mark.parametrize('detector', ['mask_rcnn', pytest.param('cascade_mask_rcnn', marks=pytest.mark.slow)])
def test_two_processes_score_what_one_does(workspace, detector):
    """A detector trained with --amp (bf16 autocast through the Focal backbone and the heads) logs
    its losses and COCO figures to TensorBoard; --eval --resume of it under torchrun (2 processes on
    gloo, 5 val images split 3 + 2) logs the same COCO box and mask tables and AP as one process."""
    root, data, cfg = workspace
    output = str(root / f'train_for_eval_{detector}')
    cfg = ['--cfg', cfg, '--data-path', data, '--opts', *DETECTOR_OPTS[detector]]
    trained = run_main(root, cfg + ['--output', output, '--amp'])
    assert_ok(trained)
    assert 'mixed precision: autocast bf16 on cpu' in trained.stdout
    events = EventAccumulator(os.path.join(run_folder(output), 'tensorboard'))
    events.Reload()
    for tag in ('train/loss', 'train/lr', 'train/grad_norm'):  # 2 epochs of 8 images, 2 a step
        assert [event.step for event in events.Scalars(tag)] == list(range(8)), tag
    assert all(math.isfinite(event.value) for event in events.Scalars('train/loss'))
    for tag in ('val/bbox_ap', 'val/bbox_ap50', 'val/segm_ap', 'train/epoch_time'):
        assert [event.step for event in events.Scalars(tag)] == [0, 1], tag
    final = re.findall(r' \* bbox AP (\d+\.\d+) segm AP (\d+\.\d+)', trained.stdout)[-1]
    assert events.Scalars('val/bbox_ap')[-1].value == pytest.approx(float(final[0]), abs=1e-3)
    checkpoint = os.path.join(run_folder(output), 'ckpt_epoch_1.pth')
    summaries = []
    for nproc in (1, 2):
        result = run_main(root, cfg + ['--eval', '--resume', checkpoint,
                                       '--output', str(root / f'eval_{detector}_{nproc}')], nproc=nproc)
        assert_ok(result)
        summaries.append([line.split('INFO ')[-1] for line in result.stdout.splitlines()
                          if 'Average' in line or ' * bbox AP' in line or 'detections on' in line])
    assert len(summaries[0]) == 2 * 13 + 1 and summaries[0] == summaries[1]
    # every image's detections reached the scoring, and there are some
    counts = re.findall(r'COCO (?:bbox|segm): (\d+) detections on (\d+) images', '\n'.join(summaries[0]))
    assert len(counts) == 2 and all(int(found) > 0 and images == '5' for found, images in counts)


@pytest.mark.parametrize('detector, lr', [('mask_rcnn', 1e-3), ('cascade_mask_rcnn', 1e-3), ('atss', 1e-3),
                                          ('sparse_rcnn', 2e-4)])
def test_a_few_training_steps_on_the_demo_scenes_lower_the_loss(tmp_path, detector, lr):
    """Each demo config's detector (on the smallest digit scenes) trained 6 steps on one batch."""
    config = load_config(os.path.join(REPO, 'configs', 'detection', f'{detector}_focal_micro_digits.yaml'),
                         str(tmp_path), 'DATA.IMG_SIZE', '32', 'DATA.MIN_SIZES', '[32]',
                         'DATA.TEST_MIN_SIZE', '32', 'DATA.MAX_SIZE', '32')
    task = build_task(config)
    loader, _, class_names = task.build_loaders(config)
    torch.manual_seed(0)
    model = task.build_model(with_classes(config, class_names))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    loader.sampler.set_epoch(0)
    samples, targets, _ = next(iter(loader))
    model.train()
    losses = []
    for _ in range(6):
        loss = task.training_loss(model, samples, targets, torch.device('cpu'))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


# the default run keeps Mask R-CNN's; Cascade Mask R-CNN's (about 20 s) runs under -m slow
@pytest.mark.parametrize('detector', ['mask_rcnn', pytest.param('cascade_mask_rcnn', marks=pytest.mark.slow)])
def test_sigkill_and_restart_end_bit_identical(workspace, detector):
    """Flip and multi-scale augmentation, drop path, a checkpoint every 2 steps; the run is
    killed in epoch 1 and restarted with the same command (the weights compared include the
    cascade's batch-norm statistics)."""
    root, data, cfg = workspace
    args = ['--cfg', cfg, '--data-path', data, '--opts', 'TRAIN.SAVE_EVERY_STEPS', '1',
            'TRAIN.EPOCHS', '3', *DETECTOR_OPTS[detector]]
    straight, killed = str(root / f'straight_{detector}'), str(root / f'killed_{detector}')
    assert_ok(run_main(root, args + ['--output', straight]))
    process = start_main(root, args + ['--output', killed], log_path=root / f'killed_{detector}.log',
                         new_session=True)
    stop_when(process, lambda: os.path.exists(os.path.join(run_folder(killed), 'ckpt_epoch_1_step_2.pth')),
              lambda: os.killpg(process.pid, signal.SIGKILL))
    assert not os.path.exists(os.path.join(run_folder(killed), 'ckpt_epoch_2.pth'))
    restarted = run_main(root, args + ['--output', killed])
    assert_ok(restarted)
    assert re.search(r'continuing at epoch 1 step [23]', restarted.stdout), restarted.stdout[-2000:]
    assert_same_training_state(os.path.join(run_folder(straight), 'ckpt_epoch_2.pth'),
                               os.path.join(run_folder(killed), 'ckpt_epoch_2.pth'))


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the file, exit status 2, nothing left behind
# ---------------------------------------------------------------------------------------------
def broken_copy(data, tmp_path, break_it):
    copy = shutil.copytree(data, tmp_path / 'broken')
    break_it(str(copy))
    return str(copy)


def not_json(root):
    with open(os.path.join(root, 'annotations', 'instances_val2017.json'), 'w') as f:
        f.write('{"images": [')


def not_coco(root):
    with open(os.path.join(root, 'annotations', 'instances_train2017.json'), 'w') as f:
        json.dump({'images': [{'id': 1}], 'annotations': [], 'categories': []}, f)


def image_missing(root):
    os.remove(os.path.join(root, 'val2017', '000004.png'))


@pytest.mark.parametrize('break_it, opts, message', [
    (not_json, [], r"instances_val2017\.json is not COCO JSON: Expecting value: line 1"),
    (not_coco, [], r"instances_train2017\.json: an entry of 'images' has no file_name, height, width"),
    (image_missing, [], r"1 images listed in .*instances_val2017\.json are missing: .*val2017/000004\.png"),
    (None, ['MODEL.NUM_CLASSES', '2'], r"instances_val2017\.json has 2 categories, more than "
                                       r"MODEL\.NUM_CLASSES 2 holds besides the background"),
])
def test_bad_coco_input_is_one_line_naming_the_file(workspace, tmp_path, capsys, break_it, opts, message):
    _, data, cfg = workspace
    if break_it is not None:
        data = broken_copy(data, tmp_path, break_it)
    output = str(tmp_path / 'out')
    status = main.cli(['--cfg', cfg, '--data-path', data, '--output', output, '--opts', *opts]
                      if opts else ['--cfg', cfg, '--data-path', data, '--output', output])
    err = capsys.readouterr().err
    assert status == main.EXIT_BAD_INPUT
    assert len(err.strip().splitlines()) == 1 and err.startswith('error: '), err
    assert re.search(message, err), err
    assert not os.path.exists(output)


# ---------------------------------------------------------------------------------------------
# The recipes
# ---------------------------------------------------------------------------------------------
DETECTION_CONFIGS = os.path.join(REPO, 'configs', 'detection')
# The seed table's parameter counts in millions (the paper's Table 5, as mmdetection counts them).
PAPER_PARAMETERS = {('mask_rcnn', 'tiny'): 49, ('mask_rcnn', 'small'): 71, ('mask_rcnn', 'base'): 110,
                    ('retinanet', 'tiny'): 39, ('retinanet', 'small'): 62, ('retinanet', 'base'): 101}


def recipe(detector, size, schedule):
    return load_config(os.path.join(DETECTION_CONFIGS, f'{detector}_focal_{size}_{schedule}.yaml'), '')


@pytest.mark.parametrize('detector, size', sorted(PAPER_PARAMETERS))
def test_recipe_models_have_the_papers_parameter_counts(detector, size):
    """Each 1x recipe builds its detector at the paper's size; torchvision's heads (81 classes,
    class-specific boxes) differ from mmdetection's by less than a million parameters. The 3x
    recipe builds the same model."""
    config = recipe(detector, size, '1x')
    assert config.MODEL.DETECTION.DETECTOR == detector
    model = Detection(config).build_model(config)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 1e6 - PAPER_PARAMETERS[detector, size]) < 1.0, count
    three_x = recipe(detector, size, '3x')
    assert three_x.MODEL.NAME == config.MODEL.NAME.replace('_1x', '_3x')
    assert all(three_x.MODEL[key] == config.MODEL[key] for key in config.MODEL if key != 'NAME')
    assert three_x.TRAIN.EPOCHS == 36
    assert three_x.TRAIN.LR_SCHEDULER.MILESTONES == [27, 33] and config.TRAIN.LR_SCHEDULER.MILESTONES == [8, 11]
    assert three_x.DATA.MIN_SIZES == list(range(480, 801, 32)) and config.DATA.MIN_SIZES == [800]


def test_recipe_optimizer_skips_the_focal_no_weight_decay_names():
    """AdamW at 1e-4 per 16 images, weight decay 0.05 except on the Focal position-bias tables,
    norms and biases; the schedule warms up over 500 steps and divides by 10 at epochs 8 and 11."""
    config = load_config(os.path.join(DETECTION_CONFIGS, 'mask_rcnn_focal_tiny_1x.yaml'), '',
                         'MODEL.FOCAL.DEPTHS', '[1, 1, 1, 1]')
    assert (config.TRAIN.BASE_LR, config.TRAIN.WEIGHT_DECAY, config.TRAIN.BASE_BATCH_SIZE) == (1e-4, 0.05, 16)
    task = Detection(config)
    model = task.build_model(config)
    names, _ = task.no_weight_decay(model)
    assert 'backbone.body.layers.0.blocks.0.attn.relative_position_bias_table' in names
    optimizer = build_optimizer(config, model, *task.no_weight_decay(model))
    no_decay = {id(p) for p in optimizer.param_groups[1]['params']}
    parameters = dict(model.named_parameters())
    assert all(id(parameters[name]) in no_decay for name in names)
    scheduler = build_scheduler(config, optimizer, 100)
    rates = []
    for step in (0, 250, 500, 799, 800, 1099, 1100):
        scheduler.step_update(step)
        rates.append(optimizer.param_groups[0]['lr'])
    assert rates[0] < 1e-6 and rates[1] == pytest.approx(0.5e-4, rel=0.01)
    assert rates[2:5] == pytest.approx([1e-4, 1e-4, 1e-5]) and rates[5:] == pytest.approx([1e-5, 1e-6])


@pytest.mark.parametrize('detector', sorted(DETECTOR_OPTS))
def test_pretrained_classifier_weights_load_into_the_backbone(workspace, tmp_path, detector):
    """--pretrained: a released-format classification checkpoint (under 'model', with its head)
    of the backbone's architecture fills the Focal stages exactly; one of another width is
    refused in one line naming the file."""
    import timm
    from models.build import focal_arguments
    from models.checkpoint import CheckpointError
    _, data, cfg = workspace
    config = load_config(cfg, data, *DETECTOR_OPTS[detector])
    arguments = dict(focal_arguments(config), num_classes=7)
    classifier = timm.create_model('focal_tiny_patch4_window7_224', **arguments)
    path = str(tmp_path / 'classifier.pth')
    torch.save({'model': classifier.state_dict()}, path)
    model = Detection(config).build_model(config)
    assert config.MODEL.DETECTION.DETECTOR == detector
    load_pretrained(load_config(cfg, data, *DETECTOR_OPTS[detector], pretrained=path), model, logging.getLogger('test'))
    body = model.backbone.body.state_dict()
    for key, value in classifier.state_dict().items():
        if key in body:
            assert torch.equal(body[key], value), key
    assert sum(key in body for key in classifier.state_dict()) > 10

    torch.save({'model': timm.create_model('focal_tiny_patch4_window7_224',
                                           **dict(arguments, embed_dim=16)).state_dict()}, path)
    with pytest.raises(CheckpointError, match=r'classifier\.pth does not fit the Focal backbone'):
        load_pretrained(load_config(cfg, data, *DETECTOR_OPTS[detector], pretrained=path), model,
                        logging.getLogger('test'))


def test_pretrained_released_classifier_fills_the_recipes_larger_focal_windows(tmp_path, caplog):
    """The 1x recipe's backbone has the paper's focal windows (15, 13, 9, 7); --pretrained with a
    released-format Focal-T (7, 5, 3, 1) resizes each block's pooled-window bias table to them,
    keeping the value at offset 0, and copies every other tensor (depths cut to one block a stage
    to keep the test small; the geometry is the recipe's)."""
    import timm
    config = recipe('mask_rcnn', 'tiny', '1x')
    assert config.MODEL.FOCAL.FOCAL_WINDOWS == [15, 13, 9, 7]
    classifier = timm.create_model('focal_tiny_patch4_window7_224', depths=(1, 1, 1, 1))
    path = str(tmp_path / 'focal-tiny-is224-ws7.pth')
    torch.save({'model': classifier.state_dict()}, path)
    config = load_config(os.path.join(DETECTION_CONFIGS, 'mask_rcnn_focal_tiny_1x.yaml'), '',
                         'MODEL.FOCAL.DEPTHS', '[1, 1, 1, 1]', pretrained=path)
    detector = Detection(config).build_model(config)
    with caplog.at_level(logging.INFO, logger='test_pretrained'):
        load_pretrained(config, detector, logging.getLogger('test_pretrained'))
    assert re.search(r'copied \d+ tensors .*, resized 4 tensors .*, fresh 0 tensors', caplog.text), caplog.text
    body, released = detector.backbone.body.state_dict(), classifier.state_dict()
    for key, value in body.items():
        if key.endswith('relative_position_bias_table_to_windows.0'):
            old_side, new_side = math.isqrt(released[key].shape[1]), math.isqrt(value.shape[1])
            stage = int(key.split('.')[1])
            assert new_side - old_side == [15, 13, 9, 7][stage] - [7, 5, 3, 1][stage]
            assert torch.equal(value[:, new_side ** 2 // 2], released[key][:, old_side ** 2 // 2])
        elif key in released:
            assert torch.equal(value, released[key]), key


# ---------------------------------------------------------------------------------------------
# Swin's random-crop policy of the 3x recipes
# ---------------------------------------------------------------------------------------------
SCALES_3X = list(range(480, 801, 32))


def recipe_transform(config):
    """The training pipeline that Detection.build_loaders builds from `config`."""
    return detection_transform(True, config.DATA.MIN_SIZES, config.DATA.MAX_SIZE, config.AUG.HFLIP,
                               config.AUG.DET_CROP_MIN_SIZES, config.AUG.DET_CROP_SIZE_RANGE)


def instances(height, width, rectangles, ellipse=None):
    """(image, target) as the COCO wrapper gives them: rectangles (top, left, bottom, right)
    labelled 1, 2, ... and an optional ellipse (centre row, centre col, radii) labelled last."""
    masks = torch.zeros(len(rectangles) + (ellipse is not None), height, width, dtype=torch.uint8)
    for index, (top, left, bottom, right) in enumerate(rectangles):
        masks[index, top:bottom, left:right] = 1
    if ellipse is not None:
        row, col, radius_rows, radius_cols = ellipse
        rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing='ij')
        masks[-1] = ((rows - row) / radius_rows) ** 2 + ((cols - col) / radius_cols) ** 2 < 1
    boxes = torch.stack([mask_box(mask) for mask in masks])
    image = tv_tensors.Image(torch.randint(0, 256, (3, height, width), dtype=torch.uint8))
    return image, {'image_id': 1, 'boxes': tv_tensors.BoundingBoxes(boxes, format='XYXY',
                                                                    canvas_size=(height, width)),
                   'labels': torch.arange(1, len(masks) + 1), 'masks': tv_tensors.Mask(masks)}


def mask_box(mask):
    """The XYXY box of a mask's pixels (right and bottom exclusive, as COCO's)."""
    rows, cols = torch.nonzero(mask, as_tuple=True)
    return torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=torch.float)


def test_3x_recipe_crops_about_half_the_images_moving_boxes_and_masks_together():
    """The 3x recipe's pipeline on an 800x1000 image (two rectangles near opposite corners, an
    ellipse in the middle), 40 draws: about half change the aspect (crops) and the others keep
    it; every shorter side is one of 480..800 (no output reaches the 1333 cap); each rectangle's
    box is its mask's box within 2.5 px (a crop then scales up to 2.1 times), the ellipse's mask
    lies in its box (a crop clips the box, not to the visible arc), and boxes, labels and masks
    are dropped together, some draws losing an instance."""
    config = recipe('mask_rcnn', 'tiny', '3x')
    transform = recipe_transform(config)
    image, target = instances(800, 1000, [(40, 60, 200, 300), (550, 700, 760, 960)], (400, 500, 150, 220))
    torch.manual_seed(0)
    crops, fewer = 0, 0
    for _ in range(40):
        output, found = transform(image, target)
        height, width = output.shape[-2:]
        assert output.dtype == torch.float32 and max(height, width) < 1333
        assert any(abs(min(height, width) - side) <= 1 for side in SCALES_3X), (height, width)
        if width == int(1000 * height / 800):
            assert height in SCALES_3X and found['labels'].tolist() == [1, 2, 3]
        else:
            crops += 1
        boxes, labels, masks = found['boxes'], found['labels'], found['masks']
        assert len(boxes) == len(labels) == len(masks) > 0 and masks.shape[-2:] == (height, width)
        fewer += len(boxes) < 3
        for box, label, mask in zip(boxes, labels.tolist(), masks):
            if label < 3:
                assert torch.allclose(box, mask_box(mask), atol=2.5), (label, box, mask_box(mask))
            elif mask.any():
                inner = mask_box(mask)
                assert (inner[:2] >= box[:2] - 2.5).all() and (inner[2:] <= box[2:] + 2.5).all()
    assert 10 <= crops <= 30 and fewer >= 1, (crops, fewer)


def test_3x_recipe_crop_may_leave_no_box():
    """A single small instance in a corner: some crop misses it, and the sample then has boxes
    (0, 4), labels (0,) and masks (0, H, W), a negative image (allow_negative_crop)."""
    transform = recipe_transform(recipe('mask_rcnn', 'tiny', '3x'))
    image, target = instances(800, 1000, [(0, 0, 40, 40)])
    torch.manual_seed(0)
    for _ in range(40):
        output, found = transform(image, target)
        if len(found['boxes']) == 0:
            break
    else:
        pytest.fail('no crop of 40 left the image without its box')
    height, width = output.shape[-2:]
    assert found['boxes'].shape == (0, 4) and found['labels'].shape == (0,)
    assert found['masks'].shape == (0, height, width) and found['image_id'] == 1


@pytest.mark.parametrize('cfg, opts', [('mask_rcnn_focal_tiny_1x.yaml', ()),
                                       ('retinanet_focal_small_3x.yaml', ('AUG.DET_CROP_MIN_SIZES', '[]'))])
def test_without_crop_sizes_no_image_is_cropped(cfg, opts):
    """AUG.DET_CROP_MIN_SIZES at its default []: every image keeps its aspect and all its
    instances (the 1x recipe trains as before)."""
    config = load_config(os.path.join(DETECTION_CONFIGS, cfg), '', *opts)
    assert config.AUG.DET_CROP_MIN_SIZES == []
    transform = recipe_transform(config)
    image, target = instances(800, 1000, [(0, 0, 40, 40), (550, 700, 760, 960)])
    torch.manual_seed(0)
    for _ in range(40):
        output, found = transform(image, target)
        height, width = output.shape[-2:]
        assert height in config.DATA.MIN_SIZES and width == int(1000 * height / 800)
        assert found['labels'].tolist() == [1, 2] and found['masks'].shape == (2, height, width)


def test_recipes_crop_as_swin_in_3x_only():
    """The 3x recipes carry Swin's crop policy ([400, 500, 600] then 384-600 px); the 1x ones,
    which train at one scale, and the digits demo do not crop."""
    for detector, size in PAPER_PARAMETERS:
        three_x, one_x = recipe(detector, size, '3x'), recipe(detector, size, '1x')
        assert three_x.AUG.DET_CROP_MIN_SIZES == [400, 500, 600], (detector, size)
        assert three_x.AUG.DET_CROP_SIZE_RANGE == [384, 600], (detector, size)
        assert one_x.AUG.DET_CROP_MIN_SIZES == [], (detector, size)
    demo = load_config(os.path.join(DETECTION_CONFIGS, 'mask_rcnn_focal_micro_digits.yaml'), '')
    assert demo.AUG.DET_CROP_MIN_SIZES == []


@pytest.mark.parametrize('value', ['[600, 384]', '[0, 10]', '[384]'])
def test_bad_crop_size_range_is_named(value):
    with pytest.raises(ConfigError, match=r"'AUG\.DET_CROP_SIZE_RANGE' must be \[min, max\]"):
        load_config(None, '', 'AUG.DET_CROP_SIZE_RANGE', value)


@pytest.mark.parametrize('opts, cropped', [((), False), (('AUG.DET_CROP_MIN_SIZES', '[24]',
                                                               'AUG.DET_CROP_SIZE_RANGE', '[16, 20]'), True)])
def test_training_loader_crops_as_the_config_says(workspace, opts, cropped):
    """The training loader of the square demo scenes gives non-square images (crops) only with
    AUG.DET_CROP_MIN_SIZES set."""
    _, data, cfg = workspace
    config = load_config(cfg, data, *opts)
    loader, _, _ = Detection(config).build_loaders(config)
    shapes = set()
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        for images, targets, _ in loader:
            shapes.update(tuple(image.shape[-2:]) for image in images)
            assert all(len(target['boxes']) == len(target['masks']) for target in targets)
    assert any(height != width for height, width in shapes) == cropped, shapes


@pytest.mark.parametrize('detector', ['mask_rcnn', 'retinanet'])
def test_a_training_step_on_a_crop_without_a_box(tmp_path, detector):
    """The micro detector trains on a batch where the crop policy left one image with no box
    (and on one where it left none with a box): finite losses and gradients."""
    cfg = tmp_path / 'tiny.yaml'
    cfg.write_text(TINY_DETECTION if detector == 'mask_rcnn' else TINY_RETINANET)
    config = load_config(str(cfg), '', 'MODEL.NUM_CLASSES', '4', 'MODEL.DETECTION.DETECTOR', detector,
                         'AUG.DET_CROP_MIN_SIZES', '[24]', 'AUG.DET_CROP_SIZE_RANGE', '[16, 20]')
    image, target = instances(32, 40, [(1, 1, 9, 9)])
    torch.manual_seed(0)
    transform, samples = recipe_transform(config), {}
    for _ in range(40):  # the first sample with a box and the first crop that kept none
        output, found = transform(image, target)
        samples.setdefault(len(found['boxes']) > 0, (output, found, []))
    assert sorted(samples) == [False, True], 'no crop of 40 left the image without its box'
    negative = samples[False][1]
    assert negative['boxes'].shape == (0, 4) and negative['masks'].shape[0] == 0
    task = Detection(config)
    model = task.build_model(config)
    model.train()
    for batch in ([samples[False], samples[True]], [samples[False], samples[False]]):
        images, targets, _ = collate_detection_training(batch)
        model.zero_grad()
        loss = task.training_loss(model, images, targets, torch.device('cpu'))
        loss.backward()
        assert torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
