"""Fine-tuning from a checkpoint at another resolution, window or number of classes
(models/pretrained.py) and the 384 px fine-tuning configs."""
import argparse
import json
import math
import pathlib
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from config import get_config
from golden import CASES, LAYOUTS, GoldenCase
from helpers import assert_ok, load_weights, run_dir, run_main, write_config, write_image_folder
from models import build_model
from models.attention_tables import neighbour_key_positions
from models.checkpoint import CheckpointError
from models.focal_transformer import FocalTransformer, checkpoint_filter_fn
from models.pretrained import TransferReport

REPO = pathlib.Path(__file__).resolve().parents[1]

SMALL = dict(embed_dim=8, depths=[1, 1, 2, 1], num_heads=[1, 2, 2, 4], focal_pool='fc',
             focal_levels=[2, 2, 2, 2], focal_windows=[3, 3, 1, 1], drop_path_rate=0.1)
# Stage maps 16/8/4/2 with window 3: stages 0-2 have neighbours (expand 1), stage 3 is one 2x2 window.
PRETRAIN = dict(SMALL, img_size=64, window_size=3, expand_sizes=[1, 1, 1, 1], num_classes=10)
# Stage maps 24/12/6/3 with window 5: stages 0-2 have neighbours (expand 2), stage 3 is one 3x3 window.
FINETUNE = dict(SMALL, img_size=96, window_size=5, expand_sizes=[2, 2, 2, 2], num_classes=5)


def adapted(checkpoint, model):
    """What --pretrained loads into `model` from `checkpoint`'s contents, and the report of it."""
    report = TransferReport()
    return checkpoint_filter_fn(checkpoint, model, adapt=True, report=report), report


def build(kwargs, seed=0):
    torch.manual_seed(seed)
    return FocalTransformer(**kwargs)


def trained_state_dict(kwargs):
    """A state dict whose every value differs from any initialisation, as after training."""
    model = build(kwargs, seed=1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.2)
    return model.state_dict()


def actions(report):
    return {entry.key: entry.action for entry in report.entries}


