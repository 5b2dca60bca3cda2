"""COCO object detection and instance segmentation: torchvision's Mask R-CNN or RetinaNet, or the
Cascade Mask R-CNN, ATSS, Sparse R-CNN or RepPointsV2 of models.detectors, on the Focal FPN backbone,
COCO box and mask AP from pycocotools.

Training images are resized in the data pipeline (DATA.MIN_SIZES, DATA.MAX_SIZE, the 3x recipes'
random crop of AUG.DET_CROP_MIN_SIZES and AUG.DET_CROP_SIZE_RANGE, flip), so the detector's own
transform only normalises and batches them (`_skip_resize`, as torchvision's references train
multi-scale); at evaluation it resizes each image to DATA.TEST_MIN_SIZE (longer side at most
DATA.MAX_SIZE) and maps the detections back to the image as stored, which is what COCOeval
scores. Evaluation runs one image per forward pass: a batch pads its images to the largest, and
the padding reaches the attention windows, so only then are the detections the same for any
number of processes.
"""
import contextlib
import io
import os
import time
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
from pycocotools import mask as coco_mask
from pycocotools.cocoeval import COCOeval
from timm.utils import AverageMeter
from torchvision.models.detection import MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from data import DataError, dataset_folder
from data.coco import (check_images_exist, collate_detection_eval, collate_detection_training,
                       detection_transform, keep_trainable_images, read_coco, wrap_for_transforms)
from data.loaders import LoaderSettings, build_loaders
from distributed import broadcast_batch_norm_statistics, is_distributed, rank_and_world_size
from logger import memory_mb
from models.backbone import no_weight_decay_names
from models.build import focal_arguments
from models.detection import LastLevelP6P7, focal_fpn_backbone
from tasks import parameter_count
from models.detectors import ATSS, CascadeMaskRCNN, RepPointsV2, SparseRCNN
from models.detectors.bifpn import BiFPN

ASPECT_RATIOS = [(0.5, 1.0, 2.0)]  # of every level's anchors, torchvision's
# (image folder, annotation file) of each split under the COCO 2017 root
COCO_SPLITS = {'train': ('train2017', os.path.join('annotations', 'instances_train2017.json')),
               'val': ('val2017', os.path.join('annotations', 'instances_val2017.json'))}
MASK_DETECTORS = {'mask_rcnn', 'cascade_mask_rcnn'}  # the detectors that predict masks: scored 'segm' too


def coco_files(config, rank, splits):
    """{split: (image folder, annotation file)}: DATA.TRAIN_IMAGES, DATA.TRAIN_ANNOTATIONS and the VAL_
    ones, each by default COCO 2017's, a relative path taken under DATA.DATA_PATH or, for the demo, under
    the digit scenes written on first use (COCO's layout)."""
    given = {split: (config.DATA[f'{split.upper()}_IMAGES'], config.DATA[f'{split.upper()}_ANNOTATIONS'])
             for split in splits}
    if config.DATA.DATASET == 'digits':
        from data.digit_scenes import ensure_digit_scenes  # only the demo needs scikit-learn
        root = os.path.join(ensure_digit_scenes(config.DATA.DATA_PATH, config.DATA.IMG_SIZE,
                                                is_writer=rank == 0), 'coco')
    elif config.DATA.DATASET != 'coco':
        raise DataError(f"TASK detection reads DATA.DATASET 'coco' or 'digits', "
                        f"not {config.DATA.DATASET!r}")
    elif all(os.path.isabs(path) for paths in given.values() for path in paths):
        root = ''
    else:
        root = dataset_folder(config.DATA.DATA_PATH, 'the COCO 2017 folder, or absolute DATA.TRAIN_IMAGES, '
                                                     'DATA.TRAIN_ANNOTATIONS, DATA.VAL_IMAGES, DATA.VAL_ANNOTATIONS')
    return {split: tuple(os.path.join(root, path or default) for path, default in zip(given[split], COCO_SPLITS[split]))
            for split in splits}


