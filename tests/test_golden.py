"""The model reproduces the reference implementation on every golden case of tests/reference, in
float32 and float64, forward and backward."""
import copy

import pytest
import torch

from golden import CASES, CASES_WITH_PROBES, REFERENCE, GoldenCase, relative_error
from models.window_attention import window_attention

# (dtype, bound on the outputs' relative error, bound on the gradient probes' relative error).
# Measured: float32 2e-7 and 3e-5; float64 4e-16 and 3e-14.
PRECISIONS = [pytest.param(torch.float32, 1e-5, 1e-4, id='float32'),
              pytest.param(torch.float64, 1e-12, 1e-9, id='float64')]


def test_every_case_is_in_the_repository():
    assert sorted(path.stem for path in (REFERENCE / 'golden').glob('*.json')) == sorted(CASES)
    for name in CASES_WITH_PROBES:
        assert set(GoldenCase(name).gradient_probes) == set(GoldenCase(name).data['parameters'])


@pytest.mark.parametrize('dtype, output_bound, probe_bound', PRECISIONS)
@pytest.mark.parametrize('name', CASES)
def test_output_parameters_and_flops(name, dtype, output_bound, probe_bound, cpu_attention):
    case = GoldenCase(name)
    model = case.model(dtype)
    assert sum(p.numel() for p in model.parameters()) == case.data['n_parameters']
    assert model.flops() == pytest.approx(case.data['flops'], rel=1e-12)
    model.eval()
    with torch.no_grad():
        output = model(case.input(dtype))
    assert output.dtype == dtype
    assert relative_error(output, case.output) < output_bound


def assert_probes_match(case: GoldenCase, model, bound: float):
    """Sum of squares relative to itself; the dot product with a unit-variance random direction
    relative to its scale, the gradient's norm (a relative error of the dot product alone would
    blow up where it happens to be near zero)."""
    expected = case.gradient_probes
    for name, (sum_of_squares, dot) in case.probes_of(model).items():
        expected_sum_of_squares, expected_dot = expected[name]
        assert abs(sum_of_squares - expected_sum_of_squares) < bound * expected_sum_of_squares, name
        assert abs(dot - expected_dot) < bound * expected_sum_of_squares.sqrt(), name


@pytest.mark.parametrize('use_checkpoint', [False, True], ids=['plain', 'grad_checkpointing'])
@pytest.mark.parametrize('dtype, output_bound, probe_bound', PRECISIONS)
@pytest.mark.parametrize('name', CASES_WITH_PROBES)
def test_gradient_probes(name, dtype, output_bound, probe_bound, use_checkpoint, cpu_attention):
    case = GoldenCase(name)
    model = case.model(dtype)
    model.set_grad_checkpointing(use_checkpoint)
    model.train()
    loss = (model(case.input(dtype)) * case.loss_weight(dtype)).sum()
    loss.backward()
    assert loss.item() == pytest.approx(case.loss, rel=output_bound)
    assert_probes_match(case, model, probe_bound)


def test_attention_dropout_path_matches_fused_path_when_dropout_is_zero():
    """Training with attention dropout takes PyTorch's own SDPA path; at p=0 both paths agree
    (in float64, so that rounding differences of the two paths do not hide a wrong gradient)."""
    case = GoldenCase('micro_fc_224')
    model = case.model(torch.float64)
    fused = copy.deepcopy(model)
    for block in (b for stage in model.layers for b in stage.blocks):
        block.attn.attn_drop = 1e-30  # any positive rate selects the SDPA path; this one drops nothing
    for m in (model, fused):
        m.train()
        (m(case.input(torch.float64)) * case.loss_weight(torch.float64)).sum().backward()
    for (name, p), q in zip(model.named_parameters(), fused.parameters()):
        assert relative_error(p.grad, q.grad) < 1e-10, name


@pytest.mark.parametrize('mask_rows', [1, 4], ids=['mask-per-window', 'mask-per-query'])
def test_window_attention_passes_gradcheck_in_float64(mask_rows, cpu_attention):
    """The hand-written backward of the CPU training attention against finite differences, with
    several images, key slots that read the same row, masked slots (per window, or per query as the
    shift mask is), and gradients for the q/k/v rows and the bias that every window shares. The
    tolerance is tight enough that rounding the probabilities through float32 fails it."""
    torch.manual_seed(0)
    batch, heads, windows, queries, keys, head_dim = 2, 2, 3, 4, 7, 5
    tokens = windows * queries + 2
    query_index = torch.randperm(windows * queries)
    key_index = torch.randint(0, tokens, (windows, keys))
    key_index[:, -2:] = tokens - 1
    qkv = torch.randn(batch, tokens, 3 * heads * head_dim, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(heads, queries, keys, dtype=torch.float64, requires_grad=True)
    mask = torch.zeros(windows, mask_rows, keys)
    mask[1:, :, -3:] = float('-inf')  # every window but the first: a slot no query sees
    mask[2, -1, 1] = float('-inf')    # and one more in one query row (all rows, per window)

    def attention(qkv, bias):
        out = window_attention(qkv, query_index, key_index, bias, mask, 0.3, training=True)
        assert type(out.grad_fn).__name__ == '_CpuTrainingAttentionBackward'
        return out

    assert torch.autograd.gradcheck(attention, (qkv, bias), atol=1e-8, rtol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a CUDA device')
@pytest.mark.parametrize('name', CASES_WITH_PROBES)
def test_cuda_float32_and_bf16(name):
    case = GoldenCase(name)
    model = case.model().cuda().eval()
    inputs = case.input().cuda()
    with torch.no_grad():
        assert relative_error(model(inputs).cpu(), case.output) < 1e-4
        with torch.autocast('cuda', dtype=torch.bfloat16):
            assert relative_error(model(inputs).float().cpu(), case.output) < 5e-2
    model.train()
    (model(inputs) * case.loss_weight().cuda()).sum().backward()
    assert_probes_match(case, model, 1e-3)