def centre(grid_values):
    """Middle element of a flattened odd x odd grid."""
    return grid_values[..., (grid_values.shape[-1] - 1) // 2]


def bicubic_matrix(old, new):
    """(new, old) weights of a 1-D bicubic resize as torch does it: Keys' cubic with a = -0.75,
    half-pixel centres (align_corners=False), edge samples repeated beyond the border."""
    def cubic(t):
        t, a = abs(t), -0.75
        if t <= 1:
            return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1
        return a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a if t < 2 else 0.0

    weights = torch.zeros(new, old, dtype=torch.float64)
    for i in range(new):
        x = (i + 0.5) * old / new - 0.5
        for j in range(math.floor(x) - 1, math.floor(x) + 3):
            weights[i, min(max(j, 0), old - 1)] += cubic(x - j)
    return weights


def expected_grids(table, new_size):
    """(X, S*S) rows, each an S x S grid, resized bicubically to (X, new_size)."""
    old_side, new_side = math.isqrt(table.shape[1]), math.isqrt(new_size)
    weights = bicubic_matrix(old_side, new_side)
    grids = table.double().reshape(-1, old_side, old_side)
    return (weights @ grids @ weights.t()).reshape(table.shape[0], new_size)


def expected_pool_kernel(kernel, new):
    """A pooling kernel resized as models/pretrained.py documents it: bicubic, times the area
    ratio, then shifted by one constant so that its sum is the old sum."""
    old = kernel.shape[-1]
    weights = bicubic_matrix(old, new)
    resized = weights @ kernel.double() @ weights.t() * (old / new) ** 2
    return resized + (kernel.double().sum() - resized.sum()) / new ** 2


def load_config(name):
    return get_config(argparse.Namespace(cfg=str(REPO / 'configs' / name)))


def released_state_dict(name):
    """Random tensors with the names, shapes and dtypes of a released checkpoint, its integer
    index buffers included."""
    layout = json.loads(LAYOUTS.read_text())[name]['state_dict']
    generator = torch.Generator().manual_seed(0)
    state_dict = {}
    for key, entry in layout.items():
        dtype = getattr(torch, entry['dtype'])
        if dtype.is_floating_point:
            state_dict[key] = torch.randn(entry['shape'], generator=generator, dtype=dtype) * 0.02
        else:
            state_dict[key] = torch.zeros(entry['shape'], dtype=dtype)
    return state_dict


def test_finetune_at_higher_resolution_other_window_and_classes(tmp_path):
    path = tmp_path / 'pretrained.pth'
    torch.save({'model': trained_state_dict(PRETRAIN)}, path)
    old = torch.load(path, weights_only=True)['model']
    model = build(FINETUNE)
    init = {key: value.clone() for key, value in model.state_dict().items()}

    state_dict, report = adapted(torch.load(path, weights_only=True), model)
    model.load_state_dict(state_dict, strict=True)
    new = {key: value.clone() for key, value in model.state_dict().items()}

    geometric = ('relative_position_bias_table', 'pool_layers.0.weight')
    for key, action in actions(report).items():
        expected = ('fresh' if key.startswith('head.') else
                    'resized' if any(part in key for part in geometric) else 'copied')
        assert action == expected, key
        if action == 'copied':
            assert torch.equal(new[key], old[key]), key
        if action == 'fresh':
            assert torch.equal(new[key], init[key]), key
    assert set(actions(report)) == set(new)

    checked_centres = checked_tables = checked_kernels = 0
    for key in new:
        if key.endswith('attn.relative_position_bias_table'):
            assert torch.equal(centre(new[key].t()), centre(old[key].t())), key
            torch.testing.assert_close(new[key].t().double(), expected_grids(old[key].t(), new[key].shape[0]),
                                       rtol=0, atol=1e-5)
            checked_centres += 1
            checked_tables += 1
        elif 'relative_position_bias_table_to_windows' in key:
            if old[key].shape[1] % 2 == 1:
                assert torch.equal(centre(new[key]), centre(old[key])), key
                checked_centres += 1
            torch.testing.assert_close(new[key].double(), expected_grids(old[key], new[key].shape[1]),
                                       rtol=0, atol=1e-5)
            checked_tables += 1
        elif key.endswith('pool_layers.0.weight'):
            side = 5 if key.startswith(('layers.0', 'layers.1', 'layers.2')) else 3
            old_side = math.isqrt(old[key].shape[1])
            assert new[key].shape == (1, side * side)
            expected = expected_pool_kernel(old[key].reshape(old_side, old_side), side)
            torch.testing.assert_close(new[key].double().reshape(side, side), expected, rtol=0, atol=1e-6)
            checked_kernels += 1
    assert checked_centres == 5 + 4  # every window table; to_windows but stage 3's (2x2 -> 3x3)
    assert checked_tables == 5 + 5
    assert checked_kernels == 5  # every block (depths 1, 1, 2, 1)
    copied = sum(value.numel() for key, value in new.items() if actions(report)[key] == 'copied')
    assert f'copied {len(new) - 21} tensors ({copied:,} weights)' in report.summary()
    assert 'fresh 2 tensors (325 weights)' in report.summary()
    assert any(line.startswith('head.weight: (10, 64) -> (5, 64) fresh') for line in report.details())

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    images, labels = torch.randn(2, 3, 96, 96), torch.tensor([0, 4])
    loss = F.cross_entropy(model(images), labels)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert not torch.equal(model.state_dict()['head.weight'], new['head.weight'])


def test_neighbour_biases_mapped_by_relative_offset():
    """A neighbour table whose value depends only on the offset key - query keeps that value at
    every offset the old geometry had; other offsets start from the model's initialisation."""
    old_window, old_expand, new_window, new_expand = 3, 1, 5, 2
    pretrained = trained_state_dict(PRETRAIN)
    key = 'layers.1.blocks.0.attn.relative_position_bias_table_to_neighbors'

    def offsets(window, expand):
        rows, cols = torch.meshgrid(torch.arange(window), torch.arange(window), indexing='ij')
        queries = torch.stack([rows.flatten(), cols.flatten()], dim=1)
        return neighbour_key_positions(window, expand)[None] - queries[:, None]  # (ws², n, 2)

    def value(offset, head):
        return 100.0 * head + 10.0 * offset[..., 0] + offset[..., 1]

    old_offsets = offsets(old_window, old_expand)
    pretrained[key] = torch.stack([value(old_offsets, head) for head in range(2)])[None]
    model = build(FINETUNE)
    init = model.state_dict()[key].clone()
    state_dict, report = adapted(pretrained, model)

    new_offsets = offsets(new_window, new_expand)
    old_set = {tuple(offset) for offset in old_offsets.reshape(-1, 2).tolist()}
    known = torch.tensor([[tuple(offset) in old_set for offset in row] for row in new_offsets.tolist()])
    assert 0 < known.sum() < known.numel()
    for head in range(2):
        mapped = state_dict[key][0, head]
        assert torch.equal(mapped[known], value(new_offsets, head)[known])
        assert torch.equal(mapped[~known], init[0, head][~known])
    detail = next(line for line in report.details() if line.startswith(key))
    assert f'{int(known.sum()) * 2} of {init.numel()} values mapped' in detail

    # Several old slots with one offset: their mean.
    pretrained[key] = torch.randn(1, 2, old_window ** 2, old_offsets.shape[1])
    state_dict, _ = adapted(pretrained, model)
    target = torch.tensor([1, 0])
    old_same = (old_offsets == target).all(-1)
    new_same = (new_offsets == target).all(-1)
    assert old_same.sum() > 1
    expected = pretrained[key][0, :, old_same].double().mean(-1).float()
    for head in range(2):
        torch.testing.assert_close(state_dict[key][0, head][new_same],
                                   expected[head].expand(int(new_same.sum())), rtol=1e-6, atol=1e-7)


# Same window 4 at 64 px (stage maps 16/8/4/2) and 160 px (40/20/10/5): stages 2 and 3 have a map
# larger than the window only at 160 px, so only there do their blocks have neighbour keys.
LOW_RES = dict(SMALL, img_size=64, window_size=4, expand_sizes=[2, 2, 2, 2], num_classes=10)
HIGH_RES = dict(LOW_RES, img_size=160)
GAINED = ['layers.2.blocks.0.attn.relative_position_bias_table_to_neighbors',
          'layers.2.blocks.1.attn.relative_position_bias_table_to_neighbors',
          'layers.3.blocks.0.attn.relative_position_bias_table_to_neighbors']


def test_blocks_that_gain_neighbours_start_as_from_scratch():
    model = build(HIGH_RES)
    init = {key: value.clone() for key, value in model.state_dict().items()}
    state_dict, report = adapted(trained_state_dict(LOW_RES), model)
    model.load_state_dict(state_dict, strict=True)
    fresh = sorted(key for key, action in actions(report).items() if action == 'fresh')
    assert fresh == GAINED
    for key in GAINED:
        assert torch.equal(model.state_dict()[key], init[key])
    assert 'fresh 3 tensors' in report.summary() and 'ignored 0 tensors' in report.summary()
    assert any(line.startswith(f'{GAINED[0]}: absent -> (1, 2, 16, 48) fresh') for line in report.details())
    model.eval()
    assert torch.isfinite(model(torch.randn(1, 3, 160, 160))).all()


def test_neighbour_tables_the_model_lacks_are_ignored_and_reported():
    model = build(LOW_RES)
    state_dict, report = adapted(trained_state_dict(HIGH_RES), model)
    model.load_state_dict(state_dict, strict=True)
    ignored = sorted(key for key, action in actions(report).items() if action == 'ignored')
    assert ignored == GAINED
    assert 'ignored 3 tensors (6,144 weights)' in report.summary()  # (2 + 2 + 4) heads x 16 x 48
    assert any(line.startswith(f'{GAINED[2]}: (1, 4, 16, 48) -> absent ignored') for line in report.details())


@pytest.mark.parametrize('change, named', [
    (dict(depths=[1, 1, 1, 1]), 'unexpected keys: layers.2.blocks.1.pool_layers.0.weight, '),
    (dict(depths=[1, 1, 3, 1]), 'missing keys: layers.2.blocks.2.pool_layers.0.weight, '),
    (dict(embed_dim=16), 'patch_embed.proj.weight (8, 3, 4, 4) vs (16, 3, 4, 4)'),
    (dict(num_heads=[1, 1, 2, 4]), 'layers.1.blocks.0.attn.relative_position_bias_table (25, 2) vs (25, 1) '
                                   '(different number of heads)'),
    (dict(focal_pool='conv'), 'layers.0.blocks.0.pool_layers.0.weight (1, 9) vs (8, 1, 3, 3) '
                              '(not the same pooling layer)'),
])
def test_other_architecture_fails_naming_the_keys(change, named):
    with pytest.raises(CheckpointError, match=r'the checkpoint does not fit this model \(another architecture\?\): ') as error:
        adapted(trained_state_dict(PRETRAIN), build(dict(PRETRAIN, **change)))
    assert named in str(error.value)


def test_conv_pooling_kernels_resized_bicubic_per_channel_keeping_their_sums():
    conv = dict(SMALL, focal_pool='conv', expand_sizes=[1, 1, 1, 1], num_classes=10)
    pretrained = trained_state_dict(dict(conv, img_size=64, window_size=3))
    model = build(dict(conv, img_size=96, window_size=5))
    state_dict, report = adapted(pretrained, model)
    model.load_state_dict(state_dict, strict=True)
    key = 'layers.1.blocks.0.pool_layers.0.weight'
    assert pretrained[key].shape == (16, 1, 3, 3) and state_dict[key].shape == (16, 1, 5, 5)
    torch.testing.assert_close(state_dict[key].sum((1, 2, 3)), pretrained[key].sum((1, 2, 3)), rtol=0, atol=1e-6)
    for channel in range(16):
        torch.testing.assert_close(state_dict[key][channel, 0].double(),
                                   expected_pool_kernel(pretrained[key][channel, 0], 5), rtol=0, atol=1e-6)
    # A constant kernel (mean pooling) stays constant: the same total over 25 cells instead of 9.
    pretrained[key] = torch.full((16, 1, 3, 3), 0.5)
    state_dict, _ = adapted(pretrained, model)
    torch.testing.assert_close(state_dict[key], torch.full((16, 1, 5, 5), 0.5 * 9 / 25), rtol=0, atol=1e-7)
    assert actions(report)['layers.1.blocks.0.pool_layers.0.bias'] == 'copied'


def test_position_embedding_resized_and_classifier_dropped_or_added():
    pretrained = trained_state_dict(dict(PRETRAIN, ape=True))
    channel_values = torch.randn(8)
    pretrained['absolute_pos_embed'] = channel_values.expand(1, 16 * 16, 8).clone()
    ddp_names = {f'module.{key}': value for key, value in pretrained.items()}
    headless = build(dict(FINETUNE, ape=True, num_classes=0))
    state_dict, report = adapted(ddp_names, headless)
    headless.load_state_dict(state_dict, strict=True)
    assert actions(report)['absolute_pos_embed'] == 'resized'
    # A grid constant in space stays constant under bicubic resizing.
    torch.testing.assert_close(state_dict['absolute_pos_embed'], channel_values.expand(1, 24 * 24, 8))
    assert actions(report)['head.weight'] == actions(report)['head.bias'] == 'ignored'

    model = build(dict(FINETUNE, ape=True))
    state_dict, report = adapted(headless.state_dict(), model)
    model.load_state_dict(state_dict, strict=True)
    assert actions(report)['head.weight'] == actions(report)['head.bias'] == 'fresh'
    assert torch.equal(state_dict['head.weight'], model.head.weight.detach())


@pytest.mark.parametrize('name', CASES)
def test_golden_state_dicts_load_strictly(name):
    case = GoldenCase(name)
    model = FocalTransformer(**case.kwargs)
    checkpoint = case.reference_checkpoint()
    state_dict, report = adapted(checkpoint, model)
    model.load_state_dict(state_dict, strict=True)
    assert set(actions(report).values()) == {'copied'}
    assert report.dropped_buffers > 0
    for key, value in model.state_dict().items():
        assert torch.equal(value, checkpoint[key]), key


@pytest.fixture(scope='module')
def released_focal_tiny():
    return released_state_dict('focal_tiny_patch4_window7_224')


def test_released_focal_tiny_loads_for_evaluation_at_224(released_focal_tiny):
    model = build_model(load_config('focal_tiny_patch4_window7_224.yaml'))
    state_dict, report = adapted(released_focal_tiny, model)
    model.load_state_dict(state_dict, strict=True)
    assert set(actions(report).values()) == {'copied'} and len(report.entries) == len(model.state_dict())
    model.eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 224, 224))
    assert logits.shape == (1, 1000) and torch.isfinite(logits).all()


