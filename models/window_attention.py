"""Attention of each window's queries to its gathered key slots, on projected token rows.

A logit's additive bias comes in two parts, never summed for all windows at once: the learned bias
(heads, queries, key slots), the same for every window, and the 0 / -inf mask of each window (padding
of pooled cells outside the grid, the shift mask).

`window_attention` is the one entry point; it picks one implementation per call:
- 'cuda-fused': the Triton kernels of models/triton_attention.py (keys read by row index, bias added
  in the kernel, bias gradient reduced in it), on CUDA where `set_cuda_attention` asks for them.
- 'sdpa': PyTorch's `scaled_dot_product_attention` on the whole batch. Other devices, attention
  dropout, compiled or exported evaluation, TorchScript, and autograd outside the CPU training path.
- CPU training ('cpu-training-materialised' / 'cpu-training-fused'): an autograd Function that runs
  the evaluation forward and a hand-written backward a chunk of windows at a time. PyTorch's fused
  CPU kernel has no gradient for the bias, so SDPA would fall back to its unfused path, which keeps
  every attention matrix and the gathered keys for the backward pass.
- CPU evaluation ('cpu-materialised' / 'cpu-fused'): one image and one chunk of windows at a time, so
  that its gathered rows stay in cache.

On the CPU the logits are either materialised between batched matrix products or left to PyTorch's
fused kernel, a chunk of windows at a time; bias and the chunk's mask are summed for that chunk only.
`set_cpu_attention` chooses which, as timm's `set_fused_attn` chooses its kernels.
"""
import functools
from typing import Tuple

import torch
import torch.nn.functional as F
from timm.models import register_notrace_function

from .triton_attention import fused_attention_unsupported, fused_window_attention

__all__ = ['window_attention', 'set_cpu_attention', 'cpu_attention_kernel', 'cpu_bf16_instructions',
           'set_cuda_attention', 'cuda_attention_kernel']

CPU_KERNELS = ('auto', 'materialised', 'fused')
CUDA_KERNELS = ('auto', 'fused', 'sdpa')
# Logits of a chunk of windows: small enough that the chunk's gathered keys, their head-major copies
# and the logits stay in cache together.
DEFAULT_CHUNK_BYTES = 2 << 20

_cpu_kernel = 'auto'
_chunk_bytes = DEFAULT_CHUNK_BYTES
_cuda_kernel = 'sdpa'


@functools.lru_cache(maxsize=None)  # asked by every bf16 block's forward; the CPU does not change
def cpu_bf16_instructions() -> Tuple[str, ...]:
    """The bf16 dot-product instruction sets PyTorch found on this CPU ('avx512_bf16', 'amx_bf16');
    without them bf16 products are emulated."""
    capabilities = torch.cpu.get_capabilities()
    return tuple(isa for isa in ('avx512_bf16', 'amx_bf16') if capabilities.get(isa))


def set_cpu_attention(kernel: str = 'auto', chunk_bytes: int = DEFAULT_CHUNK_BYTES):
    """Choose how CPU attention computes (for every model in this process).

    kernel: 'materialised' computes the logits between batched products, a chunk of windows at a time
    (in bf16 as autocast's own matmuls would: logits rounded to bf16, softmax accumulated in float32),
    in every dtype but float16, whose range might not hold the logits; 'fused' takes PyTorch's fused
    kernel, which computes in float32; 'auto' (the default) materialises float32, float64 and, where
    the CPU has bf16 dot-product instructions (`cpu_bf16_instructions()`), bf16.
    chunk_bytes: the logits of one chunk of windows, at most (a chunk holds at least one window).
    Under torch.compile the fused kernel always runs on all windows at once, since the traced loop
    over chunks would be unrolled.
    """
    global _cpu_kernel, _chunk_bytes
    if kernel not in CPU_KERNELS:
        raise ValueError(f'CPU attention kernel {kernel!r} is not one of {CPU_KERNELS}')
    if chunk_bytes < 1:
        raise ValueError(f'chunk_bytes must be positive, got {chunk_bytes}')
    _cpu_kernel, _chunk_bytes = kernel, chunk_bytes


