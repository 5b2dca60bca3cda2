"""Writes what PaddleViT's own Focal Transformer code computes, for tests/test_paddlevit.py.

Run by hand, never by the tests (PaddlePaddle is no dependency of this project), in a scratch
environment with PaddleViT's source (github.com/BR-IDL/PaddleViT):

    python3 -m venv /tmp/paddle && /tmp/paddle/bin/pip install paddlepaddle numpy
    git clone https://github.com/BR-IDL/PaddleViT /tmp/PaddleViT
    /tmp/paddle/bin/python tests/reference/paddlevit/generate.py /tmp/PaddleViT --commit 5ac7d89

and once more in a second environment with paddlepaddle 2.6.2 and numpy 1.26.4, with `--legacy`:
that writes only LEGACY_CASE, as `fc_levels2_paddle2`, a file whose pickle names numpy's
`numpy.core.multiarray`, as the files PaddleViT released in 2021 (paddle 2.1, numpy 1) do; numpy 2
writes `numpy._core.multiarray`.

For every case of CASES it builds PaddleViT's `FocalTransformer(**kwargs)`, gives each parameter a
seeded draw d = numpy.random.default_rng([SEED, zlib.crc32(name)]).standard_normal(shape, float32) in
Paddle's own shapes (biases 0.05 d, norm weights 1 + 0.2 d, the rest 0.5 d: small biases keep the
logits dependent on the image; the index buffers stay as PaddleViT computes them), saves
`model.state_dict()` with `paddle.save` as `<case>.pdparams` and the eval-mode logits as
`<case>.json` for the input x = n + 2 c, n of shape (batch, 3, size, size) and per-image colour
offsets c (batch, 3, 1, 1), both drawn in that order from numpy.random.default_rng(SEED).
It also writes one training checkpoint as PaddleViT's main_multi_gpu.py saves it,
`training_<case>.pdparams` ({'model', 'model_ema', 'optimizer', 'epoch', 'lr_scheduler'}, after one
AdamW step with an EMA of decay 0.5, so that the two weight sets differ), with the logits of both, and
`tests/reference/paddlevit_layouts.json`: name, shape, dtype and kind of every state_dict entry of
PaddleViT's six ImageNet-1K models (built from PaddleViT's configs; no weights are written).

PaddleViT's code cannot build two of the reference's options: `use_layerscale=True` (it calls
`paddle.create_parameter` with a tensor and no dtype: TypeError) and `focal_pool='max'` (its
`.max(-2)[0]` indexes the batch: reshape error). The `layerscale` case builds the layer-scale vectors
as the parameters PaddleViT means (same names and shapes) and leaves everything else, the forward
pass included, to PaddleViT; max pooling is not covered.
"""
import argparse
import contextlib
import json
import sys
import zlib
from pathlib import Path

import numpy as np
import paddle

HERE = Path(__file__).resolve().parent
LAYOUTS = HERE.parent / 'paddlevit_layouts.json'
SEED = 23
BATCH = 2

# Two stages of embed_dim 8 and window 5 unless a case says otherwise: stage 1 (5x5 at 40 px) is one
# window, shrunk to the map as the released models' last stage is. Windows stay small because
# PaddleViT's files carry the integer index tables (ws^2 x ws^2 int64) beside the weights.
BASE = dict(img_size=40, embed_dim=8, depths=[1, 1], num_heads=[1, 2], window_size=5, focal_pool='fc',
            focal_stages=[0, 1], focal_levels=[2, 2], focal_windows=[5, 3], expand_sizes=[2, 2],
            num_classes=10, drop_path_rate=0.)
