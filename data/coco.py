# --------------------------------------------------------
# Focal Transformer: COCO detection data
# Licensed under The MIT License [see LICENSE for details]
# --------------------------------------------------------
"""COCO instances (boxes, labels, pycocotools masks) through torchvision.

`load_coco_split` checks an annotation file and its images before training starts and returns
torchvision's `CocoDetection` wrapped for `transforms.v2` (`wrap_dataset_for_transforms_v2`), whose
samples are `(image, {'boxes', 'labels', 'masks', 'image_id'})`: boxes and masks are tv_tensors,
so the v2 transforms of `detection_transform` (a shorter side drawn per image under a cap on the
longer side, optionally Swin's random-size crop policy in between, horizontal flip) move them with
the image. The file's categories, sorted by id, are the labels 1..K whatever their ids (COCO 2017's
80 categories, ids 1..90, are labels 1..80): torchvision's detectors take 0 for the background, which
a category id 0 would otherwise become. `CocoImages.category_ids` maps the labels back, for the
results that pycocotools scores against the file.

Every problem found before training is a one-line `DataError` naming the file: a file that is
not COCO JSON, a listed image that is missing, more categories than the model has classes. An
image that turns out unreadable during training raises `DataError(path=...)`, for the bad-sample
policy (`data.bad_samples.ReplaceUnreadable`).
"""
import contextlib
import functools
import io
import json
import os

import torch
from torchvision import datasets, tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .image_io import DataError, load_rgb

# Keys each part of a COCO file must have for training and evaluation.
REQUIRED_KEYS = {'images': ('id', 'file_name', 'height', 'width'),
                 'annotations': ('id', 'image_id', 'category_id', 'bbox', 'area', 'iscrowd'),
                 'categories': ('id',)}
# How many missing images the error names before "(+N more)".
FILES_NAMED = 3


class CocoImages(datasets.CocoDetection):
    """`CocoDetection` that reads images with `data.image_io.load_rgb` (a `DataError` naming the
    file when one cannot be read), gives each annotation its category's label (1..K, in the order of
    `category_ids`) and leaves crowd regions out of the targets, as torchvision's detection references
    train (COCOeval still reads them from the annotation file)."""

    @functools.cached_property
    def category_ids(self):
        """The category id of each label 1..K (index 0 is label 1)."""
        return sorted(category['id'] for category in self.coco.dataset['categories'])

    @functools.cached_property
    def _labels(self):
        return {category_id: label for label, category_id in enumerate(self.category_ids, start=1)}

    def _load_image(self, id):
        return load_rgb(os.path.join(self.root, self.coco.loadImgs(id)[0]['file_name']))

    def _load_target(self, id):
        return [dict(annotation, category_id=self._labels[annotation['category_id']])
                for annotation in super()._load_target(id) if not annotation['iscrowd']]


def read_coco(annotation_file, image_folder, with_masks):
    """`CocoImages` over `annotation_file`, its structure checked (`with_masks`: every
    annotation has a 'segmentation'); a one-line DataError if the file is missing, not JSON, or
    not COCO instances."""
    if not os.path.isfile(annotation_file):
        raise DataError(f"COCO annotation file not found: {annotation_file}")
    if not os.path.isdir(image_folder):
        raise DataError(f"COCO image folder not found: {image_folder}")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            dataset = CocoImages(image_folder, annotation_file)
    except json.JSONDecodeError as err:
        raise DataError(f"{annotation_file} is not COCO JSON: {err}") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{annotation_file} is not COCO JSON: not UTF-8 text ({err.reason})") from None
    except (AssertionError, TypeError, KeyError, AttributeError) as err:
        raise DataError(f"{annotation_file} is not COCO JSON: expected an object with 'images', "
                        f"'annotations' and 'categories' ({type(err).__name__}: {err})") from None
    content = dataset.coco.dataset
    required = dict(REQUIRED_KEYS)
    if with_masks:
        required['annotations'] += ('segmentation',)
    for part, keys in required.items():
        entries = content.get(part)
        if not isinstance(entries, list):
            raise DataError(f"{annotation_file} is not COCO instances JSON: no list '{part}'")
        for entry in entries:
            missing = [key for key in keys if not isinstance(entry, dict) or key not in entry]
            if missing:
                raise DataError(f"{annotation_file}: an entry of '{part}' has no {', '.join(missing)}: "
                                f"{str(entry)[:80]}")
    image_ids = {image['id'] for image in content['images']}
    category_ids = {category['id'] for category in content['categories']}
    if len(category_ids) < len(content['categories']):
        repeated = sorted(id for id in category_ids if dataset.category_ids.count(id) > 1)
        raise DataError(f"{annotation_file}: 'categories' lists the id {repeated[0]} more than once")
    for annotation in content['annotations']:
        if annotation['image_id'] not in image_ids:
            raise DataError(f"{annotation_file}: annotation {annotation['id']} is of image "
                            f"{annotation['image_id']}, which 'images' does not list")
        if annotation['category_id'] not in category_ids:
            raise DataError(f"{annotation_file}: annotation {annotation['id']} has category "
                            f"{annotation['category_id']}, which 'categories' does not list")
    return dataset