def test_released_focal_tiny_transfers_to_384_window_12(released_focal_tiny):
    model = build_model(load_config('focal_tiny_patch4_window12_384_finetune.yaml'))
    state_dict, report = adapted(released_focal_tiny, model)
    model.load_state_dict(state_dict, strict=True)

    done = actions(report)
    resized = sorted(key for key, action in done.items() if action == 'resized')
    tables_and_kernels = [key for key in model.state_dict()
                          if 'relative_position_bias_table' in key or key.endswith('pool_layers.0.weight')]
    assert resized == sorted(tables_and_kernels)
    # The last stage's 12x12 map is one window at 384 px as its 7x7 map was at 224 px: no block
    # gains or loses neighbour keys, and the 1000-class head is kept.
    assert done['head.weight'] == 'copied'
    assert 'fresh 0 tensors' in report.summary() and 'ignored 0 tensors' in report.summary()
    key = 'layers.0.blocks.0.attn.relative_position_bias_table'
    assert state_dict[key].shape == (23 * 23, 3)
    assert torch.equal(centre(state_dict[key].t()), centre(released_focal_tiny[key].t()))


@pytest.mark.parametrize('size', ['tiny', 'small', 'base'])
def test_finetune_config_is_its_224_config_at_384(size):
    """Building the full-size small and base models takes 5-15 s each; the tiny test above
    builds its 384 model, and these differ from it only in what they inherit from their 224 config."""
    finetune = load_config(f'focal_{size}_patch4_window12_384_finetune.yaml')
    pretrain = load_config(f'focal_{size}_patch4_window7_224.yaml')
    changed = {
        'DATA.IMG_SIZE': 384, 'MODEL.NAME': f'focal_{size}_patch4_window12_384_finetune',
        'MODEL.FOCAL.WINDOW_SIZE': 12, 'MODEL.FOCAL.EXPAND_SIZES': [6, 6, 6, 6],
        'TRAIN.EPOCHS': 30, 'TRAIN.WARMUP_EPOCHS': 5, 'TRAIN.WEIGHT_DECAY': 1e-8,
        'TRAIN.BASE_LR': 2e-5, 'TRAIN.WARMUP_LR': 2e-8, 'TRAIN.MIN_LR': 2e-7, 'TEST.CROP': False,
        'OUTPUT': finetune.OUTPUT,
    }

    def flat(node, prefix=''):
        items = {}
        for key, value in node.items():
            items.update(flat(value, f'{prefix}{key}.') if isinstance(value, dict) else {prefix + key: value})
        return items

    expected = dict(flat(pretrain), **changed)
    assert flat(finetune) == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_transfer_into_a_model_on_the_gpu():
    model = build(FINETUNE).cuda()
    state_dict, report = adapted(trained_state_dict(PRETRAIN), model)
    model.load_state_dict(state_dict, strict=True)
    assert 'resized 19 tensors' in report.summary()
    assert torch.isfinite(model(torch.randn(2, 3, 96, 96, device='cuda'))).all()


