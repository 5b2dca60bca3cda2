"""The digit-scene demo data: valid COCO (pycocotools and torchvision read it, the masks are the
drawn digits) and a valid ADE20K layout that agrees with it pixel for pixel."""
import json
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO
from sklearn.datasets import load_digits
from torchvision.datasets import CocoDetection, wrap_dataset_for_transforms_v2

from data import DataError
from data.digit_scenes import (ADE_BACKGROUND, ADE_CLASSES, ADE_DIR, ADE_IGNORED, COCO_DIR,
                               NUM_SCENES, draw_scene, ensure_digit_scenes)
from data.digits import COMPLETE_MARKER

SIZE = 48


@pytest.fixture(scope='module')
def scenes(tmp_path_factory):
    return ensure_digit_scenes(str(tmp_path_factory.mktemp('cache')), SIZE, is_writer=True)


def test_coco_files_load_and_masks_are_the_labelled_digits(scenes):
    for split, ade_split in (('train2017', 'training'), ('val2017', 'validation')):
        coco = COCO(os.path.join(scenes, COCO_DIR, 'annotations', f'instances_{split}.json'))
        assert sorted(coco.getCatIds()) == list(range(1, 11))
        assert [c['name'] for c in coco.loadCats(list(range(1, 11)))] == [str(d) for d in range(10)]
        image_ids = sorted(coco.getImgIds())
        assert len(image_ids) == NUM_SCENES['train' if split == 'train2017' else 'val']
        annotation_ids = coco.getAnnIds()
        assert len(set(annotation_ids)) == len(annotation_ids) >= len(image_ids)
        for image_id in image_ids[:40]:
            info = coco.loadImgs(image_id)[0]
            image = Image.open(os.path.join(scenes, COCO_DIR, split, info['file_name']))
            assert image.mode == 'RGB' and image.size == (info['width'], info['height']) == (SIZE, SIZE)
            ade_name = f"ADE_{split[:-4]}_{image_id:08d}.png"
            label = np.asarray(Image.open(os.path.join(scenes, ADE_DIR, 'annotations', ade_split, ade_name)))
            ade_image = Image.open(os.path.join(scenes, ADE_DIR, 'images', ade_split, ade_name))
            assert np.array_equal(np.asarray(ade_image), np.asarray(image))

            # the label map, rebuilt from the COCO masks, is the ADE20K label outside the ignored rim
            rebuilt = np.full((SIZE, SIZE), ADE_BACKGROUND)
            annotations = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
            assert 1 <= len(annotations) <= 4
            for annotation in annotations:
                mask = coco.annToMask(annotation).astype(bool)
                assert mask.sum() == annotation['area'] > 0
                assert not (rebuilt[mask] != ADE_BACKGROUND).any(), 'masks overlap'
                rebuilt[mask] = ADE_BACKGROUND + annotation['category_id']
                x, y, w, h = annotation['bbox']
                rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
                assert (x, y, x + w - 1, y + h - 1) == (cols[0], rows[0], cols[-1], rows[-1])
                # the digit is painted there: brighter than the background around it
                pixels = np.asarray(image, dtype=float).sum(axis=2)
                assert pixels[mask].mean() > pixels[rebuilt == ADE_BACKGROUND].mean() + 100
            labelled = label != ADE_IGNORED
            assert np.array_equal(rebuilt[labelled], label[labelled])
            assert set(np.unique(rebuilt[~labelled])) <= {ADE_BACKGROUND}


def test_torchvision_coco_detection_reads_boxes_and_masks(scenes):
    root = os.path.join(scenes, COCO_DIR)
    dataset = wrap_dataset_for_transforms_v2(
        CocoDetection(os.path.join(root, 'val2017'), os.path.join(root, 'annotations', 'instances_val2017.json')),
        target_keys=('boxes', 'labels', 'masks'))
    image, target = dataset[3]
    assert image.size == (SIZE, SIZE)
    masks = target['masks']
    assert masks.shape == (len(target['labels']), SIZE, SIZE) and masks.flatten(1).any(1).all()
    assert target['labels'].min() >= 1 and target['labels'].max() <= 10
    for box, mask in zip(target['boxes'], masks):  # XYXY boxes with an exclusive far edge
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert box.tolist() == [cols[0], rows[0], cols[-1] + 1, rows[-1] + 1]


