# --------------------------------------------------------
# Focal Transformer: datasets, transforms and loaders
# Licensed under The MIT License [see LICENSE for details]
# --------------------------------------------------------
"""Classification data: ImageNet layouts and the digits demo, their transforms, and Mixup/CutMix."""
import os

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.transforms import str_to_interp_mode
from torchvision import datasets, transforms

from .cached_image_folder import CachedImageFolder
from .image_io import DataError, dataset_folder, load_rgb
from .loaders import LoaderSettings, build_loaders


def build_loader(config, rank=0, world_size=1):
    """``(data_loader_train, data_loader_val, class_names)`` of the classification data (``data.loaders``
    assembles the loaders). With ``config.EVAL_MODE`` only the val split is read and the training loader
    is None. ``class_names``: the class folders in label order, or for zipped data the labels' first
    folder in the map file's paths. The labels are checked to fit a set MODEL.NUM_CLASSES."""
    root = _data_root(config, rank)
    dataset_val = _build_dataset('val', root, config, rank, world_size)
    dataset_train = None if config.EVAL_MODE else _build_dataset('train', root, config, rank, world_size)
    class_names = _class_names(root, dataset_train, dataset_val)
    if config.MODEL.NUM_CLASSES and len(class_names) > config.MODEL.NUM_CLASSES:
        raise DataError(f"the data in {root} has {len(class_names)} classes, more than "
                        f"MODEL.NUM_CLASSES {config.MODEL.NUM_CLASSES}")
    # a per-process zip cache holds only this process's shard: sample only from it
    shard_first = config.DATA.ZIP_MODE and config.DATA.CACHE_MODE == 'part'
    data_loader_train, data_loader_val = build_loaders(
        LoaderSettings.from_config(config, rank, world_size), dataset_train, dataset_val, root,
        shard_first=shard_first)
    return data_loader_train, data_loader_val, class_names


def build_mixup(config, num_classes):
    """timm's Mixup/CutMix with label smoothing, or None when AUG turns both off."""
    aug = config.AUG
    if not (aug.MIXUP > 0 or aug.CUTMIX > 0 or aug.CUTMIX_MINMAX is not None):
        return None
    if config.DATA.BATCH_SIZE % 2:
        raise DataError(f"Mixup/CutMix needs an even DATA.BATCH_SIZE, got {config.DATA.BATCH_SIZE}")
    return Mixup(mixup_alpha=aug.MIXUP, cutmix_alpha=aug.CUTMIX, cutmix_minmax=aug.CUTMIX_MINMAX,
                 prob=aug.MIXUP_PROB, switch_prob=aug.MIXUP_SWITCH_PROB, mode=aug.MIXUP_MODE,
                 label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=num_classes)


def _data_root(config, rank):
    """The folder holding the splits; for the digits demo, written on first use by rank 0."""
    if config.DATA.DATASET == 'digits':
        from .digits import ensure_digits_imagefolder  # only the demo needs scikit-learn
        return ensure_digits_imagefolder(config.DATA.DATA_PATH, config.DATA.IMG_SIZE, is_writer=rank == 0)
    if config.DATA.DATASET != 'imagenet':
        raise DataError(f"unknown DATA.DATASET {config.DATA.DATASET!r} (use 'imagenet' or 'digits')")
    return dataset_folder(config.DATA.DATA_PATH, 'the folder holding train/ and val/')


def _build_dataset(split, root, config, rank, world_size):
    """The dataset of ``split`` ('train' or 'val') under ``root``."""
    transform = build_transform(split == 'train', config)
    if config.DATA.ZIP_MODE and config.DATA.DATASET == 'imagenet':
        # the val shard of a process is its cache shard, so 'part' covers what it reads
        cache_mode = config.DATA.CACHE_MODE if split == 'train' else \
            ('no' if config.DATA.CACHE_MODE == 'no' else 'part')
        dataset = CachedImageFolder(os.path.join(root, f'{split}.zip'),
                                    os.path.join(root, f'{split}_map.txt'),
                                    transform, cache_mode, rank, world_size)
        return dataset
    folder = os.path.join(root, split)
    if not os.path.isdir(folder):
        raise DataError(f"data folder not found: {folder}")
    try:
        dataset = datasets.ImageFolder(folder, transform=transform, loader=load_rgb)
    except FileNotFoundError:
        raise DataError(f"no images in {folder}: expected one sub-folder of images per class") from None
    return dataset


def _class_names(root, dataset_train, dataset_val):
    """The names of the classes in label order; the train and val class folders must agree."""
    if isinstance(dataset_val, CachedImageFolder):
        return max((d.class_names for d in (dataset_train, dataset_val) if d is not None), key=len)
    if dataset_train is not None and dataset_train.classes != dataset_val.classes:
        differing = sorted(set(dataset_train.classes) ^ set(dataset_val.classes))
        raise DataError(f"the class folders of {root}/train and {root}/val differ "
                        f"(e.g. {differing[:3]}): their labels would not match")
    return list(dataset_val.classes)


def build_transform(is_train, config):
    """Training: timm's ``create_transform`` (random resized crop, flip, RandAugment or colour
    jitter, random erasing). Evaluation: resize to 256/224 of the input size and centre-crop
    (TEST.CROP), or resize straight to the input size. Inputs of 32 px or less are not resized
    (CIFAR-style: a padded random crop for training), as Swin does."""
    size = config.DATA.IMG_SIZE
    resize_im = size > 32
    if is_train:
        transform = create_transform(
            input_size=size, is_training=True,
            color_jitter=config.AUG.COLOR_JITTER if config.AUG.COLOR_JITTER > 0 else None,
            auto_augment=config.AUG.AUTO_AUGMENT if config.AUG.AUTO_AUGMENT != 'none' else None,
            re_prob=config.AUG.REPROB, re_mode=config.AUG.REMODE, re_count=config.AUG.RECOUNT,
            interpolation=config.DATA.INTERPOLATION, hflip=config.AUG.HFLIP)
        if not resize_im:
            transform.transforms[0] = transforms.RandomCrop(size, padding=4)
        return transform

    # 'random' interpolation is a training augmentation; evaluation resizes bilinearly, as Swin
    interpolation = str_to_interp_mode(
        'bilinear' if config.DATA.INTERPOLATION == 'random' else config.DATA.INTERPOLATION)
    steps = []
    if resize_im and config.TEST.CROP:
        steps += [transforms.Resize(int(256 / 224 * size), interpolation=interpolation),
                  transforms.CenterCrop(size)]
    elif resize_im:
        steps.append(transforms.Resize((size, size), interpolation=interpolation))
    steps += [transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)]
    return transforms.Compose(steps)
