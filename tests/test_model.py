"""The network beyond the golden cases: registry, released layouts, validation, any input size,
features, torch.fx, TorchScript, compile and export.

timm's own model tests are not copied here; they pass for the six registered models (downloads
excluded) when run from the repository root against a checkout of pytorch-image-models:
    python -m pytest <pytorch-image-models>/tests/test_models.py -k "focal_ and not pretrained" -p models
"""
import argparse
import json
import re
import os

import pytest
import timm
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torchvision.models.feature_extraction import create_feature_extractor

from config import get_config
from golden import LAYOUTS
from helpers import REPO, uninitialised
from models import build_model  # importing models registers the focal models with timm
from models.attention_tables import (attention_table_cache_info, attention_tables, clear_attention_table_cache,
                                     neighbour_key_positions, shift_region_mask)
from models.checkpoint import CheckpointError
from models.focal_transformer import FocalTransformer, checkpoint_filter_fn
from models.window_attention import cpu_attention_kernel, cpu_bf16_instructions, set_cpu_attention, window_attention

PAPER_GFLOPS = {
    'focal_tiny_patch4_window7_224': 4.9, 'focal_tiny_useconv_patch4_window7_224': 5.2,
    'focal_small_patch4_window7_224': 9.4, 'focal_small_useconv_patch4_window7_224': 9.7,
    'focal_base_patch4_window7_224': 16.4, 'focal_base_useconv_patch4_window7_224': 16.8,
}
# A small model that still has every kind of key: neighbours, two pooled levels, shift, padding.
MICRO = dict(embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4, focal_pool='fc',
             focal_levels=[3, 2], focal_windows=[3, 1], expand_sizes=[2, 2], num_classes=5, img_size=40,
             patch_size=2, drop_path_rate=0.)


def micro(**overrides) -> FocalTransformer:
    torch.manual_seed(0)
    return FocalTransformer(**dict(MICRO, **overrides))


@pytest.mark.parametrize('name', sorted(PAPER_GFLOPS))
def test_registered_model_matches_released_layout(name):
    layout = json.loads(LAYOUTS.read_text())[name]
    model = timm.create_model(name)
    parameters = {key: list(value.shape) for key, value in model.state_dict().items()}
    expected = {key: entry['shape'] for key, entry in layout['state_dict'].items() if entry['kind'] == 'parameter'}
    assert parameters == expected
    assert sum(p.numel() for p in model.parameters()) == layout['n_parameters']
    # The paper prints one decimal: Focal-T with conv embedding counts 5.17 (0.56% below its 5.2).
    assert round(model.flops() / 1e9, 1) == PAPER_GFLOPS[name]
    assert model.flops() / 1e9 == pytest.approx(layout['gflops'], rel=1e-9)


# Focal-L's parameters as counted here (the paper gives only its UPerNet's 240M, tested with the
# segmentation recipe): the classifier at ImageNet-1K's and ImageNet-22K's class counts.
FOCAL_L_PARAMETERS = {1000: 199_602_640, 21841: 231_635_257}


@pytest.mark.parametrize('num_classes', sorted(FOCAL_L_PARAMETERS))
def test_focal_large_is_swin_large_shaped_with_the_released_focal_settings(num_classes):
    """The registered Focal-L and configs/focal_large_patch4_window7_224.yaml build the same network:
    Swin-L's widths, depths and heads, the released models' two fc-pooled levels."""
    config = get_config(argparse.Namespace(cfg=os.path.join(REPO, 'configs', 'focal_large_patch4_window7_224.yaml'),
                                           opts=['MODEL.NUM_CLASSES', str(num_classes)]))
    with uninitialised():
        registered = timm.create_model('focal_large_patch4_window7_224', num_classes=num_classes)
        from_config = build_model(config)
    shapes = {key: value.shape for key, value in registered.state_dict().items()}
    assert shapes == {key: value.shape for key, value in from_config.state_dict().items()}
    assert [stage.dim for stage in registered.layers] == [192, 384, 768, 1536]
    assert [len(stage.blocks) for stage in registered.layers] == [2, 2, 18, 2]
    assert [stage.blocks[0].num_heads for stage in registered.layers] == [6, 12, 24, 48]
    block = registered.layers[0].blocks[0]
    assert (block.window_size, block.focal_level, block.pool_method, block.expand_size) == (7, 2, 'fc', 3)
    assert sum(p.numel() for p in registered.parameters()) == FOCAL_L_PARAMETERS[num_classes]


