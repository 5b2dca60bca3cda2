"""Where a checkpoint keeps the model's weights, in one place for every loader (--resume,
--pretrained, timm's pretrained_filter_fn)."""
from collections.abc import Mapping

import torch

# Name prefixes a wrapped model adds: DistributedDataParallel and torch.compile (in either order).
WRAPPER_PREFIXES = ('module.', '_orig_mod.')


def unwrap_state_dict(checkpoint):
    """The plain model state dict inside `checkpoint`: a raw state dict or `{'model': ...}` (the
    original's layout and ours), its keys without the prefixes of a DDP or compiled model.

    Raises ValueError when there is no state dict of tensors, naming the first entry that is not one.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f'expected a dict of tensors, got a {type(checkpoint).__name__}')
    state_dict = checkpoint['model'] if isinstance(checkpoint.get('model'), Mapping) else checkpoint
    if not state_dict:
        raise ValueError('the state dict is empty')
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f'entry {key} is a {type(value).__name__}, not a tensor')
    stripped = True
    while stripped:
        stripped = False
        for prefix in WRAPPER_PREFIXES:
            if all(key.startswith(prefix) for key in state_dict):
                state_dict = {key[len(prefix):]: value for key, value in state_dict.items()}
                stripped = True
    return dict(state_dict)
