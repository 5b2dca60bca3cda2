# --------------------------------------------------------
# Focal Transformer: predictions, features and attention maps for images
# Licensed under The MIT License [see LICENSE for details]
# --------------------------------------------------------
"""Classify images with a trained Focal Transformer, export their features, and draw where it looks.

    python3 predict.py --resume output/focal_micro_digits/default/ckpt_best.pth photo.png my_folder/ --topk 3
    python3 predict.py --cfg configs/focal_tiny_patch4_window7_224.yaml --resume focal-tiny-is224-ws7.pth cat.jpg
        [--output preds.csv | preds.json] [--features features.safetensors [--stage-maps]]
        [--attention maps/ [--point X,Y] [--block S.B]]
    python3 predict.py --resume output/mask_rcnn_focal_micro_digits/default/ckpt_best.pth scenes/ \
        --draw drawn/ --output detections.json [--threshold 0.5]

The model and its preprocessing (evaluation's resize and crop) come from the config a training checkpoint
saved; --cfg merges a YAML file over it, and gives the model of a file that saved none (released weights,
safetensors, .pdparams). Class names: the checkpoint's ('classes'), else ImageNet-1K's for 1000 classes.
Images of any size and mode (grey, RGBA, CMYK, 16-bit), turned upright by their EXIF orientation; folders
are searched recursively. Each image's top-k goes to stdout; progress and skipped files to stderr.

A detector's or segmenter's checkpoint (TASK detection, segmentation): each image with its boxes and masks,
or its class map, drawn into --draw DIR, and COCO-style JSON in --output (dense_predictions.py).

Exit status: 0 every image predicted; 2 bad input, one `error:` line naming it (argument, checkpoint,
config, a path without images, --topk beyond the classes, --point outside an image, an output that cannot
be written); 3 done, but some files could not be read, each named on one `skipped:` line.
"""
import argparse
import csv
import json
import os
import sys
from contextlib import nullcontext

import torch
from safetensors.torch import save_file
from timm.data import ImageNetInfo
from torchvision import transforms

from attention_figure import save_attention_figure
from config import ConfigError, get_config, get_saved_config
from data import DataError
from data.build import build_transform
from data.image_io import find_images, read_photo
from dense_predictions import predict_dense
from lifecycle import EXIT_BAD_INPUT, OneLineArgumentParser
from models.attention_maps import attention_over_map, find_block, grad_cam, keep_attention, query_slot
from models.backbone import load_weights
from models.checkpoint import CheckpointError, error_line, model_weights, read_checkpoint, resolve
from tasks import build_task

EXIT_SKIPPED = 3  # some files could not be read; the others were predicted


class BadInput(Exception):
    """A bad argument found after parsing (--topk, --point); one line."""


def parse_args(argv=None):
    parser = OneLineArgumentParser('Focal Transformer predictions, features and attention maps')
    parser.add_argument('images', nargs='+', metavar='IMAGE_OR_FOLDER', help='image files and folders of them')
    parser.add_argument('--resume', help='checkpoint to predict with (training checkpoint or released weights)')
    parser.add_argument('--pretrained', help='weights adapted to the --cfg model (another size or window)')
    parser.add_argument('--cfg', help='YAML merged over the checkpoint\'s config (required if it saved none)')
    parser.add_argument('--topk', type=int, help='classes printed per image (default 5, or all if fewer)')
    parser.add_argument('--batch-size', type=int, default=16, help='images per forward pass (default 16)')
    parser.add_argument('--output', help='write the predictions as .csv or .json')
    parser.add_argument('--features', metavar='FILE.safetensors', help="each image's pooled embedding")
    parser.add_argument('--stage-maps', action='store_true', help="--features: also each stage's map")
    parser.add_argument('--attention', metavar='DIR', help='a PNG of focal attention and Grad-CAM per image')
    parser.add_argument('--point', help='--attention: the query at pixel X,Y of the image (default: all, averaged)')
    parser.add_argument('--block', default='0.0', help='--attention: stage.block, counted from 0 (default 0.0)')
    parser.add_argument('--draw', metavar='DIR', help='detector, segmenter: each image with its predictions drawn')
    parser.add_argument('--threshold', type=float, default=0.5, help='detector: lowest score drawn and printed')
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    args = parser.parse_args(argv)
    if (args.resume is None) == (args.pretrained is None):
        parser.error('give one of --resume and --pretrained')
    if args.output and not args.output.endswith(('.csv', '.json')):
        parser.error(f'--output {args.output} must end in .csv or .json')
    if args.features and not args.features.endswith('.safetensors'):
        parser.error(f'--features {args.features} must end in .safetensors')
    if (args.topk is not None and args.topk < 1) or args.batch_size < 1:
        parser.error('--topk and --batch-size must be positive')
    args.point = _pair(parser, '--point', args.point, ',', float) if args.point else None
    args.block = _pair(parser, '--block', args.block, '.', int)
    return args


