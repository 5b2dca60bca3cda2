# --------------------------------------------------------
# Focal Transformer: optimizer
# Licensed under The MIT License [see LICENSE for details]
# --------------------------------------------------------
"""AdamW or SGD with weight decay only on the weight matrices, as the original recipe."""
from torch import optim


def build_optimizer(config, model, skip_names=None, skip_keywords=None):
    """The optimizer named by TRAIN.OPTIMIZER.NAME at learning rate TRAIN.BASE_LR.

    Pass the bare model (not the DDP / compiled wrapper) so that parameter names match the
    names ``skip_names`` and substrings ``skip_keywords`` (by default the model's
    ``no_weight_decay()`` and ``no_weight_decay_keywords()``), which go without weight decay
    together with every 1-D parameter and bias.
    """
    if skip_names is None:
        skip_names = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else set()
    if skip_keywords is None:
        skip_keywords = (model.no_weight_decay_keywords()
                         if hasattr(model, 'no_weight_decay_keywords') else set())
    param_groups = parameter_groups(model, config.TRAIN.WEIGHT_DECAY, skip_names, skip_keywords)

    name = config.TRAIN.OPTIMIZER.NAME.lower()
    if name == 'adamw':
        return optim.AdamW(param_groups, lr=config.TRAIN.BASE_LR, eps=config.TRAIN.OPTIMIZER.EPS,
                           betas=tuple(config.TRAIN.OPTIMIZER.BETAS))
    if name == 'sgd':
        return optim.SGD(param_groups, lr=config.TRAIN.BASE_LR, nesterov=True,
                         momentum=config.TRAIN.OPTIMIZER.MOMENTUM)
    raise ValueError(f"unknown optimizer TRAIN.OPTIMIZER.NAME={config.TRAIN.OPTIMIZER.NAME!r} "
                     f"(use 'adamw' or 'sgd')")


def parameter_groups(model, weight_decay, skip_names=(), skip_keywords=()):
    """Two groups: trainable parameters with ``weight_decay``, and those without (1-D tensors such
    as norms, biases, names in ``skip_names``, names containing one of ``skip_keywords``)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if (param.ndim <= 1 or name.endswith('.bias') or name in skip_names
                or any(keyword in name for keyword in skip_keywords)):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{'params': decay, 'weight_decay': weight_decay},
            {'params': no_decay, 'weight_decay': 0.0}]
