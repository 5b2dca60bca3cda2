# --------------------------------------------------------
# Focal Transformer: configuration
# The key tree of the original Focal Transformer / Swin Transformer repositories,
# plus the keys this codebase adds (marked "added"). YAML files only override.
# Licensed under The MIT License [see LICENSE for details]
# --------------------------------------------------------
"""The configuration tree, YAML loading with ``BASE`` inheritance, and command-line overrides.

``get_config(args)`` reads these attributes of the argparse Namespace that ``main.parse_option``
builds; every one is optional (read with ``getattr``), so a partial Namespace works:

    cfg, opts, batch_size, data_path, dataset, zip, cache_mode, resume, pretrained,
    accumulation_steps, use_checkpoint, amp, amp_opt_level (legacy), output, tag, eval, throughput

Every problem with the configuration raises ``ConfigError`` with a one-line message naming the
file, key or value at fault.
"""
import ast
import os
import re

import yaml
from yacs.config import CfgNode as CN



class ConfigError(ValueError):
    """A bad configuration file, key or value; the message is one line naming it."""


_C = CN()

# -----------------------------------------------------------------------------
# Data settings
# -----------------------------------------------------------------------------
_C.DATA = CN()
# Batch size per process (per GPU); --batch-size overrides
_C.DATA.BATCH_SIZE = 128
# Dataset root; --data-path overrides. For 'imagenet': a folder holding train/ and val/
# (ImageFolder layout), or train.zip, train_map.txt, val.zip, val_map.txt in zip mode.
# For 'imagenet22k': the folder of synset folders, or those four zip-mode files.
# For 'digits': where the demo images are written ('' = ~/.cache/focal_transformer/digits).
_C.DATA.DATA_PATH = ''
# Dataset name: 'imagenet' (any ImageFolder or zipped folder), 'imagenet22k' (one folder per
# WordNet synset, or zipped as 'imagenet': data.imagenet22k), 'coco' (detection: train2017/,
# val2017/, annotations/instances_{train,val}2017.json), 'ade20k' (segmentation:
# ADEChallengeData2016's images/ and annotations/), or 'digits', the built-in demo of every task
# (digit images, or scenes of digits written in the COCO or ADE20K layout)
_C.DATA.DATASET = 'imagenet'
# Input image size
_C.DATA.IMG_SIZE = 224
# Interpolation used to resize images: 'random', 'bilinear' or 'bicubic'
_C.DATA.INTERPOLATION = 'bicubic'
# Read images from train.zip / val.zip instead of folders; --zip sets it
_C.DATA.ZIP_MODE = False
# Zip mode only: keep image bytes in memory. 'no': read from the zip every time;
# 'part': each process caches the shard of images it reads; 'full': every image. --cache-mode
_C.DATA.CACHE_MODE = 'part'
# Pin CPU memory in the DataLoader for faster host-to-GPU copies
_C.DATA.PIN_MEMORY = True
# Number of data loading worker processes per training process
_C.DATA.NUM_WORKERS = 8
# Unreadable or undecodable training images a run tolerates. 0: the first one stops the run.
# Above 0: each is replaced by the next readable image of the data set (the same in every run, so
# resumed runs stay identical), named once in the log and counted in TensorBoard
# (train/bad_samples); the run stops when more than this many different files failed. Validation
# images are never replaced: a bad one always stops the run.
_C.DATA.MAX_BAD_SAMPLES = 0
# (added, detection) shorter sides of the training images, one drawn per image (the
# multi-scale range of the recipes; [800] trains at one scale)
_C.DATA.MIN_SIZES = [800]
# (added, detection) shorter side of the images at evaluation
_C.DATA.TEST_MIN_SIZE = 800
# (added, detection) cap on the longer side, in training and at evaluation
_C.DATA.MAX_SIZE = 1333
# (added, segmentation) (long, short) scale of the images, kept in aspect: evaluation resizes
# each image to fit it, training to fit it times a ratio drawn from SEG_RATIO_RANGE
_C.DATA.SEG_SCALE = [2048, 512]
# (added, segmentation) range of that training ratio; DATA.IMG_SIZE is the training crop
_C.DATA.SEG_RATIO_RANGE = [0.5, 2.0]
# (added, detection) COCO-format data at any paths, each '' for COCO 2017's; a relative path is taken
# under DATA.DATA_PATH. The training images' folder ('' = train2017/)
_C.DATA.TRAIN_IMAGES = ''
# (added, detection) the training annotation file ('' = annotations/instances_train2017.json)
_C.DATA.TRAIN_ANNOTATIONS = ''
# (added, detection) the validation images' folder ('' = val2017/)
_C.DATA.VAL_IMAGES = ''
# (added, detection) the validation annotation file ('' = annotations/instances_val2017.json)
_C.DATA.VAL_ANNOTATIONS = ''
# (added, imagenet22k) share of the images held out for validation in the folder layout, chosen by a
# hash of each image's path (the same on every process and restart): 0.0035 is about 50,000 of
# fall11's 14.2M images, as many as ImageNet-1K's val/
_C.DATA.HOLDOUT_FRACTION = 0.0035
# (added, imagenet22k) folder of the index of the synset folders, written once and shared by every
# process and run: it must be the same folder for all processes ('' = ~/.cache/focal_transformer/imagenet22k)
_C.DATA.INDEX_PATH = ''