def missing_images(dataset):
    """Paths of the images the annotation file lists and the folder lacks."""
    return [path for path in (os.path.join(dataset.root, image['file_name'])
                              for image in dataset.coco.dataset['images'])
            if not os.path.isfile(path)]


def check_images_exist(dataset, annotation_file, tolerated):
    """Raise a DataError naming the missing images when there are more than `tolerated`."""
    missing = missing_images(dataset)
    if len(missing) > tolerated:
        more = f' (+{len(missing) - FILES_NAMED} more)' if len(missing) > FILES_NAMED else ''
        raise DataError(f"{len(missing)} images listed in {annotation_file} are missing: "
                        + ', '.join(missing[:FILES_NAMED]) + more, path=missing[0])
    return missing


def keep_trainable_images(dataset):
    """Only the images with at least one non-crowd box wider and taller than one pixel, as
    torchvision's references train (an image without a box teaches the detector nothing)."""
    def trainable(image_id):
        return any(not annotation['iscrowd'] and annotation['bbox'][2] > 1 and annotation['bbox'][3] > 1
                   for annotation in dataset.coco.imgToAnns[image_id])
    dataset.ids = [image_id for image_id in dataset.ids if trainable(image_id)]
    return dataset


class RandomSizeCrop(v2.Transform):
    """A crop whose height and width are drawn independently from the integers
    [min_side, max_side] (an image side shorter than min_side is kept whole), at a uniformly random
    position: mmdetection's RandomCrop with crop_type 'absolute_range' of Swin's 3x recipes. Boxes
    are shifted and clipped to the crop and masks cropped; `SanitizeBoundingBoxes` then drops the
    boxes left without area, and a crop may keep no box at all (a negative image)."""

    def __init__(self, min_side, max_side):
        super().__init__()
        self.min_side, self.max_side = int(min_side), int(max_side)
        if not 0 < self.min_side <= self.max_side:
            raise ValueError(f"crop sides must satisfy 0 < min <= max, got [{min_side}, {max_side}]")

    def _side(self, length):
        # torch's global generator only: the loader seeds it per sample, so resumed runs repeat
        return int(torch.randint(min(length, self.min_side), min(length, self.max_side) + 1, ()))

    def make_params(self, flat_inputs):
        height, width = v2.query_size(flat_inputs)
        crop_h, crop_w = self._side(height), self._side(width)
        top = int(torch.randint(height - crop_h + 1, ()))
        left = int(torch.randint(width - crop_w + 1, ()))
        return {'top': top, 'left': left, 'height': crop_h, 'width': crop_w}

    def transform(self, inpt, params):
        return self._call_kernel(F.crop, inpt, **params)


def detection_transform(is_train, min_sizes, max_size, hflip, crop_min_sizes=(), crop_size_range=(384, 600)):
    """Training: a shorter side drawn from `min_sizes` per image with the longer side at most
    `max_size`, a horizontal flip with probability `hflip`, boxes of no area dropped (with their
    labels and masks). With `crop_min_sizes`, half the images (drawn per image) are instead resized
    to a shorter side from `crop_min_sizes`, cropped to a height and a width drawn from
    `crop_size_range` (`RandomSizeCrop`), then resized as the others: Swin's AutoAugment policies of
    its 3x recipes. Evaluation: the image as it is (the detector resizes it and maps its
    detections back)."""
    # boxes in float before any resize (COCO files may hold integer coordinates)
    steps = [v2.ToImage(), v2.ToDtype({tv_tensors.BoundingBoxes: torch.float32, 'others': None})]
    if is_train:
        resize = v2.RandomShortestSize(list(min_sizes), max_size=max_size)
        if crop_min_sizes:
            resize = v2.RandomChoice([resize, v2.Compose([
                v2.RandomShortestSize(list(crop_min_sizes), max_size=max_size),
                RandomSizeCrop(*crop_size_range), resize])])
        steps += [resize, v2.RandomHorizontalFlip(hflip)]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    if is_train:
        steps.append(v2.SanitizeBoundingBoxes())
    return v2.Compose(steps)


def wrap_for_transforms(dataset, transform, target_keys):
    """The dataset's samples as tv_tensors with `target_keys`, through `transform`."""
    dataset.transforms = transform
    return datasets.wrap_dataset_for_transforms_v2(dataset, target_keys=target_keys)


def collate_detection_training(batch):
    """DataLoader collate_fn for `ReplaceUnreadable` samples of different sizes: (list of images,
    list of targets, the (path, error) pairs replaced in the whole batch)."""
    return ([image for image, _, _ in batch], [target for _, target, _ in batch],
            [report for _, _, reports in batch for report in reports])


def collate_detection_eval(batch):
    """DataLoader collate_fn of evaluation: (list of images, list of targets)."""
    return [image for image, _ in batch], [target for _, target in batch]
