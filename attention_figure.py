# --------------------------------------------------------
# Focal Transformer: attention figures
# Licensed under The MIT License [see LICENSE for details]
# --------------------------------------------------------
"""The PNG predict.py --attention writes: the model's input, then heat maps over it, each scaled to its own
maximum: the attention averaged over heads, each head's, and the Grad-CAM map of the predicted class."""
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

# Panels are drawn at least this many pixels a side (small inputs enlarged, nearest neighbour).
MIN_PANEL = 192
CAPTION = 14  # pixels of caption strip above each panel
# Colours of the heat scale at 0, 1/3, 2/3 and 1 (dark blue, purple, orange, yellow).
HEAT = np.array([[13, 8, 135], [156, 23, 158], [237, 121, 83], [240, 249, 33]], dtype=np.float64)


def _heat_colours(values: np.ndarray) -> np.ndarray:
    """(H, W) in [0, 1] -> (H, W, 3) colours, linear between the HEAT anchors."""
    position = values * (len(HEAT) - 1)
    low = np.clip(np.floor(position).astype(int), 0, len(HEAT) - 2)
    fraction = (position - low)[..., None]
    return HEAT[low] * (1 - fraction) + HEAT[low + 1] * fraction


def _overlay(picture: np.ndarray, heat: torch.Tensor, stride: int) -> np.ndarray:
    """`heat` (h, w), one value per token of `stride` input pixels, over `picture` (H, W, 3); pixels no
    token covers (the stem's floor division) stay dark."""
    H, W = picture.shape[:2]
    heat = heat / heat.max().clamp(min=1e-12)
    full = np.zeros((H, W))
    covered = heat.repeat_interleave(stride, 0).repeat_interleave(stride, 1).numpy()[:H, :W]
    full[:covered.shape[0], :covered.shape[1]] = covered
    return 0.35 * picture + 0.65 * _heat_colours(full)


def save_attention_figure(path: str, image: torch.Tensor, attention: torch.Tensor, cam: torch.Tensor, stride: int,
                          point, label: str, block: str):
    """Write the figure to `path` (PNG). image: the normalized (3, H, W) input; attention: (heads, h, w) over
    the block's map of `stride` pixels a token; cam: Grad-CAM over the last map; point: the query token
    (row, col), outlined, or None for the average query."""
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None], torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    picture = ((image.float() * std + mean).clamp(0, 1) * 255).permute(1, 2, 0).numpy()
    H, W = picture.shape[:2]
    cam_stride = -(-H // cam.shape[0])
    cam_pixels = F.interpolate(cam[None, None], size=(cam.shape[0] * cam_stride, cam.shape[1] * cam_stride),
                               mode='bilinear', align_corners=False)[0, 0]
    what = 'query' if point is not None else 'mean query'
    panels = [(picture, 'input'), (_overlay(picture, attention.mean(0), stride), f'{block} {what}, heads mean')]
    panels += [(_overlay(picture, head, stride), f'head {h}') for h, head in enumerate(attention)]
    panels.append((_overlay(picture, cam_pixels, 1), f'Grad-CAM: {label}'[:40]))
    scale = max(1, -(-MIN_PANEL // min(H, W)))
    width, height = W * scale, H * scale
    figure = Image.new('RGB', (len(panels) * width, height + CAPTION), 'white')
    draw = ImageDraw.Draw(figure)
    for i, (pixels, caption) in enumerate(panels):
        panel = Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).resize((width, height), Image.NEAREST)
        figure.paste(panel, (i * width, CAPTION))
        draw.text((i * width + 2, 1), caption, fill='black')
        if point is not None and i > 0:
            top, left = CAPTION + point[0] * stride * scale, i * width + point[1] * stride * scale
            draw.rectangle([left, top, left + stride * scale - 1, top + stride * scale - 1], outline='white')
    figure.save(path)