CASES = {
    # the released recipe and geometry: window 7, fc pooling, two focal levels, expand 3
    'fc_levels2': dict(img_size=56, window_size=7, focal_windows=[7, 5], expand_sizes=[3, 3]),
    'conv_embed': dict(use_conv_embed=True),
    # maps of 12 and 6 padded to 15 and 10, neighbours in both stages
    'pad_odd_window': dict(img_size=48),
    # stage 0 8x8 padded to 10; stage 1 4x4, smaller than the window: the window shrinks to 4
    'small_last_stage': dict(img_size=32),
    # Swin-style shift in block 1, neighbours only in odd blocks
    'shift_even': dict(depths=[2, 1], use_shift=True, expand_layer='even'),
    # two pooled levels, depthwise-conv pooling; level 2's 2x2 cells leave rows over (trimmed)
    'level3_conv_pool': dict(focal_pool='conv', focal_levels=[3, 3]),
    'mean_prenorm_ape': dict(focal_pool='mean', use_pre_norm=True, ape=True, use_conv_embed=True),
    'layerscale': dict(use_layerscale=True),
    # focal level 1, no pooling: windows plus neighbours only
    'nofocal': dict(focal_pool='none', focal_levels=[1, 1]),
}
TRAINING_CASE = 'nofocal'
# written again by an older Paddle with numpy 1 (--legacy)
LEGACY_CASE = 'fc_levels2'

# PaddleViT's configs/*.yaml over its config.py defaults (and the reference's constructor arguments).
RELEASED = dict(window_size=7, focal_pool='fc', focal_stages=[0, 1, 2, 3], focal_levels=[2, 2, 2, 2],
                focal_windows=[7, 5, 3, 1], expand_sizes=[3, 3, 3, 3], img_size=224, num_classes=1000)
TINY = dict(RELEASED, embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24])
SMALL = dict(RELEASED, embed_dim=96, depths=[2, 2, 18, 2], num_heads=[3, 6, 12, 24])
BASE_SIZE = dict(RELEASED, embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32])
FULL_SIZE = {
    'focal_tiny_patch4_window7_224': TINY,
    'focal_tiny_useconv_patch4_window7_224': dict(TINY, use_conv_embed=True),
    'focal_small_patch4_window7_224': SMALL,
    'focal_small_useconv_patch4_window7_224': dict(SMALL, use_conv_embed=True),
    'focal_base_patch4_window7_224': BASE_SIZE,
    'focal_base_useconv_patch4_window7_224': dict(BASE_SIZE, use_conv_embed=True),
}


@contextlib.contextmanager
def layer_scale_parameters():
    """PaddleViT writes `paddle.create_parameter(value * paddle.ones((dim)))`, which Paddle refuses;
    while this is active a tensor given as the shape becomes a parameter of that shape and value."""
    create_parameter = paddle.create_parameter

    def create(shape, *args, **kwargs):
        if isinstance(shape, paddle.Tensor):
            return create_parameter(shape.shape, 'float32',
                                    default_initializer=paddle.nn.initializer.Assign(shape))
        return create_parameter(shape, *args, **kwargs)

    paddle.create_parameter = create
    try:
        yield
    finally:
        paddle.create_parameter = create_parameter


def seeded_weights(model):
    for name, parameter in model.named_parameters():
        rng = np.random.default_rng([SEED, zlib.crc32(name.encode())])
        draw = rng.standard_normal(parameter.shape, dtype=np.float32)
        if name.endswith('.bias'):
            value = draw * np.float32(0.05)
        elif name.endswith('.weight') and draw.ndim == 1:  # LayerNorm / GroupNorm
            value = 1 + draw * np.float32(0.2)
        else:
            value = draw * np.float32(0.5)
        parameter.set_value(value)


def seeded_input(image_size):
    rng = np.random.default_rng(SEED)
    noise = rng.standard_normal((BATCH, 3, image_size, image_size), dtype=np.float32)
    colour = rng.standard_normal((BATCH, 3, 1, 1), dtype=np.float32)
    return noise + 2 * colour


def logits(model, x):
    model.eval()
    with paddle.no_grad():
        return model(paddle.to_tensor(x)).numpy().astype(np.float64).tolist()


def build(FocalTransformer, kwargs):
    patch = layer_scale_parameters() if kwargs.get('use_layerscale') else contextlib.nullcontext()
    with patch:
        model = FocalTransformer(**kwargs)
    seeded_weights(model)
    return model


def record(path, kwargs, output, provenance, **extra):
    data = dict(kwargs=kwargs, seed=SEED, batch=BATCH, image_size=kwargs['img_size'], output=output,
                **extra, **provenance)
    path.write_text(json.dumps(data, indent=1) + '\n')


