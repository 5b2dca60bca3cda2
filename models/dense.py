"""A Focal Transformer inside a dense-prediction model that another library built.

segmentation_models_pytorch's `tu-focal_*` encoders, timm's `features_only=True` models and the
torchvision backbone of `models.detection` all hold one `FocalTransformer`. The two functions here
find it wherever it sits:

- `load_backbone_checkpoint(model, checkpoint)` loads a released-format classification checkpoint
  into it strictly: only what a backbone has no use for (the classifier, and the final norm where
  the feature wrapper pruned it) is left out; any other difference is an error naming the keys.
- `no_weight_decay_names(model)` names, in `model`'s own parameter names, the Focal parameters that
  train without weight decay (position embedding and relative-position bias tables), for
  `optimizer.parameter_groups(model, weight_decay, skip_names=...)`.
"""
import os
from collections.abc import Mapping

import torch
from torch import nn

from .focal_transformer import FocalTransformer, checkpoint_filter_fn

# What a classification checkpoint has and a backbone may lack: the classifier, and the final norm
# (timm's feature wrappers prune it when the last map is returned unnormalised).
CLASSIFIER_ONLY_PREFIXES = ('head.', 'norm.')
MAX_NAMED_KEYS = 8


def find_focal(model: nn.Module) -> tuple[str, FocalTransformer]:
    """(name in `model`, module) of the one FocalTransformer inside `model` (or `model` itself)."""
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, FocalTransformer)]
    if len(found) != 1:
        raise ValueError(f'{type(model).__name__} holds {len(found)} FocalTransformer modules; '
                         f'expected exactly one')
    return found[0]


def load_backbone_checkpoint(model: nn.Module, checkpoint) -> list[str]:
    """Load a classification checkpoint into the Focal Transformer inside `model`, strictly.

    `checkpoint`: a file path, or a state dict in the released layout (raw or under 'model',
    DDP / torch.compile prefixes allowed). The reference's index buffers are dropped by
    `checkpoint_filter_fn`; `head.*` and `norm.*` are dropped only if the backbone lacks them.
    Every other parameter must match in name and shape, otherwise a ValueError names the keys.
    Returns the checkpoint keys left out.
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        try:
            checkpoint = torch.load(checkpoint, map_location='cpu', weights_only=True)
        except Exception as err:  # torch raises many types for a missing or foreign file
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(f'cannot read checkpoint {os.fspath(checkpoint)}: {first}') from None
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f'checkpoint is a {type(checkpoint).__name__}, not a state dict')
    _, focal = find_focal(model)
    state_dict = checkpoint_filter_fn(checkpoint, focal)
    expected = focal.state_dict()
    left_out = sorted(key for key in state_dict
                      if key not in expected and key.startswith(CLASSIFIER_ONLY_PREFIXES))
    for key in left_out:
        del state_dict[key]

    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    wrong_shape = [f'{key} {tuple(state_dict[key].shape)} in the checkpoint, '
                   f'{tuple(expected[key].shape)} in the model'
                   for key in expected if key in state_dict and state_dict[key].shape != expected[key].shape]
    problems = ([f'missing {key}' for key in missing] + [f'unexpected {key}' for key in unexpected]
                + wrong_shape)
    if problems:
        more = len(problems) - MAX_NAMED_KEYS
        raise ValueError(f'checkpoint does not fit the Focal backbone ({len(missing)} missing, '
                         f'{len(unexpected)} unexpected, {len(wrong_shape)} of another shape): '
                         + '; '.join(problems[:MAX_NAMED_KEYS]) + (f'; and {more} more' if more > 0 else ''))
    focal.load_state_dict(state_dict, strict=True)
    return left_out


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names, as `model.named_parameters()` gives them, of the Focal parameters without weight decay.

    The Focal Transformer's own `no_weight_decay()` names and `no_weight_decay_keywords()`
    substrings, prefixed with where it sits in `model` (a detector, a segmenter, a feature wrapper).
    """
    prefix, focal = find_focal(model)
    names, keywords = focal.no_weight_decay(), focal.no_weight_decay_keywords()
    prefix = f'{prefix}.' if prefix else ''
    return {prefix + name for name, _ in focal.named_parameters()
            if name in names or any(keyword in name for keyword in keywords)}
