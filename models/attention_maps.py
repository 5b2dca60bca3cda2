"""Where a Focal Transformer looks: one block's focal attention laid over its stage map, and a Grad-CAM
class map.

`keep_attention(model, stage, block)` makes that block's forward keep the probabilities it weighs its
values with (FocalAttention.keep_attention: the same numbers that produced the output, not recomputed)
and records the size of its unpadded map. `attention_over_map` then lays each key slot's weight over the
tokens it read: a window or neighbour token is one token; a pooled cell covers the tokens it pools
(FocalTransformerBlock.pooling_cells), its weight spread evenly over them, so that a map sums to the
attention's total (one per query, less what fell on the padding beyond the map's edge). Key slots index
the padded, shifted map (models.attention_tables); the map is drawn on the padded grid and rolled back.
"""
import contextlib
from typing import Optional, Tuple

import torch

from .focal_transformer import FocalTransformer, FocalTransformerBlock, KeptAttention

__all__ = ['AttentionCapture', 'keep_attention', 'find_block', 'query_slot', 'attention_over_map', 'grad_cam']


class AttentionCapture:
    """What `keep_attention` records of the chosen block's last forward."""

    def __init__(self, block: FocalTransformerBlock, stride: int):
        self.block = block
        self.stride = stride  # input pixels per token of the block's map
        self.map_size: Optional[Tuple[int, int]] = None

    @property
    def kept(self) -> KeptAttention:
        return self.block.attn.kept_attention

    @contextlib.contextmanager
    def paused(self):
        """Forwards within run the block as usual (with gradients: grad_cam) and leave what was kept alone."""
        self.block.attn.keep_attention = False
        try:
            yield
        finally:
            self.block.attn.keep_attention = True


def find_block(model: FocalTransformer, stage: int, block: int) -> FocalTransformerBlock:
    """The block `block` of stage `stage`; a ValueError naming what the model has otherwise."""
    depths = [len(layer.blocks) for layer in model.layers]
    if not (0 <= stage < len(depths) and 0 <= block < depths[stage]):
        raise ValueError(f'block {stage}.{block} does not exist: the model has {len(depths)} stages of '
                         f'{", ".join(map(str, depths))} blocks (stage.block counts from 0)')
    return model.layers[stage].blocks[block]


@contextlib.contextmanager
def keep_attention(model: FocalTransformer, stage: int, block: int):
    """Within the context, forwards of `model` keep block `stage`.`block`'s attention; yields the
    AttentionCapture."""
    chosen = find_block(model, stage, block)
    capture = AttentionCapture(chosen, model.patch_size * 2 ** stage)

    def record_size(module, inputs):
        capture.map_size = (inputs[0].shape[1], inputs[0].shape[2])

    hook = chosen.register_forward_pre_hook(record_size)
    chosen.attn.keep_attention = True
    try:
        yield capture
    finally:
        chosen.attn.keep_attention = False
        chosen.attn.kept_attention = None
        hook.remove()


def _rolled_position(block: FocalTransformerBlock, row: int, col: int, padded_size: Tuple[int, int]):
    """Where map token (row, col) sits in the padded map the block shifted by -shift_size."""
    return (row - block.shift_size) % padded_size[0], (col - block.shift_size) % padded_size[1]