def last_stage_width(arguments):
    """Channels of the last stage's map of the Focal Transformer that `arguments` describe."""
    return arguments['embed_dim'] * 2 ** (len(arguments['depths']) - 1)


def build_atss(config, num_classes, arguments, common):
    """ATSS on stages 1-3 with P6 and P7 from P5 (mmdetection's add_extra_convs='on_output')."""
    width = config.MODEL.DETECTION.FPN_CHANNELS
    backbone = focal_fpn_backbone(drop_path_rate=config.MODEL.DROP_PATH_RATE, returned_stages=(1, 2, 3),
                                  out_channels=width, extra_blocks=LastLevelP6P7(width, width), **arguments)
    return ATSS(backbone, num_classes, anchor_scale=config.MODEL.DETECTION.ATSS.ANCHOR_SCALE, **common)


def build_sparse_rcnn(config, num_classes, arguments, common):
    """Sparse R-CNN on P2-P5 of the four stages."""
    sparse = config.MODEL.DETECTION.SPARSE_RCNN
    backbone = focal_fpn_backbone(drop_path_rate=config.MODEL.DROP_PATH_RATE,
                                  out_channels=config.MODEL.DETECTION.FPN_CHANNELS, **arguments)
    return SparseRCNN(backbone, num_classes, num_proposals=sparse.NUM_PROPOSALS, num_stages=sparse.NUM_STAGES,
                      **common)


def build_reppoints_v2(config, num_classes, arguments, common):
    """RepPointsV2 on stages 1-3 through a BiFPN (the 3x recipe's neck) or an FPN with P6 and P7 from the
    last stage's map to the five levels P3-P7."""
    settings = config.MODEL.DETECTION.REPPOINTS_V2
    width = config.MODEL.DETECTION.FPN_CHANNELS
    if settings.NECK == 'bifpn':
        neck = dict(neck=partial(BiFPN, out_channels=width, num_outputs=5, repeats=settings.BIFPN_REPEATS))
    else:
        neck = dict(out_channels=width, extra_blocks=LastLevelP6P7(last_stage_width(arguments), width))
    backbone = focal_fpn_backbone(drop_path_rate=config.MODEL.DROP_PATH_RATE, returned_stages=(1, 2, 3),
                                  **neck, **arguments)
    return RepPointsV2(backbone, num_classes, stacked_convs=settings.STACKED_CONVS,
                       corner_channels=settings.CORNER_CHANNELS, classifier_init=settings.CLASSIFIER_INIT,
                       **common)


# the detectors built outside build_detector, by MODEL.DETECTION.DETECTOR
DETECTOR_BUILDERS = {'atss': build_atss, 'sparse_rcnn': build_sparse_rcnn, 'reppoints_v2': build_reppoints_v2}