def training_checkpoint(FocalTransformer, ModelEma, kwargs, path):
    """One AdamW step from the seeded weights, as main_multi_gpu.py trains and saves."""
    model = build(FocalTransformer, kwargs)
    model_ema = ModelEma(model, decay=0.5)
    scheduler = paddle.optimizer.lr.CosineAnnealingDecay(learning_rate=0.05, T_max=10)
    optimizer = paddle.optimizer.AdamW(learning_rate=scheduler, parameters=model.parameters(),
                                       weight_decay=0.05)
    model.train()
    x = paddle.to_tensor(seeded_input(kwargs['img_size']))
    target = paddle.to_tensor(np.arange(BATCH) % kwargs['num_classes'])
    loss = paddle.nn.functional.cross_entropy(model(x), target)
    loss.backward()
    optimizer.step()
    optimizer.clear_grad()
    model_ema.update(model)
    scheduler.step()
    state = {'model': model.state_dict(), 'model_ema': model_ema.state_dict(),
             'optimizer': optimizer.state_dict(), 'epoch': 1, 'lr_scheduler': scheduler.state_dict()}
    paddle.save(state, str(path))
    return logits(model, seeded_input(kwargs['img_size'])), logits(model_ema.module, seeded_input(kwargs['img_size']))


def layout(FocalTransformer, kwargs):
    model = FocalTransformer(**kwargs)
    parameters = {name for name, _ in model.named_parameters()}
    state_dict = {}
    for name, tensor in model.state_dict().items():
        state_dict[name] = dict(shape=list(tensor.shape), dtype=str(tensor.dtype).replace('paddle.', ''),
                                kind='parameter' if name in parameters else 'buffer')
    return dict(kwargs=kwargs, n_parameters=int(sum(p.numel() for p in model.parameters())),
                state_dict=state_dict)


def write_case(FocalTransformer, name, kwargs, provenance):
    model = build(FocalTransformer, kwargs)
    paddle.save(model.state_dict(), str(HERE / f'{name}.pdparams'))
    record(HERE / f'{name}.json', kwargs, logits(model, seeded_input(kwargs['img_size'])), provenance)
    print(name, 'written')


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('paddlevit', type=Path,
                        help='PaddleViT checkout (or its image_classification/Focal_Transformer)')
    parser.add_argument('--commit', default='unknown', help="PaddleViT's commit, recorded with the outputs")
    parser.add_argument('--skip-layouts', action='store_true', help='leave paddlevit_layouts.json as it is')
    parser.add_argument('--legacy', action='store_true',
                        help=f'write only {LEGACY_CASE}, as {LEGACY_CASE}_paddle<major version> (see the docstring)')
    args = parser.parse_args()
    source = args.paddlevit / 'image_classification' / 'Focal_Transformer'
    sys.path.insert(0, str(source if source.is_dir() else args.paddlevit))
    from focal_transformer import FocalTransformer
    from model_ema import ModelEma

    paddle.set_device('cpu')
    paddle.seed(0)
    provenance = dict(paddlevit_commit=args.commit, paddle=paddle.__version__, numpy=np.__version__)
    if args.legacy:
        name = f"{LEGACY_CASE}_paddle{paddle.__version__.split('.')[0]}"
        write_case(FocalTransformer, name, dict(BASE, **CASES[LEGACY_CASE]), provenance)
        return
    for name, overrides in CASES.items():
        write_case(FocalTransformer, name, dict(BASE, **overrides), provenance)

    kwargs = dict(BASE, **CASES[TRAINING_CASE])
    trained, averaged = training_checkpoint(FocalTransformer, ModelEma, kwargs,
                                            HERE / f'training_{TRAINING_CASE}.pdparams')
    record(HERE / f'training_{TRAINING_CASE}.json', kwargs, averaged, provenance, model_output=trained)
    print(f'training_{TRAINING_CASE}', 'written')

    if not args.skip_layouts:
        layouts = {name: dict(layout(FocalTransformer, kwargs), **provenance) for name, kwargs in FULL_SIZE.items()}
        LAYOUTS.write_text(json.dumps(layouts) + '\n')
        print(LAYOUTS.name, 'written')


if __name__ == '__main__':
    main()