def cpu_attention_kernel(dtype: torch.dtype) -> str:
    """'materialised' or 'fused': what CPU attention in `dtype` runs now (see set_cpu_attention)."""
    if torch.compiler.is_compiling() or dtype == torch.float16 or _cpu_kernel == 'fused':
        return 'fused'
    if _cpu_kernel == 'materialised' or dtype in (torch.float32, torch.float64):
        return 'materialised'
    return 'materialised' if dtype == torch.bfloat16 and cpu_bf16_instructions() else 'fused'


def set_cuda_attention(kernel: str = 'sdpa'):
    """Choose how CUDA attention computes, training and inference (for every model in this process).

    kernel: 'sdpa' (the default until a GPU run measures the fused kernel faster: benchmarks/README.md)
    PyTorch's scaled_dot_product_attention; 'fused' the Triton kernels of models/triton_attention.py,
    a ValueError where they cannot run the case (attention dropout, no Triton, a float64 model);
    'auto' the fused kernels where they can, SDPA otherwise.
    """
    global _cuda_kernel
    if kernel not in CUDA_KERNELS:
        raise ValueError(f'CUDA attention kernel {kernel!r} is not one of {CUDA_KERNELS}')
    _cuda_kernel = kernel


def cuda_attention_kernel(qkv: torch.Tensor, bias: torch.Tensor, dropout_p: float) -> str:
    """'fused' or 'sdpa': what CUDA attention runs now for these arguments (see set_cuda_attention)."""
    if _cuda_kernel == 'sdpa':
        return 'sdpa'
    unsupported = fused_attention_unsupported(qkv, bias, dropout_p)
    if unsupported is not None and _cuda_kernel == 'fused':
        raise ValueError(f"set_cuda_attention('fused'): {unsupported}")
    return 'sdpa' if unsupported else 'fused'


def _attention_path(qkv: torch.Tensor, bias: torch.Tensor, dropout_p: float, training: bool) -> str:
    """The implementation window_attention runs for these arguments (see the module docstring)."""
    if qkv.device.type == 'cuda' and cuda_attention_kernel(qkv, bias, dropout_p) == 'fused':
        return 'cuda-fused'
    if qkv.device.type != 'cpu' or dropout_p > 0.:
        return 'sdpa'
    if torch.is_grad_enabled():
        return 'cpu-training-' + cpu_attention_kernel(qkv.dtype) if training and bias.requires_grad else 'sdpa'
    return 'sdpa' if torch.compiler.is_compiling() else 'cpu-' + cpu_attention_kernel(qkv.dtype)


@register_notrace_function
def window_attention(qkv: torch.Tensor, query_index: torch.Tensor, key_index: torch.Tensor, bias: torch.Tensor,
                     mask: torch.Tensor, scale: float, dropout_p: float = 0., training: bool = False) -> torch.Tensor:
    """Windowed attention on projected token rows.

    qkv (B, T, 3C): q, k and v of each token, heads interleaved within each; query_index (nW·ws²,)
    the rows whose queries attend, window by window (a permutation of the map's rows 0..nW·ws²-1);
    key_index (nW, n_keys) the rows each window's key slots read; bias (nH, ws², n_keys) the learned
    logit bias, the same for every window and image; mask (nW, ws² or 1, n_keys) of 0 / -inf, the
    window's own (1: the same for all its queries), without gradient. A logit is
    q·k·scale + bias[head, query, slot] + mask[window, query, slot]. Returns (B, nW·ws², C): row i is
    the output of the query in row i. The gradient of the bias comes back summed over windows and
    images.
    """
    if not torch.jit.is_scripting():
        path = _attention_path(qkv, bias, dropout_p, training)
        if path == 'cuda-fused':
            return fused_window_attention(qkv, query_index, key_index, bias, mask, scale)
        if path.startswith('cpu-training-'):
            return _CpuTrainingAttention.apply(qkv, query_index, key_index, bias, mask, scale,
                                               path == 'cpu-training-materialised')
        if path == 'cpu-materialised':
            return _cpu_materialised_attention(qkv, query_index, key_index, bias, mask, scale)
        if path == 'cpu-fused':
            return _cpu_fused_attention(qkv, query_index, key_index, bias, mask, scale)[0]
        if torch.is_grad_enabled() and bias.requires_grad and not qkv.requires_grad:
            # Only the bias tables train here (frozen projections, first block). SDPA then skips the
            # log-sum-exp that CUDA's memory-efficient backward reads to get the bias gradient, and
            # that backward reads memory it does not own (pytorch/pytorch#148476). Rows that ask for
            # a gradient (thrown away) make the forward keep it.
            qkv = qkv.detach().requires_grad_()
    return _sdpa_attention(qkv, query_index, key_index, bias, mask, scale, dropout_p)


