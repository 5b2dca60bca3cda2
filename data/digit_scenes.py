"""The built-in dense-prediction demo data: scenes of scikit-learn's handwritten digits.

Each scene is a `size` x `size` RGB canvas (a dark background colour under faint noise) holding
one to four digits, each an 8x8 scan of `load_digits()` upsampled to a random size and aspect,
painted in a random bright colour at a random place where its square does not touch another
digit's. A digit's ink (the upsampled scan, 0..1) blends its colour into the background; its
instance mask is where the ink is at least MASK_INK. Training scenes use the training scans of
the classification demo (`digits.train_val_scans`), validation scenes its validation scans, so
the validation handwriting is unseen. Everything is drawn from fixed seeds: the same files on
every machine.

The scenes are written once, in the layouts of the real data sets, so that the loaders of COCO
and ADE20K read them unchanged:

    <root>/digit_scenes_<size>/coco/{train2017,val2017}/<id>.png
    <root>/digit_scenes_<size>/coco/annotations/instances_{train2017,val2017}.json
    <root>/digit_scenes_<size>/ADEChallengeData2016/images/{training,validation}/ADE_<split>_<id>.png
    <root>/digit_scenes_<size>/ADEChallengeData2016/annotations/{training,validation}/ADE_<split>_<id>.png

COCO: categories 1..10 are the digits '0'..'9'; each digit is one annotation (iscrowd 0) with
its tight box [x, y, width, height], its area in pixels and its mask as compressed RLE.
ADE20K: a label PNG per image, 0 where the label is ignored (the anti-aliased rim of each digit,
where the ink lies between RIM_INK and MASK_INK and neither answer is right), 1 the background,
2..11 the digits '0'..'9' (ADE_CLASSES, after the loader's shift down by one). A pixel of
class 2 + d in the label is a pixel of a category d + 1 mask in the COCO file, and the other way
round. The folder appears complete or not at all (`digits.build_once`: written under a temporary
name by the writer rank, renamed into place; the other ranks wait).
"""
import json
import os
import shutil
from typing import NamedTuple

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask
from sklearn.datasets import load_digits

from .digits import DEMO_CACHE, build_once, train_val_scans
from .image_io import DataError

NUM_SCENES = {'train': 1000, 'val': 200}
COCO_SPLITS = {'train': 'train2017', 'val': 'val2017'}
ADE_SPLITS = {'train': 'training', 'val': 'validation'}
COCO_DIR, ADE_DIR = 'coco', 'ADEChallengeData2016'
COCO_CATEGORIES = [{'id': digit + 1, 'name': str(digit), 'supercategory': 'digit'} for digit in range(10)]
# Classes of the ADE20K labels after the shift: label 1 is class 0, the background.
ADE_CLASSES = ('background',) + tuple(str(digit) for digit in range(10))
ADE_IGNORED, ADE_BACKGROUND = 0, 1
MAX_DIGITS = 4
DIGIT_SIZE = (0.2, 0.4)  # of the canvas side
ASPECT_JITTER = 0.15  # height and width each scaled by up to this much either way
MASK_INK, RIM_INK = 0.5, 0.2
PLACEMENT_TRIES = 50
SCENE_SEED = 0
MIN_SIZE = 32