def test_ade20k_layout_and_classes(scenes):
    for split in ('training', 'validation'):
        images = sorted(os.listdir(os.path.join(scenes, ADE_DIR, 'images', split)))
        labels = sorted(os.listdir(os.path.join(scenes, ADE_DIR, 'annotations', split)))
        assert images == labels and len(images) == NUM_SCENES['train' if split == 'training' else 'val']
        assert images[0] == f"ADE_{'train' if split == 'training' else 'val'}_00000001.png"
        counts = np.zeros(256, dtype=np.int64)
        for name in labels[:100]:
            label = Image.open(os.path.join(scenes, ADE_DIR, 'annotations', split, name))
            assert label.mode == 'L' and label.size == (SIZE, SIZE)
            counts += np.bincount(np.asarray(label).ravel(), minlength=256)
        # every class appears, and nothing beyond them
        assert counts[:len(ADE_CLASSES) + 1].all() and not counts[len(ADE_CLASSES) + 1:].any()


def test_masks_are_the_scans_of_their_class():
    # Each mask lies inside its digit's square and, shrunk back to 8x8 there, is the scan's ink.
    digits = load_digits()
    for scan in (17, 100, 1000):
        _, _, objects = draw_scene(64, digits.images, digits.target, np.array([scan]), np.random.default_rng(scan))
        assert objects
        for drawn in objects:
            assert (drawn.digit, drawn.scan) == (digits.target[scan], scan)
            top, left, height, width = drawn.box
            inside = drawn.mask[top:top + height, left:left + width]
            assert inside.sum() == drawn.mask.sum()
            shrunk = Image.fromarray(inside.astype(np.uint8) * 255).resize((8, 8), Image.Resampling.BOX)
            ink = digits.images[scan] / 16
            assert np.abs(np.asarray(shrunk) / 255 - ink).mean() < 0.2
            assert np.corrcoef(np.asarray(shrunk, dtype=float).ravel(), ink.ravel())[0, 1] > 0.9


def test_scenes_are_deterministic_and_the_marker_counts_them(scenes):
    digits = load_digits()
    pool = np.arange(100)
    first = draw_scene(40, digits.images, digits.target, pool, np.random.default_rng(5))
    second = draw_scene(40, digits.images, digits.target, pool, np.random.default_rng(5))
    assert np.array_equal(first[0], second[0]) and np.array_equal(first[1], second[1])
    with open(os.path.join(scenes, COMPLETE_MARKER)) as f:
        marker = json.load(f)
    assert marker['size'] == SIZE and marker['train']['scenes'] == NUM_SCENES['train']
    with open(os.path.join(scenes, COCO_DIR, 'annotations', 'instances_val2017.json')) as f:
        assert marker['val']['digits'] == len(json.load(f)['annotations'])


def test_second_call_reuses_the_folder(scenes):
    before = os.stat(os.path.join(scenes, COCO_DIR, 'annotations', 'instances_val2017.json')).st_ino
    root = os.path.dirname(scenes)
    assert ensure_digit_scenes(root, SIZE, is_writer=True) == scenes
    assert ensure_digit_scenes(root, SIZE, is_writer=False, timeout=0) == scenes
    assert os.stat(os.path.join(scenes, COCO_DIR, 'annotations', 'instances_val2017.json')).st_ino == before


@pytest.mark.parametrize('bad_size', [16, 64.0, '64', True])
def test_bad_size_is_named(tmp_path, bad_size):
    with pytest.raises(DataError, match='digit scenes: size must be'):
        ensure_digit_scenes(str(tmp_path), bad_size, is_writer=True)


def test_waiting_rank_gives_up_naming_the_folder(tmp_path):
    with pytest.raises(DataError, match='digit_scenes_64'):
        ensure_digit_scenes(str(tmp_path), 64, is_writer=False, timeout=0.1, poll_interval=0.05)


def test_rle_round_trip_of_a_mask_with_holes(scenes):
    # digits such as 0, 6, 8 have holes: RLE keeps them where polygons would not
    coco = COCO(os.path.join(scenes, COCO_DIR, 'annotations', 'instances_train2017.json'))
    zeros = coco.loadAnns(coco.getAnnIds(catIds=[1]))[:5]
    for annotation in zeros:
        mask = coco_mask.decode(annotation['segmentation']).astype(bool)
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        inside = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
        assert (~inside).any()
