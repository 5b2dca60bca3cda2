"""Loading weights into a model that is or holds a Focal Transformer, and what the optimizer needs to know
of it: the one path every weight takes.

segmentation_models_pytorch's `tu-focal_*` encoders, timm's `features_only=True` models and the
torchvision backbone of `models.detection` all hold one `FocalTransformer`; `find_focal` finds it.

- `load_pretrained(model, location)`: --pretrained and the backbones' `pretrained=`: **read** the file or
  URL (`models.checkpoint.read_checkpoint`: PyTorch weights-only, safetensors or .pdparams, by content),
  **filter** it once for the Focal Transformer inside `model` (`focal_transformer.checkpoint_filter_fn`
  with `adapt=True`: the focal tables follow the model's geometry, a new classifier or neighbour table
  starts fresh, what a backbone has no use for is left out), **load** it; returns the TransferReport.
- `load_weights(model, contents, source, adapt)`: the same filter and load for contents already read
  (--resume reads the rest of a training checkpoint too); `adapt=False` loads the whole model exactly.
- `no_weight_decay_names(model)`: the Focal parameters that train without weight decay, in `model`'s
  own parameter names, for `optimizer.parameter_groups(model, weight_decay, skip_names=...)`.
Every mismatch is one CheckpointError naming the file and the keys.
"""
import os

from torch import nn

from .checkpoint import read_checkpoint
from .focal_transformer import FocalTransformer, checkpoint_filter_fn
from .pretrained import TransferReport


def find_focal(model: nn.Module) -> tuple[str, FocalTransformer]:
    """(name in `model`, module) of the one FocalTransformer inside `model` (or `model` itself)."""
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, FocalTransformer)]
    if len(found) != 1:
        raise ValueError(f'{type(model).__name__} holds {len(found)} FocalTransformer modules; '
                         f'expected exactly one')
    return found[0]


def load_pretrained(model: nn.Module, location) -> TransferReport:
    """Read the checkpoint at `location` (a path or URL) and load it into the Focal Transformer that `model`
    is or holds, adapted to its geometry (see the module docstring). Returns the TransferReport."""
    location = os.fspath(location)
    return load_weights(model, read_checkpoint(location), location, adapt=True)


def load_weights(model: nn.Module, contents, source: str, adapt: bool) -> TransferReport:
    """Load the weights in `contents` (what a checkpoint file holds; `source` names it in errors): with
    `adapt`, into the Focal Transformer inside `model`, adapted to its geometry; without, into the whole
    model, which they must fit exactly."""
    target, name = model, 'this model'
    if adapt:
        target = find_focal(model)[1]
        name = 'this model' if target is model else 'the Focal backbone'
    report = TransferReport()
    target.load_state_dict(checkpoint_filter_fn(contents, target, adapt, source, name, report), strict=True)
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