# -----------------------------------------------------------------------------
# Model settings
# -----------------------------------------------------------------------------
_C.MODEL = CN()
# Model name; names the output sub-folder
_C.MODEL.NAME = 'focal_tiny_patch4_window7_224'
# Checkpoint to resume training or to evaluate; --resume overrides
_C.MODEL.RESUME = ''
# (added, from Swin) weights to start fine-tuning from; --pretrained overrides
_C.MODEL.PRETRAINED = ''
# Number of classes. 0 = as many as the data has (the run records the number it found in its
# config.yaml); the released ImageNet-1K configs set 1000.
_C.MODEL.NUM_CLASSES = 0
# (added) the class names in label order, as the run found them in its data (the class folders, the
# COCO categories); recorded in config.yaml and in every checkpoint (key 'classes'). Leave it empty.
_C.MODEL.CLASS_NAMES = []
# (added) the class order of a pretrained (or, with --eval, resumed) classifier whose checkpoint names
# no classes: 'imagenet-22k' (fall11's 21,841 synsets sorted), 'imagenet-21k-goog' (Google's; Swin's
# 22K models), 'imagenet-22k-ms' (ImageNet-1K's first) or 'imagenet-1k'. Where the data's classes are
# ImageNet synsets the head's rows are picked by synset (models.class_orders); '' = the checkpoint's
# own class names, else the one order with its number of rows
_C.MODEL.PRETRAINED_CLASS_ORDER = ''
# Dropout rate
_C.MODEL.DROP_RATE = 0.0
# Stochastic depth (drop path) rate
_C.MODEL.DROP_PATH_RATE = 0.1
# Label smoothing
_C.MODEL.LABEL_SMOOTHING = 0.1

# (added) detection: a torchvision detector on the Focal FPN backbone (models.detection); the
# defaults are torchvision's, which the recipes keep
_C.MODEL.DETECTION = CN()
# 'mask_rcnn' (stages 0-3, max-pooled P6), 'retinanet' (stages 1-3, P6 and P7 from stage 3),
# 'cascade_mask_rcnn' (Mask R-CNN's backbone and RPN, three box and mask stages: models.detectors.cascade_rcnn),
# 'atss' (stages 1-3, P6 and P7 from P5: models.detectors.atss), 'sparse_rcnn' (stages 0-3:
# models.detectors.sparse_rcnn) or 'reppoints_v2' (stages 1-3, a BiFPN to P3-P7: models.detectors.reppoints_v2)
_C.MODEL.DETECTION.DETECTOR = 'mask_rcnn'
# Channels of the feature pyramid and of the heads' convolutions
_C.MODEL.DETECTION.FPN_CHANNELS = 256
# Mask R-CNN: width of the box head's two fully connected layers
_C.MODEL.DETECTION.BOX_HEAD_WIDTH = 1024
# Mask R-CNN: convolutions of the mask head
_C.MODEL.DETECTION.MASK_HEAD_LAYERS = 4
# Mask R-CNN: proposals sampled per image for the box and mask losses
_C.MODEL.DETECTION.ROI_SAMPLES = 512
# Mask R-CNN: proposals kept per image after the RPN's NMS, in training and at evaluation
_C.MODEL.DETECTION.PROPOSALS = [2000, 1000]
# Side of the anchors of each pyramid level (Mask R-CNN: P2-P6; RetinaNet's three octaves per
# level start at these on P3-P7)
_C.MODEL.DETECTION.ANCHOR_SIZES = [32, 64, 128, 256, 512]
# Detections kept per image at evaluation (COCO's AP counts 100)
_C.MODEL.DETECTION.DETECTIONS_PER_IMAGE = 100
# (added) Cascade Mask R-CNN's stages, one entry each ([mmdet] cascade_mask_rcnn_r50_fpn.py, [swin]
# cascade_mask_rcnn_swin_tiny_patch4_window7_mstrain_480-800_giou_4conv1f_adamw_3x_coco.py). It also reads
# FPN_CHANNELS, PROPOSALS, ROI_SAMPLES (per stage), BOX_HEAD_WIDTH (the fc), MASK_HEAD_LAYERS (per stage).
_C.MODEL.DETECTION.CASCADE = CN()
# [mmdet] IoU at which a RoI matches a ground truth, per stage (as many positive as negative thresholds)
_C.MODEL.DETECTION.CASCADE.IOU_THRESHOLDS = [0.5, 0.6, 0.7]
# [mmdet] weight of each stage's losses
_C.MODEL.DETECTION.CASCADE.STAGE_LOSS_WEIGHTS = [1.0, 0.5, 0.25]
# [mmdet] box-coder weights (x, y, w, h) per stage: the inverse of its target_stds (.1, .1, .2, .2),
# (.05, .05, .1, .1), (.033, .033, .067, .067)
_C.MODEL.DETECTION.CASCADE.BOX_CODER_WEIGHTS = [[10.0, 10.0, 5.0, 5.0], [20.0, 20.0, 10.0, 10.0],
                                                [30.0, 30.0, 15.0, 15.0]]