def build_detector(config, num_classes):
    """Mask R-CNN or Cascade Mask R-CNN (four stages, max-pooled P6), RetinaNet (stages 1-3, P6 and P7)
    or a detector of DETECTOR_BUILDERS on the Focal FPN backbone that MODEL.FOCAL describes, with the heads
    of MODEL.DETECTION."""
    arguments = focal_arguments(config)
    for unused in ('num_classes', 'drop_path_rate'):
        arguments.pop(unused)
    detection = config.MODEL.DETECTION
    width, levels = detection.FPN_CHANNELS, len(detection.ANCHOR_SIZES)
    common = dict(min_size=config.DATA.TEST_MIN_SIZE, max_size=config.DATA.MAX_SIZE,
                  _skip_resize=True, detections_per_img=detection.DETECTIONS_PER_IMAGE)
    if detection.DETECTOR in DETECTOR_BUILDERS:
        return DETECTOR_BUILDERS[detection.DETECTOR](config, num_classes, arguments, common)
    if detection.DETECTOR == 'retinanet':
        # P6 from the last stage's map, not from P5, as mmdetection's RetinaNet configs for
        # transformer backbones (add_extra_convs='on_input') that the paper's figures come from
        backbone = focal_fpn_backbone(drop_path_rate=config.MODEL.DROP_PATH_RATE,
                                      returned_stages=(1, 2, 3), out_channels=width,
                                      extra_blocks=LastLevelP6P7(last_stage_width(arguments), width),
                                      **arguments)
        # torchvision's RetinaNet anchors: three octaves and three aspect ratios per level
        anchors = AnchorGenerator([(size, int(size * 2 ** (1 / 3)), int(size * 2 ** (2 / 3)))
                                   for size in detection.ANCHOR_SIZES], ASPECT_RATIOS * levels)
        return RetinaNet(backbone, num_classes, anchor_generator=anchors, **common)
    backbone = focal_fpn_backbone(drop_path_rate=config.MODEL.DROP_PATH_RATE, out_channels=width,
                                  **arguments)
    rpn_anchors = AnchorGenerator([(size,) for size in detection.ANCHOR_SIZES], ASPECT_RATIOS * levels)
    if detection.DETECTOR == 'cascade_mask_rcnn':
        return build_cascade_mask_rcnn(detection, backbone, rpn_anchors, num_classes, common)
    roi_size = 7  # torchvision's MultiScaleRoIAlign output for the box head
    # the predictors say the number of classes (MaskRCNN refuses it twice)
    train_proposals, test_proposals = detection.PROPOSALS
    return MaskRCNN(backbone, None, rpn_anchor_generator=rpn_anchors,
                    rpn_post_nms_top_n_train=train_proposals, rpn_post_nms_top_n_test=test_proposals,
                    box_head=TwoMLPHead(width * roi_size ** 2, detection.BOX_HEAD_WIDTH),
                    box_predictor=FastRCNNPredictor(detection.BOX_HEAD_WIDTH, num_classes),
                    box_batch_size_per_image=detection.ROI_SAMPLES,
                    mask_head=MaskRCNNHeads(width, [width] * detection.MASK_HEAD_LAYERS, 1),
                    mask_predictor=MaskRCNNPredictor(width, width, num_classes),
                    box_detections_per_img=common.pop('detections_per_img'), **common)


def build_cascade_mask_rcnn(detection, backbone, rpn_anchors, num_classes, common):
    """Cascade Mask R-CNN on Mask R-CNN's backbone and RPN, with the stages of MODEL.DETECTION.CASCADE."""
    cascade = detection.CASCADE
    return CascadeMaskRCNN(backbone, num_classes, rpn_anchors, proposals=detection.PROPOSALS,
                           roi_samples=detection.ROI_SAMPLES, box_head_convs=cascade.BOX_HEAD_CONVS,
                           box_head_width=detection.BOX_HEAD_WIDTH, mask_head_layers=detection.MASK_HEAD_LAYERS,
                           iou_thresholds=cascade.IOU_THRESHOLDS, box_coder_weights=cascade.BOX_CODER_WEIGHTS,
                           stage_loss_weights=cascade.STAGE_LOSS_WEIGHTS,
                           giou_loss_weight=cascade.GIOU_LOSS_WEIGHT, **common)