def test_released_state_dict_loads_and_errors_name_keys():
    layout = json.loads(LAYOUTS.read_text())['focal_tiny_patch4_window7_224']
    released = {}
    for key, entry in layout['state_dict'].items():
        if entry['dtype'] == 'int64':
            released[key] = torch.zeros(entry['shape'], dtype=torch.long)
        else:
            released[key] = torch.randn(entry['shape'])
    model = timm.create_model('focal_tiny_patch4_window7_224')
    model.load_state_dict(checkpoint_filter_fn({'model': released}, model), strict=True)
    assert torch.equal(model.layers[2].blocks[3].attn.qkv.weight, released['layers.2.blocks.3.attn.qkv.weight'])

    missing = dict(released)
    del missing['layers.1.blocks.0.attn.relative_position_bias_table_to_neighbors']
    neighbours = 'layers.1.blocks.0.attn.relative_position_bias_table_to_neighbors'
    with pytest.raises(CheckpointError, match=f'missing keys: {neighbours}'):
        model.load_state_dict(checkpoint_filter_fn(missing, model), strict=True)
    wrong_shape = dict(released, **{'layers.3.blocks.1.mlp.fc1.weight': torch.zeros(3, 3)})
    with pytest.raises(CheckpointError, match=re.escape('wrong shape (checkpoint vs model): layers.3.blocks.1.mlp')):
        model.load_state_dict(checkpoint_filter_fn(wrong_shape, model), strict=True)
    unexpected = dict(released, **{'layers.0.blocks.0.attn.extra_table': torch.zeros(1)})
    with pytest.raises(CheckpointError, match='unexpected keys: layers.0.blocks.0.attn.extra_table'):
        model.load_state_dict(checkpoint_filter_fn(unexpected, model), strict=True)


@pytest.mark.parametrize('overrides, message', [
    (dict(focal_windows=[4, 1]), 'focal_windows'),
    (dict(focal_pool='median'), 'focal_pool'),
    (dict(expand_layer='every'), 'expand_layer'),
    (dict(depths=[2, 2, 2]), 'num_heads'),
    (dict(num_heads=[3, 4]), 'num_heads 3'),
    (dict(focal_levels=[2]), 'focal_levels'),
    (dict(focal_levels=[5, 2]), 'focal_levels'),
    (dict(expand_sizes=[5, 2]), 'expand_sizes'),
    (dict(use_conv_embed=True), 'patch_size'),
    (dict(img_size=2), 'img_size'),
    (dict(windowsize=7), 'windowsize'),
])
def test_invalid_configuration_is_a_value_error_naming_it(overrides, message):
    with pytest.raises(ValueError, match=message):
        micro(**overrides)


def test_strict_img_size_names_the_wrong_input_size():
    with pytest.raises(ValueError, match=r'\(32, 32\).*\(40, 40\).*strict_img_size'):
        micro(strict_img_size=True)(torch.randn(1, 3, 32, 32))
    assert micro()(torch.randn(1, 3, 32, 32)).shape == (1, 5)


@pytest.mark.parametrize('size', [(3, 40), (40, 2)])
def test_too_small_input_names_its_size_and_the_minimum(size):
    # two stages of patch 2: at least 2 * 2 pixels a side
    with pytest.raises(ValueError, match=rf'\({size[0]}, {size[1]}\).*at least 4 pixels'):
        micro()(torch.randn(1, 3, *size))


def test_build_model_from_config():
    config = get_config(None)
    config.defrost()
    config.MODEL.NUM_CLASSES = 7
    config.DATA.IMG_SIZE = 64
    config.MODEL.FOCAL.DEPTHS = [1, 1]
    config.MODEL.FOCAL.NUM_HEADS = [1, 2]
    config.MODEL.FOCAL.EMBED_DIM = 8
    config.MODEL.FOCAL.USE_LAYERSCALE = True
    config.MODEL.FOCAL.LAYERSCALE_VALUE = 0.5
    model = build_model(config)
    assert model.num_classes == 7 and len(model.layers) == 2 and model.embed_dim == 8
    assert model.layers[0].blocks[0].gamma_1.eq(0.5).all()
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)


