"""PaddleViT's files (tests/reference/paddlevit, written by PaddleViT's own code: generate.py there)
read by models.checkpoint into this model: the same logits as PaddleViT's, its training checkpoint's
EMA weights preferred, the six full-size layouts loading strictly, and main.py evaluating a
.pdparams end to end."""
import argparse
import json
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch

from config import get_config
from data.build import build_loader
from golden import relative_error
from helpers import assert_ok, run_main
from models.build import build_model
from models.checkpoint import from_paddle, read_checkpoint
from models.focal_transformer import FocalTransformer, checkpoint_filter_fn

PADDLEVIT = Path(__file__).resolve().parent / 'reference' / 'paddlevit'
PADDLEVIT_LAYOUTS = PADDLEVIT.parent / 'paddlevit_layouts.json'
# Named here rather than globbed, so that a missing file fails instead of shrinking the tests.
CASES = ('conv_embed', 'fc_levels2', 'fc_levels2_paddle2', 'layerscale', 'level3_conv_pool', 'mean_prenorm_ape',
         'nofocal', 'pad_odd_window', 'shift_even', 'small_last_stage')
TRAINING_CASE = 'training_nofocal'
# float32 on both sides; measured 2e-6 at most (conv_embed).
BOUND = 1e-5


def reference(name):
    return json.loads((PADDLEVIT / f'{name}.json').read_text())


def seeded_input(case):
    """generate.py's input: noise plus twice a per-image colour offset, drawn in that order."""
    rng = np.random.default_rng(case['seed'])
    size = case['image_size']
    noise = rng.standard_normal((case['batch'], 3, size, size), dtype=np.float32)
    colour = rng.standard_normal((case['batch'], 3, 1, 1), dtype=np.float32)
    return torch.from_numpy(noise + 2 * colour)


def paddlevit_model(name):
    """Our model built with the case's arguments, strictly loaded from its .pdparams."""
    case = reference(name)
    model = FocalTransformer(**case['kwargs'])
    state_dict = read_checkpoint(PADDLEVIT / f'{name}.pdparams')
    model.load_state_dict(checkpoint_filter_fn(state_dict, model), strict=True)
    return model.eval(), case


def logits(model, case):
    with torch.no_grad():
        return model(seeded_input(case)).double()


def test_every_case_is_in_the_repository():
    files = sorted(path.name for path in PADDLEVIT.iterdir() if path.suffix in ('.json', '.pdparams'))
    names = CASES + (TRAINING_CASE,)
    assert files == sorted([f'{name}.json' for name in names] + [f'{name}.pdparams' for name in names])


def test_files_name_numpy_as_old_and_new_numpy_do():
    """PaddleViT's releases (2021: paddle 2.1, numpy 1) pickle numpy.core.multiarray's reconstructor,
    files of numpy 2 numpy._core's: one case is written by each (paddle 2.6.2 with numpy 1.26.4)."""
    old = (PADDLEVIT / 'fc_levels2_paddle2.pdparams').read_bytes()
    new = (PADDLEVIT / 'fc_levels2.pdparams').read_bytes()
    assert b'numpy.core.multiarray' in old and b'numpy._core' not in old
    assert b'numpy._core.multiarray' in new and b'numpy.core' not in new


@pytest.mark.parametrize('name', CASES)
def test_logits_match_paddlevit(name):
    model, case = paddlevit_model(name)
    expected = torch.tensor(case['output'], dtype=torch.float64)
    actual = logits(model, case)
    error = relative_error(actual, expected)
    print(f'{name}: relative error {error:.2e}, largest difference {(actual - expected).abs().max().item():.2e}')
    assert error < BOUND
    # the logits depend on the image (a model that ignored it would match only its mean)
    assert relative_error(expected[1], expected[0]) > 0.1


def test_training_checkpoint_gives_its_ema_weights():
    """PaddleViT's `-pretrained` (its evaluation and fine-tuning) takes model_ema over model."""
    model, case = paddlevit_model(TRAINING_CASE)
    actual = logits(model, case)
    assert relative_error(actual, torch.tensor(case['output'], dtype=torch.float64)) < BOUND
    trained = torch.tensor(case['model_output'], dtype=torch.float64)
    assert relative_error(actual, trained) > 1e-3


