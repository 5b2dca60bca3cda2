"""The fused attention's Triton kernels run by Triton's CPU interpreter against plain PyTorch attention.

Run by tests/test_triton_attention.py in a subprocess with TRITON_INTERPRET=1 (Triton reads it when
models.triton_attention defines its kernels). Prints one JSON line per case: the relative error
(‖fused − reference‖ / ‖reference‖) of the output and of each gradient, and exact checks. The
reference gathers rows, adds bias and mask, softmaxes and scatters in float64, from the same
(rounded) inputs, with autograd for the gradients.
"""
import json
import os
import sys

import torch

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.path.dirname(os.path.abspath(__file__))]

import models.window_attention  # noqa: E402
from helpers import TINY_KWARGS  # noqa: E402
from models.attention_tables import attention_tables, neighbour_key_positions  # noqa: E402
from models.focal_transformer import FocalAttention, FocalTransformer  # noqa: E402
from models.triton_attention import fused_window_attention  # noqa: E402

SCALE = 0.3


def reference_attention(qkv, query_index, key_index, bias, mask, scale):
    """Plain attention of window_attention's semantics; bias (nH, ws², n_keys) or (nW, nH, ws², n_keys)."""
    B, C = qkv.shape[0], qkv.shape[2] // 3
    num_windows, num_keys = key_index.shape
    num_heads, queries = bias.shape[-3], bias.shape[-2]
    head_dim = C // num_heads
    q = qkv[:, query_index, :C].view(B, num_windows, queries, num_heads, head_dim).transpose(2, 3)
    k, v = qkv[:, key_index, C:].view(B, num_windows, num_keys, 2, num_heads, head_dim).permute(3, 0, 1, 4, 2, 5)
    logits = q @ k.transpose(-2, -1) * scale + bias.expand(num_windows, num_heads, queries, num_keys)
    if mask is not None:
        logits = logits + mask.unsqueeze(1).to(logits.dtype)
    windows = torch.softmax(logits, dim=-1) @ v
    out = torch.zeros(B, num_windows * queries, C, dtype=qkv.dtype)
    out[:, query_index] = windows.transpose(2, 3).reshape(B, num_windows * queries, C)
    return out


def relative_error(got, expected) -> float:
    expected = expected.double()
    return ((got.double() - expected).norm() / expected.norm()).item()


def output_weight(qkv, query_index):
    """The loss is Σ out·weight, so that every output element has its own gradient."""
    return torch.randn(qkv.shape[0], query_index.shape[0], qkv.shape[2] // 3,
                       generator=torch.Generator().manual_seed(1))


def run_case(name, dtype, qkv, query_index, key_index, bias, mask, checks=()):
    """Fused output and gradients against the reference; `checks` adds named exact conditions on them.
    Returns the fused gradients of qkv and bias."""
    qkv, bias = qkv.to(dtype), bias.to(dtype)
    weight = output_weight(qkv, query_index)
    rows, table = qkv.clone().requires_grad_(), bias.clone().requires_grad_()
    out = fused_window_attention(rows, query_index, key_index, table, mask, SCALE)
    grad_rows, grad_bias = torch.autograd.grad((out.float() * weight).sum(), (rows, table))
    exact_rows, exact_table = qkv.double().requires_grad_(), bias.double().requires_grad_()
    expected = reference_attention(exact_rows, query_index, key_index, exact_table, mask, SCALE)
    expected_rows, expected_bias = torch.autograd.grad((expected * weight.double()).sum(), (exact_rows, exact_table))
    C = qkv.shape[2] // 3
    errors = {'output': relative_error(out, expected), 'bias': relative_error(grad_bias, expected_bias)}
    for index, part in enumerate('qkv'):
        errors[part] = relative_error(grad_rows[..., index * C:(index + 1) * C],
                                      expected_rows[..., index * C:(index + 1) * C])
    result = {'case': name, 'dtype': str(dtype).replace('torch.', ''), 'errors': errors,
              'finite': bool(torch.isfinite(out).all() and torch.isfinite(grad_rows).all()
                             and torch.isfinite(grad_bias).all())}
    for check_name, check in checks:
        result[check_name] = bool(check(qkv, bias, out, grad_rows, grad_bias))
    print(json.dumps(result), flush=True)
    return grad_rows, grad_bias


