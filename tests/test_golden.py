"""The model reproduces the reference implementation on every golden case of shared/reference."""
import copy
from pathlib import Path

import pytest
import torch

from models.focal_transformer import FocalTransformer, checkpoint_filter_fn

REFERENCE = Path(__file__).resolve().parents[2] / 'shared' / 'reference'
GOLDEN = sorted((REFERENCE / 'golden').glob('*.pt'))
WITH_GRADS = [path for path in GOLDEN if path.stem in ('micro_fc_224', 'micro_shift_even_224')]

pytestmark = pytest.mark.skipif(not GOLDEN, reason=f'no golden files under {REFERENCE}')


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).norm() / expected.norm()).item()


def load_case(path: Path):
    case = torch.load(path, weights_only=False)
    model = FocalTransformer(**case['kwargs'])
    model.load_state_dict(checkpoint_filter_fn(case['state_dict'], model), strict=True)
    return case, model


def test_all_golden_cases_present():
    assert len(GOLDEN) == 8
    assert len(WITH_GRADS) == 2


@pytest.mark.parametrize('path', GOLDEN, ids=lambda p: p.stem)
def test_output_parameters_and_flops(path):
    case, model = load_case(path)
    assert sum(p.numel() for p in model.parameters()) == case['n_parameters']
    assert model.flops() == pytest.approx(case['flops'], rel=1e-12)
    model.eval()
    with torch.no_grad():
        output = model(case['input'])
    assert relative_error(output, case['output']) < 1e-5


@pytest.mark.parametrize('path', WITH_GRADS, ids=lambda p: p.stem)
@pytest.mark.parametrize('use_checkpoint', [False, True], ids=['plain', 'grad_checkpointing'])
def test_gradients(path, use_checkpoint):
    case, model = load_case(path)
    model.set_grad_checkpointing(use_checkpoint)
    model.train()
    loss = (model(case['input']) * case['grad_weight']).sum()
    loss.backward()
    assert loss.item() == pytest.approx(float(case['loss']), rel=1e-5)
    params = dict(model.named_parameters())
    assert set(case['grads']) == set(params)
    for name, expected in case['grads'].items():
        assert relative_error(params[name].grad, expected) < 1e-4, name


def test_attention_dropout_path_matches_fused_path_when_dropout_is_zero():
    """Training with attention dropout takes PyTorch's own SDPA path; at p=0 both paths agree."""
    case, model = load_case(REFERENCE / 'golden' / 'micro_fc_224.pt')
    fused = copy.deepcopy(model)
    for block in (b for stage in model.layers for b in stage.blocks):
        block.attn.attn_drop = 1e-30  # any positive rate selects the SDPA path; this one drops nothing
    for m in (model, fused):
        m.train()
        (m(case['input']) * case['grad_weight']).sum().backward()
    for (name, p), q in zip(model.named_parameters(), fused.parameters()):
        assert relative_error(p.grad, q.grad) < 1e-5, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('path', WITH_GRADS, ids=lambda p: p.stem)
def test_cuda_float32_and_bf16(path):
    case, model = load_case(path)
    model = model.cuda().eval()
    inputs = case['input'].cuda()
    with torch.no_grad():
        assert relative_error(model(inputs).cpu(), case['output']) < 1e-4
        with torch.autocast('cuda', dtype=torch.bfloat16):
            assert relative_error(model(inputs).float().cpu(), case['output']) < 5e-2
    model.train()
    (model(inputs) * case['grad_weight'].cuda()).sum().backward()
    params = dict(model.named_parameters())
    for name, expected in case['grads'].items():
        assert relative_error(params[name].grad.cpu(), expected) < 1e-3, name