def _sdpa_attention(qkv: torch.Tensor, query_index: torch.Tensor, key_index: torch.Tensor, bias: torch.Tensor,
                    mask: torch.Tensor, scale: float, dropout_p: float) -> torch.Tensor:
    num_windows, num_keys = key_index.shape[0], key_index.shape[1]
    num_heads, queries = bias.shape[0], bias.shape[1]
    B, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    head_dim = C // num_heads
    # Heads and windows merged into SDPA's head dimension, heads outermost: gathering tokens from a
    # head-major view of the rows writes q, k and v in that order directly, with no copy after.
    q_rows, k_rows, v_rows = qkv.view(B, T, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    keys = key_index.flatten()
    q = q_rows.index_select(2, query_index).view(B, num_heads * num_windows, queries, head_dim)
    k = k_rows.index_select(2, keys).view(B, num_heads * num_windows, num_keys, head_dim)
    v = v_rows.index_select(2, keys).view(B, num_heads * num_windows, num_keys, head_dim)
    # SDPA takes one additive mask: bias and mask summed, (nH, nW, ws², n_keys), head-major too
    attn_mask = (bias.unsqueeze(1) + mask.to(bias.dtype)).flatten(0, 1).unsqueeze(0).to(q.dtype)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, scale=scale)
    # a view where SDPA returns heads outermost (CPU), a copy where windows·heads are innermost (CUDA)
    out = out.reshape(B, num_heads, num_windows * queries, head_dim).transpose(1, 2)
    # query_index is a permutation of the rows, so every row of the empty tensor is written
    return out.new_empty(out.shape).index_copy(1, query_index, out).view(B, -1, C)