def shared_slots(dtype, per_window_bias):
    """Random rows, several slots of one window reading one row and windows reading each other's rows;
    3 images (the backward groups images per program, under the interpreter 2 and 1); 9 queries and
    70 slots (partial query and key blocks); head dim 8 (padded to 16). The last row is loud and read
    only by masked slots: it must change nothing and get an exactly zero gradient, as the masked bias
    entries. With per_window_bias, bias and mask come added, per window (the kernel's other bias form)."""
    generator = torch.Generator().manual_seed(0)
    B, num_heads, num_windows, queries, num_keys, head_dim = 3, 2, 3, 9, 70, 8
    C, tokens = num_heads * head_dim, num_windows * queries + 6
    query_index = torch.randperm(num_windows * queries, generator=generator)
    key_index = torch.randint(0, tokens - 1, (num_windows, num_keys), generator=generator)
    key_index[:, -5:] = tokens - 1
    qkv = torch.randn(B, tokens, 3 * C, generator=generator)
    qkv[:, -1, C:] = 1e3 * torch.randn(B, 2 * C, generator=generator)
    mask = torch.zeros(num_windows, 1, num_keys)
    mask[..., -5:] = float('-inf')
    mask[1, 0, :3] = float('-inf')
    bias = torch.randn(num_heads, queries, num_keys, generator=generator)
    if per_window_bias:
        bias, mask = bias.expand(num_windows, -1, -1, -1) + mask.unsqueeze(1), None

    def quiet_output(qkv, bias):
        quiet = qkv.clone()
        quiet[:, -1] = 0
        return fused_window_attention(quiet, query_index, key_index, bias, mask, SCALE)

    checks = [('loud_row_gradient_zero', lambda qkv, bias, out, grad_rows, grad_bias: (grad_rows[:, -1] == 0).all()),
              ('masked_bias_gradient_zero', lambda qkv, bias, out, grad_rows, grad_bias:
               (grad_bias[..., -5:] == 0).all()),
              ('loud_row_changes_nothing', lambda qkv, bias, out, grad_rows, grad_bias:
               torch.equal(out, quiet_output(qkv, bias)))]
    name = 'per-window-bias' if per_window_bias else 'shared-slots'
    grads = run_case(name, dtype, qkv, query_index, key_index, bias, mask, checks)
    if dtype == torch.float32 and not per_window_bias:
        one_gradient(name, qkv, query_index, key_index, bias, mask, grads)


def negative_logits(dtype, offset):
    """Every logit far below zero (the bias shifted by `offset`, which softmax ignores): the log-sum-exp is
    then far below zero too, and the backward's key columns past the last slot (partial key block), whose
    logits are 0, would overflow to inf, inf·0 = NaN in dQ, if their probabilities were not zeroed."""
    generator = torch.Generator().manual_seed(4)
    B, num_heads, num_windows, queries, num_keys, head_dim = 1, 1, 2, 9, 70, 8
    C, tokens = num_heads * head_dim, num_windows * queries
    query_index = torch.randperm(tokens, generator=generator)
    key_index = torch.randint(0, tokens, (num_windows, num_keys), generator=generator)
    qkv = torch.randn(B, tokens, 3 * C, generator=generator)
    bias = torch.randn(num_heads, queries, num_keys, generator=generator) + offset
    run_case('negative-logits', dtype, qkv, query_index, key_index, bias, None)


def one_gradient(name, qkv, query_index, key_index, bias, mask, grads):
    """Bias-only training (frozen projections) and rows-only: each gradient alone equals the one computed
    beside the other (`grads`, run_case's)."""
    weight = output_weight(qkv, query_index)
    table = bias.clone().requires_grad_()
    bias_only = torch.autograd.grad((fused_window_attention(qkv, query_index, key_index, table, mask, SCALE)
                                     * weight).sum(), table)[0]
    rows = qkv.clone().requires_grad_()
    rows_only = torch.autograd.grad((fused_window_attention(rows, query_index, key_index, bias, mask, SCALE)
                                     * weight).sum(), rows)[0]
    print(json.dumps({'case': name + '-one-gradient', 'bias_only_equal': torch.equal(bias_only, grads[1]),
                      'rows_only_equal': torch.equal(rows_only, grads[0])}), flush=True)