def test_neighbour_key_positions_follow_the_spec():
    # Window 3, expand 1, written out from the docstring's rule: four groups shifted by (+1, +1),
    # (+1, -1), (-1, +1), (-1, -1), each row-major over the window, positions outside it kept.
    # The neighbour bias tables of released checkpoints are indexed in exactly this order.
    assert neighbour_key_positions(3, 1).tolist() == [
        [1, 3], [2, 3], [3, 1], [3, 2], [3, 3],
        [1, -1], [2, -1], [3, -1], [3, 0], [3, 1],
        [-1, 1], [-1, 2], [-1, 3], [0, 3], [1, 3],
        [-1, -1], [-1, 0], [-1, 1], [0, -1], [1, -1],
    ]
    positions = neighbour_key_positions(7, 3)
    assert positions.shape == (132, 2)
    # Group 1 starts at (r, c) = (0, 4): the first position of the shifted window outside the window.
    assert positions[0].tolist() == [3, 7]
    inside = ((positions >= 0) & (positions < 7)).all(dim=1)
    assert not inside.any()


def test_shift_mask_regions_on_a_padded_map():
    # 4x4 padded map, window 2, shift 1: row/col regions are {0, 1}, {2}, {3}.
    mask = shift_region_mask((4, 4), 2, 1)
    assert mask.shape == (4, 4, 4)
    assert not mask[0].any()                                 # top-left window: one region
    assert mask[3][0].tolist() == [False, True, True, True]  # bottom-right window: four regions
    assert mask[1][0].tolist() == [False, True, False, True]  # top-right window: two column regions


def shift_regions(size, padded, window, shift):
    """Per token of an (size x size) map: (window, region) it falls in once the map is padded
    to `padded` at the bottom/right and rolled by -shift, regions as in Swin's unpadded mask."""
    rolled = (torch.arange(size) - shift) % padded
    band = (rolled >= padded - window).long() + (rolled >= padded - shift).long()
    window_id = rolled // window
    rows = torch.stack([window_id, band], dim=1)
    return torch.cat([rows[:, None].expand(size, size, 2), rows[None].expand(size, size, 2)],
                     dim=-1).reshape(size * size, 4)


@pytest.mark.parametrize('img_size', [40, 36])
def test_shifted_window_attention_mixes_only_its_region_on_padded_and_unpadded_maps(img_size):
    """Window attention alone (no pooling, no neighbours): each token's output depends exactly on
    the tokens of its own shifted window and region. 40 px gives a 20x20 map (5 windows of 4);
    36 px an 18x18 map padded to 20x20, which must split into regions the same way."""
    model = micro(img_size=img_size, use_shift=True, expand_sizes=[0, 0], focal_pool='none',
                  focal_levels=[1, 1]).eval()
    block = model.layers[0].blocks[1]
    side = img_size // 2
    assert block.shift_size == 2 and block.input_resolution == (side, side)
    regions = shift_regions(side, 20, 4, 2)
    expected = (regions[:, None] == regions[None]).all(-1)  # (query, key)
    x = torch.randn(1, side, side, 16, requires_grad=True)
    out = block(x).view(side * side, 16)
    seen = torch.zeros(side * side, side * side, dtype=torch.bool)
    for query in range(side * side):
        grad, = torch.autograd.grad(out[query].sum(), x, retain_graph=True)
        seen[query] = grad[0].view(side * side, 16).abs().amax(-1) > 1e-12
    assert torch.equal(seen, expected)


def test_features_only_returns_the_four_stage_maps():
    model = timm.create_model('focal_tiny_patch4_window7_224', features_only=True, pretrained=False)
    features = model(torch.randn(1, 3, 224, 224))
    assert [tuple(f.shape) for f in features] == [
        (1, 96, 56, 56), (1, 192, 28, 28), (1, 384, 14, 14), (1, 768, 7, 7)]
    assert model.feature_info.channels() == [96, 192, 384, 768]
    assert model.feature_info.reduction() == [4, 8, 16, 32]


def test_forward_is_forward_features_then_head_and_intermediates_agree():
    model = micro().eval()
    images = torch.randn(2, 3, 40, 40)
    with torch.no_grad():
        features = model.forward_features(images)
        assert features.shape == (2, 10, 10, 32)  # NHWC, as model.output_fmt says
        assert torch.equal(model(images), model.forward_head(features))
        assert model.forward_head(features, pre_logits=True).shape == (2, 32)
        final, maps = model.forward_intermediates(images)
        assert torch.equal(final, features)
        assert [tuple(m.shape) for m in maps] == [(2, 16, 20, 20), (2, 32, 10, 10)]
        assert torch.equal(model.forward_intermediates(images, indices=[0], intermediates_only=True,
                                                       stop_early=True)[0], maps[0])
        model.reset_classifier(0, '')
        assert torch.equal(model(images), features)


