"""A Focal Transformer inside a dense-prediction model that another library built.

segmentation_models_pytorch's `tu-focal_*` encoders, timm's `features_only=True` models and the
torchvision backbone of `models.detection` all hold one `FocalTransformer`. The two functions here
find it wherever it sits:

- `load_backbone_checkpoint(model, checkpoint)` loads a classification checkpoint (any file or URL
  `models.checkpoint` reads: released, training, .pdparams, safetensors) into it strictly: only
  what a backbone has no use for (the classifier, and the final norm where the feature wrapper
  pruned it) is left out; any other difference is an error naming the keys.
- `no_weight_decay_names(model)` names, in `model`'s own parameter names, the Focal parameters that
  train without weight decay (position embedding and relative-position bias tables), for
  `optimizer.parameter_groups(model, weight_decay, skip_names=...)`.
"""
import os

from torch import nn

from .checkpoint import check_fits, model_weights, read_checkpoint
from .focal_transformer import FocalTransformer, checkpoint_filter_fn

# What a classification checkpoint has and a backbone may lack: the classifier, and the final norm
# (timm's feature wrappers prune it when the last map is returned unnormalised).
CLASSIFIER_ONLY_PREFIXES = ('head.', 'norm.')


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

    `checkpoint`: a file path or URL (read by `models.checkpoint.read_checkpoint`), or a state dict
    in the released layout (raw or under 'model', DDP / torch.compile prefixes allowed). The
    reference's index buffers are dropped by `checkpoint_filter_fn`; `head.*` and `norm.*` are
    dropped only if the backbone lacks them. Every other parameter must match in name and shape,
    otherwise a CheckpointError (a ValueError) names the keys. Returns the checkpoint keys left out.
    """
    source = 'checkpoint'
    if isinstance(checkpoint, (str, os.PathLike)):
        source = os.fspath(checkpoint)
        checkpoint = read_checkpoint(source)
    _, focal = find_focal(model)
    state_dict = checkpoint_filter_fn(model_weights(checkpoint, source), focal)
    expected = focal.state_dict()
    left_out = sorted(key for key in state_dict
                      if key not in expected and key.startswith(CLASSIFIER_ONLY_PREFIXES))
    for key in left_out:
        del state_dict[key]
    check_fits(state_dict, expected, source, 'the Focal backbone')
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