def _pair(parser, flag, text, separator, kind):
    parts = text.split(separator)
    try:
        if len(parts) == 2:
            return kind(parts[0]), kind(parts[1])
    except ValueError:
        pass
    parser.error(f'{flag} {text!r} is not two numbers separated by {separator!r}')


def load_model(args):
    """(model in eval mode, config, class names) from the checkpoint and --cfg."""
    source = args.resume or args.pretrained
    contents = read_checkpoint(resolve(source))
    if isinstance(contents.get('config'), str):
        config = get_saved_config(contents['config'], source, args.cfg or '')
    elif args.cfg:
        config = get_config(argparse.Namespace(cfg=args.cfg))
    else:
        raise ConfigError(f"{source} saved no config (released or weights-only): give the model with --cfg")
    if config.TASK != 'classification' and (args.pretrained or args.features or args.attention):
        raise ConfigError(f"{source} is a {config.TASK} model: give it with --resume, without --features or "
                          f"--attention (classifiers only)")
    classes = list(contents.get('classes') or config.MODEL.CLASS_NAMES)
    weights = model_weights(contents, source)
    num_classes = config.MODEL.NUM_CLASSES or len(classes) or weights.get('head.weight', torch.empty(0)).shape[0]
    config.defrost()
    config.MODEL.NUM_CLASSES = num_classes
    config.freeze()
    model = build_task(config).build_model(config)
    report = load_weights(model, contents, source, adapt=args.pretrained is not None)
    if any(entry.key.startswith('head.') and entry.action == 'fresh' for entry in report.entries):
        raise CheckpointError(f"{source} has no classifier for this model's {num_classes} classes")
    return model.eval(), config, class_names(classes, num_classes, config.TASK == 'classification')


def class_names(classes, num_classes, classifier):
    """The checkpoint's names, ImageNet synsets by their description; a classifier's 1000 nameless rows
    ImageNet-1K's; 'class N' for the rest (a set MODEL.NUM_CLASSES above the data's)."""
    info = ImageNetInfo()
    if classifier and not classes and num_classes == 1000:
        classes = [info.index_to_label_name(i) for i in range(num_classes)]
    classes = list(classes[:num_classes]) + [f'class {i}' for i in range(len(classes), num_classes)]
    synsets = info.label_names()
    return [info.label_name_to_description(name) if name in synsets else name for name in classes]


def prediction_transform(config):
    """Evaluation's preprocessing, for images of any size: those of 32 px or less, which evaluation takes
    as they come (CIFAR-style), are resized to the input size first."""
    transform = build_transform(False, config)
    if config.DATA.IMG_SIZE <= 32:
        transform.transforms.insert(0, transforms.Resize((config.DATA.IMG_SIZE,) * 2))
    return transform


def input_point(transform, point, size, path):
    """Pixel (x, y) of an image of `size` (w, h), in the model's input after the transform's resize and
    crop (torchvision's arithmetic); a BadInput when it lies outside the image or is cropped away."""
    (x, y), (w, h) = point, size
    if not (0 <= x < w and 0 <= y < h):
        raise BadInput(f'--point {x:g},{y:g} lies outside {path} ({w}x{h} pixels)')
    for step in transform.transforms:
        if isinstance(step, transforms.Resize):
            if isinstance(step.size, int) or len(step.size) == 1:
                short = step.size if isinstance(step.size, int) else step.size[0]
                new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
            else:
                new = (step.size[1], step.size[0])
            x, y, (w, h) = x * new[0] / w, y * new[1] / h, new
        elif isinstance(step, transforms.CenterCrop):
            ch, cw = step.size
            x, y, (w, h) = x - int(round((w - cw) / 2.)), y - int(round((h - ch) / 2.)), (cw, ch)
            if not (0 <= x < w and 0 <= y < h):
                raise BadInput(f'--point {point[0]:g},{point[1]:g} of {path} is cut off by the centre crop')
    return int(x), int(y)


def read_batch(paths, transform):
    """(images, tensors (N, 3, H, W) or None, sizes); an unreadable file is named on stderr and left out."""
    kept, tensors, sizes = [], [], []
    for path in paths:
        try:
            image = read_photo(path)
        except DataError as err:
            print(f'skipped: {err}', file=sys.stderr)
            continue
        kept.append(path)
        tensors.append(transform(image))
        sizes.append(image.size)
    return kept, (torch.stack(tensors) if tensors else None), sizes