def focal_layout(name, dtype, map_size, window_size, expand_size, shift_size, focal_window, pooled_levels,
                 num_heads, head_dim, batch):
    """A block's real tables on an odd map, padded up to the window: the padding rows hold one row (the
    projection of the zero padding), neighbour slots wrap around, pooled cells are read by many windows
    (out-of-grid cells masked), and with a shift the mask differs per query."""
    generator = torch.Generator().manual_seed(2)
    H, W = map_size
    Hp, Wp = -(-H // window_size) * window_size, -(-W // window_size) * window_size
    positions = neighbour_key_positions(window_size, expand_size) if expand_size else None
    query_index, key_index, mask = attention_tables((Hp, Wp), window_size, shift_size, focal_window, pooled_levels,
                                                    positions, torch.device('cpu'))
    num_windows, queries = key_index.shape[0], window_size ** 2
    cells = sum(num_windows << (2 * k) for k in range(pooled_levels))
    C = num_heads * head_dim
    qkv = torch.randn(batch, Hp * Wp + cells, 3 * C, generator=generator)
    padded = torch.ones(Hp, Wp, dtype=torch.bool)
    padded[:H, :W] = False
    qkv[:, :Hp * Wp][:, padded.flatten()] = torch.randn(3 * C, generator=generator)
    bias = torch.randn(num_heads, queries, key_index.shape[1], generator=generator)
    run_case(name, dtype, qkv, query_index, key_index, bias, mask)


def model_training_step():
    """A tiny model's attention outputs (each block's, whose small contribution the residual would hide
    in the logits) and parameter gradients with window_attention's path choice pointed at the fused
    kernels (on the CPU it never chooses them; the interpreter runs them there), against the model's own
    CPU path, float32: two blocks a stage (a shifted one), a 30 px image (7x7 map padded to 8x8), the
    bias summed with the mask per window (the kernel's other bias form)."""
    torch.manual_seed(0)
    model = FocalTransformer(**dict(TINY_KWARGS, depths=[2, 2], use_shift=True, drop_path_rate=0.))
    images = torch.randn(2, 3, 30, 30)
    attention_outputs = []
    for module in model.modules():
        if isinstance(module, FocalAttention):
            module.register_forward_hook(lambda module, inputs, output: attention_outputs.append(output.detach()))
    results = []
    choose_path = models.window_attention._attention_path
    for path in (choose_path, lambda *args: 'cuda-fused'):
        models.window_attention._attention_path = path
        model.zero_grad()
        attention_outputs.clear()
        model(images).logsumexp(-1).sum().backward()
        results.append((list(attention_outputs), {name: p.grad.clone() for name, p in model.named_parameters()}))
    models.window_attention._attention_path = choose_path
    (expected, expected_grads), (outputs, grads) = results
    print(json.dumps({'case': 'model-training-step', 'dtype': 'float32', 'errors': {
        'attention outputs': max(relative_error(got, want) for got, want in zip(outputs, expected)),
        'parameters': max(relative_error(grads[name], expected_grads[name]) for name in grads
                          if expected_grads[name].norm() > 0)}}), flush=True)


def custom_op_check():
    """torch.library.opcheck of the custom op: its schema, autograd registration, fake (meta) outputs
    against the real ones (shapes, strides, dtypes: what torch.compile plans with) and AOT autograd with
    dynamic shapes, backward included."""
    generator = torch.Generator().manual_seed(3)
    B, num_heads, num_windows, queries, num_keys, head_dim = 2, 2, 3, 9, 40, 16
    C, tokens = num_heads * head_dim, num_windows * queries + 4
    query_index = torch.randperm(num_windows * queries, generator=generator)
    key_index = torch.randint(0, tokens, (num_windows, num_keys), generator=generator)
    mask = torch.zeros(num_windows, 1, num_keys)
    mask[..., -3:] = float('-inf')
    qkv = torch.randn(B, tokens, 3 * C, generator=generator, requires_grad=True)
    bias = torch.randn(num_heads, queries, num_keys, generator=generator, requires_grad=True)
    results = torch.library.opcheck(torch.ops.focal.fused_window_attention.default,
                                    (qkv, query_index, key_index, bias, mask, SCALE))
    out, lse = torch.ops.focal.fused_window_attention(qkv.detach(), query_index, key_index, bias.detach(), mask, SCALE)
    backward = torch.library.opcheck(torch.ops.focal.fused_window_attention_backward.default,
                                     (torch.randn_like(out), qkv.detach(), query_index, key_index, bias.detach(),
                                      mask, out, lse, SCALE, True, True))
    results.update({f'backward {name}': outcome for name, outcome in backward.items()})
    print(json.dumps({'case': 'opcheck', 'results': results}), flush=True)


def main():
    custom_op_check()
    model_training_step()
    shared_slots(torch.float32, per_window_bias=True)
    # float32 overflows from 2**128, float16 from 2**16 (the base-2 logits are 1.44 times these)
    negative_logits(torch.float32, -100.)
    negative_logits(torch.float16, -20.)
    for dtype in (torch.float32, torch.float16):
        shared_slots(dtype, per_window_bias=False)
        # window 4, neighbours 2, shift 2, two pooled levels (9 + 16 cells): 89 slots, 16 queries
        focal_layout('shifted-odd-map', dtype, (11, 13), 4, 2, 2, 3, 2, 2, 8, 2)
    # the released models' stage 0 (window 7, neighbours 3, focal window 7: 230 slots, head dim 32),
    # the detection recipes' (focal window 15: 406 slots) and the 384 fine-tuning's (window 12,
    # neighbours 6: 144 queries in three blocks, 625 slots), on odd maps of two windows
    focal_layout('focal-t-stage-0', torch.float16, (13, 6), 7, 3, 0, 7, 1, 1, 32, 2)
    focal_layout('detection-stage-0', torch.float16, (6, 13), 7, 3, 0, 15, 1, 1, 32, 1)
    focal_layout('window-12-stage-0', torch.float16, (13, 11), 12, 6, 0, 7, 1, 1, 32, 1)


if __name__ == '__main__':
    main()
