"""ADE20K semantic segmentation: smp's UPerNet on the Focal encoder with Swin's auxiliary FCN head
(models.segmentation), the ADE20K layout and augmentation (data.ade20k), mIoU and pixel accuracy.

The training loss is mmseg's: cross-entropy of the main head plus MODEL.SEGMENTATION.AUX_LOSS_WEIGHT
times that of the auxiliary head, each averaged over all pixels of the batch with the ignored ones
counting zero (so that a crop with no labelled pixel adds nothing instead of dividing by zero).

Evaluation is mmseg's whole-image inference, one image per forward pass: each image is resized
to fit DATA.SEG_SCALE (keeping its aspect), the logits are resized back to the image as stored and
compared with its label. With TEST.MULTI_SCALE, the softmax of every scale of TEST.SEG_SCALES (and
of its horizontal flip, with TEST.SEG_FLIP) is summed first: the paper's multi-scale column.
Every process adds its images into a confusion matrix; the matrices are summed across processes
before scoring, so the figures are exact for any number of processes.
"""
import os
import time

import torch
import torch.nn.functional as F
from timm.utils import AverageMeter

from data import DataError, dataset_folder
from data.ade20k import (ADE20K_NUM_CLASSES, IGNORE_INDEX, ADE20KSegmentation, eval_transform,
                         read_class_names, rescaled_size, train_transform)
from data.loaders import LoaderSettings, build_loaders
from distributed import is_distributed, rank_and_world_size, reduce_sum
from logger import memory_mb
from models.backbone import no_weight_decay_names
from models.build import focal_arguments
from models.segmentation import FocalUPerNet
from tasks import parameter_count

# Every architecture argument comes from MODEL.FOCAL; the registered name only makes it a timm
# model, which smp's `tu-` encoders require.
ENCODER = 'focal_tiny_patch4_window7_224'


def ade20k_root(config, rank):
    """(the ADE20K-layout folder, its class names): the digit scenes, written on first use, with theirs,
    or DATA.DATA_PATH with the names its files give (`data.ade20k.read_class_names`) or, without any,
    MODEL.NUM_CLASSES (ADE20K's 150 when 0) named by their label numbers."""
    if config.DATA.DATASET == 'digits':
        from data.digit_scenes import ADE_CLASSES, ADE_DIR, ensure_digit_scenes  # scikit-learn
        folder = ensure_digit_scenes(config.DATA.DATA_PATH, config.DATA.IMG_SIZE, is_writer=rank == 0)
        if config.MODEL.NUM_CLASSES and config.MODEL.NUM_CLASSES < len(ADE_CLASSES):
            raise DataError(f"the digit scenes in {folder} have {len(ADE_CLASSES)} classes, more than "
                            f"MODEL.NUM_CLASSES {config.MODEL.NUM_CLASSES}")
        return os.path.join(folder, ADE_DIR), list(ADE_CLASSES)
    if config.DATA.DATASET != 'ade20k':
        raise DataError(f"TASK segmentation reads DATA.DATASET 'ade20k' or 'digits', not {config.DATA.DATASET!r}")
    root = dataset_folder(config.DATA.DATA_PATH, 'the ADEChallengeData2016 folder')
    names = read_class_names(root)
    if names is None:
        return root, [str(label) for label in range(config.MODEL.NUM_CLASSES or ADE20K_NUM_CLASSES)]
    if config.MODEL.NUM_CLASSES and len(names) > config.MODEL.NUM_CLASSES:
        raise DataError(f"{root} names {len(names)} classes, more than MODEL.NUM_CLASSES {config.MODEL.NUM_CLASSES}")
    return root, names


def build_segmenter(config):
    arguments = focal_arguments(config)
    for set_by_smp in ('num_classes', 'in_chans'):  # smp's encoder sets them itself
        arguments.pop(set_by_smp)
    seg = config.MODEL.SEGMENTATION
    return FocalUPerNet(ENCODER, config.MODEL.NUM_CLASSES, decoder_channels=seg.DECODER_CHANNELS,
                        aux_channels=seg.AUX_CHANNELS, dropout=seg.DROPOUT, **arguments)


def segmentation_loss(outputs, targets, aux_weight):
    """mmseg's loss: per-pixel cross-entropy averaged over every pixel (ignored ones count 0),
    of the main logits plus `aux_weight` times that of the auxiliary logits."""
    if not isinstance(outputs, tuple):
        outputs = (outputs,)
    weights = (1.0, aux_weight)
    return sum(weight * F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX,
                                        reduction='none').mean()
               for weight, logits in zip(weights, outputs))


def confusion_matrix(prediction, label, num_classes):
    """(num_classes, num_classes) int64 counts: row the labelled class, column the predicted one;
    pixels labelled IGNORE_INDEX are left out."""
    valid = label != IGNORE_INDEX
    pairs = label[valid] * num_classes + prediction[valid]
    return torch.bincount(pairs, minlength=num_classes ** 2).view(num_classes, num_classes)