def test_no_weight_decay_names_and_classifier_reset():
    model = micro(ape=True)
    assert model.no_weight_decay() == {'absolute_pos_embed'}
    assert model.no_weight_decay_keywords() == {'relative_position_bias_table'}
    tables = [n for n, _ in model.named_parameters() if 'relative_position_bias_table' in n]
    assert any('to_neighbors' in n for n in tables) and any('to_windows' in n for n in tables)
    model.reset_classifier(3)
    assert model(torch.randn(1, 3, 40, 40)).shape == (1, 3)


def test_parameter_gradients_have_the_parameters_layout():
    """DDP copies gradients into buckets laid out like the parameters; views would warn and copy.

    A single head makes the bias tables' leading dimension 1, where autograd keeps a view it is given.
    """
    model = micro(use_shift=True, num_heads=[1, 2])
    model(torch.randn(2, 3, 40, 40)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad.stride() == p.stride(), name


def test_gradient_checkpointing_gives_the_same_gradients():
    plain, checkpointed = micro(use_shift=True), micro(use_shift=True, use_checkpoint=True)
    images = torch.randn(2, 3, 40, 40)
    for model in (plain, checkpointed):
        model(images).square().sum().backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-5, atol=1e-7), name


@pytest.mark.parametrize('amp', [False, True], ids=['float32', 'bf16-autocast'])
def test_focal_large_training_step_with_activation_checkpointing_is_bit_identical(amp):
    """TRAIN.USE_CHECKPOINT on Focal-L's layout at 224 px (narrowed to 12 channels): the same loss and
    gradients, bit for bit, with drop path on (the recomputed blocks draw the same masks), in float32 and
    under bf16 autocast."""
    def training_step(use_checkpoint):
        config = get_config(argparse.Namespace(
            cfg=os.path.join(REPO, 'configs', 'focal_large_patch4_window7_224.yaml'),
            opts=['MODEL.FOCAL.EMBED_DIM', '12', 'MODEL.NUM_CLASSES', '10',
                  'TRAIN.USE_CHECKPOINT', str(use_checkpoint)]))
        torch.manual_seed(0)
        model = build_model(config).train()
        assert all(stage.use_checkpoint == use_checkpoint for stage in model.layers)
        images, labels = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1)), torch.tensor([7])
        torch.manual_seed(2)
        with torch.autocast('cpu', dtype=torch.bfloat16, enabled=amp):
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        return loss, {name: p.grad for name, p in model.named_parameters()}

    plain, checkpointed = training_step(False), training_step(True)
    assert torch.equal(plain[0], checkpointed[0])
    for name, gradient in plain[1].items():
        assert torch.equal(gradient, checkpointed[1][name]), name


