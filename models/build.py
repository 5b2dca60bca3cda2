"""Build the network named by a yacs config (the one place in models/ that reads the config)."""
import re

from .focal_transformer import FocalTransformer

# FocalTransformer's keyword arguments and the config key each comes from.
ARGUMENT_KEYS = {
    'img_size': 'DATA.IMG_SIZE',
    'patch_size': 'MODEL.FOCAL.PATCH_SIZE',
    'in_chans': 'MODEL.FOCAL.IN_CHANS',
    'num_classes': 'MODEL.NUM_CLASSES',
    'embed_dim': 'MODEL.FOCAL.EMBED_DIM',
    'depths': 'MODEL.FOCAL.DEPTHS',
    'num_heads': 'MODEL.FOCAL.NUM_HEADS',
    'window_size': 'MODEL.FOCAL.WINDOW_SIZE',
    'mlp_ratio': 'MODEL.FOCAL.MLP_RATIO',
    'qkv_bias': 'MODEL.FOCAL.QKV_BIAS',
    'qk_scale': 'MODEL.FOCAL.QK_SCALE',
    'drop_rate': 'MODEL.DROP_RATE',
    'drop_path_rate': 'MODEL.DROP_PATH_RATE',
    'ape': 'MODEL.FOCAL.APE',
    'patch_norm': 'MODEL.FOCAL.PATCH_NORM',
    'use_checkpoint': 'TRAIN.USE_CHECKPOINT',
    'use_shift': 'MODEL.FOCAL.USE_SHIFT',
    'focal_stages': 'MODEL.FOCAL.FOCAL_STAGES',
    'focal_levels': 'MODEL.FOCAL.FOCAL_LEVELS',
    'focal_windows': 'MODEL.FOCAL.FOCAL_WINDOWS',
    'focal_pool': 'MODEL.FOCAL.FOCAL_POOL',
    'expand_sizes': 'MODEL.FOCAL.EXPAND_SIZES',
    'expand_layer': 'MODEL.FOCAL.EXPAND_LAYER',
    'use_conv_embed': 'MODEL.FOCAL.USE_CONV_EMBED',
    'use_layerscale': 'MODEL.FOCAL.USE_LAYERSCALE',
    'layerscale_value': 'MODEL.FOCAL.LAYERSCALE_VALUE',
    'use_pre_norm': 'MODEL.FOCAL.USE_PRE_NORM',
}
_ARGUMENT = re.compile(r'\b(' + '|'.join(ARGUMENT_KEYS) + r')\b')


def build_model(config) -> FocalTransformer:
    return FocalTransformer(**focal_arguments(config))


def focal_arguments(config) -> dict:
    """The FocalTransformer keyword arguments of the config (also the backbone of a detector)."""
    arguments = {}
    for argument, key in ARGUMENT_KEYS.items():
        value = config
        for part in key.split('.'):
            value = value[part]
        arguments[argument] = value
    return arguments


def name_config_keys(message: str) -> str:
    """A model's error message with each argument it names followed by its config key, so that a bad
    value in a YAML file is found where it was written."""
    return _ARGUMENT.sub(lambda match: f"{match.group(1)} ({ARGUMENT_KEYS[match.group(1)]})", message)
