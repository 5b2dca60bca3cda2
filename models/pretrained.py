"""Carry a checkpoint's weights into a Focal Transformer of another geometry: what
`focal_transformer.checkpoint_filter_fn(..., adapt=True)` does for fine-tuning (--pretrained) and for the
backbone of a detector or segmenter, which may differ from the checkpoint's model in image size, window
size, focal windows, expand sizes or number of classes. For each model tensor the filter

- copies it when the checkpoint holds it with the same shape;
- resizes it where only the geometry changed (`adapt_tensor`):
  * `relative_position_bias_table` ((2ws-1)^2, nH) and `relative_position_bias_table_to_windows.k`
    (nH, S^2): per head, a 2-D grid resized by bicubic interpolation (align_corners=False, as
    Swin resizes its table). Odd sides map centre sample onto centre sample, and the
    interpolation runs in float64, so the centre value (offset 0) is kept exactly;
  * `pool_layers.k.weight`, fc (1, g^2) or depthwise conv (C, 1, g, g): each g x g kernel resized
    the same way, scaled by the area ratio (g/g')^2 (a pooling kernel spreads the same total weight
    over more cells), then shifted by one constant so that its sum is exactly the old sum;
  * `relative_position_bias_table_to_neighbors` (1, nH, ws^2, n_neighbours): one free value per
    query and neighbour slot. Each new (query, slot) pair takes the mean of all old pairs with the
    same relative offset key - query; offsets the old geometry never had start fresh;
  * `absolute_pos_embed` (1, H*W, C): the token grid resized bicubically;
- starts it fresh (the model's own initialisation, as training from scratch) for a classifier with
  another number of classes and for a neighbour table the checkpoint lacks (at a higher resolution a
  stage whose map exceeds the window gains neighbour keys): `missing_tensor_note`.

Checkpoint tensors the model lacks are ignored when they are a neighbour table (the block has no
neighbour keys at the new geometry), the classifier or the final norm (a backbone has neither):
`surplus_tensor_note`. `TransferReport` records what happened to each tensor, for the log.
"""
import functools
import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .attention_tables import neighbour_key_positions

RELATIVE_TABLE = re.compile(r'\.attn\.relative_position_bias_table$')
WINDOWS_TABLE = re.compile(r'\.attn\.relative_position_bias_table_to_windows\.\d+$')
NEIGHBOURS_TABLE = re.compile(r'\.attn\.relative_position_bias_table_to_neighbors$')
POOL_WEIGHT = re.compile(r'\.pool_layers\.\d+\.weight$')
HEAD = ('head.weight', 'head.bias')
# What a classifier has and a backbone may lack: the classifier, and the final norm (timm's feature
# wrappers prune it when the last map is returned unnormalised). The reason each is left out:
CLASSIFIER_ONLY = {'head.weight': 'the model has no classifier', 'head.bias': 'the model has no classifier',
                   'norm.weight': 'the model has no final norm', 'norm.bias': 'the model has no final norm'}


@dataclass
class TransferEntry:
    key: str
    old_shape: tuple | None
    new_shape: tuple | None
    action: str  # copied | resized | fresh | ignored
    note: str = ''

    @property
    def weights(self):
        return math.prod(self.new_shape if self.new_shape is not None else self.old_shape)


class TransferReport:
    ACTIONS = ('copied', 'resized', 'fresh', 'ignored')

    def __init__(self):
        self.entries = []
        self.dropped_buffers = 0

    def add(self, key, old_shape, new_shape, action, note=''):
        self.entries.append(TransferEntry(key, old_shape, new_shape, action, note))

    def count(self, action):
        """(number of tensors, number of weights) that got `action`."""
        chosen = [entry for entry in self.entries if entry.action == action]
        return len(chosen), sum(entry.weights for entry in chosen)

    def summary(self):
        parts = []
        for action in self.ACTIONS:
            tensors, weights = self.count(action)
            parts.append(f'{action} {tensors} tensors ({weights:,} weights)')
        line = 'pretrained weights: ' + ', '.join(parts)
        if self.dropped_buffers:
            line += f'; {self.dropped_buffers} reference index buffers dropped'
        return line

    def details(self):
        lines = []
        for entry in self.entries:
            old = _shape_text(entry.old_shape)
            new = _shape_text(entry.new_shape)
            note = f': {entry.note}' if entry.note else ''
            lines.append(f'{entry.key}: {old} -> {new} {entry.action}{note}')
        return lines


def missing_tensor_note(key):
    """Why a model tensor the checkpoint lacks may start fresh, or None when that means another
    architecture."""
    if key in HEAD:
        return 'the checkpoint has no classifier'
    if NEIGHBOURS_TABLE.search(key):
        return 'the checkpoint has no neighbour keys in this block'
    return None


def surplus_tensor_note(key):
    """Why a checkpoint tensor the model lacks may be left out, or None when that means another
    architecture."""
    if NEIGHBOURS_TABLE.search(key):
        return 'the model block has no neighbour keys'
    return CLASSIFIER_ONLY.get(key)


class GeometryMismatch(Exception):
    """A tensor whose shape differs in more than the geometry; `why` says how, for the mismatch report."""

    def __init__(self, why=''):
        super().__init__(why)
        self.why = f' ({why})' if why else ''