# [swin] 3x convolutions (3x3, batch norm) of each box head before its fc ("4conv1fc": num_shared_convs 4)
_C.MODEL.DETECTION.CASCADE.BOX_HEAD_CONVS = 4
# [swin] 3x weight of the GIoU loss of the decoded class-specific boxes (GIoULoss loss_weight 10)
_C.MODEL.DETECTION.CASCADE.GIOU_LOSS_WEIGHT = 10.0
# (added) ATSS's own settings
_C.MODEL.DETECTION.ATSS = CN()
# Side of each level's one square anchor, in units of the level's stride (mmdetection's
# octave_base_scale 8: 64-1024 px on P3-P7)
_C.MODEL.DETECTION.ATSS.ANCHOR_SCALE = 8.0
# (added) Sparse R-CNN's own settings
_C.MODEL.DETECTION.SPARSE_RCNN = CN()
# Learnable proposal boxes and features (mmdetection: 100; the 3x recipe 300)
_C.MODEL.DETECTION.SPARSE_RCNN.NUM_PROPOSALS = 100
# Dynamic instance interactive stages, each refining the last one's boxes
_C.MODEL.DETECTION.SPARSE_RCNN.NUM_STAGES = 6
# (added) RepPointsV2's own settings; the defaults are Swin's 3x recipe (reppointsv2_swin_bifpn.py)
_C.MODEL.DETECTION.REPPOINTS_V2 = CN()
# The neck: 'bifpn' ([swin] the 3x recipe's) or 'fpn' (RepPointsV2's own R-50 configs: an FPN on stages 1-3
# with P6 and P7 from the last stage's map, add_extra_convs='on_input')
_C.MODEL.DETECTION.REPPOINTS_V2.NECK = 'bifpn'
# Repeats of the BiFPN neck ([swin] num_repeat 2)
_C.MODEL.DETECTION.REPPOINTS_V2.BIFPN_REPEATS = 2
# 3x3 convolutions of the head's classification and points towers ([swin] stacked_convs 3)
_C.MODEL.DETECTION.REPPOINTS_V2.STACKED_CONVS = 3
# Channels of the corner-pooling projections ([swin] corner_dim 64)
_C.MODEL.DETECTION.REPPOINTS_V2.CORNER_CHANNELS = 64
# Initial weights of the deformable classification convolution: 'normal' ([swin] normal, std 0.01) or
# 'kaiming' (He's normal init, fan out): at a narrow head's width the first keeps every class's score the
# same for the whole of a short run (benchmarks/README.md, what was tried)
_C.MODEL.DETECTION.REPPOINTS_V2.CLASSIFIER_INIT = 'normal'

# The MODEL.DETECTION keys each detector reads (besides DETECTOR): a key that a YAML file or --opts sets
# and the chosen detector does not read is a one-line ConfigError, not silently ignored. A detector's own
# settings live in a section named after it (MODEL.DETECTION.<SECTION>), listed here as that section.
DETECTOR_KEYS = {
    'mask_rcnn': ('FPN_CHANNELS', 'BOX_HEAD_WIDTH', 'MASK_HEAD_LAYERS', 'ROI_SAMPLES', 'PROPOSALS',
                  'ANCHOR_SIZES', 'DETECTIONS_PER_IMAGE'),
    'retinanet': ('FPN_CHANNELS', 'ANCHOR_SIZES', 'DETECTIONS_PER_IMAGE'),
    'cascade_mask_rcnn': ('FPN_CHANNELS', 'BOX_HEAD_WIDTH', 'MASK_HEAD_LAYERS', 'ROI_SAMPLES', 'PROPOSALS',
                          'ANCHOR_SIZES', 'DETECTIONS_PER_IMAGE', 'CASCADE'),
    'atss': ('FPN_CHANNELS', 'DETECTIONS_PER_IMAGE', 'ATSS'),
    'sparse_rcnn': ('FPN_CHANNELS', 'DETECTIONS_PER_IMAGE', 'SPARSE_RCNN'),
    'reppoints_v2': ('FPN_CHANNELS', 'DETECTIONS_PER_IMAGE', 'REPPOINTS_V2'),
}

# (added) segmentation: smp's UPerNet on the Focal encoder with an auxiliary FCN head on stage 3
# (models.segmentation); the defaults are Swin's UPerNet setting
_C.MODEL.SEGMENTATION = CN()
# Channels of UPerNet's pyramid and fusion convolutions
_C.MODEL.SEGMENTATION.DECODER_CHANNELS = 512
# Channels of the auxiliary head's convolution (0 = no auxiliary head)
_C.MODEL.SEGMENTATION.AUX_CHANNELS = 256
# Weight of the auxiliary head's loss
_C.MODEL.SEGMENTATION.AUX_LOSS_WEIGHT = 0.4
# Dropout before both heads' classifiers
_C.MODEL.SEGMENTATION.DROPOUT = 0.1

