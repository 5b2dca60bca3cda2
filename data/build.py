# --------------------------------------------------------
# Focal Transformer: datasets, transforms and loaders
# Licensed under The MIT License [see LICENSE for details]
# --------------------------------------------------------
"""``build_loader(config)``: datasets, samplers, DataLoaders and Mixup/CutMix from the config."""
import os

import torch
import torch.distributed as dist
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from timm.data.transforms import str_to_interp_mode
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

from .bad_samples import ReplaceUnreadable, collate_training_batch
from .cached_image_folder import CachedImageFolder
from .image_io import DataError, dataset_folder, load_rgb
from .samplers import ResumableDistributedSampler, SeededSamples, ShardSampler

DIGITS_CACHE = os.path.join(os.path.expanduser('~'), '.cache', 'focal_transformer', 'digits')


def _rank_and_world_size():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def build_loader(config):
    """``(dataset_train, dataset_val, data_loader_train, data_loader_val, mixup_fn)``, as Swin.

    With ``config.EVAL_MODE`` only the val split is read and the train items are None.
    MODEL.NUM_CLASSES 0 is replaced by the number of classes of the data (the config is
    defrosted for that and frozen again). Training samples are drawn by
    ``ResumableDistributedSampler`` (``data_loader_train.sampler.set_epoch(epoch, start_step)``),
    validation by ``ShardSampler`` (every image exactly once over all processes). A training
    batch is ``(images, labels, replaced)``: ``replaced`` lists the unreadable images replaced
    under DATA.MAX_BAD_SAMPLES (``data.bad_samples``); a validation batch is ``(images, labels)``
    and an unreadable validation image always raises ``DataError``.
    """
    rank, world_size = _rank_and_world_size()
    root = _data_root(config, rank)
    pin_memory = config.DATA.PIN_MEMORY and torch.cuda.is_available()
    # DataLoader draws its workers' base seed from this generator instead of the global one, so
    # loading never moves the main process's random streams (the samples seed themselves)
    loader_generator = torch.Generator().manual_seed(config.SEED)

    dataset_val = _build_dataset('val', root, config, rank, world_size)
    dataset_train = None if config.EVAL_MODE else _build_dataset('train', root, config, rank, world_size)
    _set_num_classes(config, root, dataset_train, dataset_val)

    data_loader_val = DataLoader(
        dataset_val, sampler=ShardSampler(len(dataset_val), world_size, rank),
        batch_size=config.DATA.BATCH_SIZE, num_workers=config.DATA.NUM_WORKERS,
        pin_memory=pin_memory, drop_last=False, generator=loader_generator)
    if config.EVAL_MODE:
        return None, dataset_val, None, data_loader_val, None

    # a per-process zip cache holds only this process's shard: sample only from it
    shard_first = config.DATA.ZIP_MODE and config.DATA.CACHE_MODE == 'part'
    sampler_train = ResumableDistributedSampler(
        len(dataset_train), config.DATA.BATCH_SIZE, world_size, rank, config.SEED, shard_first)
    data_loader_train = DataLoader(
        SeededSamples(ReplaceUnreadable(dataset_train, config.DATA.MAX_BAD_SAMPLES), config.SEED),
        sampler=sampler_train, batch_size=config.DATA.BATCH_SIZE,
        num_workers=config.DATA.NUM_WORKERS, collate_fn=collate_training_batch,
        pin_memory=pin_memory, drop_last=True, generator=loader_generator)
    if len(data_loader_train) == 0:
        raise DataError(f"DATA.BATCH_SIZE {config.DATA.BATCH_SIZE} is larger than the "
                        f"{len(sampler_train)} training images of each of {world_size} process(es) "
                        f"in {root}")
    return dataset_train, dataset_val, data_loader_train, data_loader_val, build_mixup(config)


def build_mixup(config):
    """timm's Mixup/CutMix with label smoothing, or None when AUG turns both off."""
    aug = config.AUG
    if not (aug.MIXUP > 0 or aug.CUTMIX > 0 or aug.CUTMIX_MINMAX is not None):
        return None
    if config.DATA.BATCH_SIZE % 2:
        raise DataError(f"Mixup/CutMix needs an even DATA.BATCH_SIZE, got {config.DATA.BATCH_SIZE}")
    return Mixup(mixup_alpha=aug.MIXUP, cutmix_alpha=aug.CUTMIX, cutmix_minmax=aug.CUTMIX_MINMAX,
                 prob=aug.MIXUP_PROB, switch_prob=aug.MIXUP_SWITCH_PROB, mode=aug.MIXUP_MODE,
                 label_smoothing=config.MODEL.LABEL_SMOOTHING, num_classes=config.MODEL.NUM_CLASSES)


def _data_root(config, rank):
    """The folder holding the splits; for the digits demo, written on first use by rank 0."""
    if config.DATA.DATASET == 'digits':
        from .digits import ensure_digits_imagefolder  # only the demo needs scikit-learn
        return ensure_digits_imagefolder(config.DATA.DATA_PATH or DIGITS_CACHE,
                                         config.DATA.IMG_SIZE, is_writer=rank == 0)
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


def _set_num_classes(config, root, dataset_train, dataset_val):
    """Fill in MODEL.NUM_CLASSES from the data when it is 0; check that the labels fit it."""
    if isinstance(dataset_val, CachedImageFolder):
        num_classes = max(d.num_classes for d in (dataset_train, dataset_val) if d is not None)
    else:
        if dataset_train is not None and dataset_train.classes != dataset_val.classes:
            differing = sorted(set(dataset_train.classes) ^ set(dataset_val.classes))
            raise DataError(f"the class folders of {root}/train and {root}/val differ "
                            f"(e.g. {differing[:3]}): their labels would not match")
        num_classes = len(dataset_val.classes)
    if config.MODEL.NUM_CLASSES == 0:
        was_frozen = config.is_frozen()
        config.defrost()
        config.MODEL.NUM_CLASSES = num_classes
        if was_frozen:
            config.freeze()
    elif num_classes > config.MODEL.NUM_CLASSES:
        raise DataError(f"the data in {root} has {num_classes} classes, more than "
                        f"MODEL.NUM_CLASSES {config.MODEL.NUM_CLASSES}")


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
