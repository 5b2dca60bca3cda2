# --------------------------------------------------------
# Focal Transformer: predictions of detectors and segmenters
# Licensed under The MIT License [see LICENSE for details]
# --------------------------------------------------------
"""predict.py on a detector's or a segmenter's checkpoint: each image with its boxes and masks, or its
coloured class map, drawn (--draw), and the predictions as one COCO-style JSON file (--output): 'images',
'categories' and 'annotations' (with 'score'), which pycocotools' COCO reads. Each image is predicted as
evaluation predicts it, one at a time at its own size (tasks.detection, tasks.segmentation)."""
import contextlib
import json
import os
import sys

import numpy as np
import torch
from pycocotools import mask as coco_mask
from torchvision.transforms import v2
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from data.ade20k import eval_transform
from data.image_io import DataError, read_photo
from tasks.detection import MASK_DETECTORS, coco_results
from tasks.segmentation import predict as segment


def class_colours(count):
    """A distinct, repeatable colour per class (golden-ratio hues)."""
    hues = (np.arange(count) * 0.618034) % 1.
    rgb = np.stack([np.abs((hues * 6 + shift) % 6 - 3) - 1 for shift in (0, 4, 2)], axis=1).clip(0, 1)
    return [tuple(int(v) for v in colour) for colour in (55 + 200 * rgb)]


def detect(model, config, picture, image_id, names, threshold):
    """(COCO annotations, drawn uint8 picture) of one image for a detector."""
    with_masks = config.MODEL.DETECTION.DETECTOR in MASK_DETECTORS
    device = next(model.parameters()).device
    output = model([v2.functional.to_dtype(picture.to(device), torch.float32, scale=True)])[0]
    output = {key: value.cpu() for key, value in output.items()}
    # category ids are the labels here (the JSON's categories list them with their names)
    found = coco_results(image_id, output, with_masks, range(1, len(names)))
    annotations = found['bbox']
    for annotation, segment_found in zip(annotations, found.get('segm', [])):
        annotation['segmentation'] = segment_found['segmentation']
    for annotation in annotations:
        annotation['area'] = annotation['bbox'][2] * annotation['bbox'][3]
    shown = output['scores'] >= threshold
    colours = class_colours(len(names))
    labels = output['labels'][shown].tolist()
    drawn = picture
    if with_masks and shown.any():
        drawn = draw_segmentation_masks(drawn, output['masks'][shown, 0] > 0.5, alpha=0.4,
                                        colors=[colours[label] for label in labels])
    captions = [f'{names[label]} {score:.2f}' for label, score in zip(labels, output['scores'][shown].tolist())]
    drawn = draw_bounding_boxes(drawn, output['boxes'][shown], captions, colors=[colours[label] for label in labels])
    return annotations, drawn


def segment_image(model, config, picture, image_id, names):
    """(COCO annotations: one RLE per class present, drawn uint8 picture) of one image for a segmenter."""
    image = eval_transform()(picture)[None].to(next(model.parameters()).device)
    classes = segment(model, image, config.DATA.SEG_SCALE, [1.0], False, contextlib.nullcontext)[0].argmax(0).cpu()
    present = classes.unique().tolist()
    masks = classes[None] == torch.tensor(present)[:, None, None]
    rles = coco_mask.encode(np.asfortranarray(masks.permute(1, 2, 0).numpy().astype(np.uint8)))
    annotations = [{'image_id': image_id, 'category_id': label, 'score': 1.0, 'area': float(coco_mask.area(rle)),
                    'bbox': coco_mask.toBbox(rle).tolist(),
                    'segmentation': {'size': rle['size'], 'counts': rle['counts'].decode()}}
                   for label, rle in zip(present, rles)]
    colours = class_colours(len(names))
    drawn = draw_segmentation_masks(picture, masks, alpha=0.5, colors=[colours[label] for label in present])
    return annotations, drawn


def predict_dense(args, model, config, names, paths):
    """Predict every image of `paths`; returns the number skipped (unreadable, named on stderr)."""
    images, annotations, skipped = [], [], 0
    if args.draw:
        os.makedirs(args.draw, exist_ok=True)
    for number, path in enumerate(paths, 1):
        try:
            photo = read_photo(path)
        except DataError as err:
            print(f'skipped: {err}', file=sys.stderr)
            skipped += 1
            continue
        picture = v2.functional.pil_to_tensor(photo)
        image_id = len(images) + 1
        with torch.no_grad():
            if config.TASK == 'detection':
                found, drawn = detect(model, config, picture, image_id, names, args.threshold)
            else:
                found, drawn = segment_image(model, config, picture, image_id, names)
        print(f'{path}: ' + ', '.join(f"{names[a['category_id']]} {a['score']:.2f}" for a in found
                                      if a['score'] >= args.threshold))
        images.append({'id': image_id, 'file_name': path, 'width': photo.width, 'height': photo.height})
        annotations += found
        if args.draw:
            stem = os.path.splitext(os.path.basename(path))[0]
            v2.functional.to_pil_image(drawn).save(os.path.join(args.draw, f'{image_id:05d}_{stem}.png'))
        print(f'[{number}/{len(paths)}] images', file=sys.stderr)
    if args.output:
        for number, annotation in enumerate(annotations, 1):
            annotation['id'] = number
        categories = [{'id': label, 'name': name} for label, name in enumerate(names) if name != 'background']
        with open(args.output, 'w') as f:
            json.dump({'images': images, 'categories': categories, 'annotations': annotations}, f)
    return skipped