# Focal Transformer parameters; the first ones are shared with Swin (but no shift by default)
_C.MODEL.FOCAL = CN()
# Patch size of the first embedding (pixels per token side)
_C.MODEL.FOCAL.PATCH_SIZE = 4
# Input image channels
_C.MODEL.FOCAL.IN_CHANS = 3
# Channels of the first stage (doubled at every stage)
_C.MODEL.FOCAL.EMBED_DIM = 96
# Blocks per stage
_C.MODEL.FOCAL.DEPTHS = [2, 2, 6, 2]
# Attention heads per stage
_C.MODEL.FOCAL.NUM_HEADS = [3, 6, 12, 24]
# Side of the attention windows (query windows and finest key level)
_C.MODEL.FOCAL.WINDOW_SIZE = 7
# MLP hidden width / channels
_C.MODEL.FOCAL.MLP_RATIO = 4.0
# Bias in the query/key/value projection
_C.MODEL.FOCAL.QKV_BIAS = True
# Attention scale; None means head_dim ** -0.5 (the original's False had the same effect)
_C.MODEL.FOCAL.QK_SCALE = None
# Absolute position embedding
_C.MODEL.FOCAL.APE = False
# LayerNorm after the patch embedding
_C.MODEL.FOCAL.PATCH_NORM = True
# Swin-style shifted windows (the released models do not shift)
_C.MODEL.FOCAL.USE_SHIFT = False
# Focal attention: pooling of the coarse levels ('none', 'fc', 'mean', 'max', 'conv')
_C.MODEL.FOCAL.FOCAL_POOL = 'none'
# Stages that use focal attention
_C.MODEL.FOCAL.FOCAL_STAGES = [0, 1, 2, 3]
# Focal levels per stage (1 = window plus neighbours, no pooled level)
_C.MODEL.FOCAL.FOCAL_LEVELS = [1, 1, 1, 1]
# Focal window per stage: the side, in pooled sub-windows, of the coarse key region (odd)
_C.MODEL.FOCAL.FOCAL_WINDOWS = [7, 5, 3, 1]
# Neighbour ring width per stage
_C.MODEL.FOCAL.EXPAND_SIZES = [3, 3, 3, 3]
# Blocks that gather neighbours: 'all', 'even' or 'odd'
_C.MODEL.FOCAL.EXPAND_LAYER = 'all'
# Overlapping convolutional patch embedding and downsampling (the *_useconv models)
_C.MODEL.FOCAL.USE_CONV_EMBED = False
# Layer scale on the residual branches, initialised to LAYERSCALE_VALUE
_C.MODEL.FOCAL.USE_LAYERSCALE = False
# (added) initial layer-scale value; the original model's default
_C.MODEL.FOCAL.LAYERSCALE_VALUE = 1e-4
# GroupNorm before each downsampling projection
_C.MODEL.FOCAL.USE_PRE_NORM = False

# -----------------------------------------------------------------------------
# Training settings
# -----------------------------------------------------------------------------
_C.TRAIN = CN()
# Training epochs
_C.TRAIN.EPOCHS = 300
# (added) batches per epoch: 0 = one pass over the training data; N > 0 = N batches drawn from
# the data repeated, reshuffled at each pass (iteration schedules: 160k = 10 epochs x 16000)
_C.TRAIN.STEPS_PER_EPOCH = 0
# Epochs of linear warmup from WARMUP_LR (stepped per optimizer step)
_C.TRAIN.WARMUP_EPOCHS = 20
# (added) optimizer steps of linear warmup; above 0 it replaces WARMUP_EPOCHS
_C.TRAIN.WARMUP_STEPS = 0
# Weight decay (not applied to norms, biases and the model's no_weight_decay names)
_C.TRAIN.WEIGHT_DECAY = 0.05
# Peak learning rate for a total batch of BASE_BATCH_SIZE images; main.py scales BASE_LR,
# WARMUP_LR and MIN_LR linearly by (batch size x processes x accumulation steps) / BASE_BATCH_SIZE,
# as the original does.
_C.TRAIN.BASE_LR = 5e-4
# (added) the total batch the learning rates are given for: the original's 512; the dense
# recipes give theirs for 16
_C.TRAIN.BASE_BATCH_SIZE = 512
# Learning rate at the first warmup step (per BASE_BATCH_SIZE images, as BASE_LR)
_C.TRAIN.WARMUP_LR = 5e-7
# Final learning rate of the cosine, linear and poly schedules (per BASE_BATCH_SIZE images)
_C.TRAIN.MIN_LR = 5e-6
# Clip the gradient norm to this value (0 = no clipping)
_C.TRAIN.CLIP_GRAD = 5.0
# Resume from the newest complete checkpoint in the output folder
_C.TRAIN.AUTO_RESUME = True
# Gradient accumulation steps (0 or 1 = none); --accumulation-steps overrides
_C.TRAIN.ACCUMULATION_STEPS = 0
# Gradient checkpointing to save memory; --use-checkpoint sets it
_C.TRAIN.USE_CHECKPOINT = False
# (added) keep the newest N epoch checkpoints (plus the best one)
_C.TRAIN.KEEP_CHECKPOINTS = 3
# (added) also save every N optimizer steps inside an epoch, resumable at that step (0 = off)
_C.TRAIN.SAVE_EVERY_STEPS = 0
# (added) torch.compile the model
_C.TRAIN.COMPILE = False
# (added) channels-last memory format for model and inputs
_C.TRAIN.CHANNELS_LAST = False
# (added, from BEiT) layer-wise learning-rate decay: the layer k below the top (the head, or every
# parameter outside the Focal Transformer) trains at LAYER_DECAY ** k of the rate, the layers being the
# model's group_matcher blocks as timm numbers them; 0 or 1 = off
_C.TRAIN.LAYER_DECAY = 0.0
# (added) what does not train: 'none'; 'stages:K', the patch embedding and the first K stages (kept in
# eval mode: no drop path); 'linear-probe', the whole Focal Transformer (only the classifier head, or a
# detector's or segmenter's neck and heads, trains)
_C.TRAIN.FREEZE = 'none'