@pytest.mark.parametrize('mask_rows', [1, 4], ids=['mask-per-window', 'mask-per-query'])
@pytest.mark.parametrize('training', [True, False], ids=['fused-training-function', 'sdpa'])
def test_attention_has_the_values_and_gradients_of_plain_attention(training, mask_rows, cpu_attention):
    """Both differentiable paths of window_attention against autograd through explicit softmax,
    in float64: the CPU training function (hand-written backward, on each CPU attention path) and the
    SDPA path that compiled, exported and GPU code take (heads outermost); and the per-image
    evaluation path's values. The bias is shared by the windows, the mask is each window's own (per
    window, or per query as the shift mask is); the bias gradient comes back summed over windows.

    PyTorch's fused CPU kernel returns its log-sum-exp in float32, hence 1e-6 and not 1e-12.
    """
    torch.manual_seed(0)
    B, nH, nW, N, S, hd = 2, 2, 3, 4, 7, 5
    C, tokens = nH * hd, nW * N + 2
    query_index = torch.randperm(nW * N)
    key_index = torch.randint(0, tokens, (nW, S))
    qkv = torch.randn(B, tokens, 3 * C, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(nH, N, S, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(nW, mask_rows, S)
    mask[0, :, 2:4] = mask[2, -1, 0] = float('-inf')

    def plain(qkv, bias):
        q = qkv[:, query_index, :C].view(B, nW, N, nH, hd).transpose(2, 3)
        k, v = qkv[:, key_index, C:].view(B, nW, S, 2, nH, hd).permute(3, 0, 1, 4, 2, 5)
        windows = torch.softmax(q @ k.transpose(-2, -1) * 0.3 + bias + mask.unsqueeze(1), dim=-1) @ v
        out = torch.zeros(B, nW * N, C, dtype=qkv.dtype)
        out[:, query_index] = windows.transpose(2, 3).reshape(B, nW * N, C)
        return out

    weight = torch.randn(B, nW * N, C, dtype=torch.float64)
    expected_out = plain(qkv, bias)
    out = window_attention(qkv, query_index, key_index, bias, mask, 0.3, training=training)
    assert torch.allclose(out, expected_out, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad((out * weight).sum(), (qkv, bias))
    reference = torch.autograd.grad((expected_out * weight).sum(), (qkv, bias))
    for got, expected in zip(grads, reference):
        assert got.shape == expected.shape and torch.allclose(got, expected, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        evaluated = window_attention(qkv, query_index, key_index, bias, mask, 0.3)
    assert torch.allclose(evaluated, expected_out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('path', ['fused-training-function', 'sdpa', 'evaluation'])
def test_masked_key_slots_contribute_nothing_whatever_row_they_read(path, cpu_attention):
    """Out-of-grid pooled cells are masked and read an arbitrary row (their level's first cell), so
    the mask must remove them exactly: outputs bit-identical whatever that row holds, and exactly
    zero gradient (not NaN) for it and for the bias entries that every window masks."""
    torch.manual_seed(0)
    B, nH, nW, N, S, hd = 2, 2, 3, 4, 7, 5
    C, tokens = nH * hd, nW * N + 1
    query_index = torch.randperm(nW * N)
    key_index = torch.randint(0, nW * N, (nW, S))
    key_index[:, -2:] = tokens - 1                  # the last row: read by masked slots only
    # the value the model's tables give out-of-grid cells (a 2x2 window grid, focal window 3)
    _, _, table_mask = attention_tables((4, 4), 2, 0, 3, 1, None, torch.device('cpu'))
    mask = torch.zeros(nW, 1, S)
    mask[..., -2:] = table_mask.min()
    qkv = torch.randn(B, tokens, 3 * C)
    loud = qkv.clone()
    loud[:, -1, C:] = 1e3 * torch.randn(B, 2 * C)  # a large key would leak through a finite mask
    weight = torch.randn(B, nW * N, C)
    outputs, grads = [], []
    for rows in (qkv, loud):
        rows = rows.clone().requires_grad_(path != 'evaluation')
        bias = torch.randn(nH, N, S, generator=torch.Generator().manual_seed(1))
        bias.requires_grad_(path != 'evaluation')
        with torch.set_grad_enabled(path != 'evaluation'):
            out = window_attention(rows, query_index, key_index, bias, mask, 0.3,
                                   training=path == 'fused-training-function')
        outputs.append(out.detach())
        if path != 'evaluation':
            grads.append(torch.autograd.grad((out * weight).sum(), (rows, bias)))
    assert torch.equal(outputs[0], outputs[1])
    for grad_rows, grad_bias in grads:
        assert torch.equal(grad_rows[:, -1], torch.zeros(B, 3 * C))
        assert torch.equal(grad_bias[..., -2:], torch.zeros(nH, N, 2))
        assert torch.isfinite(grad_rows).all() and torch.isfinite(grad_bias).all()


def test_bf16_autocast_on_cpu_agrees_with_float32(cpu_attention):
    """Inside autocast the linear layers compute in bf16 (8-bit mantissa, ~0.4% per rounding), and
    so do the attention's products on the materialised path. Measured on every path: logits within
    0.9% of float32's largest, all gradients together within 1.3% (a small tensor such as a bias
    alone can be 40% off, so the bound is on the whole gradient)."""
    model = micro()
    images = torch.randn(2, 3, 40, 40)
    reference = model(images)
    reference.square().mean().backward()
    reference_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    dtypes = set()
    model.layers[0].blocks[0].attn.qkv.register_forward_hook(lambda m, i, out: dtypes.add(out.dtype))
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits = model(images)
    assert dtypes == {torch.bfloat16}
    logits.float().square().mean().backward()
    scale = reference.abs().max()
    assert (logits.float() - reference).abs().max() < 0.03 * scale
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    expected = torch.cat([grad.flatten() for grad in reference_grads])
    assert (grads - expected).norm() < 0.05 * expected.norm()


class LargestStorage(TorchDispatchMode):
    """Records the largest storage (bytes) of any tensor an operator returns while active."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.untyped_storage().nbytes())
        return out


@pytest.mark.parametrize('kernel', ['fused', 'materialised'])
def test_cpu_attention_never_holds_a_bias_for_every_window(kernel):
    """The learned bias is shared by the windows and only the mask is each window's own, so the CPU
    paths sum the two a chunk of windows at a time: no tensor as large as (windows, heads, queries,
    keys) exists in a block's evaluation, training forward or backward (bias gradient included)."""
    model = micro(img_size=56, use_shift=True)
    block = model.layers[0].blocks[1]
    x = torch.randn(1, 28, 28, 16, requires_grad=True)
    _, key_index, mask = attention_tables((28, 28), 4, 2, 3, 2, block.attn.neighbour_positions, torch.device('cpu'))
    all_windows = key_index.shape[0] * block.attn.attention_bias().numel() * 4  # float32 bytes
    qkv_bytes = 4 * 3 * 16 * (28 * 28 + 7 * 7 + 14 * 14)
    assert mask.shape[1] == 16 and qkv_bytes < all_windows  # shifted: the mask has a row per query
    set_cpu_attention(kernel, chunk_bytes=4000)
    try:
        for training in (False, True):
            block.train(training)
            with LargestStorage() as largest, torch.set_grad_enabled(training):
                out = block(x)
                if training:
                    out.square().sum().backward()
            assert qkv_bytes <= largest.largest < all_windows
    finally:
        set_cpu_attention()
    assert block.attn.relative_position_bias_table.grad.abs().sum() > 0


@pytest.mark.parametrize('kernel, expected_op', [('fused', 'aten::_scaled_dot_product_flash_attention_for_cpu'),
                                                 ('materialised', 'aten::baddbmm_')])
def test_set_cpu_attention_chooses_the_kernel_that_runs(kernel, expected_op):
    """The switch decides what CPU evaluation and training run (seen in the profiler); a bad kernel
    name is a ValueError naming it."""
    qkv, bias, mask = torch.randn(1, 8, 12), torch.randn(2, 4, 3, requires_grad=True), torch.zeros(2, 1, 3)
    query_index, key_index = torch.arange(8), torch.tensor([[0, 1, 7], [4, 5, 0]])
    other = {'aten::_scaled_dot_product_flash_attention_for_cpu', 'aten::baddbmm_'} - {expected_op}
    set_cpu_attention(kernel)
    try:
        for training in (False, True):
            with torch.profiler.profile() as profile, torch.set_grad_enabled(training):
                window_attention(qkv, query_index, key_index, bias, mask, 0.5, training=training)
            ops = {event.name for event in profile.events()}
            assert expected_op in ops and not ops & other, ops
    finally:
        set_cpu_attention()
    with pytest.raises(ValueError, match="'flash'"):
        set_cpu_attention('flash')


@pytest.mark.skipif(not os.path.exists('/proc/cpuinfo'), reason='reads the CPU flags from /proc/cpuinfo')
def test_bf16_takes_the_materialised_path_only_on_cpus_with_bf16_instructions():
    """Without bf16 dot-product instructions bf16 products are emulated and the fused kernel is faster;
    the model's choice must agree with the CPU flags the kernel (Linux) reports."""
    with open('/proc/cpuinfo') as f:
        flags = next((line.split(':', 1)[1].split() for line in f if line.startswith('flags')), [])
    assert set(cpu_bf16_instructions()) == {'avx512_bf16', 'amx_bf16'} & set(flags)
    has_bf16 = 'avx512_bf16' in flags or 'amx_bf16' in flags
    assert (cpu_attention_kernel(torch.bfloat16) == 'materialised') == has_bf16
    assert cpu_attention_kernel(torch.float32) == cpu_attention_kernel(torch.float64) == 'materialised'
    assert cpu_attention_kernel(torch.float16) == 'fused'


def test_torch_compile_matches_eager():
    """Inductor on the CPU, as TRAIN.COMPILE uses it: main.py compiles the training forward and
    backward only (evaluation runs the eager model), so one compiled training step is what is
    checked. Its output and its backward (the attention's custom autograd function included) must
    give the eager ones."""
    model = micro(depths=[1, 1]).train()  # drop_path_rate 0: training mode is still deterministic
    images = torch.randn(2, 3, 40, 40)
    compiled = torch.compile(model)
    eager_output = model(images)
    eager_output.square().sum().backward()
    eager = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    compiled_output = compiled(images)
    torch.testing.assert_close(compiled_output, eager_output, rtol=1e-4, atol=1e-5)
    compiled_output.square().sum().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[name], rtol=1e-3, atol=1e-5, msg=lambda m: f'{name}: {m}')


def tiny_registered(**kwargs):
    """A registered model with the architecture overridden down to a few thousand parameters."""
    torch.manual_seed(0)
    return timm.create_model('focal_tiny_patch4_window7_224', embed_dim=8, depths=(1, 1, 1, 1),
                             num_heads=(1, 1, 1, 1), **kwargs)


def test_create_model_keyword_arguments_override_the_architecture():
    model = tiny_registered(use_conv_embed=True, drop_path_rate=0.)
    assert model.embed_dim == 8 and [len(stage.blocks) for stage in model.layers] == [1, 1, 1, 1]
    assert model.patch_embed.proj.kernel_size == (7, 7)
    assert model.head_hidden_size == model.num_features == 64
    assert timm.create_model('focal_tiny_useconv_patch4_window7_224', embed_dim=8, depths=(1, 1, 1, 1),
                             num_heads=(1, 1, 1, 1), use_conv_embed=False).patch_embed.proj.kernel_size == (4, 4)


# (height, width): non-square, not multiples of the patch or the window, and (the last one) a last
# stage map smaller than the window, padded up to it.
OTHER_SIZES = [(37, 50), (64, 29), (9, 6)]


def stage_sizes(size, stem, downsampling, num_stages):
    """Stage map sizes from a convolution's arithmetic, out = (in + 2 * padding - kernel) // stride + 1,
    stem then each downsampling given as (kernel, stride, padding)."""
    sizes = []
    for i in range(num_stages):
        kernel, stride, padding = stem if i == 0 else downsampling
        size = tuple((side + 2 * padding - kernel) // stride + 1 for side in size)
        sizes.append(size)
    return sizes


@pytest.mark.parametrize('size', OTHER_SIZES)
def test_other_input_sizes_give_the_downsampling_arithmetic_stage_maps(size):
    model = micro(use_shift=True).eval()
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        maps = model.forward_intermediates(images, intermediates_only=True)
        logits = model(images)
    # patch 2: the stem and each downsampling drop an odd last row or column
    assert [tuple(m.shape[-2:]) for m in maps] == [(size[0] // 2, size[1] // 2), (size[0] // 4, size[1] // 4)]
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()


@pytest.mark.parametrize('use_conv_embed', [False, True], ids=['patch-embed', 'conv-embed'])
@pytest.mark.parametrize('size', [(233, 201), (232, 232), (71, 38)])
def test_stage_maps_follow_the_embedding_convolutions_built_or_not(size, use_conv_embed):
    """At odd sizes, square or not, built for that size or run at it: the stem Conv(4, 4) then Conv(2, 2)
    round down (232: 58, 29, 14, 7); the overlapped Conv(7, 4, padding 2) then Conv(3, 2, padding 1)
    follow their own arithmetic, halving odd maps rounding up (233: 58, 29, 15, 8). The blocks are built
    for those sizes (a last-stage map no larger than the window is one window without neighbours)."""
    expected = stage_sizes(size, (7, 4, 2) if use_conv_embed else (4, 4, 0),
                           (3, 2, 1) if use_conv_embed else (2, 2, 0), 4)
    torch.manual_seed(0)
    built = timm.create_model('focal_tiny_patch4_window7_224', embed_dim=8, depths=(1, 1, 1, 1),
                              num_heads=(1, 1, 1, 1), use_conv_embed=use_conv_embed, img_size=size).eval()
    assert [stage.input_resolution for stage in built.layers] == expected
    assert built.patches_resolution == expected[0]
    for stage, (height, width) in zip(built.layers, expected):
        block = stage.blocks[0]
        assert block.input_resolution == (height, width)
        assert block.window_size == min(7, height, width)
        assert (block.expand_size > 0) == (min(height, width) > 7)
    other = tiny_registered(use_conv_embed=use_conv_embed).eval()
    for model in (built, other):
        with torch.no_grad():
            maps = model.forward_intermediates(torch.randn(1, 3, *size), intermediates_only=True)
        assert [tuple(m.shape[-2:]) for m in maps] == expected
    other.set_input_size(size)
    assert [stage.input_resolution for stage in other.layers] == expected


def test_features_only_takes_other_sizes():
    model = tiny_registered(features_only=True).eval()
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 100, 150))
    assert [tuple(m.shape) for m in maps] == [(1, 8, 25, 37), (1, 16, 12, 18), (1, 32, 6, 9), (1, 64, 3, 4)]


def test_output_at_the_built_size_is_the_same_whatever_sizes_ran_before():
    model = micro(use_shift=True).eval()
    images = torch.randn(2, 3, 40, 40)
    clear_attention_table_cache()
    with torch.no_grad():
        first = model(images)
        for size in OTHER_SIZES:
            model(torch.randn(1, 3, *size))
        again = model(images)
        clear_attention_table_cache()
        for size in OTHER_SIZES:
            model(torch.randn(1, 3, *size))
        after_others = model(images)
    assert torch.equal(first, again) and torch.equal(first, after_others)


def test_tables_are_built_once_per_size_and_the_cache_is_bounded():
    model = micro(use_shift=True).eval()
    images = torch.randn(1, 3, 37, 50)
    clear_attention_table_cache()
    with torch.no_grad():
        model(images)
        built = attention_table_cache_info().misses
        assert built == 4  # two stages, shifted and plain blocks
        model(images)
        info = attention_table_cache_info()
        assert info.misses == built and info.hits == 4
        # every height (a multiple of patch x window) needs new stage-0 tables: more than the cache holds
        for blocks in range(1, 1 + info.maxsize // 2):
            model(torch.randn(1, 3, 8 * blocks, 9))
    info = attention_table_cache_info()
    assert info.misses > info.maxsize and info.currsize == info.maxsize


def test_set_input_size_reports_the_size_and_resamples_the_position_embedding():
    model = micro(ape=True).eval()
    resized = micro(ape=True).eval()
    resized.set_input_size(48)
    assert resized.img_size == (48, 48) and resized.patches_resolution == (24, 24)
    assert resized.absolute_pos_embed.shape == (1, 24 * 24, 16)
    assert resized.layers[1].input_resolution == (12, 12) and resized.flops() > model.flops()
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        # the model built for 40 resamples its embedding at run time the same way
        assert torch.equal(model(images), resized(images))
        assert not torch.equal(model(images), micro()(images))


def test_torch_fx_feature_extractor_at_another_size():
    model = micro(use_shift=True).eval()
    extractor = create_feature_extractor(model, {'layers.0.blocks.1': 'block', 'norm': 'features', 'head': 'logits'})
    images = torch.randn(2, 3, 37, 50)
    with torch.no_grad():
        out = extractor(images)
        assert torch.equal(out['features'], model.forward_features(images))
        assert torch.equal(out['logits'], model(images))
    assert out['block'].shape == (2, 18, 25, 16)


def test_torchscript_matches_eager_at_another_size():
    model = micro(use_shift=True).eval()
    scripted = torch.jit.script(model)
    images = torch.randn(2, 3, 37, 50)
    with torch.no_grad():
        assert torch.allclose(scripted(images), model(images), rtol=1e-5, atol=1e-6)


def test_torch_export_with_dynamic_batch_height_and_width_matches_eager_at_other_sizes():
    """From an eval model whose parameters still require grad, as after training: the export takes the
    SDPA path, and the tables are built in the graph from the symbolic sizes."""
    model = micro(depths=[1, 2], use_shift=True).eval()
    assert all(p.requires_grad for p in model.parameters())
    dims = {'x': {0: torch.export.Dim('batch', max=64), 2: torch.export.Dim('height', min=32, max=1024),
                  3: torch.export.Dim('width', min=32, max=1024)}}
    exported = torch.export.export(model, (torch.randn(2, 3, 40, 40),), dynamic_shapes=dims).module()
    for size in [(1, 37, 50), (3, 64, 33)]:
        images = torch.randn(size[0], 3, *size[1:])
        with torch.no_grad():
            expected = model(images)
        assert (exported(images) - expected).abs().max() < 1e-4