def paddle_zero_state_dict(layout):
    """What paddle.save writes for a model of `layout`, zeros for values: numpy arrays in Paddle's
    shapes and the structured-name table."""
    state_dict = {key: np.zeros(entry['shape'], dtype=entry['dtype']) for key, entry in layout.items()}
    state_dict['StructuredToParameterName@@'] = {key: f'var_{i}' for i, key in enumerate(layout)}
    return state_dict


@pytest.mark.parametrize('name', sorted(json.loads(PADDLEVIT_LAYOUTS.read_text())))
def test_full_size_layout_loads_into_registered_model(name):
    layout = json.loads(PADDLEVIT_LAYOUTS.read_text())[name]['state_dict']
    model = timm.create_model(name)
    converted = checkpoint_filter_fn(from_paddle(paddle_zero_state_dict(layout)), model)
    model.load_state_dict(converted, strict=True)

    del converted['layers.2.blocks.1.attn.qkv.weight']
    with pytest.raises(RuntimeError, match=r'Missing key.*layers\.2\.blocks\.1\.attn\.qkv\.weight'):
        model.load_state_dict(converted, strict=True)


DIGITS_CONFIG = """\
DATA:
  DATASET: digits
  IMG_SIZE: {img_size}
  BATCH_SIZE: 120
  NUM_WORKERS: 0
  PIN_MEMORY: False
MODEL:
  NAME: paddlevit_{name}
  NUM_CLASSES: {num_classes}
  DROP_PATH_RATE: 0.0
  FOCAL:
    EMBED_DIM: {embed_dim}
    DEPTHS: {depths}
    NUM_HEADS: {num_heads}
    WINDOW_SIZE: {window_size}
    FOCAL_POOL: {focal_pool}
    FOCAL_STAGES: {focal_stages}
    FOCAL_LEVELS: {focal_levels}
    FOCAL_WINDOWS: {focal_windows}
    EXPAND_SIZES: {expand_sizes}
"""


def test_main_evaluates_a_pdparams(tmp_path):
    """`main.py --eval --resume <PaddleViT training checkpoint>` on the digits: the loss and top-1
    of the EMA weights, computed here with the model checked against PaddleViT above."""
    case = reference(TRAINING_CASE)
    cfg = tmp_path / 'paddlevit.yaml'
    cfg.write_text(DIGITS_CONFIG.format(name=TRAINING_CASE, **case['kwargs']))
    data = tmp_path / 'digits'
    pdparams = PADDLEVIT / f'{TRAINING_CASE}.pdparams'
    result = run_main(tmp_path, ['--cfg', str(cfg), '--data-path', str(data), '--output', str(tmp_path / 'out'),
                                 '--eval', '--resume', str(pdparams)])
    assert_ok(result)
    output = result.stdout + result.stderr
    acc1 = float(re.findall(r' \* Acc@1 ([0-9.]+) Acc@5', output)[-1])
    loss, count = re.findall(r' \* loss ([0-9.]+) over (\d+) images', output)[-1]

    config = get_config(argparse.Namespace(cfg=str(cfg), data_path=str(data), eval=True,
                                           output=str(tmp_path / 'here')))
    _, loader, _ = build_loader(config)
    model, _ = paddlevit_model(TRAINING_CASE)
    assert relative_error(logits(model, case), torch.tensor(case['output'], dtype=torch.float64)) < BOUND
    assert set(build_model(config).state_dict()) == set(model.state_dict())
    loss_sum, hits, seen = 0., 0, 0
    with torch.no_grad():
        for images, targets in loader:
            outputs = model(images)
            loss_sum += torch.nn.functional.cross_entropy(outputs, targets, reduction='sum').item()
            hits += (outputs.argmax(1) == targets).sum().item()
            seen += len(targets)
    assert int(count) == seen == 360
    assert float(loss) == pytest.approx(loss_sum / seen, rel=1e-5, abs=1e-6)
    assert acc1 == pytest.approx(100 * hits / seen, abs=1e-3)