# LR scheduler, stepped every optimizer step
_C.TRAIN.LR_SCHEDULER = CN()
# 'cosine', 'linear', 'step', 'multistep' or 'poly'
_C.TRAIN.LR_SCHEDULER.NAME = 'cosine'
# Epoch interval to decay LR, used by the 'step' scheduler
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30
# LR decay rate, used by the 'step' and 'multistep' schedulers
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1
# (added) epochs after which 'multistep' multiplies the rate by DECAY_RATE (detection 1x: [8, 11])
_C.TRAIN.LR_SCHEDULER.MILESTONES = [30, 60, 90]
# (added) exponent of the 'poly' schedule, which decays from BASE_LR to MIN_LR over the whole run
_C.TRAIN.LR_SCHEDULER.POWER = 1.0
# (added, from later Swin) False: warmup steps count inside the schedule, as the original;
# True: the schedule starts after the warmup.
_C.TRAIN.LR_SCHEDULER.WARMUP_PREFIX = False

# Optimizer
_C.TRAIN.OPTIMIZER = CN()
# 'adamw' or 'sgd'
_C.TRAIN.OPTIMIZER.NAME = 'adamw'
# Optimizer epsilon (AdamW)
_C.TRAIN.OPTIMIZER.EPS = 1e-8
# Optimizer betas (AdamW)
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
# SGD momentum (Nesterov)
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9

# (added) exponential moving average of the weights (timm ModelEmaV3), evaluated beside the model
_C.TRAIN.EMA = CN()
# Keep and evaluate the EMA weights
_C.TRAIN.EMA.ENABLE = False
# EMA decay per optimizer step
_C.TRAIN.EMA.DECAY = 0.9998

# -----------------------------------------------------------------------------
# Augmentation settings
# -----------------------------------------------------------------------------
_C.AUG = CN()
# Colour jitter factor (used only when AUTO_AUGMENT is off, as in timm)
_C.AUG.COLOR_JITTER = 0.4
# RandAugment / AutoAugment policy string for timm; 'none' disables it
_C.AUG.AUTO_AUGMENT = 'rand-m9-mstd0.5-inc1'
# Random erase probability
_C.AUG.REPROB = 0.25
# Random erase mode
_C.AUG.REMODE = 'pixel'
# Random erase count
_C.AUG.RECOUNT = 1
# Mixup alpha, mixup enabled if > 0
_C.AUG.MIXUP = 0.8
# Cutmix alpha, cutmix enabled if > 0
_C.AUG.CUTMIX = 1.0
# Cutmix min/max ratio, overrides alpha and enables cutmix if set
_C.AUG.CUTMIX_MINMAX = None
# Probability of performing mixup or cutmix when either/both is enabled
_C.AUG.MIXUP_PROB = 1.0
# Probability of switching to cutmix when both mixup and cutmix enabled
_C.AUG.MIXUP_SWITCH_PROB = 0.5
# How to apply mixup/cutmix params: per 'batch', 'pair', or 'elem'
_C.AUG.MIXUP_MODE = 'batch'
# (added) horizontal flip probability; the digits demo sets 0 (a flipped digit is another digit)
_C.AUG.HFLIP = 0.5
# (added, detection) Swin's random-crop policy of the 3x recipes: shorter sides drawn before the
# crop (e.g. [400, 500, 600]), for half the training images; [] never crops
_C.AUG.DET_CROP_MIN_SIZES = []
# (added, detection) range [min, max] of that crop's height and width, each drawn separately
_C.AUG.DET_CROP_SIZE_RANGE = [384, 600]
# (added, segmentation) a training crop is drawn again (up to 10 times) while one class covers
# this share of its labelled pixels or more (1.0 = any crop)
_C.AUG.CAT_MAX_RATIO = 0.75
# (added, segmentation) random brightness, contrast, saturation and hue (mmseg's photometric
# distortion)
_C.AUG.PHOTOMETRIC = True

# -----------------------------------------------------------------------------
# Testing settings
# -----------------------------------------------------------------------------
_C.TEST = CN()
# Evaluate on a centre crop after resizing to 256/224 of the input size
_C.TEST.CROP = True
# (added, segmentation) also score the multi-scale column, ' * mIoU(MS)': the softmax summed
# over the ratios SEG_SCALES of DATA.SEG_SCALE
_C.TEST.MULTI_SCALE = False
# (added, segmentation) the multi-scale ratios of DATA.SEG_SCALE
_C.TEST.SEG_SCALES = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
# (added, segmentation) the multi-scale column adds each ratio's horizontal flip
_C.TEST.SEG_FLIP = True

# -----------------------------------------------------------------------------
# Misc
# -----------------------------------------------------------------------------
# (added) what the run trains: 'classification', 'detection' or 'segmentation' (tasks/)
_C.TASK = 'classification'
# (added) mixed precision with native torch.amp; --amp sets it
_C.AMP_ENABLE = False
# (added) autocast dtype: 'bf16' or 'fp16' (fp16 uses a gradient scaler)
_C.AMP_DTYPE = 'bf16'
# Output root; runs write to OUTPUT/MODEL.NAME/TAG. --output overrides
_C.OUTPUT = 'output'
# Tag of the experiment; --tag overrides
_C.TAG = 'default'
# Save a checkpoint every SAVE_FREQ epochs
_C.SAVE_FREQ = 1
# Log every PRINT_FREQ steps
_C.PRINT_FREQ = 100
# Random seed; the data order and every sample's augmentation derive from it
_C.SEED = 0
# Evaluate only; --eval sets it
_C.EVAL_MODE = False
# Measure throughput only; --throughput sets it
_C.THROUGHPUT_MODE = False