def adapt_tensor(key, old, fresh):
    """(tensor, action, note) for a checkpoint tensor whose shape differs from the model's."""
    if key in HEAD:
        if old.shape[1:] != fresh.shape[1:]:
            raise GeometryMismatch('different feature width')
        return fresh.clone(), 'fresh', f'{old.shape[0]} classes in the checkpoint, {fresh.shape[0]} in the model'
    if RELATIVE_TABLE.search(key):
        if old.shape[1] != fresh.shape[1]:
            raise GeometryMismatch('different number of heads')
        return _resize_grid_columns(old, fresh.shape[0], fresh.dtype)
    if WINDOWS_TABLE.search(key):
        if old.shape[0] != fresh.shape[0]:
            raise GeometryMismatch('different number of heads')
        resized, action, note = _resize_grid_columns(old.t(), fresh.shape[1], fresh.dtype)
        return resized.t().contiguous(), action, note
    if POOL_WEIGHT.search(key):
        return _resize_pool_weight(old, fresh)
    if NEIGHBOURS_TABLE.search(key):
        return _map_neighbour_table(old, fresh)
    if key == 'absolute_pos_embed':
        if old.shape[0] != 1 or old.shape[2] != fresh.shape[2]:
            raise GeometryMismatch('different embedding width')
        resized, action, note = _resize_grid_columns(old[0], fresh.shape[1], fresh.dtype)
        return resized[None], action, note
    raise GeometryMismatch()


def _resize_grid_columns(table, new_size, dtype):
    """Resize a (S*S, X) table to (new_size, X), each column an S x S grid."""
    old_side, new_side = _square_side(table.shape[0]), _square_side(new_size)
    grids = table.t().reshape(-1, old_side, old_side)
    resized = _resize_grids(grids, new_side).reshape(-1, new_size).t()
    return resized.to(dtype).contiguous(), 'resized', f'grid {old_side}x{old_side} -> {new_side}x{new_side} bicubic'


def _resize_pool_weight(old, fresh):
    if old.dim() == 2 and fresh.dim() == 2 and old.shape[0] == fresh.shape[0] == 1:
        old_side, new_side = _square_side(old.shape[1]), _square_side(fresh.shape[1])
        kernels = old.reshape(1, old_side, old_side)
    elif (old.dim() == 4 and fresh.dim() == 4 and old.shape[:2] == fresh.shape[:2]
          and old.shape[2] == old.shape[3] and fresh.shape[2] == fresh.shape[3]):
        old_side, new_side = old.shape[2], fresh.shape[2]
        kernels = old.reshape(-1, old_side, old_side)
    else:
        raise GeometryMismatch('not the same pooling layer')
    old_sums = kernels.double().sum(dim=(1, 2), keepdim=True)
    resized = _resize_grids(kernels, new_side) * (old_side / new_side) ** 2
    resized += (old_sums - resized.sum(dim=(1, 2), keepdim=True)) / new_side ** 2
    note = f'kernel {old_side}x{old_side} -> {new_side}x{new_side} bicubic, sum kept'
    return resized.reshape(fresh.shape).to(fresh.dtype), 'resized', note


def _map_neighbour_table(old, fresh):
    if old.dim() != 4 or fresh.dim() != 4 or old.shape[:2] != fresh.shape[:2]:
        raise GeometryMismatch('different number of heads')
    old_window, old_expand = _neighbour_geometry(old.shape)
    new_window, new_expand = _neighbour_geometry(fresh.shape)
    reach = max(old_window + old_expand, new_window + new_expand)
    old_offsets = _neighbour_offset_ids(old_window, old_expand, reach).flatten()
    new_offsets = _neighbour_offset_ids(new_window, new_expand, reach)

    num_heads, num_offsets = old.shape[1], (2 * reach + 1) ** 2
    sums = torch.zeros(num_heads, num_offsets, dtype=torch.float64)
    sums.index_add_(1, old_offsets, old[0].reshape(num_heads, -1).double())
    counts = torch.zeros(num_offsets, dtype=torch.float64)
    counts.index_add_(0, old_offsets, torch.ones(old_offsets.numel(), dtype=torch.float64))
    means = (sums / counts.clamp(min=1)).to(fresh.dtype)

    seen = counts[new_offsets] > 0
    mapped = torch.where(seen, means[:, new_offsets], fresh[0])
    note = (f'window {old_window} expand {old_expand} -> window {new_window} expand {new_expand}: '
            f'{int(seen.sum()) * num_heads} of {fresh.numel()} values mapped by relative offset, '
            f'the rest fresh')
    return mapped[None], 'resized', note


def _neighbour_geometry(shape):
    """(window size, expand size) of a neighbour table (1, nH, ws^2, 4 ws^2 - 4 (ws - e)^2)."""
    window = _square_side(shape[2])
    for expand in range(1, window + 1):
        if 4 * window ** 2 - 4 * (window - expand) ** 2 == shape[3]:
            return window, expand
    raise GeometryMismatch(f'{shape[3]} neighbour slots fit no expand size for window {window}')


@functools.lru_cache(maxsize=None)
def _neighbour_offset_ids(window, expand, reach):
    """(ws^2, n_neighbours) ids of the offset key - query, for offsets within +-reach."""
    rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing='ij')
    queries = torch.stack([rows.flatten(), cols.flatten()], dim=1)
    keys = neighbour_key_positions(window, expand)
    offsets = keys[None, :, :] - queries[:, None, :] + reach
    return offsets[..., 0] * (2 * reach + 1) + offsets[..., 1]


def _resize_grids(grids, side):
    """Bicubic resize of (N, S, S) grids to (N, side, side), computed in float64."""
    return F.interpolate(grids.double()[:, None], size=(side, side), mode='bicubic',
                         align_corners=False)[:, 0]


def _square_side(size):
    side = math.isqrt(size)
    if side * side != size:
        raise GeometryMismatch('not a square grid')
    return side


def _shape_text(shape):
    return 'absent' if shape is None else str(shape)