def _gather_buffers(qkv: torch.Tensor, query_index: torch.Tensor,
                    key_index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Memory for one image's gathered query rows and key/value rows, reused for every image of a
    batch: fresh buffers of this size come back from the allocator as new pages, and filling those
    costs more than the gather itself."""
    C = qkv.shape[-1] // 3
    return qkv.new_empty(query_index.shape[0], C), qkv.new_empty(key_index.numel(), 2 * C)


def _window_qkv(qkv: torch.Tensor, query_index: torch.Tensor, key_index: torch.Tensor, num_heads: int,
                buffers: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's q, k, v for attention with windows as the batch: (nW, nH, ws², hd) and twice
    (nW, nH, n_keys, hd), views of the gathered (token, channel) rows.

    Whole rows are gathered (all heads, keys and values of a token together), a plain copy per row
    rather than a strided one per head; the fused CPU kernel reads the head and key strides as they come.
    """
    C = qkv.shape[1] // 3
    num_windows, num_keys = key_index.shape[0], key_index.shape[1]
    head_dim = C // num_heads
    q = torch.index_select(qkv[:, :C], 0, query_index, out=buffers[0])
    kv = torch.index_select(qkv[:, C:], 0, key_index.flatten(), out=buffers[1])
    q = q.view(num_windows, -1, num_heads, head_dim).transpose(1, 2)
    kv = kv.view(num_windows, num_keys, 2, num_heads, head_dim)
    return q, kv[:, :, 0].transpose(1, 2), kv[:, :, 1].transpose(1, 2)


def _head_major_buffers(qkv: torch.Tensor, bias: torch.Tensor,
                        num_windows: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reused memory for the q (nW, nH, ws², hd), k and v (each nW, nH, n_keys, hd, stacked) and logits
    (nW, nH, ws², n_keys) of num_windows windows."""
    num_heads, queries, num_keys = bias.shape[0], bias.shape[1], bias.shape[2]
    head_dim = qkv.shape[-1] // 3 // num_heads
    return (qkv.new_empty(num_windows, num_heads, queries, head_dim),
            qkv.new_empty(2, num_windows, num_heads, num_keys, head_dim),
            qkv.new_empty(num_windows, num_heads, queries, num_keys))


def _masked_bias(bias: torch.Tensor, mask: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """bias (nH, ws², n_keys) plus a chunk's mask (n, ws² or 1, n_keys), written into out (n, nH, ws², n_keys):
    the learned bias is shared by every window, so only a chunk's worth of the sum ever exists."""
    return torch.add(bias, mask.unsqueeze(1), out=out)


def _chunk_logits(q_heads: torch.Tensor, k_heads: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor,
                  scale: float, logits: torch.Tensor) -> torch.Tensor:
    """q·kᵀ·scale + bias + mask of a chunk of windows, computed in `logits`; all (n, nH, ·, ·) and contiguous,
    so that windows and heads form the batch of one product, which accumulates onto bias + mask."""
    queries, num_keys, head_dim = logits.shape[-2], logits.shape[-1], q_heads.shape[-1]
    _masked_bias(bias, mask, logits)
    logits.view(-1, queries, num_keys).baddbmm_(q_heads.view(-1, queries, head_dim),
                                                k_heads.view(-1, num_keys, head_dim).transpose(1, 2), alpha=scale)
    return logits


def _softmax_probabilities(q_heads: torch.Tensor, k_heads: torch.Tensor, bias: torch.Tensor, mask: torch.Tensor,
                           scale: float, logits: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ·scale + bias + mask) of a chunk of windows, computed in `logits` (see _chunk_logits)."""
    return torch.softmax(_chunk_logits(q_heads, k_heads, bias, mask, scale, logits), -1, out=logits)


def _window_rows(out: torch.Tensor) -> torch.Tensor:
    """(nW, nH, ws², hd) attention output -> (nW·ws², C) rows in window order."""
    return out.transpose(1, 2).reshape(-1, out.shape[1] * out.shape[3])


def _window_chunk(qkv: torch.Tensor, bias: torch.Tensor, num_windows: int) -> int:
    """Windows per chunk of CPU attention: as many as keep their logits within set_cpu_attention's
    chunk_bytes; all of them under torch.compile, which unrolls the loop over chunks into the graph."""
    if torch.compiler.is_compiling():
        return num_windows
    return max(1, min(num_windows, _chunk_bytes // (bias.numel() * qkv.element_size())))


def _chunk_rows(qkv: torch.Tensor, query_index: torch.Tensor, key_index: torch.Tensor, start: int, count: int,
                row_buffers: Tuple[torch.Tensor, torch.Tensor], num_heads: int):
    """One image's q, k, v for windows start..start+count, gathered as rows into row_buffers (see
    _window_qkv). Returns the chunk's query rows, its key slots (count, n_keys) and the q, k, v views."""
    queries = query_index.shape[0] // key_index.shape[0]
    rows, keys = query_index[start * queries:(start + count) * queries], key_index[start:start + count]
    q, k, v = _window_qkv(qkv, rows, keys, num_heads, (row_buffers[0][:rows.shape[0]], row_buffers[1][:keys.numel()]))
    return rows, keys, q, k, v


def _cpu_fused_attention(qkv: torch.Tensor, query_index: torch.Tensor, key_index: torch.Tensor, bias: torch.Tensor,
                         mask: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """window_attention by PyTorch's fused CPU kernel, one image and one chunk of windows at a time in reused
    buffers (the kernel takes one additive mask: bias + mask of the chunk's windows): the output and the
    kernel's log-sum-exp (B, nW, nH, ws²), which the training backward reads."""
    num_windows, num_heads, queries = key_index.shape[0], bias.shape[0], bias.shape[1]
    chunk = _window_chunk(qkv, bias, num_windows)
    out = qkv.new_empty(qkv.shape[0], query_index.shape[0], qkv.shape[2] // 3)
    lse = []
    row_buffers = _gather_buffers(qkv, query_index[:chunk * queries], key_index[:chunk])
    attn_mask = qkv.new_empty(chunk, *bias.shape)
    for b in range(qkv.shape[0]):
        for start in range(0, num_windows, chunk):
            n = min(chunk, num_windows - start)
            rows, _, q, k, v = _chunk_rows(qkv[b], query_index, key_index, start, n, row_buffers, num_heads)
            out_chunk, lse_chunk = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                q, k, v, attn_mask=_masked_bias(bias, mask[start:start + n], attn_mask[:n]), scale=scale)
            out[b].index_copy_(0, rows, _window_rows(out_chunk))
            lse.append(lse_chunk)
    return out, torch.cat(lse).view(qkv.shape[0], num_windows, num_heads, queries)


def _chunk_heads(qkv: torch.Tensor, query_index: torch.Tensor, key_index: torch.Tensor, start: int, count: int,
                 row_buffers: Tuple[torch.Tensor, torch.Tensor], q_heads: torch.Tensor, kv_heads: torch.Tensor):
    """One image's q, k, v for windows start..start+count: gathered as rows into row_buffers, then copied
    head-major into the first `count` windows of q_heads and kv_heads (see _head_major_buffers).
    Returns the chunk's query rows, its key slots (count, n_keys), and contiguous q, k, v views."""
    rows, keys, q, k, v = _chunk_rows(qkv, query_index, key_index, start, count, row_buffers, q_heads.shape[1])
    q_chunk, k_chunk, v_chunk = q_heads[:count], kv_heads[0, :count], kv_heads[1, :count]
    q_chunk.copy_(q)
    k_chunk.copy_(k)
    v_chunk.copy_(v)
    return rows, keys, q_chunk, k_chunk, v_chunk


def _cpu_materialised_attention(qkv: torch.Tensor, query_index: torch.Tensor, key_index: torch.Tensor,
                                bias: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """window_attention on the CPU with the logits materialised, one image and one chunk of windows
    at a time: the chunk's q, k, v gathered and copied head-major into reused buffers, then bias and
    mask added into the logits and one batched product accumulated onto them, a softmax in place and
    one product for the output. The fused kernel instead splits a window's queries into fixed-size
    blocks and multiplies block by block."""
    num_windows = key_index.shape[0]
    queries = bias.shape[1]
    chunk = _window_chunk(qkv, bias, num_windows)
    out = qkv.new_empty(qkv.shape[0], query_index.shape[0], qkv.shape[2] // 3)
    row_buffers = _gather_buffers(qkv, query_index[:chunk * queries], key_index[:chunk])
    q_heads, kv_heads, logits = _head_major_buffers(qkv, bias, chunk)
    out_heads = torch.empty_like(q_heads)
    for b in range(qkv.shape[0]):
        for start in range(0, num_windows, chunk):
            n = min(chunk, num_windows - start)
            rows, _, q, k, v = _chunk_heads(qkv[b], query_index, key_index, start, n, row_buffers, q_heads, kv_heads)
            probs = _softmax_probabilities(q, k, bias, mask[start:start + n], scale, logits[:n])
            torch.matmul(probs, v, out=out_heads[:n])
            out[b].index_copy_(0, rows, _window_rows(out_heads[:n]))
    return out


class _CpuTrainingAttention(torch.autograd.Function):
    """window_attention for CPU training: the evaluation forward, a hand-written backward, a chunk of
    one image's windows at a time.

    The forward keeps only the projected rows, the output and (fused kernel) its log-sum-exp; the
    backward gathers each chunk's keys again and recomputes its probabilities, in buffers reused for
    every chunk, so that the gathered rows and the (windows, heads, ws², n_keys) intermediates stay in
    cache. The bias gradient is summed over the chunk's windows as it is made.
    """

    @staticmethod
    def forward(ctx, qkv, query_index, key_index, bias, mask, scale, materialised):
        # Materialised logits: the backward recomputes the softmax; fused kernel: it reads its log-sum-exp.
        if materialised:
            out, lse = _cpu_materialised_attention(qkv, query_index, key_index, bias, mask, scale), qkv.new_empty(0)
        else:
            out, lse = _cpu_fused_attention(qkv, query_index, key_index, bias, mask, scale)
        ctx.save_for_backward(qkv, query_index, key_index, bias, mask, out, lse)
        ctx.scale, ctx.materialised = scale, materialised
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, query_index, key_index, bias, mask, out, lse = ctx.saved_tensors
        nH, scale = bias.shape[0], ctx.scale
        B, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        num_windows, num_keys, head_dim = key_index.shape[0], key_index.shape[1], C // nH
        queries = query_index.shape[0] // num_windows
        grad_qkv = None
        if ctx.needs_input_grad[0]:
            # every map row's q gradient and every row's k/v gradient are written below; only the pooled
            # cells' q (rows past the map's, no query) stay zero
            grad_qkv = torch.empty_like(qkv)
            grad_qkv[:, query_index.shape[0]:, :C].zero_()
        # Probabilities and the bias gradient (summed over windows and images) in at least float32, so
        # that a low-precision input does not round them per window; float64 stays float64.
        exact_dtype = torch.promote_types(qkv.dtype, torch.float32)
        grad_bias = torch.zeros_like(bias, dtype=exact_dtype) if ctx.needs_input_grad[3] else None
        # Σ_d dO·O per query and head, the softmax backward's row term, for all images at once.
        row_dot = (grad_out * out).view(B, -1, nH, head_dim).sum(-1)
        # Memory for one chunk of windows, reused: head-major q, k/v, dO (the batched products then run
        # without hidden copies), logits, their gradient, and the gradients on their way back to rows.
        chunk = _window_chunk(qkv, bias, num_windows)
        row_buffers = _gather_buffers(qkv, query_index[:chunk * queries], key_index[:chunk])
        grad_out_rows = torch.empty_like(row_buffers[0])
        q_heads, kv_heads, logits = _head_major_buffers(qkv, bias, chunk)
        grad_out_heads, grad_q = torch.empty_like(q_heads), torch.empty_like(q_heads)
        grad_kv_heads = torch.empty_like(kv_heads)
        grad_probs = torch.empty_like(logits)
        grad_kv_rows = qkv.new_empty(chunk, num_keys, 2, nH, head_dim)
        grad_kv = qkv.new_empty(T, 2 * C)
        for b in range(B):
            if grad_qkv is not None:
                grad_kv.zero_()
            for start in range(0, num_windows, chunk):
                n = min(chunk, num_windows - start)
                rows, keys, q, k, v = _chunk_heads(qkv[b], query_index, key_index, start, n, row_buffers, q_heads,
                                                   kv_heads)
                torch.index_select(grad_out[b], 0, rows, out=grad_out_rows[:n * queries])
                grad_out_heads[:n].copy_(grad_out_rows[:n * queries].view(n, queries, nH, head_dim).transpose(1, 2))
                row_dot_b = row_dot[b].index_select(0, rows).view(n, queries, nH).transpose(1, 2)
                chunk_mask = mask[start:start + n]
                if ctx.materialised:
                    probs = _softmax_probabilities(q, k, bias, chunk_mask, scale, logits[:n])
                else:
                    _chunk_logits(q, k, bias, chunk_mask, scale, logits[:n])
                    probs = logits[:n].to(exact_dtype).sub_(lse[b, start:start + n].unsqueeze(-1)).exp_().to(qkv.dtype)
                torch.matmul(probs.transpose(-2, -1), grad_out_heads[:n], out=grad_kv_heads[1, :n])
                torch.matmul(grad_out_heads[:n], v.transpose(-2, -1), out=grad_probs[:n])
                grad_logits = probs.mul_(grad_probs[:n].sub_(row_dot_b.unsqueeze(-1)))
                if grad_bias is not None:
                    grad_bias.add_(grad_logits.sum(0, dtype=exact_dtype))
                if grad_qkv is not None:
                    torch.matmul(grad_logits, k, out=grad_q[:n]).mul_(scale)
                    torch.matmul(grad_logits.transpose(-2, -1), q, out=grad_kv_heads[0, :n]).mul_(scale)
                    grad_kv_rows[:n].copy_(grad_kv_heads[:, :n].permute(1, 3, 0, 2, 4))
                    # summed in a contiguous buffer, then copied once: index_add_ into the strided
                    # slice of grad_qkv is slower
                    grad_kv.index_add_(0, keys.flatten(), grad_kv_rows[:n].view(-1, 2 * C))
                    grad_qkv[b, :, :C].index_copy_(0, rows, _window_rows(grad_q[:n]))
            if grad_qkv is not None:
                grad_qkv[b, :, C:] = grad_kv
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_qkv, None, None, grad_bias, None, None, None