def query_slot(block: FocalTransformerBlock, kept: KeptAttention, row: int, col: int) -> Tuple[int, int]:
    """(window, query) of map token (row, col) in the kept attention's (nW, ws²) layout."""
    ws, (Hp, Wp) = block.window_size, kept.padded_size
    r, c = _rolled_position(block, row, col, kept.padded_size)
    return (r // ws) * (Wp // ws) + c // ws, (r % ws) * ws + c % ws


def _slot_rectangles(block: FocalTransformerBlock, kept: KeptAttention) -> torch.Tensor:
    """(nW, n_keys, 4) the (top, left, bottom, right) tokens of the padded, shifted map each key slot read:
    one token for window and neighbour slots, the pooled region for a cell (pooling_cells' layout)."""
    ws, (Hp, Wp) = block.window_size, kept.padded_size
    rows = kept.key_index.cpu()
    rect = torch.stack([rows // Wp, rows % Wp, rows // Wp + 1, rows % Wp + 1], dim=-1)
    offset, windows = Hp * Wp, (Hp // ws) * (Wp // ws)
    for level in range(block.pooled_levels):
        cell, cells = ws >> level, windows << (2 * level)
        grid_w = (Wp // ws) << level
        top, left = (Hp - (Hp // ws << level) * cell) // 2, (Wp - grid_w * cell) // 2
        index = rows - offset
        in_level = (index >= 0) & (index < cells)
        r0, c0 = top + index // grid_w * cell, left + index % grid_w * cell
        level_rect = torch.stack([r0, c0, r0 + cell, c0 + cell], dim=-1)
        rect = torch.where(in_level[..., None], level_rect, rect)
        offset += cells
    return rect


def attention_over_map(capture: AttentionCapture, image: int, point: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """(nH, H, W) attention of image `image`'s query at map token `point` (row, col), or the average over
    all of the map's queries (point None), over the block's (H, W) map: each key slot's weight spread
    evenly over the tokens it read (see the module docstring)."""
    block, kept = capture.block, capture.kept
    if kept is None:
        raise RuntimeError('no attention kept: run the model inside keep_attention first')
    H, W = capture.map_size
    Hp, Wp = kept.padded_size
    probabilities = kept.probabilities[image].float().cpu()  # (nW, nH, ws², n_keys)
    num_windows, num_heads, queries, _ = probabilities.shape
    if point is not None:
        window, query = query_slot(block, kept, *point)
        per_window = torch.zeros(num_windows, num_heads, probabilities.shape[-1])
        per_window[window] = probabilities[window, :, query]
    else:
        # only the queries of real tokens, not of the padding, are averaged
        valid = torch.zeros(Hp, Wp, dtype=torch.bool)
        valid[:H, :W] = True
        valid = torch.roll(valid, shifts=(-block.shift_size, -block.shift_size), dims=(0, 1))
        ws = block.window_size
        valid = valid.view(Hp // ws, ws, Wp // ws, ws).permute(0, 2, 1, 3).reshape(num_windows, 1, queries, 1)
        per_window = (probabilities * valid).sum(2) / valid.sum()
    rect = _slot_rectangles(block, kept)
    area = ((rect[..., 2] - rect[..., 0]) * (rect[..., 3] - rect[..., 1])).float()
    density = per_window / area[:, None, :]  # (nW, nH, n_keys)
    # each rectangle added to a difference grid at its four corners, then summed along both axes
    corners = torch.zeros(num_heads, Hp + 1, Wp + 1)
    for rows, cols, sign in ((0, 1, 1.), (0, 3, -1.), (2, 1, -1.), (2, 3, 1.)):
        flat = (rect[..., rows] * (Wp + 1) + rect[..., cols]).flatten()
        corners.view(num_heads, -1).index_add_(1, flat, sign * density.permute(1, 0, 2).reshape(num_heads, -1))
    painted = corners.cumsum(1).cumsum(2)[:, :Hp, :Wp]
    painted = torch.roll(painted, shifts=(block.shift_size, block.shift_size), dims=(1, 2))
    return painted[:, :H, :W]


def grad_cam(model: FocalTransformer, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """Grad-CAM (Selvaraju et al., 2017) of each image for its class in `classes`: the last stage map larger
    than one token (the network's last, 7x7, at 224 px), its channels weighed by the mean gradient of the
    class score, summed, ReLU'd and scaled to a maximum of 1 (all zero where nothing is positive): (B, H, W)."""
    with torch.enable_grad():
        final, maps = model.forward_intermediates(images, output_fmt='NHWC')  # the maps the network goes on with
        stage = max([i for i, stage_map in enumerate(maps) if stage_map.shape[1] * stage_map.shape[2] > 1],
                    default=len(maps) - 1)
        scores = model.forward_head(final).gather(1, classes[:, None]).sum()
        gradient, = torch.autograd.grad(scores, maps[stage])
    weights = gradient.mean(dim=(1, 2), keepdim=True)  # each channel's weight: its mean gradient
    cam = (maps[stage].detach() * weights).sum(-1).clamp(min=0)
    return cam / cam.flatten(1).amax(1).clamp(min=1e-12)[:, None, None]