def segmentation_scores(confusion):
    """(mIoU %, aAcc %, per-class IoU % with NaN for classes neither labelled nor predicted)
    of a confusion matrix, as mmseg scores: mIoU is the mean over classes with a non-empty union."""
    confusion = confusion.double()
    intersection = confusion.diag()
    union = confusion.sum(0) + confusion.sum(1) - intersection
    iou = 100 * intersection / union  # 0 / 0 = NaN: the class is in neither
    accuracy = 100 * intersection.sum() / confusion.sum().clamp(min=1)
    return iou.nanmean().item(), accuracy.item(), iou


class Segmentation:
    HEADLINE = 'mIoU'

    def __init__(self, config):
        self.config = config

    def build_loaders(self, config):
        rank, world_size = rank_and_world_size()
        root, class_names = ade20k_root(config, rank)
        num_classes = config.MODEL.NUM_CLASSES or len(class_names)
        val_set = ADE20KSegmentation(root, 'val', num_classes, eval_transform())
        train_set = None
        if not config.EVAL_MODE:
            transform = train_transform(config.DATA.IMG_SIZE, config.DATA.SEG_SCALE, config.DATA.SEG_RATIO_RANGE,
                                        config.AUG.CAT_MAX_RATIO, config.AUG.HFLIP, config.AUG.PHOTOMETRIC)
            train_set = ADE20KSegmentation(root, 'train', num_classes, transform)
        # one image per evaluation forward pass, at its own size
        data_loader_train, data_loader_val = build_loaders(
            LoaderSettings.from_config(config, rank, world_size), train_set, val_set, root, val_batch_size=1)
        return data_loader_train, data_loader_val, class_names

    def build_model(self, config):
        model = build_segmenter(config)
        if is_distributed() and torch.cuda.is_available():
            # the heads' batch norms see a few crops per GPU: as Swin's setting, SyncBN
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def describe(self, config, model):
        return (f"model {config.MODEL.NAME}: UPerNet on the Focal encoder, {parameter_count(model)}, "
                f"{config.MODEL.NUM_CLASSES} classes")

    def no_weight_decay(self, model):
        return no_weight_decay_names(model), ()

    def training_loss(self, model, samples, targets, device):
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        return segmentation_loss(model(samples), targets, self.config.MODEL.SEGMENTATION.AUX_LOSS_WEIGHT)

    @torch.no_grad()
    def evaluate(self, config, model, data_loader, device, autocast, logger):
        model.eval()
        num_classes = config.MODEL.NUM_CLASSES
        multi_scale = config.TEST.MULTI_SCALE
        confusion = torch.zeros(2 if multi_scale else 1, num_classes, num_classes, dtype=torch.int64,
                                device=device)
        batch_time, end = AverageMeter(), time.time()
        for step, (image, label) in enumerate(data_loader):
            image, label = image.to(device, non_blocking=True), label.to(device, non_blocking=True)
            whole = predict(model, image, config.DATA.SEG_SCALE, [1.0], False, autocast)
            confusion[0] += confusion_matrix(whole.argmax(1), label, num_classes)
            if multi_scale:
                summed = predict(model, image, config.DATA.SEG_SCALE, config.TEST.SEG_SCALES,
                                 config.TEST.SEG_FLIP, autocast)
                confusion[1] += confusion_matrix(summed.argmax(1), label, num_classes)
            batch_time.update(time.time() - end)
            end = time.time()
            if step % config.PRINT_FREQ == 0:
                logger.info(f"Test: [{step}/{len(data_loader)}]\ttime {batch_time.val:.3f} "
                            f"({batch_time.avg:.3f})\tmem {memory_mb(device):.0f}MB")
        reduce_sum(confusion)
        miou, aacc, _ = segmentation_scores(confusion[0])
        metrics = {'mIoU': miou, 'aAcc': aacc}
        logger.info(f" * mIoU {miou:.2f} aAcc {aacc:.2f}")
        if multi_scale:
            metrics['mIoU_MS'], metrics['aAcc_MS'], _ = segmentation_scores(confusion[1])
            logger.info(f" * mIoU(MS) {metrics['mIoU_MS']:.2f} aAcc(MS) {metrics['aAcc_MS']:.2f}")
        return metrics, miou


def predict(model, image, scale, ratios, flip, autocast):
    """(1, classes, H, W) scores of `image` (1, 3, H, W): with one ratio and no flip the logits
    of the image resized to fit `scale`; otherwise the sum of the softmax over every ratio of
    `scale` (and each one's horizontal flip), each resized back to (H, W)."""
    height, width = image.shape[-2:]
    single = len(ratios) == 1 and not flip
    total = 0
    for ratio in ratios:
        size = rescaled_size(height, width, [side * ratio for side in scale])
        resized = F.interpolate(image, size=size, mode='bilinear', align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            with autocast():
                logits = model(resized.flip(-1) if flipped else resized)
            logits = logits.float().flip(-1) if flipped else logits.float()
            logits = F.interpolate(logits, size=(height, width), mode='bilinear', align_corners=False)
            total = total + (logits if single else logits.softmax(1))
    return total
