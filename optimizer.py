# --------------------------------------------------------
# Focal Transformer: optimizer
# Licensed under The MIT License [see LICENSE for details]
# --------------------------------------------------------
"""AdamW or SGD with weight decay only on the weight matrices, as the original recipe, and optionally
BEiT's layer-wise learning-rate decay (TRAIN.LAYER_DECAY)."""
from torch import optim

from models.backbone import layer_ids


def build_optimizer(config, model, skip_names=None, skip_keywords=None):
    """The optimizer named by TRAIN.OPTIMIZER.NAME at learning rate TRAIN.BASE_LR, over the parameters
    that train (frozen ones, TRAIN.FREEZE, never reach it).

    Pass the bare model (not the DDP / compiled wrapper) so that parameter names match the
    names ``skip_names`` and substrings ``skip_keywords`` (by default the model's
    ``no_weight_decay()`` and ``no_weight_decay_keywords()``), which go without weight decay
    together with every 1-D parameter and bias. With TRAIN.LAYER_DECAY in (0, 1) each group carries
    its ``lr_scale``, which timm's schedulers multiply into every rate they set.
    """
    if skip_names is None:
        skip_names = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else set()
    if skip_keywords is None:
        skip_keywords = (model.no_weight_decay_keywords()
                         if hasattr(model, 'no_weight_decay_keywords') else set())
    layer_decay = config.TRAIN.LAYER_DECAY
    scales = layer_scales(model, layer_decay) if 0 < layer_decay < 1 else None
    param_groups = parameter_groups(model, config.TRAIN.WEIGHT_DECAY, skip_names, skip_keywords, scales)

    name = config.TRAIN.OPTIMIZER.NAME.lower()
    if name == 'adamw':
        return optim.AdamW(param_groups, lr=config.TRAIN.BASE_LR, eps=config.TRAIN.OPTIMIZER.EPS,
                           betas=tuple(config.TRAIN.OPTIMIZER.BETAS))
    if name == 'sgd':
        return optim.SGD(param_groups, lr=config.TRAIN.BASE_LR, nesterov=True,
                         momentum=config.TRAIN.OPTIMIZER.MOMENTUM)
    raise ValueError(f"unknown optimizer TRAIN.OPTIMIZER.NAME={config.TRAIN.OPTIMIZER.NAME!r} "
                     f"(use 'adamw' or 'sgd')")


def layer_scales(model, layer_decay):
    """{parameter name: learning-rate scale}: ``layer_decay ** k`` for a parameter k layers below the
    top (`models.backbone.layer_ids`), as timm's ``param_groups_layer_decay`` scales them."""
    layers, num_layers = layer_ids(model)
    return {name: layer_decay ** (num_layers - 1 - layer) for name, layer in layers.items()}


def parameter_groups(model, weight_decay, skip_names=(), skip_keywords=(), scales=None):
    """The trainable parameters grouped by weight decay: ``weight_decay``, or none for 1-D tensors
    such as norms, biases, names in ``skip_names`` and names containing one of ``skip_keywords``.
    Without ``scales`` two groups, with decay and without; with ``scales`` ({name: learning-rate
    scale}) one group per scale and decay, in the order the model's parameters first reach them,
    each with its ``lr_scale``."""
    groups = {} if scales else {False: [], True: []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = (param.ndim <= 1 or name.endswith('.bias') or name in skip_names
                  or any(keyword in name for keyword in skip_keywords))
        key = (scales[name], exempt) if scales else exempt
        groups.setdefault(key, []).append(param)
    if not scales:
        return [{'params': groups[exempt], 'weight_decay': 0.0 if exempt else weight_decay}
                for exempt in (False, True)]
    return [{'params': params, 'weight_decay': 0.0 if exempt else weight_decay, 'lr_scale': scale}
            for (scale, exempt), params in groups.items()]
