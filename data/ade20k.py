# --------------------------------------------------------
# Focal Transformer: ADE20K semantic segmentation data
# Licensed under The MIT License [see LICENSE for details]
# --------------------------------------------------------
"""The ADE20K folder layout (ADEChallengeData2016) and the UPerNet augmentation of Swin's setting.

    <root>/images/{training,validation}/<name>.jpg (or .png)
    <root>/annotations/{training,validation}/<name>.png   one byte per pixel

    <root>/class_names.txt                                 optional: the name of label value i on line i

A label value 0 is "not annotated" and is ignored (IGNORE_INDEX in the targets); 1..N are the
classes 0..N-1 (mmseg's `reduce_zero_label`). The real data has 150 classes, named in the
objectInfo150.txt it ships with; a folder of one's own has its own count and names, in
class_names.txt (`read_class_names`). `ADE20KSegmentation` checks the pairing and the sizes of every image and label
(headers only) before training starts, and the class values of each label when it is read; every
problem is a one-line `DataError` naming the file, with `path` set for the bad-sample policy.

Augmentation (`train_transform`), as mmseg's pipeline for Swin's UPerNet, in transforms.v2,
which moves the label with the image: a random rescale of the (long, short) scale by a ratio in
`ratio_range` keeping the aspect, a random crop of `crop_size` whose largest class covers less
than `cat_max_ratio` of the labelled pixels (10 tries), a horizontal flip, photometric distortion,
normalisation, and padding to `crop_size` (0 for the image, IGNORE_INDEX for the label).
Evaluation (`eval_transform`) only normalises: the evaluator rescales each image itself, once per
test scale, and compares its prediction with the label at the image's own size.
"""
import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from .image_io import DataError, load_rgb

ADE20K_NUM_CLASSES = 150
IGNORE_INDEX = 255
SPLIT_FOLDERS = {'train': 'training', 'val': 'validation'}
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')
# mmseg's img_norm_cfg: the ImageNet statistics
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CROP_TRIES = 10
FILES_NAMED = 3
# The class names of a folder: one's own (a name per line), or those ADE20K ships (a header line, then
# tab-separated Idx, Ratio, Train, Val, Name)
CLASS_NAMES_FILE, ADE20K_OBJECT_INFO = 'class_names.txt', 'objectInfo150.txt'


def read_class_names(root):
    """The names of label values 1..N of the folder `root`, from its CLASS_NAMES_FILE, else from ADE20K's
    ADE20K_OBJECT_INFO; None when it has neither. A file that names no class, or leaves one unnamed, is a
    DataError naming it."""
    path = os.path.join(root, CLASS_NAMES_FILE)
    is_ade20k = not os.path.isfile(path)
    if is_ade20k:
        path = os.path.join(root, ADE20K_OBJECT_INFO)
        if not os.path.isfile(path):
            return None
    try:
        with open(path, encoding='utf-8') as f:
            lines = f.read().rstrip().splitlines()[1 if is_ade20k else 0:]
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read the class names in {path}: {err}") from None
    names = [line.split('\t')[-1].strip() if is_ade20k else line.strip() for line in lines]
    if '' in names or not names:
        where = f"line {names.index('') + 1 + is_ade20k} names no class" if names else "it names no class"
        raise DataError(f"{path}: {where} (one name per label value 1, 2, ...)")
    return names