class Detection:
    HEADLINE = 'bbox AP'

    def __init__(self, config):
        self.config = config
        self.coco_val = None  # pycocotools COCO of the val annotations, the ground truth
        self.category_ids = None  # each label's category id in that file (label 1 first)

    def build_loaders(self, config):
        rank, world_size = rank_and_world_size()
        with_masks = config.MODEL.DETECTION.DETECTOR in MASK_DETECTORS
        files = coco_files(config, rank, ['val'] if config.EVAL_MODE else ['train', 'val'])
        datasets = {}
        for split, (folder, annotations) in files.items():
            datasets[split] = read_coco(annotations, folder, with_masks)
            # a missing validation image always stops; training tolerates DATA.MAX_BAD_SAMPLES
            check_images_exist(datasets[split], annotations,
                               config.DATA.MAX_BAD_SAMPLES if split == 'train' else 0)
        class_names = self._class_names(config, datasets, files)
        self.coco_val = datasets['val'].coco
        self.category_ids = datasets['val'].category_ids

        val_set = wrap_for_transforms(datasets['val'], detection_transform(
            False, config.DATA.MIN_SIZES, config.DATA.MAX_SIZE, 0.0), target_keys=('image_id',))
        train_set = None
        if not config.EVAL_MODE:
            target_keys = ('image_id', 'boxes', 'labels') + (('masks',) if with_masks else ())
            train_set = wrap_for_transforms(keep_trainable_images(datasets['train']), detection_transform(
                True, config.DATA.MIN_SIZES, config.DATA.MAX_SIZE, config.AUG.HFLIP,
                config.AUG.DET_CROP_MIN_SIZES, config.AUG.DET_CROP_SIZE_RANGE), target_keys)
            if len(train_set) == 0:
                raise DataError(f"{files['train'][1]} has no image with a box to train on")
        # one image per evaluation forward pass, at its own size
        data_loader_train, data_loader_val = build_loaders(
            LoaderSettings.from_config(config, rank, world_size), train_set, val_set, files['val'][0],
            val_batch_size=1,
            train_collate=collate_detection_training, val_collate=collate_detection_eval)
        return data_loader_train, data_loader_val, class_names

    @staticmethod
    def _class_names(config, datasets, files):
        """Each label's name: 'background' at 0, then the categories in id order (their 'name', or the id);
        the two files must list the same category ids, and a set MODEL.NUM_CLASSES must hold them all."""
        if 'train' in datasets and datasets['train'].category_ids != datasets['val'].category_ids:
            differing = sorted(set(datasets['train'].category_ids) ^ set(datasets['val'].category_ids))
            raise DataError(f"{files['train'][1]} and {files['val'][1]} list other categories (e.g. id "
                            f"{differing[0]} in one only): their labels would not match")
        dataset = datasets['val']
        if config.MODEL.NUM_CLASSES and len(dataset.category_ids) >= config.MODEL.NUM_CLASSES:
            raise DataError(f"{files['val'][1]} has {len(dataset.category_ids)} categories, more than "
                            f"MODEL.NUM_CLASSES {config.MODEL.NUM_CLASSES} holds besides the background")
        names = {category['id']: str(category.get('name', category['id']))
                 for category in dataset.coco.dataset['categories']}
        return ['background'] + [names[category_id] for category_id in dataset.category_ids]

    def build_model(self, config):
        model = build_detector(config, config.MODEL.NUM_CLASSES)
        if is_distributed() and torch.cuda.is_available():
            # the cascade's box heads normalise over the batch's RoIs: the recipe's SyncBN
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        return model

    def describe(self, config, model):
        return (f"model {config.MODEL.NAME}: {type(model).__name__} on the Focal FPN, "
                f"{parameter_count(model)}, {config.MODEL.NUM_CLASSES} classes")

    def no_weight_decay(self, model):
        return no_weight_decay_names(model), ()

    def training_loss(self, model, samples, targets, device):
        images = [image.to(device, non_blocking=True) for image in samples]
        targets = [{key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
                    for key, value in target.items()} for target in targets]
        losses = model(images, targets)
        return sum(losses.values())

    @torch.no_grad()
    def evaluate(self, config, model, data_loader, device, autocast, logger):
        model.eval()
        broadcast_batch_norm_statistics(model)  # the cascade's box heads
        with_masks = config.MODEL.DETECTION.DETECTOR in MASK_DETECTORS
        results = {'bbox': [], 'segm': []}
        batch_time, end = AverageMeter(), time.time()
        for step, (images, targets) in enumerate(data_loader):
            with autocast():
                outputs = model([image.to(device, non_blocking=True) for image in images])
            for target, output in zip(targets, outputs):
                for kind, found in coco_results(target['image_id'], output, with_masks,
                                                self.category_ids).items():
                    results[kind] += found
            batch_time.update(time.time() - end)
            end = time.time()
            if step % config.PRINT_FREQ == 0:
                logger.info(f"Test: [{step}/{len(data_loader)}]\ttime {batch_time.val:.3f} "
                            f"({batch_time.avg:.3f})\tmem {memory_mb(device):.0f}MB")
        kinds = ['bbox', 'segm'] if with_masks else ['bbox']
        metrics = score_on_rank_0({kind: results[kind] for kind in kinds}, self.coco_val, logger)
        logger.info(' * ' + ' '.join(f"{kind} AP {metrics[f'{kind}_ap']:.3f}" for kind in kinds))
        return metrics, metrics['bbox_ap']


