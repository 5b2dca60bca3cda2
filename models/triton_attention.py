"""Fused focal attention for CUDA: Triton kernels that attend each window's queries to its key slots
read straight from the projected token rows, and their backward.

The semantics are `window_attention`'s: qkv (B, T, 3C) rows of q, k, v (heads interleaved within
each); query_index (nW·ws²,) the rows whose queries attend, window by window; key_index (nW, n_keys)
the rows each window's key slots read (a row may be read by several slots and several windows);
bias (nH, ws², n_keys), the same for every window, or (nW, nH, ws², n_keys); mask (nW, ws² or 1,
n_keys) of 0 / -inf, or None. Output row i is the attention output of the query in row i.

Forward: one program per (image, window, head, block of queries) loops over blocks of key slots,
loading keys and values by their row index (no gathered copy), adding bias and mask in registers and
keeping an online softmax; it stores the output rows and the log-sum-exp of each query.
Backward: one program per (block of queries, block of key slots, window, head, group of images)
recomputes the probabilities from the log-sum-exp, loops over its images, and adds dQ, dK and dV to
the token rows in float32 with atomic adds (slots that read one row, in one window or several, sum
there); it sums the bias gradient of its tile over its images in registers and adds it once, so the
bias gradient arrives reduced over the batch (and over windows for a shared bias) with no per-image
copy. The grid's tiles of (queries, keys) are independent given the log-sum-exp, which is what lets
the key slots be split across programs.

Triton is imported if it can be: `TRITON_AVAILABLE` says whether it was. Under TRITON_INTERPRET=1
(read when this module is imported) the kernels run on the CPU, which the tests use.
"""
import math
from typing import NamedTuple, Optional, Tuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

__all__ = ['TRITON_AVAILABLE', 'fused_window_attention', 'fused_attention_unsupported', 'LaunchConfig',
           'launch_config']

TRITON_AVAILABLE = triton is not None
LOG2E = math.log2(math.e)
# Elements by which bias and mask rows are aligned: Triton vectorises loads from arguments it sees
# divisible by 16.
ROW_ALIGNMENT = 16
# Head dims up to this compile without spills for sm_90 in every dtype (benchmarks/kernel_report.py); the
# released models' is 32.
MAX_HEAD_DIM = 64
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# The backward aims for this many programs per streaming multiprocessor, grouping images to get there:
# fewer images per program mean more atomic adds of the bias gradient, more mean too few programs.
BACKWARD_PROGRAMS_PER_SM = 4


class LaunchConfig(NamedTuple):
    """Compile-time tile sizes and launch settings of both kernels for one case."""
    block_m: int
    block_n: int
    block_d: int
    forward_warps: int
    forward_stages: int
    backward_warps: int
    backward_stages: int


def launch_config(queries: int, head_dim: int, dtype: torch.dtype) -> LaunchConfig:
    """A window's queries in blocks of at most 64 (16 at least, the smallest tensor-core operand), key
    slots in blocks of 64 (32 in float32), the head dim padded to a power of two of at least 16.

    Chosen from the registers and spills that ptxas reports for sm_90 (benchmarks/kernel_report.py), not
    yet from timings: the forward pipelines its key/value loads over two stages; the backward, whose
    loop over images would prefetch a whole image's tiles, runs one stage on 8 warps. Float32 products
    are exact ('ieee', on the FMA units), whose operands take more registers: key blocks of 32 (166 and
    122 registers at head dim 32 against 210 and 202), and the forward on 8 warps from head dim 64.
    """
    block_m = min(64, max(16, triton.next_power_of_2(queries)))
    block_d = max(16, triton.next_power_of_2(head_dim))
    block_n = 32 if dtype == torch.float32 else 64
    forward_warps = 8 if dtype == torch.float32 and block_d > 32 else 4
    return LaunchConfig(block_m, block_n, block_d, forward_warps=forward_warps, forward_stages=2,
                        backward_warps=8, backward_stages=1)


def fused_attention_unsupported(qkv: torch.Tensor, bias: torch.Tensor, dropout_p: float) -> Optional[str]:
    """Why the fused kernel cannot run these arguments (a clause), or None where it can."""
    if not TRITON_AVAILABLE:
        return 'Triton is not installed'
    if dropout_p > 0.:
        return f'attention dropout ({dropout_p}) is not implemented in the fused kernel'
    if qkv.dtype not in SUPPORTED_DTYPES:
        return f'dtype {qkv.dtype} is not one of {SUPPORTED_DTYPES}'
    head_dim = qkv.shape[-1] // 3 // bias.shape[-3]
    if head_dim > MAX_HEAD_DIM:
        return f'head dim {head_dim} is above {MAX_HEAD_DIM}'
    return None