def rescaled_size(height, width, scale):
    """(height, width) resized keeping the aspect to fit a (long, short) `scale`: mmcv's
    `rescale_size` for Resize(img_scale, keep_ratio=True), the same for either orientation."""
    factor = min(max(scale) / max(height, width), min(scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


class RandomRescale(v2.Transform):
    """Resize to a (long, short) `scale` times a ratio drawn uniformly from `ratio_range`,
    keeping the aspect (mmseg's Resize with img_scale and ratio_range); labels by nearest."""

    def __init__(self, scale, ratio_range):
        super().__init__()
        self.scale = tuple(scale)
        self.ratio_range = tuple(ratio_range)

    def make_params(self, flat_inputs):
        height, width = v2.query_size(flat_inputs)
        ratio = float(torch.empty(1).uniform_(*self.ratio_range))
        return {'size': list(rescaled_size(height, width, [side * ratio for side in self.scale]))}

    def transform(self, inpt, params):
        return self._call_kernel(F.resize, inpt, params['size'])


class CategoryBalancedCrop(v2.Transform):
    """A random crop of at most `crop_size` (smaller images are kept whole on that side), drawn
    again, up to CROP_TRIES times, while one class covers `cat_max_ratio` or more of the crop's
    labelled pixels or the crop holds a single class (mmseg's RandomCrop with cat_max_ratio)."""

    def __init__(self, crop_size, cat_max_ratio):
        super().__init__()
        self.crop_size = int(crop_size)
        self.cat_max_ratio = cat_max_ratio

    def make_params(self, flat_inputs):
        height, width = v2.query_size(flat_inputs)
        crop_h, crop_w = min(self.crop_size, height), min(self.crop_size, width)
        label = next(inpt for inpt in flat_inputs if isinstance(inpt, tv_tensors.Mask))
        for _ in range(CROP_TRIES):
            top = int(torch.randint(height - crop_h + 1, ()))
            left = int(torch.randint(width - crop_w + 1, ()))
            if self.cat_max_ratio >= 1:
                break
            crop = label[..., top:top + crop_h, left:left + crop_w]
            counts = torch.bincount(crop[crop != IGNORE_INDEX].flatten().long())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() < self.cat_max_ratio * counts.sum():
                break
        return {'top': top, 'left': left, 'height': crop_h, 'width': crop_w}

    def transform(self, inpt, params):
        return self._call_kernel(F.crop, inpt, **params)


class PadTo(v2.Transform):
    """Pad at the bottom and right to `size` x `size`: images with 0, labels with IGNORE_INDEX."""

    def __init__(self, size):
        super().__init__()
        self.size = int(size)

    def make_params(self, flat_inputs):
        height, width = v2.query_size(flat_inputs)
        return {'padding': [0, 0, max(self.size - width, 0), max(self.size - height, 0)]}

    def transform(self, inpt, params):
        fill = IGNORE_INDEX if isinstance(inpt, tv_tensors.Mask) else 0
        return self._call_kernel(F.pad, inpt, params['padding'], fill=fill)


def photometric_distortion():
    """mmseg's PhotoMetricDistortion (the SSD one), each part applied with probability 0.5:
    brightness (torchvision's is a factor; mmseg adds up to +-32 of 255), contrast 0.5-1.5,
    saturation 0.5-1.5, hue +-18 degrees."""
    return v2.Compose([v2.RandomApply([v2.ColorJitter(brightness=(1 - 32 / 255, 1 + 32 / 255))]),
                       v2.RandomApply([v2.ColorJitter(contrast=(0.5, 1.5))]),
                       v2.RandomApply([v2.ColorJitter(saturation=(0.5, 1.5))]),
                       v2.RandomApply([v2.ColorJitter(hue=18 / 360)])])


def train_transform(crop_size, scale, ratio_range, cat_max_ratio, hflip, photometric):
    steps = [RandomRescale(scale, ratio_range), CategoryBalancedCrop(crop_size, cat_max_ratio)]
    if hflip > 0:
        steps.append(v2.RandomHorizontalFlip(hflip))
    if photometric:
        steps.append(photometric_distortion())
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD), PadTo(crop_size),
              v2.ToPureTensor()]
    return v2.Compose(steps)


def eval_transform():
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD),
                       v2.ToPureTensor()])


class ADE20KSegmentation(Dataset):
    """`(image, target)` pairs of one split ('train' or 'val') of an ADE20K-layout folder.

    image: the transform's output (float (3, H, W)); target: int64 (H, W) class indices
    0..num_classes-1, IGNORE_INDEX where the label is 0 (and in the padding).
    """

    def __init__(self, root, split, num_classes, transform):
        self.num_classes = num_classes
        self.transform = transform
        image_folder = os.path.join(root, 'images', SPLIT_FOLDERS[split])
        label_folder = os.path.join(root, 'annotations', SPLIT_FOLDERS[split])
        for folder in (image_folder, label_folder):
            if not os.path.isdir(folder):
                raise DataError(f"ADE20K folder not found: {folder}")
        names = sorted(name for name in os.listdir(image_folder) if name.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            raise DataError(f"no images (.jpg, .png) in {image_folder}")
        self.samples = [(os.path.join(image_folder, name),
                         os.path.join(label_folder, os.path.splitext(name)[0] + '.png')) for name in names]
        missing = [label for _, label in self.samples if not os.path.isfile(label)]
        if missing:
            more = f" (+{len(missing) - FILES_NAMED} more)" if len(missing) > FILES_NAMED else ''
            raise DataError(f"ADE20K label file missing: {', '.join(missing[:FILES_NAMED])}{more}")
        for image_path, label_path in self.samples:
            _check_sizes(_header_size(image_path), _header_size(label_path), image_path, label_path)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        image_path, label_path = self.samples[index]
        image = load_rgb(image_path)
        label = _load_label(label_path)
        _check_sizes(image.size, (label.shape[1], label.shape[0]), image_path, label_path)
        largest = int(label.max())
        if largest > self.num_classes:
            raise DataError(f"ADE20K label {label_path} holds the value {largest}, more than the "
                            f"{self.num_classes} classes (1..{self.num_classes}; 0 is ignored)",
                            path=label_path)
        target = torch.from_numpy(label.astype(np.int64)) - 1
        target[target < 0] = IGNORE_INDEX
        return self.transform(tv_tensors.Image(F.pil_to_tensor(image)), tv_tensors.Mask(target))


def _header_size(path):
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read {path}: {err}", path=path) from None


def _check_sizes(image_size, label_size, image_path, label_path):
    if tuple(image_size) != tuple(label_size):
        raise DataError(f"ADE20K label {label_path} is {label_size[0]}x{label_size[1]}, its image "
                        f"{image_path} is {image_size[0]}x{image_size[1]}", path=label_path)


def _load_label(path):
    """The label PNG as a (H, W) uint8 array of class values (greyscale or palette PNG)."""
    try:
        with Image.open(path) as label:
            if label.mode not in ('L', 'P'):
                raise DataError(f"ADE20K label {path} is a {label.mode} image, not one byte of class "
                                f"value per pixel (mode L or P)", path=path)
            return np.asarray(label)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read ADE20K label {path}: {err}", path=path) from None