# -----------------------------------------------------------------------------
# Legacy: accepted only so that the original repository's YAML files and commands run unchanged.
# These keys are not in the tree (a dumped config.yaml does not have them); each is checked and its
# effect applied here: key -> (allowed values or None for any, what it does).
# -----------------------------------------------------------------------------
LEGACY_KEYS = {
    'MODEL.TYPE': (('focal',), "the original's model family switch; this codebase builds only 'focal'"),
    'MODEL.FOCAL.EXPAND_STAGES': (None, "accepted and unused, as in the original"),
    'AMP_OPT_LEVEL': (('', 'O0', 'O1', 'O2'), "the original's apex level: when given, 'O0' turns AMP_ENABLE "
                                              "off and 'O1'/'O2' on, whatever else set it"),
}


def add_legacy_options(parser):
    """The original's command-line options that main.py still accepts: --amp-opt-level (AMP_OPT_LEVEL
    above) and --local_rank, which torch.distributed.launch passed and which is ignored (the device comes
    from the LOCAL_RANK environment variable, which both launchers set)."""
    parser.add_argument('--amp-opt-level', type=str, choices=['O0', 'O1', 'O2'],
                        help="legacy: the original's apex level; O0 = AMP off, O1/O2 = on")
    parser.add_argument('--local_rank', '--local-rank', type=int, default=None,
                        help='legacy: accepted and ignored, for torch.distributed.launch')


# Allowed values of the keys that take one of a few strings.
_CHOICES = {
    'DATA.DATASET': ('imagenet', 'imagenet22k', 'digits', 'coco', 'ade20k'),
    'TASK': ('classification', 'detection', 'segmentation'),
    'MODEL.DETECTION.DETECTOR': tuple(DETECTOR_KEYS),
    'MODEL.DETECTION.REPPOINTS_V2.NECK': ('bifpn', 'fpn'),
    'MODEL.DETECTION.REPPOINTS_V2.CLASSIFIER_INIT': ('normal', 'kaiming'),
    'DATA.INTERPOLATION': ('random', 'bilinear', 'bicubic'),
    'DATA.CACHE_MODE': ('no', 'part', 'full'),
    'TRAIN.LR_SCHEDULER.NAME': ('cosine', 'linear', 'step', 'multistep', 'poly'),
    'TRAIN.OPTIMIZER.NAME': ('adamw', 'sgd'),
    'AUG.MIXUP_MODE': ('batch', 'pair', 'elem'),
    'AMP_DTYPE': ('bf16', 'fp16'),
}


def _parse_literal(value, default):
    """A string from YAML or --opts becomes the Python literal it spells, as yacs does
    ('1e-3' -> 0.001, '[1, 2]' -> [1, 2]), except where the key holds a string."""
    if not isinstance(value, str) or isinstance(default, str):
        return value
    if isinstance(default, bool) and value.lower() in ('true', 'false'):
        return value.lower() == 'true'
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return value


_MISMATCH = object()


def _same_kind(default, value):
    """``value`` converted to the type of ``default`` (int -> float, list <-> tuple, element by
    element), or ``_MISMATCH``. A default of None (optional keys) accepts anything."""
    if default is None:
        return value
    if isinstance(default, bool):
        return value if isinstance(value, bool) else _MISMATCH
    if isinstance(value, bool):
        return _MISMATCH
    if isinstance(default, int):
        return value if isinstance(value, int) else _MISMATCH
    if isinstance(default, float):
        return float(value) if isinstance(value, (int, float)) else _MISMATCH
    if isinstance(default, str):
        return value if isinstance(value, str) else _MISMATCH
    if isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            return _MISMATCH
        if default:
            value = [_same_kind(default[0], item) for item in value]
            if any(item is _MISMATCH for item in value):
                return _MISMATCH
        return type(default)(value)
    return value


class _Merged:
    """What merging files and options recorded besides the values: where each key was last set, and the
    legacy keys' values (LEGACY_KEYS), which the tree does not hold."""

    def __init__(self):
        self.sources = {}
        self.legacy = {}


def _set_key(config, full_key, value, source, merged):
    """Set one dotted key, checking that it exists and that the value has the default's type."""
    if full_key in LEGACY_KEYS:
        allowed = LEGACY_KEYS[full_key][0]
        if allowed is not None and value not in allowed:
            raise ConfigError(f"config key '{full_key}' in {source} must be one of {list(allowed)}, got {value!r}")
        merged.legacy[full_key] = value
        return
    node = config
    *parents, leaf = full_key.split('.')
    for part in parents:
        if not isinstance(node.get(part), CN):
            raise ConfigError(f"unknown config key '{full_key}' in {source}")
        node = node[part]
    if leaf not in node:
        raise ConfigError(f"unknown config key '{full_key}' in {source}")
    default = node[leaf]
    if isinstance(default, CN):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{full_key}' in {source} is a section; got value {value!r}")
        for key, sub_value in value.items():
            _set_key(config, f'{full_key}.{key}', sub_value, source, merged)
        return
    converted = _same_kind(default, _parse_literal(value, default))
    if converted is _MISMATCH:
        raise ConfigError(f"config key '{full_key}' in {source} expects {type(default).__name__} "
                          f"(default {default!r}), got {value!r}")
    node[leaf] = converted
    merged.sources[full_key] = source


