"""Build the network named by a yacs config (the one place in models/ that reads the config)."""
from .focal_transformer import FocalTransformer


def build_model(config) -> FocalTransformer:
    return FocalTransformer(**focal_arguments(config))


def focal_arguments(config) -> dict:
    """The FocalTransformer keyword arguments of the config (also the backbone of a detector)."""
    if config.MODEL.TYPE != 'focal':
        raise ValueError(f"unknown MODEL.TYPE {config.MODEL.TYPE!r}: this codebase builds 'focal'")
    focal = config.MODEL.FOCAL
    return dict(
        img_size=config.DATA.IMG_SIZE,
        patch_size=focal.PATCH_SIZE,
        in_chans=focal.IN_CHANS,
        num_classes=config.MODEL.NUM_CLASSES,
        embed_dim=focal.EMBED_DIM,
        depths=focal.DEPTHS,
        num_heads=focal.NUM_HEADS,
        window_size=focal.WINDOW_SIZE,
        mlp_ratio=focal.MLP_RATIO,
        qkv_bias=focal.QKV_BIAS,
        qk_scale=focal.QK_SCALE,
        drop_rate=config.MODEL.DROP_RATE,
        drop_path_rate=config.MODEL.DROP_PATH_RATE,
        ape=focal.APE,
        patch_norm=focal.PATCH_NORM,
        use_checkpoint=config.TRAIN.USE_CHECKPOINT,
        use_shift=focal.USE_SHIFT,
        focal_stages=focal.FOCAL_STAGES,
        focal_levels=focal.FOCAL_LEVELS,
        focal_windows=focal.FOCAL_WINDOWS,
        focal_pool=focal.FOCAL_POOL,
        expand_stages=focal.EXPAND_STAGES,
        expand_sizes=focal.EXPAND_SIZES,
        expand_layer=focal.EXPAND_LAYER,
        use_conv_embed=focal.USE_CONV_EMBED,
        use_layerscale=focal.USE_LAYERSCALE,
        layerscale_value=focal.LAYERSCALE_VALUE,
        use_pre_norm=focal.USE_PRE_NORM,
    )