def draw_attention(args, model, capture, paths, images, sizes, labels, transform, written):
    """Each image's attention figure (attention_figure) in --attention, and beside it as .safetensors what
    it draws: 'map' (heads, H, W), 'grad_cam', and for a --point the query's 'query_probabilities' (heads,
    key slots) as the forward computed them. `labels`: (class, name) of each image's top prediction."""
    drawn = []
    for i, (path, size) in enumerate(zip(paths, sizes)):
        point, tensors = None, {}
        if args.point is not None:
            x, y = input_point(transform, args.point, size, path)
            rows, cols = capture.map_size  # pixels the stem's floor division drops belong to the last token
            point = (min(y // capture.stride, rows - 1), min(x // capture.stride, cols - 1))
            window, query = query_slot(capture.block, capture.kept, *point)
            tensors['query_probabilities'] = capture.kept.probabilities[i, window, :, query].float().cpu().contiguous()
        tensors['map'] = attention_over_map(capture, i, point)
        drawn.append((point, tensors))
    with capture.paused():  # Grad-CAM's gradients through the block's attention
        cams = grad_cam(model, images, torch.tensor([label for label, _ in labels], device=images.device)).cpu()
    for i, (path, (point, tensors)) in enumerate(zip(paths, drawn)):
        target = figure_path(args.attention, path, written)
        save_attention_figure(target, images[i].cpu(), tensors['map'], cams[i], capture.stride, point, labels[i][1],
                              f'block {args.block[0]}.{args.block[1]}')
        save_file(dict(tensors, grad_cam=cams[i].contiguous()), target[:-len('.png')] + '.safetensors')


def predict(args):
    model, config, names = load_model(args)
    if args.topk is None:
        args.topk = min(5, len(names))
    elif args.topk > len(names):
        raise BadInput(f'--topk {args.topk} exceeds the {len(names)} classes of the model')
    paths = find_images(args.images)
    model.to(args.device)
    if config.TASK != 'classification':
        if args.output and not args.output.endswith('.json'):
            raise BadInput(f'--output {args.output}: a {config.TASK} model writes COCO-style .json')
        return EXIT_SKIPPED if predict_dense(args, model, config, names, paths) else 0
    transform = prediction_transform(config)
    if args.attention:
        find_block(model, *args.block)
        os.makedirs(args.attention, exist_ok=True)
    rows, features, written, skipped, done = [], {}, set(), 0, 0
    with keep_attention(model, *args.block) if args.attention else nullcontext() as capture:
        for start in range(0, len(paths), args.batch_size):
            batch = paths[start:start + args.batch_size]
            kept, images, sizes = read_batch(batch, transform)
            skipped += len(batch) - len(kept)
            done += len(batch)
            print(f'[{done}/{len(paths)}] images', file=sys.stderr)
            if images is None:
                continue
            images = images.to(args.device)
            with torch.no_grad():
                final, maps = model.forward_intermediates(images)
                pooled = model.forward_head(final, pre_logits=True)
                top = model.head(pooled).float().softmax(-1).topk(args.topk, dim=-1)
            for i, path in enumerate(kept):
                predictions = [(names[c], p) for p, c in zip(top.values[i].tolist(), top.indices[i].tolist())]
                print(f'{path}: ' + ', '.join(f'{name} ({p:.3f})' for name, p in predictions))
                rows.append((path, predictions))
                if args.features:
                    features[path] = pooled[i].float().cpu()
                    for stage, stage_map in enumerate(maps if args.stage_maps else ()):
                        features[f'{path}/stage{stage}'] = stage_map[i].float().cpu().contiguous()
            if args.attention:
                labels = [(c, names[c]) for c in top.indices[:, 0].tolist()]
                draw_attention(args, model, capture, kept, images, sizes, labels, transform, written)
    write_outputs(args, rows, features)
    return EXIT_SKIPPED if skipped else 0


def figure_path(folder, path, written):
    """folder/<image name>.png, numbered _2, _3, ... where images of several folders share a name."""
    stem = os.path.splitext(os.path.basename(path))[0]
    target, suffix = os.path.join(folder, f'{stem}.png'), 1
    while target in written:
        suffix += 1
        target = os.path.join(folder, f'{stem}_{suffix}.png')
    written.add(target)
    return target


def write_outputs(args, rows, features):
    """--output (.csv: a row per image and rank; .json: a list of images) and --features."""
    if args.output and args.output.endswith('.csv'):
        with open(args.output, 'w', newline='') as f:
            writer = csv.writer(f)
            writer.writerow(['file', 'rank', 'class', 'probability'])
            writer.writerows((path, rank + 1, name, f'{p:.6f}') for path, predictions in rows
                             for rank, (name, p) in enumerate(predictions))
    elif args.output:
        with open(args.output, 'w') as f:
            json.dump([{'file': path, 'predictions': [{'class': name, 'probability': p} for name, p in predictions]}
                       for path, predictions in rows], f, indent=1)
    if args.features:
        save_file(features, args.features, metadata={'embedding': 'pooled final map (forward_head pre_logits)'})


def cli(argv=None):
    args = parse_args(argv)
    try:
        return predict(args)
    except (BadInput, ConfigError, DataError, CheckpointError, ValueError) as err:
        print(f'error: {error_line(err)}', file=sys.stderr)
        return EXIT_BAD_INPUT
    except OSError as err:  # an output file or folder that cannot be written
        print(f'error: cannot write {err.filename}: {err.strerror}', file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == '__main__':
    sys.exit(cli())
