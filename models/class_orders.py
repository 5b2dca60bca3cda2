"""The ImageNet class orders a classifier head's rows follow, and carrying a head's rows from one set of
classes to another by synset (ImageNet-22K -> ImageNet-1K).

The orders, each a list of WordNet synsets that timm ships (`timm.data.ImageNetInfo`):

- 'imagenet-22k': fall11's 21,841 synsets, sorted. The class order of data.imagenet22k's folder layout,
  of ImageFolder on fall11 (ConvNeXt's 22K models) and timm's name for 21,841 classes.
- 'imagenet-21k-goog': Google's list, 21,843 synsets sorted: fall11's and two that have no images
  (n03931044, n09859684). Swin's 22K models have 21,841 rows in this order: Swin's
  data/imagenet22k_dataset.py gives Google's last two classes (numbers 21841, 21842) the rows of the two
  without images (numbers 9205, 15027), and its data/map22kto1k.txt numbers the rows so.
- 'imagenet-22k-ms': 21,842 synsets, ImageNet-1K's 1,000 first (in their sorted order), then the rest of
  fall11 sorted (FocalNet's 22K models).
- 'imagenet-1k': ImageNet-1K's 1,000 synsets, sorted: the class folders of its train/ and val/.

A head with no class names is read in the order its row count names, where only one does: 1,000,
21,842 and 21,843 rows do; 21,841 rows are either 'imagenet-22k' or Swin's 'imagenet-21k-goog', and
the order must be named. ImageNet-1K's teddy bear (n04399382) is in no 22K list but 'imagenet-22k-ms';
Swin's map22kto1k.txt gives it the row of n03013580 (chemise, "teddy"), a different class, and here it
starts fresh.
"""
import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch
from timm.data import ImageNetInfo

from .checkpoint import CheckpointError

ORDERS = ('imagenet-22k', 'imagenet-21k-goog', 'imagenet-22k-ms', 'imagenet-1k')
# Google's class numbers whose synsets have no images, and the numbers of the classes Swin's 21,841-row
# heads keep in their rows (Swin data/imagenet22k_dataset.py: "map 21841->9205; 21842->15027").
GOOGLE_IMAGELESS = (9205, 15027)
GOOGLE_MOVED = (21841, 21842)
# How many synsets an error names.
SHOWN = 3


@functools.lru_cache(maxsize=None)
def _timm_list(order: str) -> tuple:
    return tuple(ImageNetInfo(order).label_names())


@functools.lru_cache(maxsize=None)
def order_synsets(order: str, rows: Optional[int] = None) -> tuple:
    """The synset of each row of a head of `rows` rows (None: the order's own length) in `order`."""
    if order not in ORDERS:
        raise ValueError(f"unknown class order {order!r}: one of {', '.join(ORDERS)}")
    synsets = _timm_list(order)
    if order == 'imagenet-21k-goog' and rows == len(synsets) - len(GOOGLE_MOVED):  # Swin's 21,841 rows
        swin = list(synsets[:rows])
        for row, moved in zip(GOOGLE_IMAGELESS, GOOGLE_MOVED):
            swin[row] = synsets[moved]
        return tuple(swin)
    if rows is not None and rows != len(synsets):
        raise ValueError(f"class order {order!r} has {len(synsets)} classes, not {rows}")
    return synsets


@functools.lru_cache(maxsize=None)
def known_synsets() -> frozenset:
    """Every synset of the orders."""
    return frozenset().union(*(_timm_list(order) for order in ORDERS))


def are_synsets(names: Sequence[str]) -> bool:
    return bool(names) and all(name in known_synsets() for name in names)


def orders_of_rows(rows: int) -> List[str]:
    """The orders that have a form with `rows` rows."""
    found = []
    for order in ORDERS:
        try:
            order_synsets(order, rows)
        except ValueError:
            continue
        found.append(order)
    return found


def source_synsets(rows: int, class_names: Optional[Sequence[str]] = None, order: str = '',
                   source: str = 'the checkpoint') -> tuple:
    """(synset of each of a head's `rows` rows, where they come from): the class names the checkpoint
    carries, else the `order` named (MODEL.PRETRAINED_CLASS_ORDER), else the one order with that many
    rows. A CheckpointError names `source` when none applies."""
    if class_names is not None:
        if len(class_names) != rows:
            raise CheckpointError(f"{source} names {len(class_names)} classes for a head of {rows} rows")
        return tuple(class_names), 'the class names it carries'
    if order:
        try:
            return order_synsets(order, rows), order
        except ValueError as err:
            raise CheckpointError(f"{source}: its head of {rows} rows does not fit MODEL.PRETRAINED_CLASS_ORDER: "
                                  f"{err}") from None
    candidates = orders_of_rows(rows)
    if len(candidates) == 1:
        return order_synsets(candidates[0], rows), candidates[0]
    sizes = ', '.join(f'{name} {len(_timm_list(name))}' for name in ORDERS)
    if candidates:
        raise CheckpointError(f"{source}: its head of {rows} rows carries no class names and fits the orders "
                              f"{' and '.join(candidates)}: set MODEL.PRETRAINED_CLASS_ORDER to the one it was "
                              f"trained in (Swin's 22K models: imagenet-21k-goog)")
    raise CheckpointError(f"{source}: its head of {rows} rows carries no class names and matches no known class "
                          f"order ({sizes}; Swin's imagenet-21k-goog 21841)")