def coco_results(image_id, output, with_masks, category_ids):
    """One image's detections as COCO results of the file's categories (label l is `category_ids[l - 1]`;
    a label beyond them, of a class MODEL.NUM_CLASSES holds spare, is dropped): boxes [x, y, w, h], and
    masks (the detector's probabilities thresholded at 0.5) as RLE."""
    kept = (output['labels'] <= len(category_ids)).cpu()
    boxes = output['boxes'].float().cpu()[kept]
    boxes[:, 2:] -= boxes[:, :2]
    scores = output['scores'].float().cpu()[kept].tolist()
    categories = [category_ids[label - 1] for label in output['labels'].cpu()[kept].tolist()]
    found = {'bbox': [{'image_id': image_id, 'category_id': category, 'bbox': box, 'score': score}
                      for box, category, score in zip(boxes.tolist(), categories, scores)]}
    if with_masks:
        masks = (output['masks'][:, 0] > 0.5).cpu()[kept].numpy().astype(np.uint8)
        rles = coco_mask.encode(np.asfortranarray(masks.transpose(1, 2, 0)))
        found['segm'] = [{'image_id': image_id, 'category_id': category, 'score': score,
                          'segmentation': {'size': rle['size'], 'counts': rle['counts'].decode()}}
                         for rle, category, score in zip(rles, categories, scores)]
    return found


def gather_results(results):
    """Every process's results, on every process, ordered by image (stable within one)."""
    if is_distributed():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, results)  # Python objects: works on gloo and NCCL
        results = {kind: [found for part in gathered for found in part[kind]] for kind in results}
    return {kind: sorted(found, key=lambda result: result['image_id'])
            for kind, found in results.items()}


def score_on_rank_0(results, coco_gt, logger):
    """COCOeval of each kind of result over the whole validation set: rank 0 scores and logs
    the summary table, every process gets the figures. Metrics in percent: '<kind>_ap',
    '<kind>_ap50', '<kind>_ap75'."""
    results = gather_results(results)
    metrics = {}
    if not is_distributed() or dist.get_rank() == 0:
        for kind, found in results.items():
            stats = coco_summary(coco_gt, found, kind, logger)
            metrics.update({f'{kind}_ap': 100 * stats[0], f'{kind}_ap50': 100 * stats[1],
                            f'{kind}_ap75': 100 * stats[2]})
    if is_distributed():
        shared = [metrics]
        dist.broadcast_object_list(shared, src=0)
        metrics = shared[0]
    return metrics


def coco_summary(coco_gt, found, kind, logger):
    """pycocotools' 12 summary figures (fractions) of `found` results of `kind`, logging the
    table; no detection at all scores 0."""
    if not found:
        logger.info(f"no {kind} detections: AP 0")
        return [0.0] * 12
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        coco_dt = coco_gt.loadRes(found)
        evaluator = COCOeval(coco_gt, coco_dt, iouType=kind)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    table = [line for line in printed.getvalue().splitlines() if line.startswith(' Average')]
    images = len({result['image_id'] for result in found})
    logger.info(f"COCO {kind}: {len(found)} detections on {images} images\n" + '\n'.join(table))
    return [float(value) for value in evaluator.stats]