def ensure_digit_scenes(root, size, is_writer, timeout=600.0, poll_interval=0.5):
    """Return the folder `<root>/digit_scenes_<size>` (its `coco/` and `ADEChallengeData2016/`
    sub-folders hold the two layouts; `root` DEMO_CACHE when empty), writing it on first use.

    The writer (rank 0) builds the folder if it is missing or incomplete; the other ranks
    (`is_writer=False`) only wait, up to `timeout` seconds, for the writer to finish.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size < MIN_SIZE:
        raise DataError(f"digit scenes: size must be an integer >= {MIN_SIZE}, got {size!r}")
    folder = os.path.join(os.path.abspath(os.path.expanduser(root or DEMO_CACHE)), f'digit_scenes_{size}')
    return build_once(folder, lambda partial: _write_scenes(partial, size), is_writer,
                      timeout, poll_interval)


def _write_scenes(folder, size):
    digits = load_digits()
    marker = {'size': size, 'scene_seed': SCENE_SEED}
    for split_index, (split, scans) in enumerate(zip(('train', 'val'), train_val_scans(digits))):
        rng = np.random.default_rng([SCENE_SEED, split_index])
        scans = np.sort(scans)
        coco_images, coco_annotations = [], []
        image_folder = os.path.join(folder, COCO_DIR, COCO_SPLITS[split])
        ade_images = os.path.join(folder, ADE_DIR, 'images', ADE_SPLITS[split])
        ade_labels = os.path.join(folder, ADE_DIR, 'annotations', ADE_SPLITS[split])
        for path in (image_folder, ade_images, ade_labels):
            os.makedirs(path)
        for image_id in range(1, NUM_SCENES[split] + 1):
            image, label, objects = draw_scene(size, digits.images, digits.target, scans, rng)
            file_name = f'{image_id:06d}.png'
            ade_name = f'ADE_{split}_{image_id:08d}.png'
            Image.fromarray(image).save(os.path.join(image_folder, file_name))
            shutil.copyfile(os.path.join(image_folder, file_name), os.path.join(ade_images, ade_name))
            Image.fromarray(label).save(os.path.join(ade_labels, ade_name))
            coco_images.append({'id': image_id, 'file_name': file_name, 'height': size, 'width': size})
            for drawn in objects:
                coco_annotations.append(_coco_annotation(len(coco_annotations) + 1, image_id, drawn))
        annotations = os.path.join(folder, COCO_DIR, 'annotations')
        os.makedirs(annotations, exist_ok=True)
        with open(os.path.join(annotations, f'instances_{COCO_SPLITS[split]}.json'), 'w') as f:
            json.dump({'info': {'description': 'digit scenes (scikit-learn digits)'}, 'licenses': [],
                       'images': coco_images, 'annotations': coco_annotations,
                       'categories': COCO_CATEGORIES}, f)
        marker[split] = {'scenes': len(coco_images), 'digits': len(coco_annotations)}
    return marker


class DrawnDigit(NamedTuple):
    digit: int
    mask: np.ndarray  # (size, size) bool, non-empty
    scan: int  # index into `load_digits()`
    box: tuple  # (top, left, height, width) of the upsampled scan on the canvas


def draw_scene(size, scans, targets, scan_pool, rng):
    """(image (size, size, 3) uint8, ADE20K label (size, size) uint8, [DrawnDigit]) of one
    scene of digits drawn from the scans `scans[scan_pool]`."""
    background = rng.uniform(0.0, 0.3, 3)
    image = background + rng.normal(0.0, 0.03, (size, size, 3))
    label = np.full((size, size), ADE_BACKGROUND, dtype=np.uint8)
    placed, objects = [], []
    for _ in range(rng.integers(1, MAX_DIGITS + 1)):
        scan_index = scan_pool[rng.integers(len(scan_pool))]
        side = rng.uniform(*DIGIT_SIZE) * size
        height, width = (max(8, int(round(side * rng.uniform(1 - ASPECT_JITTER, 1 + ASPECT_JITTER))))
                         for _ in range(2))
        box = _free_place(height, width, size, placed, rng)
        if box is None:
            continue
        placed.append(box)
        top, left = box[:2]
        ink = _upsampled_ink(scans[scan_index], height, width)
        colour = rng.uniform(0.55, 1.0, 3)
        region = image[top:top + height, left:left + width]
        region[:] = region * (1 - ink[..., None]) + colour * ink[..., None]
        digit = int(targets[scan_index])
        mask = np.zeros((size, size), dtype=bool)
        mask[top:top + height, left:left + width] = ink >= MASK_INK
        rim = np.zeros_like(mask)
        rim[top:top + height, left:left + width] = (ink >= RIM_INK) & (ink < MASK_INK)
        label[rim] = ADE_IGNORED
        label[mask] = ADE_BACKGROUND + 1 + digit
        if mask.any():
            objects.append(DrawnDigit(digit, mask, int(scan_index), box))
    image = np.round(image.clip(0.0, 1.0) * 255).astype(np.uint8)
    return image, label, objects


def _free_place(height, width, size, placed, rng):
    """(top, left, height, width) of a random place for the digit whose square, grown by a pixel,
    overlaps no placed one; None when PLACEMENT_TRIES random places all do."""
    for _ in range(PLACEMENT_TRIES):
        top, left = int(rng.integers(0, size - height + 1)), int(rng.integers(0, size - width + 1))
        if all(top + height < t or t + h < top or left + width < l or l + w < left
               for t, l, h, w in placed):
            return top, left, height, width
    return None


def _upsampled_ink(scan, height, width):
    """The 8x8 scan (ink 0..16) resized bicubically to (height, width), as ink in [0, 1]."""
    ink = Image.fromarray((scan / 16.0).astype(np.float32))
    return np.asarray(ink.resize((width, height), Image.Resampling.BICUBIC)).clip(0.0, 1.0)


def _coco_annotation(annotation_id, image_id, drawn):
    mask = drawn.mask
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]
    return {'id': annotation_id, 'image_id': image_id, 'category_id': drawn.digit + 1, 'bbox': box,
            'area': int(mask.sum()), 'iscrowd': 0,
            'segmentation': {'size': list(rle['size']), 'counts': rle['counts'].decode('ascii')}}