def _merge_yaml_file(config, cfg_file, merged, visiting=()):
    """Merge a YAML file into ``config``: first the files listed in its ``BASE`` (paths relative
    to this file, in order), then its own keys."""
    cfg_file = os.path.abspath(cfg_file)
    if cfg_file in visiting:
        raise ConfigError(f"config file {cfg_file} includes itself through BASE")
    if not os.path.isfile(cfg_file):
        raise ConfigError(f"config file not found: {cfg_file}")
    try:
        with open(cfg_file, 'r') as f:
            loaded = yaml.safe_load(f)
    except yaml.YAMLError as err:
        mark = getattr(err, 'problem_mark', None)
        where = f" line {mark.line + 1}" if mark is not None else ''
        problem = getattr(err, 'problem', None) or type(err).__name__
        raise ConfigError(f"malformed YAML in {cfg_file}{where}: {problem}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read config file {cfg_file}: {err}") from None
    if loaded is None:
        loaded = {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {cfg_file} must hold a mapping of keys, "
                          f"got {type(loaded).__name__}")
    bases = loaded.pop('BASE', None) or []
    if isinstance(bases, str):
        bases = [bases]
    for base in bases:
        if base:
            _merge_yaml_file(config, os.path.join(os.path.dirname(cfg_file), base), merged,
                             visiting + (cfg_file,))
    for key, value in loaded.items():
        _set_key(config, str(key), value, cfg_file, merged)


def _merge_opts(config, opts, merged):
    """Merge ``--opts KEY VALUE ...`` pairs."""
    if len(opts) % 2:
        raise ConfigError(f"--opts needs KEY VALUE pairs, got an odd number of items: {' '.join(opts)}")
    for key, value in zip(opts[0::2], opts[1::2]):
        _set_key(config, key, value, '--opts', merged)


