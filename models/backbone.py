"""A Focal Transformer inside a dense-prediction model that another library built.

segmentation_models_pytorch's `tu-focal_*` encoders, timm's `features_only=True` models and the
torchvision backbone of `models.detection` all hold one `FocalTransformer`. The two functions here
find it wherever it sits:

- `load_backbone_checkpoint(model, checkpoint)` loads a classification checkpoint (any file or URL
  `models.checkpoint` reads: released, training, .pdparams, safetensors) into it through
  `models.pretrained.transfer_weights`: the focal tables follow the backbone's geometry (the
  detection recipes' larger focal windows, the neighbour keys a stage gains at a segmentation
  crop size), what a backbone has no use for (the classifier, the final norm where the feature
  wrapper pruned it) is left out, and any other difference is an error naming the keys.
- `no_weight_decay_names(model)` names, in `model`'s own parameter names, the Focal parameters that
  train without weight decay (position embedding and relative-position bias tables), for
  `optimizer.parameter_groups(model, weight_decay, skip_names=...)`.
"""
import os

from torch import nn

from .checkpoint import model_weights, read_checkpoint
from .focal_transformer import FocalTransformer
from .pretrained import TransferReport, transfer_weights


def find_focal(model: nn.Module) -> tuple[str, FocalTransformer]:
    """(name in `model`, module) of the one FocalTransformer inside `model` (or `model` itself)."""
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, FocalTransformer)]
    if len(found) != 1:
        raise ValueError(f'{type(model).__name__} holds {len(found)} FocalTransformer modules; '
                         f'expected exactly one')
    return found[0]


def load_backbone_checkpoint(model: nn.Module, checkpoint, source: str = 'checkpoint') -> TransferReport:
    """Load a classification checkpoint into the Focal Transformer inside `model` (or `model` itself).

    `checkpoint`: a file path or URL (read by `models.checkpoint.read_checkpoint`), or what such a
    file holds (`source` names it in errors): a state dict in the released layout, raw or under
    'model', DDP / torch.compile prefixes allowed. Tensors are copied, or resized where only the
    geometry differs (window, focal windows, image size: `models.pretrained`); neighbour tables the
    checkpoint lacks start fresh, and `head.*` and `norm.*` are left out where the model lacks them.
    Any other difference raises a CheckpointError (a ValueError) naming the keys. Returns the
    TransferReport: what was copied, resized, started fresh and left out ('ignored').
    """
    if isinstance(checkpoint, (str, os.PathLike)):
        source = os.fspath(checkpoint)
        checkpoint = read_checkpoint(source)
    _, focal = find_focal(model)
    target = 'this model' if focal is model else 'the Focal backbone'
    state_dict, report = transfer_weights(model_weights(checkpoint, source), focal, source, target)
    focal.load_state_dict(state_dict, strict=True)
    return report


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