@dataclass
class HeadRows:
    weight: torch.Tensor  # (target classes, features): the source row of each target synset, else fresh
    bias: torch.Tensor
    kept: int  # target classes whose row came from the source
    origin: str  # where the source's synsets came from (`source_synsets`)
    missing: List[str]  # target synsets the source lacks (their rows are the fresh ones); unnamed rows are not listed

    def summary(self) -> str:
        return (f"head: {self.kept} of {len(self.weight)} class rows kept by synset, from {self.origin}"
                + (f"; {len(self.missing)} start fresh ({', '.join(self.missing[:SHOWN])})" if self.missing else ''))


def map_head(weight: torch.Tensor, bias: torch.Tensor, source: Sequence[str], target: Sequence[str],
             fresh_weight: torch.Tensor, fresh_bias: torch.Tensor, origin: str = 'the checkpoint',
             file: str = 'the checkpoint') -> HeadRows:
    """The rows of a head over the `source` synsets (weight (S, F), bias (S,)) for a head over `target`:
    each target synset's row is its source row; a synset the source lacks keeps its `fresh_*` row (on the
    CPU: the model may sit on a GPU, the checkpoint not). A
    CheckpointError names `file` when no target synset is in the source. A target row named '' (a model with
    more rows than named classes) keeps its fresh row."""
    row_of = {synset: row for row, synset in enumerate(source)}
    pairs = [(index, row_of[synset]) for index, synset in enumerate(target) if synset in row_of]
    if not pairs:
        raise CheckpointError(f"{file}: none of the model's {len(target)} classes ({', '.join(target[:SHOWN])}, ...) "
                              f"is among the {len(source)} classes of its head ({origin})")
    if weight.shape[1:] != fresh_weight.shape[1:]:
        raise CheckpointError(f"{file}: its head has {weight.shape[1]} features per class, the model's "
                              f"{fresh_weight.shape[1]}")
    to_rows, from_rows = (torch.tensor(indices) for indices in zip(*pairs))
    mapped_weight, mapped_bias = fresh_weight.detach().cpu().clone(), fresh_bias.detach().cpu().clone()
    mapped_weight[to_rows] = weight[from_rows].to('cpu', mapped_weight.dtype)
    mapped_bias[to_rows] = bias[from_rows].to('cpu', mapped_bias.dtype)
    missing = [synset for synset in target if synset and synset not in row_of]
    return HeadRows(mapped_weight, mapped_bias, len(pairs), origin, missing)


def head_for_classes(contents, weight: torch.Tensor, bias: torch.Tensor, fresh_weight: torch.Tensor,
                     fresh_bias: torch.Tensor, classes: Sequence[str], order: str = '',
                     source: str = 'the checkpoint') -> Optional[HeadRows]:
    """A checkpoint's classifier rows (`weight`, `bias`) for a model whose first rows are the `classes`
    (MODEL.CLASS_NAMES, the data's), picked by synset (`map_head`), or None where there is nothing to pick
    by: the model's classes are not all ImageNet synsets, or the checkpoint's head names classes that are
    not, or carries no names and neither `order` (MODEL.PRETRAINED_CLASS_ORDER) nor its row count says its
    order. `contents` is what the checkpoint file holds: its 'classes' (our checkpoints save them) name
    the head's rows."""
    if order and order not in ORDERS:
        raise CheckpointError(f"{source}: MODEL.PRETRAINED_CLASS_ORDER {order!r} is not one of {', '.join(ORDERS)}")
    carried = contents.get('classes') if isinstance(contents, Mapping) else None
    if not are_synsets(classes) or (carried and not are_synsets(carried)):
        return None
    rows = len(weight)
    if not carried and not order and not orders_of_rows(rows):
        return None
    synsets, origin = source_synsets(rows, list(carried) if carried else None, order, source)
    target = list(classes) + [''] * (len(fresh_weight) - len(classes))
    return map_head(weight, bias, synsets, target, fresh_weight, fresh_bias, origin, source)