def _check_values(config):
    """Values that have the right type but cannot work."""
    for full_key, allowed in _CHOICES.items():
        value = _lookup(config, full_key)
        if value not in allowed:
            raise ConfigError(f"config key '{full_key}' must be one of {list(allowed)}, got {value!r}")
    positive = {
        'DATA.BATCH_SIZE': config.DATA.BATCH_SIZE,
        'DATA.IMG_SIZE': config.DATA.IMG_SIZE,
        'TRAIN.EPOCHS': config.TRAIN.EPOCHS,
        'TRAIN.BASE_BATCH_SIZE': config.TRAIN.BASE_BATCH_SIZE,
        'SAVE_FREQ': config.SAVE_FREQ,
        'PRINT_FREQ': config.PRINT_FREQ,
    }
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"config key '{key}' must be positive, got {value}")
    non_negative = {
        'DATA.NUM_WORKERS': config.DATA.NUM_WORKERS,
        'DATA.MAX_BAD_SAMPLES': config.DATA.MAX_BAD_SAMPLES,
        'MODEL.NUM_CLASSES': config.MODEL.NUM_CLASSES,
        'TRAIN.WARMUP_EPOCHS': config.TRAIN.WARMUP_EPOCHS,
        'TRAIN.WARMUP_STEPS': config.TRAIN.WARMUP_STEPS,
        'TRAIN.STEPS_PER_EPOCH': config.TRAIN.STEPS_PER_EPOCH,
        'TRAIN.ACCUMULATION_STEPS': config.TRAIN.ACCUMULATION_STEPS,
        'TRAIN.KEEP_CHECKPOINTS': config.TRAIN.KEEP_CHECKPOINTS,
        'TRAIN.SAVE_EVERY_STEPS': config.TRAIN.SAVE_EVERY_STEPS,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise ConfigError(f"config key '{key}' must not be negative, got {value}")
    if not 0 <= config.TRAIN.LAYER_DECAY <= 1:
        raise ConfigError(f"config key 'TRAIN.LAYER_DECAY' must lie in [0, 1] (0 or 1 = off), "
                          f"got {config.TRAIN.LAYER_DECAY}")
    freeze = re.fullmatch(r'none|linear-probe|stages:(\d+)', config.TRAIN.FREEZE)
    num_stages = len(config.MODEL.FOCAL.DEPTHS)
    if freeze is None or (freeze.group(1) is not None and int(freeze.group(1)) > num_stages):
        raise ConfigError(f"config key 'TRAIN.FREEZE' must be 'none', 'stages:K' with 0 <= K <= {num_stages} "
                          f"(the stages of MODEL.FOCAL.DEPTHS) or 'linear-probe', got {config.TRAIN.FREEZE!r}")
    crop_range = config.AUG.DET_CROP_SIZE_RANGE
    if len(crop_range) != 2 or not 0 < crop_range[0] <= crop_range[1]:
        raise ConfigError(f"config key 'AUG.DET_CROP_SIZE_RANGE' must be [min, max] with "
                          f"0 < min <= max, got {list(crop_range)}")
    cascade = config.MODEL.DETECTION.CASCADE
    stages = {key: len(cascade[key]) for key in ('IOU_THRESHOLDS', 'STAGE_LOSS_WEIGHTS', 'BOX_CODER_WEIGHTS')}
    if len(set(stages.values())) != 1 or not all(len(weights) == 4 for weights in cascade.BOX_CODER_WEIGHTS):
        raise ConfigError(f"config keys MODEL.DETECTION.CASCADE.{', '.join(stages)} must have one entry per "
                          f"stage, and each box-coder entry 4 weights; got {stages} entries")
    if config.THROUGHPUT_MODE and config.TASK != 'classification':
        raise ConfigError(f"--throughput measures classification models; for TASK {config.TASK!r} "
                          f"use benchmarks/throughput.py")


def _lookup(config, full_key):
    for part in full_key.split('.'):
        config = config[part]
    return config


def _check_detector_keys(config, sources):
    """A MODEL.DETECTION key set to other than its default (a dumped config.yaml repeats every
    default) that the chosen detector does not read (DETECTOR_KEYS)."""
    detector = config.MODEL.DETECTION.DETECTOR
    read = DETECTOR_KEYS[detector]
    for full_key, source in sources.items():
        if not full_key.startswith('MODEL.DETECTION.') or full_key == 'MODEL.DETECTION.DETECTOR':
            continue
        if full_key.split('.')[2] not in read and _lookup(config, full_key) != _lookup(_C, full_key):
            raise ConfigError(f"config key '{full_key}' in {source} is not read by MODEL.DETECTION.DETECTOR "
                              f"{detector!r}, which reads {', '.join(read)}")


# argparse attribute of a flag -> the config key it sets when given
_FLAG_KEYS = {
    'batch_size': 'DATA.BATCH_SIZE',
    'data_path': 'DATA.DATA_PATH',
    'dataset': 'DATA.DATASET',
    'zip': 'DATA.ZIP_MODE',
    'cache_mode': 'DATA.CACHE_MODE',
    'resume': 'MODEL.RESUME',
    'pretrained': 'MODEL.PRETRAINED',
    'accumulation_steps': 'TRAIN.ACCUMULATION_STEPS',
    'use_checkpoint': 'TRAIN.USE_CHECKPOINT',
    'amp_opt_level': 'AMP_OPT_LEVEL',  # legacy
    'output': 'OUTPUT',
    'tag': 'TAG',
    'eval': 'EVAL_MODE',
    'throughput': 'THROUGHPUT_MODE',
}


def update_config(config, args):
    """Merge ``args.cfg`` (with its BASE files), then ``args.opts``, then the dedicated flags
    (which win over both), check the values, and derive OUTPUT/MODEL.NAME/TAG."""
    config.defrost()
    merged = _Merged()
    cfg_file = getattr(args, 'cfg', None)
    if cfg_file:
        _merge_yaml_file(config, cfg_file, merged)
    _merge_opts(config, list(getattr(args, 'opts', None) or []), merged)

    for attribute, key in _FLAG_KEYS.items():
        value = getattr(args, attribute, None)
        # argparse leaves a flag that was not given at None or False (an explicit 0 counts)
        if value is not None and value is not False and value != '':
            _set_key(config, key, value, '--' + attribute.replace('_', '-'), merged)
    amp = getattr(args, 'amp', None)
    if amp:
        config.AMP_ENABLE = True
        if isinstance(amp, str):  # --amp bf16 / --amp fp16
            config.AMP_DTYPE = amp

    _check_values(config)
    _check_detector_keys(config, merged.sources)
    # the original's apex opt level, when given, decides whether mixed precision is on
    if merged.legacy.get('AMP_OPT_LEVEL'):
        config.AMP_ENABLE = merged.legacy['AMP_OPT_LEVEL'] != 'O0'
    config.OUTPUT = os.path.join(config.OUTPUT, config.MODEL.NAME, config.TAG)
    config.freeze()


def with_classes(config, class_names):
    """A copy of the frozen `config` that records the classes the run found in its data: MODEL.CLASS_NAMES,
    and MODEL.NUM_CLASSES where it was 0 (a set one may exceed the data's, as the released 1000 do)."""
    recorded = config.clone()
    recorded.defrost()
    recorded.MODEL.CLASS_NAMES = list(class_names)
    recorded.MODEL.NUM_CLASSES = config.MODEL.NUM_CLASSES or len(class_names)
    recorded.freeze()
    return recorded


def get_config(args=None):
    """A frozen config: the defaults, updated from ``args`` (see the module docstring)."""
    config = _C.clone()
    update_config(config, args)
    return config


def get_saved_config(text, source, cfg_file=''):
    """A frozen config from a checkpoint's saved one (`text`, the YAML that config.dump() wrote; `source`
    names the checkpoint in errors) with `cfg_file` merged over it: the model predict.py rebuilds."""
    config = _C.clone()
    merged = _Merged()
    try:
        saved = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"the config saved in {source} is not YAML: {type(err).__name__}") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"the config saved in {source} is not a mapping of keys")
    for key, value in saved.items():
        _set_key(config, str(key), value, f'the config saved in {source}', merged)
    if cfg_file:
        _merge_yaml_file(config, cfg_file, merged)
    _check_values(config)
    config.freeze()
    return config