def test_main_fine_tunes_from_a_file_url(tmp_path):
    """What users run (two main.py launches, ~15 s): train at 32 px / window 4 on 3 classes, then
    fine-tune from that checkpoint, given as a file:// URL, at 48 px / window 6 on 2 classes."""
    pretrain_data = write_image_folder(tmp_path / 'pretrain_data')
    finetune_data = write_image_folder(tmp_path / 'finetune_data', size=48)
    for split in ('train', 'val'):
        shutil.rmtree(tmp_path / 'finetune_data' / split / 'stripe')
    cfg = write_config(tmp_path / 'tiny.yaml')
    out = str(tmp_path / 'out')
    one_epoch = ['TRAIN.EPOCHS', '1', 'TRAIN.WARMUP_EPOCHS', '0']
    assert_ok(run_main(tmp_path, ['--cfg', cfg, '--data-path', pretrain_data, '--output', out,
                                  '--tag', 'pretrain', '--opts', *one_epoch]))
    checkpoint = pathlib.Path(run_dir(out, 'pretrain')) / 'ckpt_epoch_0.pth'

    result = run_main(tmp_path, [
        '--cfg', cfg, '--data-path', finetune_data, '--output', out, '--tag', 'finetune',
        '--pretrained', checkpoint.as_uri(),
        '--opts', *one_epoch, 'DATA.IMG_SIZE', '48', 'MODEL.FOCAL.WINDOW_SIZE', '6',
        'MODEL.FOCAL.EXPAND_SIZES', '[3, 3]'])
    assert_ok(result)
    # The file was read in place (nothing in the torch hub cache), and the transfer summary logged.
    assert not (tmp_path / 'torch_home' / 'hub' / 'checkpoints').exists()
    assert re.search(r'pretrained weights: copied \d+ tensors .*, resized 7 tensors .*, '
                     r'fresh 2 tensors \(34 weights\), ignored 0 tensors', result.stdout)
    log = (pathlib.Path(run_dir(out, 'finetune')) / 'log_rank0.txt').read_text()
    assert 'head.weight: (3, 16) -> (2, 16) fresh' in log
    assert 'layers.0.blocks.0.attn.relative_position_bias_table: (49, 1) -> (121, 1) resized' in log
    finetuned = load_weights(pathlib.Path(run_dir(out, 'finetune')) / 'ckpt_epoch_0.pth')
    assert finetuned['head.weight'].shape == (2, 16)
    assert finetuned['layers.0.blocks.0.attn.relative_position_bias_table'].shape == (121, 1)