def fused_window_attention(qkv: torch.Tensor, query_index: torch.Tensor, key_index: torch.Tensor,
                           bias: torch.Tensor, mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """window_attention by the fused kernels (see the module docstring for the arguments).

    Differentiable in qkv and bias; a torch.library custom op, so torch.compile treats it as one opaque
    call. Returns (B, nW·ws², C) in qkv's dtype.
    """
    return torch.ops.focal.fused_window_attention(qkv, query_index, key_index, bias, mask, float(scale))[0]


def _sizes(qkv: torch.Tensor, key_index: torch.Tensor, bias: torch.Tensor) -> Tuple[int, ...]:
    """(B, T, C, nW, nH, queries per window, key slots, head dim)."""
    B, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    num_windows, num_keys = key_index.shape
    num_heads, queries = bias.shape[-3], bias.shape[-2]
    return B, T, C, num_windows, num_heads, queries, num_keys, C // num_heads


def _aligned_rows(table: torch.Tensor) -> torch.Tensor:
    """The table (bias or mask) with rows of key slots that start at multiples of 16 elements, so that the
    kernels load them as aligned vectors rather than one element at a time (which also takes a 64-bit
    address register per element); a copy, with the rows padded, where they do not. Both tables are small
    next to the token rows."""
    if table.stride(-1) == 1 and all(stride % ROW_ALIGNMENT == 0 for stride in table.stride()[:-1]):
        return table
    num_keys = table.shape[-1]
    padded = table.new_empty(*table.shape[:-1], triton.cdiv(num_keys, ROW_ALIGNMENT) * ROW_ALIGNMENT)
    return padded[..., :num_keys].copy_(table)


def _aligned_zeros(shape: torch.Size, device: torch.device) -> torch.Tensor:
    """Float32 zeros of `shape` laid out as _aligned_rows lays out a copy."""
    padded = torch.zeros(*shape[:-1], triton.cdiv(shape[-1], ROW_ALIGNMENT) * ROW_ALIGNMENT, device=device)
    return padded[..., :shape[-1]]


def _window_bias(bias: torch.Tensor, num_windows: int) -> torch.Tensor:
    """The bias as (nW, nH, ws², n_keys), a stride-0 view where it is shared by all windows."""
    return bias.expand(num_windows, *bias.shape[-3:])


if TRITON_AVAILABLE:
    # the kernels compute in base 2: exp2 is the hardware's exponential
    _LOG2E = tl.constexpr(LOG2E)

    @triton.jit
    def _forward_kernel(qkv, query_index, key_index, bias, mask, out, lse,
                        stride_qkv_b, stride_qkv_t, stride_out_b, stride_out_t,
                        stride_bias_w, stride_bias_h, stride_bias_m, stride_bias_n,
                        stride_mask_w, stride_mask_m, stride_mask_n,
                        num_windows, num_heads, queries, num_keys, channels, scale_log2,
                        HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, MASK_PER_QUERY: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # program order: query blocks, then heads, then windows, then images, so that the programs
        # running together read the same window's key rows
        pid = tl.program_id(0)
        query_blocks = tl.cdiv(queries, BLOCK_M)
        query_block = pid % query_blocks
        head = (pid // query_blocks) % num_heads
        window = (pid // (query_blocks * num_heads)) % num_windows
        image = pid // (query_blocks * num_heads * num_windows)

        offs_m = query_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < queries
        d_valid = offs_d < HEAD_DIM
        slots = window * queries + offs_m
        # 32-bit offsets within one image, added to the image's base pointer: a 64-bit pointer per
        # element would double the registers of every gathered tile
        q_rows = tl.load(query_index + slots, mask=m_valid, other=0).to(tl.int32)
        head_cols = head * HEAD_DIM + offs_d
        q_mask = m_valid[:, None] & d_valid[None, :]
        rows = qkv + image.to(tl.int64) * stride_qkv_b
        q = tl.load(rows + (q_rows[:, None] * stride_qkv_t + head_cols[None, :]), mask=q_mask, other=0.)
        bias_rows = bias + window * stride_bias_w + head * stride_bias_h
        mask_rows = mask + window * stride_mask_w

        row_max = tl.full([BLOCK_M], float('-inf'), tl.float32)
        row_sum = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for start in range(0, num_keys, BLOCK_N):
            offs_n = start + tl.arange(0, BLOCK_N)
            n_valid = offs_n < num_keys
            k_rows = tl.load(key_index + window * num_keys + offs_n, mask=n_valid, other=0).to(tl.int32)
            k_offsets = k_rows[:, None] * stride_qkv_t + channels + head_cols[None, :]
            kv_mask = n_valid[:, None] & d_valid[None, :]
            k = tl.load(rows + k_offsets, mask=kv_mask, other=0.)
            v = tl.load(rows + (k_offsets + channels), mask=kv_mask, other=0.)
            tile_mask = m_valid[:, None] & n_valid[None, :]
            logits = tl.load(bias_rows + (offs_m[:, None] * stride_bias_m + offs_n[None, :] * stride_bias_n),
                             mask=tile_mask, other=0.).to(tl.float32)
            if MASK_PER_QUERY:
                logits += tl.load(mask_rows + (offs_m[:, None] * stride_mask_m + offs_n[None, :] * stride_mask_n),
                                  mask=tile_mask, other=0.)
            elif HAS_MASK:
                logits += tl.load(mask_rows + offs_n * stride_mask_n, mask=n_valid, other=0.)[None, :]
            logits = tl.dot(q, tl.trans(k), input_precision='ieee') * scale_log2 + logits * _LOG2E
            logits = tl.where(n_valid[None, :], logits, float('-inf'))
            new_max = tl.maximum(row_max, tl.max(logits, 1))
            # a row whose keys so far are all masked keeps max -inf; subtracting 0 then keeps exp2 at 0
            shift = tl.where(new_max == float('-inf'), 0., new_max)
            probs = tl.exp2(logits - shift[:, None])
            rescale = tl.exp2(row_max - shift)
            row_sum = row_sum * rescale + tl.sum(probs, 1)
            acc = acc * rescale[:, None] + tl.dot(probs.to(v.dtype), v, input_precision='ieee')
            row_max = new_max
        acc = acc / row_sum[:, None]
        tl.store(out + image.to(tl.int64) * stride_out_b + (q_rows[:, None] * stride_out_t + head_cols[None, :]),
                 acc.to(out.dtype.element_ty), mask=q_mask)
        lse_rows = lse + (image.to(tl.int64) * num_heads + head) * num_windows * queries
        tl.store(lse_rows + slots, row_max + tl.log2(row_sum), mask=m_valid)

    @triton.jit
    def _backward_kernel(qkv, query_index, key_index, bias, mask, out, grad_out, lse, grad_rows, grad_bias,
                         stride_qkv_b, stride_qkv_t, stride_out_b, stride_out_t, stride_grad_b, stride_grad_t,
                         stride_bias_w, stride_bias_h, stride_bias_m, stride_bias_n,
                         stride_mask_w, stride_mask_m, stride_mask_n,
                         stride_gbias_w, stride_gbias_h, stride_gbias_m, stride_gbias_n,
                         batch, images_per_program, num_windows, num_heads, queries, num_keys, channels,
                         scale, scale_log2,
                         HEAD_DIM: tl.constexpr, HAS_MASK: tl.constexpr, MASK_PER_QUERY: tl.constexpr,
                         GRAD_QKV: tl.constexpr, GRAD_BIAS: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        pid = tl.program_id(0)
        query_blocks = tl.cdiv(queries, BLOCK_M)
        key_blocks = tl.cdiv(num_keys, BLOCK_N)
        key_block = pid % key_blocks
        query_block = (pid // key_blocks) % query_blocks
        head = (pid // (key_blocks * query_blocks)) % num_heads
        window = (pid // (key_blocks * query_blocks * num_heads)) % num_windows
        first_image = pid // (key_blocks * query_blocks * num_heads * num_windows) * images_per_program

        offs_m = query_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = key_block * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_valid = offs_m < queries
        n_valid = offs_n < num_keys
        d_valid = offs_d < HEAD_DIM
        tile_mask = m_valid[:, None] & n_valid[None, :]
        q_mask = m_valid[:, None] & d_valid[None, :]
        kv_mask = n_valid[:, None] & d_valid[None, :]
        slots = window * queries + offs_m
        head_cols = head * HEAD_DIM + offs_d
        # 32-bit offsets within one image (see the forward kernel)
        q_rows = tl.load(query_index + slots, mask=m_valid, other=0).to(tl.int32)
        k_rows = tl.load(key_index + window * num_keys + offs_n, mask=n_valid, other=0).to(tl.int32)
        q_offsets = q_rows[:, None] * stride_qkv_t + head_cols[None, :]
        k_offsets = k_rows[:, None] * stride_qkv_t + channels + head_cols[None, :]
        out_offsets = q_rows[:, None] * stride_out_t + head_cols[None, :]
        # bias and mask are the same for every image: loaded once, in base-2 units
        tile_bias = tl.load(bias + window * stride_bias_w + head * stride_bias_h
                            + (offs_m[:, None] * stride_bias_m + offs_n[None, :] * stride_bias_n),
                            mask=tile_mask, other=0.).to(tl.float32)
        if MASK_PER_QUERY:
            tile_bias += tl.load(mask + window * stride_mask_w
                                 + (offs_m[:, None] * stride_mask_m + offs_n[None, :] * stride_mask_n),
                                 mask=tile_mask, other=0.)
        elif HAS_MASK:
            tile_bias += tl.load(mask + window * stride_mask_w + offs_n * stride_mask_n, mask=n_valid,
                                 other=0.)[None, :]
        tile_bias = tile_bias * _LOG2E
        bias_grad = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
        for image in range(first_image, tl.minimum(first_image + images_per_program, batch)):
            image_offset = tl.cast(image, tl.int64)
            rows = qkv + image_offset * stride_qkv_b
            q = tl.load(rows + q_offsets, mask=q_mask, other=0.)
            k = tl.load(rows + k_offsets, mask=kv_mask, other=0.)
            v = tl.load(rows + (k_offsets + channels), mask=kv_mask, other=0.)
            d_out = tl.load(grad_out + image_offset * stride_out_b + out_offsets, mask=q_mask, other=0.)
            # Σ_d dO·O per query, the softmax backward's row term (recomputed per key block: it is a
            # (queries x head dim) product, cheaper than a pass of its own over the output)
            row_term = tl.sum(d_out.to(tl.float32) * tl.load(out + image_offset * stride_out_b + out_offsets,
                                                              mask=q_mask, other=0.).to(tl.float32), 1)
            row_lse = tl.load(lse + (image_offset * num_heads + head) * num_windows * queries + slots, mask=m_valid,
                              other=0.)
            logits = tl.dot(q, tl.trans(k), input_precision='ieee') * scale_log2 + tile_bias
            probs = tl.where(tile_mask, tl.exp2(logits - row_lse[:, None]), 0.)
            grad_probs = tl.dot(d_out, tl.trans(v), input_precision='ieee')
            grad_logits = probs * (grad_probs - row_term[:, None])
            if GRAD_BIAS:
                bias_grad += grad_logits
            if GRAD_QKV:
                grads = grad_rows + image_offset * stride_grad_b
                grad_v = tl.dot(tl.trans(probs.to(d_out.dtype)), d_out, input_precision='ieee')
                tl.atomic_add(grads + (k_rows[:, None] * stride_grad_t + 2 * channels + head_cols[None, :]), grad_v,
                              mask=kv_mask, sem='relaxed')
                grad_logits_in = grad_logits.to(q.dtype)
                grad_k = tl.dot(tl.trans(grad_logits_in), q, input_precision='ieee') * scale
                tl.atomic_add(grads + (k_rows[:, None] * stride_grad_t + channels + head_cols[None, :]), grad_k,
                              mask=kv_mask, sem='relaxed')
                grad_q = tl.dot(grad_logits_in, k, input_precision='ieee') * scale
                tl.atomic_add(grads + (q_rows[:, None] * stride_grad_t + head_cols[None, :]), grad_q, mask=q_mask,
                              sem='relaxed')
        if GRAD_BIAS:
            tl.atomic_add(grad_bias + window * stride_gbias_w + head * stride_gbias_h
                          + (offs_m[:, None] * stride_gbias_m + offs_n[None, :] * stride_gbias_n),
                          bias_grad, mask=tile_mask, sem='relaxed')


def _mask_args(mask: Optional[torch.Tensor], bias: torch.Tensor, num_windows: int, queries: int, num_keys: int):
    """The mask as the kernels read it: (tensor, window/query/key strides), broadcast to (nW, ws², n_keys);
    any tensor (never read) with zero strides where there is no mask."""
    if mask is None:
        return bias, 0, 0, 0
    mask = _aligned_rows(mask).expand(num_windows, queries, num_keys)
    return (mask, *mask.stride())


def _mask_per_query(mask: Optional[torch.Tensor]) -> bool:
    """Whether the mask differs per query (a shifted block's); else the kernels load one row per window."""
    return mask is not None and mask.shape[1] > 1


def _forward_launch(qkv: torch.Tensor, query_index: torch.Tensor, key_index: torch.Tensor, bias: torch.Tensor,
                    mask: Optional[torch.Tensor], scale: float, out: torch.Tensor, lse: torch.Tensor):
    """(grid, positional arguments, compile-time arguments) of the forward kernel."""
    B, T, C, num_windows, num_heads, queries, num_keys, head_dim = _sizes(qkv, key_index, bias)
    config = launch_config(queries, head_dim, qkv.dtype)
    window_bias = _window_bias(_aligned_rows(bias), num_windows)
    mask_args = _mask_args(mask, bias, num_windows, queries, num_keys)
    grid = (B * num_windows * num_heads * triton.cdiv(queries, config.block_m),)
    args = (qkv, query_index, key_index, window_bias, mask_args[0], out, lse,
            qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1), *window_bias.stride(), *mask_args[1:],
            num_windows, num_heads, queries, num_keys, C, scale * LOG2E)
    constants = dict(HEAD_DIM=head_dim, HAS_MASK=mask is not None, MASK_PER_QUERY=_mask_per_query(mask),
                     BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_D=config.block_d,
                     num_warps=config.forward_warps, num_stages=config.forward_stages)
    return grid, args, constants


def _backward_programs(device: torch.device, tiles: int) -> int:
    """How many backward programs to aim for. The interpreter (CPU) runs them one after another, so any
    grouping is correct: two groups of images there, so that tests see several images per program and,
    for an odd batch, a short last group."""
    if device.type == 'cuda':
        return BACKWARD_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return 2 * tiles


def _backward_launch(grad_out: torch.Tensor, qkv: torch.Tensor, query_index: torch.Tensor, key_index: torch.Tensor,
                     bias: torch.Tensor, mask: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
                     scale: float, grad_rows: torch.Tensor, grad_bias: torch.Tensor, grad_qkv: bool,
                     bias_grad: bool):
    """(grid, positional arguments, compile-time arguments) of the backward kernel, which groups images so
    that the grid has about `_backward_programs` programs."""
    B, T, C, num_windows, num_heads, queries, num_keys, head_dim = _sizes(qkv, key_index, bias)
    config = launch_config(queries, head_dim, qkv.dtype)
    tiles = num_windows * num_heads * triton.cdiv(queries, config.block_m) * triton.cdiv(num_keys, config.block_n)
    groups = min(B, max(1, _backward_programs(qkv.device, tiles) // tiles))
    images_per_program = triton.cdiv(B, groups)
    window_bias, window_grad_bias = _window_bias(_aligned_rows(bias), num_windows), _window_bias(grad_bias, num_windows)
    mask_args = _mask_args(mask, bias, num_windows, queries, num_keys)
    grid = (triton.cdiv(B, images_per_program) * tiles,)
    args = (qkv, query_index, key_index, window_bias, mask_args[0], out, grad_out, lse, grad_rows, window_grad_bias,
            qkv.stride(0), qkv.stride(1), out.stride(0), out.stride(1), grad_rows.stride(0), grad_rows.stride(1),
            *window_bias.stride(), *mask_args[1:], *window_grad_bias.stride(),
            B, images_per_program, num_windows, num_heads, queries, num_keys, C, scale, scale * LOG2E)
    constants = dict(HEAD_DIM=head_dim, HAS_MASK=mask is not None, MASK_PER_QUERY=_mask_per_query(mask),
                     GRAD_QKV=grad_qkv, GRAD_BIAS=bias_grad, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
                     BLOCK_D=config.block_d, num_warps=config.backward_warps, num_stages=config.backward_stages)
    return grid, args, constants


def _check_layout(qkv: torch.Tensor, query_index: torch.Tensor, key_index: torch.Tensor, bias: torch.Tensor,
                  mask: Optional[torch.Tensor]):
    """The kernels index rows with their own strides but need unit channel and key-index strides."""
    B, T, C, num_windows, num_heads, queries, num_keys, head_dim = _sizes(qkv, key_index, bias)
    if qkv.stride(-1) != 1 or not query_index.is_contiguous() or not key_index.is_contiguous():
        raise ValueError('fused attention needs qkv rows with unit channel stride and contiguous index tables')
    if (head_dim * num_heads != C or query_index.shape[0] != num_windows * queries or bias.shape[-1] != num_keys
            or bias.dim() not in (3, 4) or (bias.dim() == 4 and bias.shape[0] != num_windows)):
        raise ValueError(f'fused attention: qkv {tuple(qkv.shape)}, query_index {tuple(query_index.shape)}, '
                         f'key_index {tuple(key_index.shape)} and bias {tuple(bias.shape)} do not agree')
    if mask is not None and (mask.dim() != 3 or mask.shape[0] != num_windows or mask.shape[1] not in (1, queries)
                             or mask.shape[2] != num_keys or mask.requires_grad):
        raise ValueError(f'fused attention: mask {tuple(mask.shape)} must be ({num_windows}, {queries} or 1, '
                         f'{num_keys}), with no gradient')


@torch.library.custom_op('focal::fused_window_attention', mutates_args=())
def _fused_forward(qkv: torch.Tensor, query_index: torch.Tensor, key_index: torch.Tensor, bias: torch.Tensor,
                   mask: Optional[torch.Tensor], scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The output (B, nW·ws², C) and the base-2 log-sum-exp of each query's logits (B, nH, nW·ws²)."""
    if not TRITON_AVAILABLE:
        raise RuntimeError('fused window attention needs Triton, which is not installed')
    _check_layout(qkv, query_index, key_index, bias, mask)
    B, T, C, num_windows, num_heads, queries, num_keys, head_dim = _sizes(qkv, key_index, bias)
    out = qkv.new_empty(B, num_windows * queries, C)
    lse = torch.empty(B, num_heads, num_windows * queries, dtype=torch.float32, device=qkv.device)
    grid, args, constants = _forward_launch(qkv, query_index, key_index, bias, mask, scale, out, lse)
    _forward_kernel[grid](*args, **constants)
    return out, lse


@_fused_forward.register_fake
def _fused_forward_fake(qkv, query_index, key_index, bias, mask, scale):
    B, T, C, num_windows, num_heads, queries, num_keys, head_dim = _sizes(qkv, key_index, bias)
    return (qkv.new_empty(B, num_windows * queries, C),
            qkv.new_empty(B, num_heads, num_windows * queries, dtype=torch.float32))


@torch.library.custom_op('focal::fused_window_attention_backward', mutates_args=())
def _fused_backward(grad_out: torch.Tensor, qkv: torch.Tensor, query_index: torch.Tensor, key_index: torch.Tensor,
                    bias: torch.Tensor, mask: Optional[torch.Tensor], out: torch.Tensor, lse: torch.Tensor,
                    scale: float, grad_qkv: bool, bias_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of qkv (its shape and dtype) and of bias (its shape and dtype); an empty tensor in place of
    one not asked for."""
    grad_out = grad_out.contiguous()
    # float32 sums for the atomic adds: in place where qkv is float32 already
    grad_rows = torch.zeros(qkv.shape, dtype=torch.float32, device=qkv.device) if grad_qkv else qkv.new_empty(0)
    grad_bias = _aligned_zeros(bias.shape, bias.device) if bias_grad else bias.new_empty(0)
    grid, args, constants = _backward_launch(grad_out, qkv, query_index, key_index, bias, mask, out, lse, scale,
                                             grad_rows if grad_qkv else qkv, grad_bias if bias_grad else bias,
                                             grad_qkv, bias_grad)
    _backward_kernel[grid](*args, **constants)
    return grad_rows.to(qkv.dtype), grad_bias.to(bias.dtype).contiguous()


@_fused_backward.register_fake
def _fused_backward_fake(grad_out, qkv, query_index, key_index, bias, mask, out, lse, scale, grad_qkv, bias_grad):
    return (torch.empty_like(qkv) if grad_qkv else qkv.new_empty(0),
            torch.empty_like(bias) if bias_grad else bias.new_empty(0))


def _setup_context(ctx, inputs, output):
    qkv, query_index, key_index, bias, mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(qkv, query_index, key_index, bias, mask, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, grad_out, grad_lse):
    qkv, query_index, key_index, bias, mask, out, lse = ctx.saved_tensors
    grad_qkv, bias_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    grads = _fused_backward(grad_out, qkv, query_index, key_index, bias, mask, out, lse, ctx.scale, grad_qkv,
                            bias_grad)
    return grads[0] if grad_qkv else None, None, None, grads[1] if bias_grad else None, None, None


_fused_forward.register_autograd(_backward, setup_context=_setup_context)
