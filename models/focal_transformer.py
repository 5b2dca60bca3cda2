"""Focal Transformer (Yang et al., "Focal Self-attention for Local-Global Interactions in Vision
Transformers", NeurIPS 2021).

Computes the function of the released ImageNet-1K checkpoints (checked against the reference
implementation's outputs and gradients: tests/reference), parameter names and shapes included, at
the size the model is built for and at any other input size. The block structure (window,
neighbours, shift, pooled levels, parameter shapes) is fixed at construction; the maps between
blocks are (B, H, W, C) of whatever size the input gives, with stage sizes in ceil division as
Swin's detection backbone (the image padded to a multiple of the patch, odd maps padded before
each 2x downsampling, every map padded to the window).

Which token each key slot reads and which slots are masked depend on the padded map size: those
index tables are built once per (block configuration, map size, device) and kept in a bounded LRU
cache shared by all blocks and models (`attention_table_cache_info()`); under torch.compile/export and
TorchScript the same tables are built in the graph from tensor ops on the (symbolic) sizes. Which bias
entry each logit takes depends only on the configuration and stays a buffer. A block then projects
its map's tokens and pooled cells together into rows of q, k, v, gathers each window's query and
key/value rows, looks up each bias table and runs one fused attention call (on the CPU, per image).
"""
import dataclasses
import functools
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, Mlp, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import (build_model_with_cfg, generate_default_cfgs, register_model, register_notrace_function,
                         resolve_pretrained_cfg)
from timm.models._features import feature_take_indices

from .checkpoint import read_checkpoint, unwrap_state_dict

__all__ = ['FocalTransformer', 'checkpoint_filter_fn', 'neighbour_key_positions', 'attention_table_cache_info',
           'clear_attention_table_cache']

POOL_METHODS = ('none', 'fc', 'conv', 'mean', 'max')
EXPAND_LAYERS = ('all', 'even', 'odd')
# Names of the integer tables the reference stores in its checkpoints; ours are derived instead.
REFERENCE_BUFFER_PREFIXES = ('relative_position_index', 'valid_ind_rolled', 'valid_ind_unfold')
# Cached table sets (one per block configuration, padded map size and device). A model has a few block
# configurations (Focal-T: 4, one per stage), so this holds the tables of about 30 input sizes; a
# stage-0 set for an 800x1216 image is about 4 MB.
TABLE_CACHE_SIZE = 128
# CPU attention in these dtypes materialises the logits between batched products, a chunk of windows at a
# time (in bf16 as autocast's own matmuls would: logits rounded to bf16, softmax accumulated in float32);
# others take PyTorch's fused kernel, which computes in float32: float16, whose range might not hold the logits,
# and bf16 where the CPU has no bf16 dot-product instructions (there the products are emulated, and the fused
# kernel ran a bf16 inference pass 1.76x faster: AMD Zen 4 held to AVX2 by ATEN_CPU_CAPABILITY/ONEDNN_MAX_CPU_ISA).
MATERIALISED_DTYPES = (torch.float32, torch.float64) + (
    (torch.bfloat16,) if any(torch.cpu.get_capabilities().get(isa) for isa in ('avx512_bf16', 'amx_bf16')) else ())
# The windows of a chunk: as many as keep their logits within this many bytes, so that the chunk's
# gathered keys, their head-major copies and the logits stay in cache together (on the AMD Zen 4, a
# whole stage-0 image, 8.6 MB of logits, ran 20% slower than the fused kernel; chunks of 2 MiB 27% faster).
MATERIALISED_CHUNK_BYTES = 2 << 20


def relative_position_index(query_size: int, key_size: int) -> torch.Tensor:
    """(query_size², key_size²) index into a ((query_size + key_size - 1)², ·) bias table.

    Entry (q, k) is `(qh - kh + key_size - 1) * (query_size + key_size - 1) + (qw - kw + key_size - 1)`:
    Swin's relative position index when both sizes are the window size.
    """
    q = torch.stack(torch.meshgrid(torch.arange(query_size), torch.arange(query_size), indexing='ij')).flatten(1)
    k = torch.stack(torch.meshgrid(torch.arange(key_size), torch.arange(key_size), indexing='ij')).flatten(1)
    rel = q[:, :, None] - k[:, None, :] + key_size - 1
    return rel[0] * (query_size + key_size - 1) + rel[1]


def neighbour_key_positions(window_size: int, expand_size: int) -> torch.Tensor:
    """(n_neighbours, 2) (row, col) of each neighbour key slot relative to its window's top-left.

    Four groups shifted by (+e, +e), (+e, -e), (-e, +e), (-e, -e), each row-major over the window,
    keeping the positions that fall outside the window (some tokens appear in two groups).
    """
    ws, e = window_size, expand_size
    r, c = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing='ij')
    r, c = r.flatten(), c.flatten()
    groups = []
    for dr, dc in ((e, e), (e, -e), (-e, e), (-e, -e)):
        inside_rows = r < ws - e if dr > 0 else r >= e
        inside_cols = c < ws - e if dc > 0 else c >= e
        keep = ~(inside_rows & inside_cols)
        groups.append(torch.stack([r[keep] + dr, c[keep] + dc], dim=1))
    return torch.cat(groups)


# The functions below take sizes that may be symbolic (torch.export) and are compiled by TorchScript:
# tensor ops with broadcasting only, no data-dependent shapes, no Python branches on sizes.

def window_token_index(padded_size: Tuple[int, int], window_size: int,
                       device: Optional[torch.device] = None) -> torch.Tensor:
    """(nW, ws²) flat index of each window's tokens in the padded map, windows row-major."""
    Hp, Wp = padded_size
    ws = window_size
    top_left = (torch.arange(0, Hp, ws, device=device)[:, None] * Wp
                + torch.arange(0, Wp, ws, device=device)[None, :]).flatten()
    local = torch.arange(ws, device=device)
    in_window = (local[:, None] * Wp + local[None, :]).flatten()
    return top_left[:, None] + in_window[None, :]


def neighbour_token_index(padded_size: Tuple[int, int], window_size: int, positions: torch.Tensor) -> torch.Tensor:
    """(nW, n_neighbours) flat index of each window's neighbour keys (`positions` from
    neighbour_key_positions), wrapping around the map."""
    Hp, Wp = padded_size
    ws = window_size
    rows = torch.arange(0, Hp, ws, device=positions.device)[:, None, None] + positions[:, 0]
    cols = torch.arange(0, Wp, ws, device=positions.device)[None, :, None] + positions[:, 1]
    # Offsets reach at most one map beyond either edge, so one conditional wrap is `% size`; the
    # ONNX exporter cannot translate a remainder by a symbolic size.
    rows = torch.where(rows < 0, rows + Hp, torch.where(rows >= Hp, rows - Hp, rows))
    cols = torch.where(cols < 0, cols + Wp, torch.where(cols >= Wp, cols - Wp, cols))
    return (rows * Wp + cols).flatten(0, 1)


def pooled_block_index(window_grid: Tuple[int, int], level: int, focal_window: int,
                       device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cells of pooled level `level` that each window attends.

    Returns (index, valid): both (nW, K²) with K = focal_window + 2**level - 1; index is the flat
    cell index in the (nWh·2**level, nWw·2**level) grid, meaningful only where valid marks a cell
    inside the grid.
    """
    nWh, nWw = window_grid
    scale = 1 << level
    K = focal_window + scale - 1
    Gh, Gw = nWh * scale, nWw * scale
    cell = torch.arange(K, device=device)
    rows = (torch.arange(nWh, device=device) * scale - (focal_window - 1) // 2)[:, None, None, None] \
        + cell[None, None, :, None]
    cols = (torch.arange(nWw, device=device) * scale - (focal_window - 1) // 2)[None, :, None, None] \
        + cell[None, None, None, :]
    valid = (rows >= 0) & (rows < Gh) & (cols >= 0) & (cols < Gw)
    return (rows * Gw + cols).flatten(0, 1).flatten(1), valid.flatten(0, 1).flatten(1)


def shift_region_mask(padded_size: Tuple[int, int], window_size: int, shift_size: int,
                      device: Optional[torch.device] = None) -> torch.Tensor:
    """(nW, ws², ws²), True between tokens of different regions of the rolled map.

    Regions are Swin's slices (0, -ws), (-ws, -s), (-s, None) of each axis, taken on the padded map
    as Swin's detection backbone does, so that any map size works.
    """
    Hp, Wp = padded_size
    rows, cols = torch.arange(Hp, device=device), torch.arange(Wp, device=device)
    row_region = (rows >= Hp - window_size).long() + (rows >= Hp - shift_size).long()
    col_region = (cols >= Wp - window_size).long() + (cols >= Wp - shift_size).long()
    regions = (row_region[:, None] * 3 + col_region[None, :]).flatten()
    windows = regions[window_token_index(padded_size, window_size, device)]
    return windows[:, :, None] != windows[:, None, :]


def attention_tables(padded_size: Tuple[int, int], window_size: int, shift_size: int, focal_window: int,
                     pooled_levels: int, neighbour_positions: Optional[torch.Tensor],
                     device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The size-dependent tables of one block on a (Hp, Wp) padded map.

    Returns (query_index, key_index, mask): query_index (nW·ws²,) the map token of each query;
    key_index (nW, n_keys) the token each key slot reads from the source laid out as the padded map's
    tokens, then each pooled level's cells; mask (nW, ws² or 1, n_keys) of 0 / -inf (only the
    shift mask depends on the query). Pooled cells outside the grid are masked: with a -inf mask what
    they read does not matter, and they read their level's first cell.
    """
    Hp, Wp = padded_size
    ws = window_size
    nWh, nWw = Hp // ws, Wp // ws
    num_windows = nWh * nWw
    window_index = window_token_index(padded_size, ws, device)
    key_index = [window_index]
    if shift_size > 0:
        slot_mask = [shift_region_mask(padded_size, ws, shift_size, device)]
    else:
        slot_mask = [torch.zeros(num_windows, 1, ws * ws, dtype=torch.bool, device=device)]
    if neighbour_positions is not None:
        key_index.append(neighbour_token_index(padded_size, ws, neighbour_positions))
        slot_mask.append(torch.zeros(num_windows, 1, neighbour_positions.shape[0], dtype=torch.bool,
                                     device=device))
    source_offset = Hp * Wp
    for k in range(pooled_levels):
        index, valid = pooled_block_index((nWh, nWw), k, focal_window, device)
        key_index.append(torch.where(valid, index, 0) + source_offset)
        slot_mask.append(~valid[:, None])
        source_offset += num_windows << (2 * k)
    query_rows = ws * ws if shift_size > 0 else 1
    masked = torch.cat([m.expand(num_windows, query_rows, m.shape[-1]) for m in slot_mask], dim=2)
    # The reference adds -100 to logits that must vanish: exp(-100) is lost next to any real logit, so
    # that is the same function as leaving the key out, which -inf does exactly (every query keeps its
    # own token, so no row is all -inf). In float32 exp(-100) is a denormal, slow to produce on Intel
    # CPUs: the exponentials in a training step's backward took 4.6% of its time there.
    mask = torch.zeros_like(masked, dtype=torch.float).masked_fill_(masked, float('-inf'))
    return window_index.flatten(), torch.cat(key_index, dim=1), mask


@functools.lru_cache(maxsize=TABLE_CACHE_SIZE)
def _cached_attention_tables(padded_size: Tuple[int, int], window_size: int, expand_size: int, shift_size: int,
                             focal_window: int, pooled_levels: int, device: torch.device):
    # Built outside inference mode: tables first built under torch.inference_mode() are reused by
    # training steps, which save them for the backward pass.
    with torch.inference_mode(False):
        positions = neighbour_key_positions(window_size, expand_size) if expand_size > 0 else None
        tables = attention_tables(padded_size, window_size, shift_size, focal_window, pooled_levels, positions,
                                  torch.device('cpu'))
        return tuple(t.to(device) for t in tables)


def attention_table_cache_info():
    """functools' cache statistics of the size-dependent tables: `misses` counts the table sets built."""
    return _cached_attention_tables.cache_info()


def clear_attention_table_cache():
    _cached_attention_tables.cache_clear()


@torch.jit.unused
def _cached_block_tables(padded_size: Tuple[int, int], window_size: int, expand_size: int, shift_size: int,
                         focal_window: int, pooled_levels: int,
                         device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _cached_attention_tables(padded_size, window_size, expand_size, shift_size, focal_window, pooled_levels,
                                    device)


def _building_graph() -> bool:
    """True under TorchScript and torch.compile/export, where the Python table cache cannot be used."""
    return torch.jit.is_scripting() or torch.compiler.is_compiling()


@torch.fx.wrap
@register_notrace_function
def block_attention_tables(z: torch.Tensor, window_size: int, expand_size: int, shift_size: int, focal_window: int,
                           pooled_levels: int, neighbour_positions: Optional[torch.Tensor]
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """attention_tables for the padded, (B, Hp, Wp, C) map z: from the cache in eager mode, built in
    the graph while compiling, exporting or scripting. A leaf for torch.fx: looked up when run."""
    padded_size = (z.shape[1], z.shape[2])
    if _building_graph():
        return attention_tables(padded_size, window_size, shift_size, focal_window, pooled_levels,
                                neighbour_positions, z.device)
    return _cached_block_tables(padded_size, window_size, expand_size, shift_size, focal_window, pooled_levels,
                                z.device)


@torch.fx.wrap
@register_notrace_function
def pad_to_multiple(x: torch.Tensor, multiple: int, channels_last: bool) -> torch.Tensor:
    """Zero-pad the bottom and right of a (B, H, W, C) (channels_last) or (B, C, H, W) map so that
    H and W are multiples of `multiple` (a map smaller than `multiple` is padded up to it)."""
    h_dim = 1 if channels_last else 2
    H, W = x.shape[h_dim], x.shape[h_dim + 1]
    # written as ceil division so that a symbolic padded size is visibly a multiple
    pad_h = (H + multiple - 1) // multiple * multiple - H
    pad_w = (W + multiple - 1) // multiple * multiple - W
    # While compiling, pad whatever the (possibly symbolic) amounts: a branch would fix the size.
    if torch.compiler.is_compiling() or pad_h > 0 or pad_w > 0:
        if channels_last:
            x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
        else:
            x = F.pad(x, (0, pad_w, 0, pad_h))
    return x


@torch.fx.wrap
@register_notrace_function
def crop_to(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The top-left (H, W) of a (B, Hp, Wp, C) map with Hp >= H, Wp >= W."""
    if torch.compiler.is_compiling():
        # gathers: a slice would ask the tracer to prove H <= Hp, which it cannot for symbolic sizes
        return x.index_select(1, torch.arange(H, device=x.device)).index_select(2, torch.arange(W, device=x.device))
    return x[:, :H, :W]


@torch.fx.wrap
@register_notrace_function
def check_image_size(x: torch.Tensor, img_size: Tuple[int, int], min_size: int, strict_img_size: bool) -> torch.Tensor:
    """x, or a ValueError for an input the model cannot take (with strict_img_size: of another size than
    img_size). Returning x keeps the check in torch.fx graphs."""
    H, W = x.shape[-2], x.shape[-1]
    if strict_img_size and (H != img_size[0] or W != img_size[1]):
        raise ValueError(f'input of size ({H}, {W}) given to a model built for ({img_size[0]}, {img_size[1]}) '
                         f'with strict_img_size=True')
    if torch.compiler.is_compiling():
        torch._check(H >= min_size)
        torch._check(W >= min_size)
    elif H < min_size or W < min_size:
        raise ValueError(f'input of size ({H}, {W}) is too small: the model needs at least {min_size} pixels '
                         f'per side (patch size x 2**(stages - 1))')
    return x


@torch.fx.wrap
@register_notrace_function
def add_position_embedding(x: torch.Tensor, pos_embed: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
    """x (B, H, W, C) plus the (1, grid_h·grid_w, C) absolute position embedding, resampled if H, W differ."""
    H, W = x.shape[1], x.shape[2]
    pos_embed = resample_abs_pos_embed(pos_embed, new_size=[H, W], old_size=[grid[0], grid[1]], num_prefix_tokens=0)
    return x + pos_embed.view(1, H, W, pos_embed.shape[-1])


def _gather_buffers(qkv: torch.Tensor, query_index: torch.Tensor,
                    key_index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Memory for one image's gathered query rows and key/value rows, reused for every image of a
    batch: fresh buffers of this size (11 MB per image at Focal-T's stage 0) come back from the
    allocator as new pages, and filling those costs more than the gather itself."""
    C = qkv.shape[-1] // 3
    return qkv.new_empty(query_index.shape[0], C), qkv.new_empty(key_index.numel(), 2 * C)


def _window_qkv(qkv: torch.Tensor, query_index: torch.Tensor, key_index: torch.Tensor, num_heads: int,
                buffers: Tuple[torch.Tensor, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image's q, k, v for attention with windows as the batch: (nW, nH, ws², hd) and twice
    (nW, nH, n_keys, hd), views of the gathered (token, channel) rows.

    Gathering whole rows (all heads, keys and values of a token together) is a plain copy per row,
    several times faster on the CPU than gathering each head's (token, hd) rows; the fused CPU
    kernel reads the head and key strides as they come.
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
    num_heads, queries, num_keys = bias.shape[1], bias.shape[2], bias.shape[3]
    head_dim = qkv.shape[-1] // 3 // num_heads
    return (qkv.new_empty(num_windows, num_heads, queries, head_dim),
            qkv.new_empty(2, num_windows, num_heads, num_keys, head_dim),
            qkv.new_empty(num_windows, num_heads, queries, num_keys))


def _softmax_probabilities(q_heads: torch.Tensor, k_heads: torch.Tensor, bias: torch.Tensor, scale: float,
                           logits: torch.Tensor) -> torch.Tensor:
    """softmax(q·kᵀ·scale + bias) computed in `logits`; all four (nW, nH, ·, ·) and contiguous, so that
    windows and heads form the batch of one product."""
    queries, num_keys, head_dim = logits.shape[-2], logits.shape[-1], q_heads.shape[-1]
    torch.baddbmm(bias.reshape(-1, queries, num_keys), q_heads.view(-1, queries, head_dim),
                  k_heads.view(-1, num_keys, head_dim).transpose(1, 2), alpha=scale,
                  out=logits.view(-1, queries, num_keys))
    return torch.softmax(logits, -1, out=logits)


def _window_rows(out: torch.Tensor) -> torch.Tensor:
    """(nW, nH, ws², hd) attention output -> (nW·ws², C) rows in window order."""
    return out.transpose(1, 2).reshape(-1, out.shape[1] * out.shape[3])


def _cpu_window_attention(qkv: torch.Tensor, query_index: torch.Tensor, key_index: torch.Tensor,
                          bias: torch.Tensor, scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """gathered_attention on the CPU, one image at a time in reused buffers: the output and the fused
    kernel's log-sum-exp (B, nW, nH, ws²), which the training backward reads."""
    out = qkv.new_empty(qkv.shape[0], query_index.shape[0], qkv.shape[2] // 3)
    lse = []
    buffers = _gather_buffers(qkv, query_index, key_index)
    for b in range(qkv.shape[0]):
        q, k, v = _window_qkv(qkv[b], query_index, key_index, bias.shape[1], buffers)
        out_b, lse_b = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, attn_mask=bias, scale=scale)
        out[b].index_copy_(0, query_index, _window_rows(out_b))
        lse.append(lse_b)
    return out, torch.stack(lse)


def _materialises(qkv: torch.Tensor) -> bool:
    """Whether CPU attention on these rows materialises its logits (see MATERIALISED_DTYPES); under
    torch.compile the fused kernel stays, since the traced loop over chunks would be unrolled."""
    return qkv.dtype in MATERIALISED_DTYPES and not torch.compiler.is_compiling()


def _window_chunk(bias: torch.Tensor) -> int:
    """Windows per chunk of CPU attention: as many as keep their logits within MATERIALISED_CHUNK_BYTES;
    all of them under torch.compile, which unrolls the loop over chunks into the graph."""
    if torch.compiler.is_compiling():
        return bias.shape[0]
    return max(1, min(bias.shape[0], MATERIALISED_CHUNK_BYTES // (bias[0].numel() * bias.element_size())))


def _chunk_heads(qkv: torch.Tensor, query_index: torch.Tensor, key_index: torch.Tensor, start: int, count: int,
                 row_buffers: Tuple[torch.Tensor, torch.Tensor], q_heads: torch.Tensor, kv_heads: torch.Tensor):
    """One image's q, k, v for windows start..start+count: gathered as rows into row_buffers, then copied
    head-major into the first `count` windows of q_heads and kv_heads (see _head_major_buffers).
    Returns the chunk's query rows, its key slots (count, n_keys), and contiguous q, k, v views."""
    queries = query_index.shape[0] // key_index.shape[0]
    rows, keys = query_index[start * queries:(start + count) * queries], key_index[start:start + count]
    q, k, v = _window_qkv(qkv, rows, keys, q_heads.shape[1],
                          (row_buffers[0][:rows.shape[0]], row_buffers[1][:keys.numel()]))
    q_chunk, k_chunk, v_chunk = q_heads[:count], kv_heads[0, :count], kv_heads[1, :count]
    q_chunk.copy_(q)
    k_chunk.copy_(k)
    v_chunk.copy_(v)
    return rows, keys, q_chunk, k_chunk, v_chunk


def _cpu_materialised_attention(qkv: torch.Tensor, query_index: torch.Tensor, key_index: torch.Tensor,
                                bias: torch.Tensor, scale: float) -> torch.Tensor:
    """gathered_attention on the CPU with the logits materialised, one image and one chunk of windows
    at a time (MATERIALISED_CHUNK_BYTES): the chunk's q, k, v gathered and copied head-major into reused
    buffers, then one batched product for the logits (scale and bias included), a softmax in place and
    one product for the output. Faster than the fused kernel, which splits a window's 49 queries into
    blocks of 32 and 17 rows and multiplies block by block."""
    num_windows, queries = bias.shape[0], bias.shape[2]
    chunk = _window_chunk(bias)
    out = qkv.new_empty(qkv.shape[0], query_index.shape[0], qkv.shape[2] // 3)
    row_buffers = _gather_buffers(qkv, query_index[:chunk * queries], key_index[:chunk])
    q_heads, kv_heads, logits = _head_major_buffers(qkv, bias, chunk)
    out_heads = torch.empty_like(q_heads)
    for b in range(qkv.shape[0]):
        for start in range(0, num_windows, chunk):
            n = min(chunk, num_windows - start)
            rows, _, q, k, v = _chunk_heads(qkv[b], query_index, key_index, start, n, row_buffers, q_heads, kv_heads)
            probs = _softmax_probabilities(q, k, bias[start:start + n], scale, logits[:n])
            torch.matmul(probs, v, out=out_heads[:n])
            out[b].index_copy_(0, rows, _window_rows(out_heads[:n]))
    return out


class _GatheredBiasedAttention(torch.autograd.Function):
    """gathered_attention for CPU training: the evaluation forward, hand-written backward, a chunk of
    one image's windows at a time.

    PyTorch's CPU fused attention has no gradient for the bias, so SDPA falls back to the unfused
    path, which keeps every attention matrix and the gathered keys/values for the backward pass.
    This runs the forward of evaluation (materialised logits in MATERIALISED_DTYPES; the fused kernel
    in the others and under torch.compile) and keeps only the projected rows, the output and the
    fused kernel's log-sum-exp; the backward pass gathers each chunk's keys again and recomputes its
    probabilities, in buffers reused for every chunk, so that the gathered rows and the (windows,
    heads, ws², n_keys) intermediates stay in cache.
    """

    @staticmethod
    def forward(ctx, qkv, query_index, key_index, bias, num_heads, scale):
        # Materialised logits: the backward recomputes the softmax; fused kernel: it reads its log-sum-exp.
        ctx.materialised = _materialises(qkv)
        if ctx.materialised:
            out, lse = _cpu_materialised_attention(qkv, query_index, key_index, bias, scale), qkv.new_empty(0)
        else:
            out, lse = _cpu_window_attention(qkv, query_index, key_index, bias, scale)
        ctx.save_for_backward(qkv, query_index, key_index, bias, out, lse)
        ctx.num_heads, ctx.scale = num_heads, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        qkv, query_index, key_index, bias, out, lse = ctx.saved_tensors
        nH, scale = ctx.num_heads, ctx.scale
        B, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
        num_windows, num_keys, head_dim = key_index.shape[0], key_index.shape[1], C // nH
        queries = query_index.shape[0] // num_windows
        grad_qkv = torch.zeros_like(qkv) if ctx.needs_input_grad[0] else None
        # Probabilities and the bias gradient (summed over images) in at least float32, so that a
        # low-precision input does not round them per image; float64 stays float64.
        exact_dtype = torch.promote_types(qkv.dtype, torch.float32)
        grad_bias = torch.zeros_like(bias, dtype=exact_dtype) if ctx.needs_input_grad[3] else None
        # Σ_d dO·O per query and head, the softmax backward's row term, for all images at once.
        row_dot = (grad_out * out).view(B, -1, nH, head_dim).sum(-1)
        # Memory for one chunk of windows, reused: head-major q, k/v, dO (the batched products then run
        # without hidden copies), logits, their gradient, and the gradients on their way back to rows.
        chunk = _window_chunk(bias)
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
                if ctx.materialised:
                    probs = _softmax_probabilities(q, k, bias[start:start + n], scale, logits[:n])
                else:
                    torch.matmul(q, k.transpose(-2, -1), out=logits[:n])
                    logits[:n].mul_(scale).add_(bias[start:start + n])
                    probs = logits[:n].to(exact_dtype).sub_(lse[b, start:start + n].unsqueeze(-1)).exp_().to(qkv.dtype)
                torch.matmul(probs.transpose(-2, -1), grad_out_heads[:n], out=grad_kv_heads[1, :n])
                torch.matmul(grad_out_heads[:n], v.transpose(-2, -1), out=grad_probs[:n])
                grad_logits = probs.mul_(grad_probs[:n].sub_(row_dot_b.unsqueeze(-1)))
                if grad_bias is not None:
                    grad_bias[start:start + n].add_(grad_logits)
                if grad_qkv is not None:
                    torch.matmul(grad_logits, k, out=grad_q[:n]).mul_(scale)
                    torch.matmul(grad_logits.transpose(-2, -1), q, out=grad_kv_heads[0, :n]).mul_(scale)
                    grad_kv_rows[:n].copy_(grad_kv_heads[:, :n].permute(1, 3, 0, 2, 4))
                    # summed in a contiguous buffer, then copied: index_add_ straight into the strided
                    # slice of grad_qkv measured 5% slower per training step
                    grad_kv.index_add_(0, keys.flatten(), grad_kv_rows[:n].view(-1, 2 * C))
                    grad_qkv[b, :, :C].index_copy_(0, rows, _window_rows(grad_q[:n]))
            if grad_qkv is not None:
                grad_qkv[b, :, C:] = grad_kv
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_qkv, None, None, grad_bias, None, None


@torch.fx.wrap
@register_notrace_function
def gathered_attention(qkv: torch.Tensor, query_index: torch.Tensor, key_index: torch.Tensor, bias: torch.Tensor,
                       scale: float, dropout_p: float = 0., training: bool = False) -> torch.Tensor:
    """Windowed attention on projected token rows.

    qkv (B, T, 3C): q, k and v of each token, heads interleaved within each; query_index (nW·ws²,)
    the rows whose queries attend, window by window (a permutation of the map's rows 0..nW·ws²-1);
    key_index (nW, n_keys) the rows each window's key slots read; bias (nW, nH, ws², n_keys) the
    additive logit bias, the same for every image. Returns (B, nW·ws², C): row i is the output of
    the query in row i.

    On the CPU, training takes the memory-saving function with its own backward (compiled too) and
    eager evaluation runs one image at a time (its gathered rows stay in cache): float32, float64 and
    (on CPUs with bf16 instructions) bf16 by batched products around materialised logits, a chunk of
    windows at a time, other dtypes by the fused kernel. Compiled or exported evaluation,
    TorchScript, other devices and attention dropout take PyTorch's SDPA on the whole batch.
    """
    num_windows, num_heads, queries, num_keys = bias.shape[0], bias.shape[1], bias.shape[2], bias.shape[3]
    if not torch.jit.is_scripting():
        if (training and qkv.device.type == 'cpu' and dropout_p == 0. and torch.is_grad_enabled()
                and bias.requires_grad):
            return _GatheredBiasedAttention.apply(qkv, query_index, key_index, bias, num_heads, scale)
        if torch.is_grad_enabled() and bias.requires_grad and not qkv.requires_grad:
            # Only the bias tables train here (frozen projections, first block). SDPA then skips the
            # log-sum-exp that CUDA's memory-efficient backward reads to get the bias gradient, and
            # that backward reads memory it does not own (pytorch/pytorch#148476). Rows that ask for
            # a gradient (thrown away) make the forward keep it.
            qkv = qkv.detach().requires_grad_()
        if qkv.device.type == 'cpu' and not torch.is_grad_enabled() and not torch.compiler.is_compiling():
            if _materialises(qkv):
                return _cpu_materialised_attention(qkv, query_index, key_index, bias, scale)
            return _cpu_window_attention(qkv, query_index, key_index, bias, scale)[0]
    B, T, C = qkv.shape[0], qkv.shape[1], qkv.shape[2] // 3
    head_dim = C // num_heads
    # Heads and windows merged into SDPA's head dimension, heads outermost: gathering tokens from a
    # head-major view of the rows writes q, k and v in that order directly, with no copy after.
    q_rows, k_rows, v_rows = qkv.view(B, T, 3, num_heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    keys = key_index.flatten()
    q = q_rows.index_select(2, query_index).view(B, num_heads * num_windows, queries, head_dim)
    k = k_rows.index_select(2, keys).view(B, num_heads * num_windows, num_keys, head_dim)
    v = v_rows.index_select(2, keys).view(B, num_heads * num_windows, num_keys, head_dim)
    # head-major too; concatenated rather than reshaped, which would ask the exporter whether the
    # transposed bias happens to be contiguous (only for one window or one head) and fix the size
    bias = torch.cat(bias.unbind(1)).unsqueeze(0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    # a view where SDPA returns heads outermost (CPU), a copy where windows·heads are innermost (CUDA)
    out = out.reshape(B, num_heads, num_windows * queries, head_dim).transpose(1, 2)
    # query_index is a permutation of the rows, so every row of the empty tensor is written
    return out.new_empty(out.shape).index_copy(1, query_index, out).view(B, -1, C)


class FocalAttention(nn.Module):
    """Attention of one block's windows to their own tokens, neighbour tokens and pooled levels.

    Key/value slots of every window, in the reference's order: ws² window tokens, the neighbour
    tokens (if expand_size > 0), then K_k² pooled cells for each pooled level k.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, expand_size: int, shift_size: int,
                 focal_window: int, pooled_levels: int, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 attn_drop: float = 0., proj_drop: float = 0.):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.expand_size = expand_size
        self.shift_size = shift_size
        self.focal_window = focal_window
        self.pooled_levels = pooled_levels
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        ws = window_size
        pooled_sizes = [focal_window + 2 ** k - 1 for k in range(pooled_levels)]

        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        if expand_size > 0:
            positions = neighbour_key_positions(ws, expand_size)
            self.relative_position_bias_table_to_neighbors = nn.Parameter(
                torch.zeros(1, num_heads, ws * ws, positions.shape[0]))
            trunc_normal_(self.relative_position_bias_table_to_neighbors, std=.02)
        else:
            positions = None
            self.relative_position_bias_table_to_neighbors = None
        self.relative_position_bias_table_to_windows = nn.ParameterList()
        for K in pooled_sizes:
            table = nn.Parameter(torch.zeros(num_heads, (ws + K - 1) ** 2))
            trunc_normal_(table, std=.02)
            self.relative_position_bias_table_to_windows.append(table)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

        # Configuration-only tables: the neighbour offsets (for tables built in a graph) and the bias
        # entry of every (query, key slot) of the window and pooled tables; the neighbour table already
        # holds one value per (query, slot). The pooled levels' indices are concatenated along the slots.
        self.register_buffer('neighbour_positions', positions, persistent=False)
        self.register_buffer('window_bias_index', relative_position_index(ws, ws), persistent=False)
        self.pooled_key_counts = [K * K for K in pooled_sizes]
        pooled_index = [relative_position_index(ws, K) for K in pooled_sizes]
        self.register_buffer('pooled_bias_index', torch.cat(pooled_index, dim=1) if pooled_index else None,
                             persistent=False)

    def attention_bias(self, mask: torch.Tensor) -> torch.Tensor:
        """(nW, nH, ws², n_keys) additive logit bias: learned tables plus the fixed mask.

        Each table is indexed on its own, so that its gradient arrives as a fresh tensor of the
        parameter's own layout (DDP's gradient buckets expect exactly that).
        """
        parts = [self.relative_position_bias_table[self.window_bias_index].permute(2, 0, 1)]
        if self.relative_position_bias_table_to_neighbors is not None:
            parts.append(self.relative_position_bias_table_to_neighbors[0])
        if self.pooled_bias_index is not None:
            pooled_index = self.pooled_bias_index.split(self.pooled_key_counts, dim=1)
            for k, table in enumerate(self.relative_position_bias_table_to_windows):
                parts.append(table[:, pooled_index[k]])
        return torch.cat(parts, dim=-1) + mask.unsqueeze(1)

    def forward(self, z: torch.Tensor, pooled: List[torch.Tensor]) -> torch.Tensor:
        """z: (B, Hp, Wp, C) normalized, padded, shifted map; pooled: (B, Gh_k, Gw_k, C) per level.

        Returns (B, Hp, Wp, C). The map's tokens and each level's cells are projected together: one
        row of q, k, v per token.
        """
        B, Hp, Wp, C = z.shape[0], z.shape[1], z.shape[2], z.shape[3]
        query_index, key_index, mask = block_attention_tables(
            z, self.window_size, self.expand_size, self.shift_size, self.focal_window, self.pooled_levels,
            self.neighbour_positions)
        # The reference gives out-of-grid cells a zero key and value; they are masked with -inf, so
        # no zero row is needed (zeroing one in place made autograd copy the whole qkv gradient).
        tokens = [z.flatten(1, 2)] + [cells.flatten(1, 2) for cells in pooled]
        qkv = self.qkv(torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0])
        bias = self.attention_bias(mask).to(qkv.dtype)
        out = gathered_attention(qkv, query_index, key_index, bias, self.scale,
                                 self.attn_drop if self.training else 0., self.training)
        out = self.proj(out.view(B, Hp, Wp, C))
        return self.proj_drop(out)


class FocalTransformerBlock(nn.Module):
    """Pre-norm block on (B, H, W, C) maps: focal attention then MLP, each with a residual (and
    optional layer scale). `input_resolution` is the map size the block is built for: it fixes the
    window (shrunk to the map, as the reference does, when the map is no larger than the window);
    any other map size is padded to the window at run time."""

    def __init__(self, dim: int, input_resolution: Tuple[int, int], num_heads: int, window_size: int = 7,
                 expand_size: int = 0, shift_size: int = 0, mlp_ratio: float = 4., qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, drop: float = 0., attn_drop: float = 0.,
                 drop_path: float = 0., pool_method: str = 'none', focal_level: int = 1,
                 focal_window: int = 1, use_layerscale: bool = False, layerscale_value: float = 1e-4):
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        H, W = input_resolution
        if min(H, W) <= window_size:
            # The whole map is one window: no neighbours outside it and nothing to shift.
            window_size, expand_size, shift_size = min(H, W), 0, 0
        self.window_size = window_size
        self.expand_size = expand_size
        self.shift_size = shift_size
        self.pool_method = pool_method
        self.focal_level = focal_level
        self.focal_window = focal_window
        pooled_levels = focal_level - 1 if pool_method != 'none' else 0
        self.pooled_levels = pooled_levels

        self.pool_layers = nn.ModuleList()
        for k in range(pooled_levels if pool_method in ('fc', 'conv') else 0):
            cell = window_size // 2 ** k
            if pool_method == 'fc':
                self.pool_layers.append(nn.Linear(cell * cell, 1))
            else:
                self.pool_layers.append(nn.Conv2d(dim, dim, kernel_size=cell, stride=cell, groups=dim))
        if use_layerscale:
            self.gamma_1 = nn.Parameter(layerscale_value * torch.ones(dim))
            self.gamma_2 = nn.Parameter(layerscale_value * torch.ones(dim))
        else:
            self.gamma_1 = self.gamma_2 = None
        self.norm1 = nn.LayerNorm(dim)
        self.attn = FocalAttention(
            dim, num_heads, window_size, expand_size, shift_size, focal_window, pooled_levels,
            qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), drop=drop)

    def pooling_cells(self, z: torch.Tensor, level: int) -> torch.Tensor:
        """The part of the padded map (B, Hp, Wp, C) that level `level`'s cells cover: (B, Gh·g, Gw·g, C).

        The grid has 2**level cells per window along each axis, of g = ws // 2**level tokens; where
        that leaves rows or columns over (ws not a multiple of 2**level), half of them (rounded down)
        are dropped at the top/left and the rest at the bottom/right.
        """
        ws = self.window_size
        cell = ws >> level
        if cell << level == ws:
            return z
        Hp, Wp = z.shape[1], z.shape[2]
        Hg, Wg = Hp // ws * (1 << level) * cell, Wp // ws * (1 << level) * cell
        top, left = (Hp - Hg) // 2, (Wp - Wg) // 2
        return z[:, top:top + Hg, left:left + Wg]

    def pool(self, z: torch.Tensor) -> List[torch.Tensor]:
        """One token per cell of each pooled level's grid: [(B, Gh_k, Gw_k, C)] from (B, Hp, Wp, C)."""
        B, C, ws = z.shape[0], z.shape[3], self.window_size
        pooled: List[torch.Tensor] = []
        for k, layer in enumerate(self.pool_layers):  # fc and conv pooling
            cells = self.pooling_cells(z, k)
            if self.pool_method == 'conv':
                pooled.append(layer(cells.permute(0, 3, 1, 2)).permute(0, 2, 3, 1))
            else:
                cell = ws >> k
                Gh, Gw = cells.shape[1] // cell, cells.shape[2] // cell
                cells = cells.reshape(B, Gh, cell, Gw, cell, C).permute(0, 1, 3, 5, 2, 4)
                pooled.append(layer(cells.reshape(B, Gh, Gw, C, cell * cell)).squeeze(-1))
        if self.pool_method == 'mean' or self.pool_method == 'max':
            for k in range(self.pooled_levels):
                cell = ws >> k
                cells = self.pooling_cells(z, k)
                cells = cells.reshape(B, cells.shape[1] // cell, cell, cells.shape[2] // cell, cell, C)
                pooled.append(cells.mean(dim=(2, 4)) if self.pool_method == 'mean' else cells.amax(dim=(2, 4)))
        return pooled

    def focal_attention(self, x: torch.Tensor) -> torch.Tensor:
        H, W = x.shape[1], x.shape[2]
        z = pad_to_multiple(self.norm1(x), self.window_size, True)
        if self.shift_size > 0:
            z = torch.roll(z, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        out = self.attn(z, self.pool(z))
        if self.shift_size > 0:
            out = torch.roll(out, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        return crop_to(out, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.focal_attention(x)
        if self.gamma_1 is not None:
            attn = self.gamma_1 * attn
        x = x + self.drop_path(attn)
        mlp = self.mlp(self.norm2(x))
        if self.gamma_2 is not None:
            mlp = self.gamma_2 * mlp
        return x + self.drop_path(mlp)

    def flops(self) -> float:
        H, W = self.input_resolution
        C, nH, ws, e = self.dim, self.num_heads, self.window_size, self.expand_size
        N, head_dim = ws * ws, C // nH
        num_windows = H * W / N
        attn = 4 * N * C * C + 2 * nH * N * head_dim * N
        if self.pooled_levels > 0:
            attn += 2 * nH * N * head_dim * self.focal_window ** 2
        if e > 0:
            attn += 2 * nH * N * head_dim * ((ws + 2 * e) ** 2 - N)
        flops = 2 * C * H * W + num_windows * attn + 2 * H * W * C * C * self.mlp_ratio
        for k in range(self.pooled_levels):
            cell = ws // 2 ** k
            flops += num_windows * 2 ** k * (C * cell * cell + 3 * C * C)
        return flops


class PatchEmbed(nn.Module):
    """Strided convolution from (B, C, H, W) to LayerNorm'ed (B, H', W', C') maps."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, use_conv_embed: bool = False,
                 is_stem: bool = False, norm: bool = True, use_pre_norm: bool = False):
        super().__init__()
        if use_conv_embed:
            kernel, stride, padding = (7, 4, 2) if is_stem else (3, 2, 1)
        else:
            kernel, stride, padding = patch_size, patch_size, 0
        self.in_chans, self.embed_dim, self.kernel_size = in_chans, embed_dim, kernel
        self.pre_norm = nn.GroupNorm(1, in_chans) if use_pre_norm else None
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) with H, W multiples of the stride -> (B, H / stride, W / stride, C')."""
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        x = self.proj(x).permute(0, 2, 3, 1)
        return self.norm(x) if self.norm is not None else x

    def flops(self, output_resolution: Tuple[int, int]) -> float:
        Ho, Wo = output_resolution
        flops = Ho * Wo * self.embed_dim * self.in_chans * self.kernel_size ** 2
        if self.norm is not None:
            flops += Ho * Wo * self.embed_dim
        return flops


class FocalStage(nn.Module):
    """Blocks at one resolution, then (except for the last stage) a patch embedding that halves it,
    rounding up: an odd map is zero-padded at the bottom/right first."""

    def __init__(self, dim: int, input_resolution: Tuple[int, int], blocks: List[FocalTransformerBlock],
                 downsample: Optional[PatchEmbed], use_checkpoint: bool = False):
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        self.use_checkpoint = use_checkpoint

    def set_input_resolution(self, resolution: Tuple[int, int]):
        """The map size reported (FLOPs); the blocks' structure stays as built."""
        self.input_resolution = resolution
        for block in self.blocks:
            block.input_resolution = resolution

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward_downsample(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is None:
            return x
        # (B, C, H, W) in channels-last memory: the layout the convolution runs fastest in on the CPU
        return self.downsample(pad_to_multiple(x, 2, True).permute(0, 3, 1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_downsample(self.forward_blocks(x))

    def flops(self) -> float:
        flops = sum(block.flops() for block in self.blocks)
        if self.downsample is not None:
            H, W = self.input_resolution
            flops += self.downsample.flops((H // 2, W // 2))
        return flops


def _per_stage(name: str, values: Sequence, num_stages: int) -> list:
    values = list(values)
    if len(values) < num_stages:
        raise ValueError(f'{name} has {len(values)} entries, expected one per stage ({num_stages}): {values}')
    return values[:num_stages]


def _stage_resolutions(img_size: Tuple[int, int], patch_size: int, num_stages: int) -> List[Tuple[int, int]]:
    """Map size of each stage for an image: ceil division by the patch, then halving rounded up."""
    return [(math.ceil(img_size[0] / (patch_size * 2 ** i)), math.ceil(img_size[1] / (patch_size * 2 ** i)))
            for i in range(num_stages)]


class FocalTransformer(nn.Module):
    """Focal Transformer image classifier (keyword arguments as the reference implementation's).

    Takes (B, in_chans, H, W) of any size of at least `patch_size * 2**(stages - 1)` pixels a side;
    `strict_img_size=True` accepts `img_size` only. `img_size` fixes the block structure (window
    shrunk where a stage map is no larger than the window, as the reference does) and the size of
    `absolute_pos_embed`, which is resampled for other sizes. `global_pool` is timm's: 'avg' or ''.
    `expand_stages` is accepted for the reference's configs and unused, as in the reference.

    timm conventions (timm's tests/test_models.py passes for the six registered models, downloads
    excluded: `python -m pytest <timm>/tests/test_models.py -k "focal_ and not pretrained" -p models`
    from the repository root): forward_features gives (B, H, W, C) maps (`output_fmt` 'NHWC'),
    forward_intermediates/features_only the stage maps, torch.fx, TorchScript and torch.export work.

    torch.export with dynamic height and width: the example input and the dimensions' minimum must
    give every stage at least two windows per axis (export fixes a dimension it sees as 1), and the
    example batch at least 2; e.g. the released models: example 448x448, Dim(min=225).
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, mlp_ratio: float = 4.,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, drop_rate: float = 0.,
                 attn_drop_rate: float = 0., drop_path_rate: float = 0.1, ape: bool = False,
                 patch_norm: bool = True, use_checkpoint: bool = False, use_shift: bool = False,
                 focal_stages: Sequence[int] = (0, 1, 2, 3), focal_levels: Sequence[int] = (1, 1, 1, 1),
                 focal_windows: Sequence[int] = (7, 5, 3, 1), focal_pool: str = 'fc',
                 expand_stages: Sequence[int] = (0, 1, 2, 3), expand_sizes: Sequence[int] = (3, 3, 3, 3),
                 expand_layer: str = 'all', use_conv_embed: bool = False, use_layerscale: bool = False,
                 layerscale_value: float = 1e-4, use_pre_norm: bool = False, strict_img_size: bool = False,
                 global_pool: str = 'avg', **kwargs):
        super().__init__()
        if kwargs:
            raise ValueError(f'unknown FocalTransformer argument(s): {sorted(kwargs)}')
        depths, num_heads = list(depths), list(num_heads)
        num_stages = len(depths)
        if num_stages == 0 or len(num_heads) != num_stages:
            raise ValueError(f'depths {depths} and num_heads {num_heads} must have the same, non-zero length')
        focal_levels = _per_stage('focal_levels', focal_levels, num_stages)
        focal_windows = _per_stage('focal_windows', focal_windows, num_stages)
        expand_sizes = _per_stage('expand_sizes', expand_sizes, num_stages)
        if focal_pool not in POOL_METHODS:
            raise ValueError(f'focal_pool {focal_pool!r} is not one of {POOL_METHODS}')
        if expand_layer not in EXPAND_LAYERS:
            raise ValueError(f'expand_layer {expand_layer!r} is not one of {EXPAND_LAYERS}')
        if global_pool not in ('avg', ''):
            raise ValueError(f"global_pool {global_pool!r} is not one of ('avg', '')")
        if use_conv_embed and patch_size != 4:
            raise ValueError(f'use_conv_embed embeds with a stride-4 convolution; patch_size {patch_size} must be 4')
        if window_size < 1:
            raise ValueError(f'window_size must be positive, got {window_size}')
        for i in range(num_stages):
            dim = embed_dim * 2 ** i
            if depths[i] < 1 or num_heads[i] < 1 or dim % num_heads[i]:
                raise ValueError(f'stage {i}: dim {dim} must split into num_heads {num_heads[i]} '
                                 f'and depth {depths[i]} must be positive')
            if focal_windows[i] < 1 or focal_windows[i] % 2 == 0:
                raise ValueError(f'focal_windows[{i}] = {focal_windows[i]} must be a positive odd number')
            if focal_levels[i] < 1 or (focal_pool != 'none' and window_size // 2 ** (focal_levels[i] - 2) < 1):
                raise ValueError(f'focal_levels[{i}] = {focal_levels[i]} must be >= 1 and leave pooled cells '
                                 f'of at least one token for window_size {window_size}')
            if not 0 <= expand_sizes[i] <= window_size:
                raise ValueError(f'expand_sizes[{i}] = {expand_sizes[i]} must lie in [0, window_size]')
        img_size = to_2tuple(img_size)
        self.patch_size = patch_size
        self.min_img_size = patch_size * 2 ** (num_stages - 1)
        if min(img_size) < self.min_img_size:
            raise ValueError(f'img_size {img_size} is too small for {num_stages} stages with patch_size {patch_size}: '
                             f'at least {self.min_img_size} pixels a side')
        resolutions = _stage_resolutions(img_size, patch_size, num_stages)

        self.num_classes = num_classes
        self.num_features = self.head_hidden_size = embed_dim * 2 ** (num_stages - 1)
        self.embed_dim = embed_dim
        self.img_size = img_size
        self.patches_resolution = resolutions[0]
        self.strict_img_size = strict_img_size
        self.global_pool = global_pool
        self.output_fmt = 'NHWC'
        self.ape = ape
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size, use_conv_embed, is_stem=True,
                                      norm=patch_norm)
        if ape:
            grid = resolutions[0]
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=.02)
        else:
            self.absolute_pos_embed = None
        self.pos_drop = nn.Dropout(p=drop_rate)

        drop_path = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i in range(num_stages):
            dim = embed_dim * 2 ** i
            blocks = []
            for j in range(depths[i]):
                expand = expand_sizes[i]
                if (expand_layer == 'even' and j % 2 == 0) or (expand_layer == 'odd' and j % 2 == 1):
                    expand = 0
                blocks.append(FocalTransformerBlock(
                    dim, resolutions[i], num_heads[i], window_size=window_size, expand_size=expand,
                    shift_size=window_size // 2 if use_shift and j % 2 == 1 else 0, mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
                    drop_path=drop_path[sum(depths[:i]) + j],
                    pool_method=focal_pool if i in focal_stages else 'none',
                    focal_level=focal_levels[i], focal_window=focal_windows[i],
                    use_layerscale=use_layerscale, layerscale_value=layerscale_value))
            downsample = None
            if i < num_stages - 1:
                downsample = PatchEmbed(dim, 2 * dim, 2, use_conv_embed, use_pre_norm=use_pre_norm)
            self.layers.append(FocalStage(dim, resolutions[i], blocks, downsample, use_checkpoint))
            self.feature_info.append(dict(num_chs=dim, reduction=patch_size * 2 ** i, module=f'layers.{i}'))
        self.norm = nn.LayerNorm(self.num_features)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module):
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'absolute_pos_embed'}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        return {'relative_position_bias_table'}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        """timm's parameter groups (layer-wise learning-rate decay): the stem, then the blocks in order."""
        return dict(
            stem=r'^absolute_pos_embed|^patch_embed',
            blocks=r'^layers\.(\d+)' if coarse else [
                (r'^layers\.(\d+)\.downsample', (0,)),
                (r'^layers\.(\d+)\.\w+\.(\d+)', None),
                (r'^norm', (99999,)),
            ])

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True):
        for stage in self.layers:
            stage.use_checkpoint = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None):
        if global_pool is not None:
            if global_pool not in ('avg', ''):
                raise ValueError(f"global_pool {global_pool!r} is not one of ('avg', '')")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            self._init_weights(self.head)

    @torch.no_grad()
    def set_input_size(self, img_size: Union[int, Tuple[int, int]]):
        """Make the model report `img_size` (img_size, patches_resolution, the stages' resolutions and
        FLOPs) and resample `absolute_pos_embed` to it; the block structure stays as built."""
        img_size = to_2tuple(img_size)
        if min(img_size) < self.min_img_size:
            raise ValueError(f'img_size {img_size} is too small: at least {self.min_img_size} pixels a side')
        resolutions = _stage_resolutions(img_size, self.patch_size, len(self.layers))
        if self.absolute_pos_embed is not None:
            resampled = resample_abs_pos_embed(self.absolute_pos_embed, new_size=list(resolutions[0]),
                                               old_size=list(self.patches_resolution), num_prefix_tokens=0)
            self.absolute_pos_embed = nn.Parameter(resampled)
        self.img_size = img_size
        self.patches_resolution = resolutions[0]
        for stage, resolution in zip(self.layers, resolutions):
            stage.set_input_resolution(resolution)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, ceil(H / patch), ceil(W / patch), embed_dim)."""
        x = check_image_size(x, self.img_size, self.min_img_size, self.strict_img_size)
        x = self.patch_embed(pad_to_multiple(x, self.patch_size, False))
        if self.absolute_pos_embed is not None:
            x = add_position_embedding(x, self.absolute_pos_embed, self.patches_resolution)
        return self.pos_drop(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normalized last-stage map (B, H_last, W_last, C_last)."""
        x = self._embed(x)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if self.global_pool == 'avg':
            x = x.mean(dim=(1, 2))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[Union[int, List[int]]] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False
                              ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage maps before each downsampling, for dense prediction (timm's features_only uses this).

        indices: stages to return (an int n: the last n; None: all). norm: the final norm on the last
        stage's map. stop_early: run no stage past the last one wanted. output_fmt: 'NCHW' (B, C, H, W)
        or 'NHWC'. Returns the maps, or (final normalized map as forward_features, maps).
        """
        if output_fmt not in ('NCHW', 'NHWC'):
            raise ValueError(f"output_fmt {output_fmt!r} is not one of ('NCHW', 'NHWC')")
        num_stages = len(self.layers)
        take_indices, max_index = feature_take_indices(num_stages, indices)
        last = max_index if stop_early else num_stages - 1
        x = self._embed(x)
        intermediates: List[torch.Tensor] = []
        for i, stage in enumerate(self.layers):
            if i <= last:
                x = stage.forward_blocks(x)
                if i in take_indices:
                    feature = self.norm(x) if norm and i == num_stages - 1 else x
                    intermediates.append(feature.permute(0, 3, 1, 2).contiguous() if output_fmt == 'NCHW'
                                         else feature)
                if i < last:
                    x = stage.forward_downsample(x)
        if intermediates_only:
            return intermediates
        if last == num_stages - 1:
            x = self.norm(x)
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop what the wanted stage maps do not need (later stages, the last kept stage's
        downsampling, the final norm if asked, the head); returns the absolute indices kept."""
        take_indices, max_index = feature_take_indices(len(self.layers), indices)
        self.layers = self.layers[:max_index + 1]
        self.layers[-1].downsample = None
        if prune_norm or max_index < len(self.feature_info) - 1:
            self.norm = nn.Identity()
        self.feature_info = self.feature_info[:max_index + 1]
        self.num_features = self.head_hidden_size = self.feature_info[-1]['num_chs']
        if prune_head:
            self.reset_classifier(0, '')
        return take_indices

    def flops(self) -> float:
        flops = self.patch_embed.flops(self.patches_resolution)
        flops += sum(stage.flops() for stage in self.layers)
        H0, W0 = self.patches_resolution
        flops += self.num_features * H0 * W0 // 2 ** len(self.layers)
        flops += self.num_features * self.num_classes
        return flops


def checkpoint_filter_fn(state_dict: dict, model: FocalTransformer) -> dict:
    """Adapt a checkpoint (raw, under 'model', DDP names: see unwrap_state_dict) to
    `model.load_state_dict(strict=True)`.

    The reference stores integer tables it derives from the configuration and the shift mask; this
    model derives its own, so they are dropped. Parameters pass through untouched: a missing,
    unexpected or wrong-shape parameter still fails the strict load, which names the key.
    """
    out = {}
    for key, value in unwrap_state_dict(state_dict).items():
        leaf = key.rsplit('.', 1)[-1]
        if leaf.startswith(REFERENCE_BUFFER_PREFIXES) or leaf == 'attn_mask':
            continue
        out[key] = value
    return out


def _create_focal(variant: str, pretrained: bool = False, **kwargs) -> FocalTransformer:
    if pretrained:
        # timm would read the file or URL with torch.load; models.checkpoint reads it instead (every format
        # it accepts, nothing unpickled unrestricted, a cache entry per URL) and timm is given the weights.
        pretrained_cfg = resolve_pretrained_cfg(variant, kwargs.pop('pretrained_cfg', None),
                                                kwargs.pop('pretrained_cfg_overlay', None))
        location = pretrained_cfg.file or pretrained_cfg.url
        if pretrained_cfg.state_dict is None and location:
            weights = unwrap_state_dict(read_checkpoint(location))
            pretrained_cfg = dataclasses.replace(pretrained_cfg, state_dict=weights)
        kwargs['pretrained_cfg'] = pretrained_cfg
    model = build_model_with_cfg(
        FocalTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3)),
        **kwargs)
    for built in (model, getattr(model, 'model', None)):  # a feature wrapper holds the network as .model
        getattr(built, 'pretrained_cfg', {}).pop('state_dict', None)  # the weights are loaded: keep no copy
    return model


def _cfg(file_name: str, **kwargs) -> dict:
    return {
        'url': f'https://projects4jw.blob.core.windows.net/model/focal-transformer/imagenet1k/{file_name}',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': (7, 7), 'crop_pct': 0.875,
        'interpolation': 'bicubic', 'mean': (0.485, 0.456, 0.406), 'std': (0.229, 0.224, 0.225),
        'first_conv': 'patch_embed.proj', 'classifier': 'head', **kwargs,
    }


default_cfgs = generate_default_cfgs({
    'focal_tiny_patch4_window7_224': _cfg('focal-tiny-is224-ws7.pth'),
    'focal_tiny_useconv_patch4_window7_224': _cfg('focal-tiny-useconv-is224-ws7.pth'),
    'focal_small_patch4_window7_224': _cfg('focal-small-is224-ws7.pth'),
    'focal_small_useconv_patch4_window7_224': _cfg('focal-small-useconv-is224-ws7.pth'),
    'focal_base_patch4_window7_224': _cfg('focal-base-is224-ws7.pth'),
    'focal_base_useconv_patch4_window7_224': _cfg('focal-base-useconv-is224-ws7.pth'),
})

# The recipe every released model shares: two focal levels with fc pooling, expand size 3.
_RELEASED = dict(window_size=7, focal_pool='fc', focal_stages=(0, 1, 2, 3), focal_levels=(2, 2, 2, 2),
                 focal_windows=(7, 5, 3, 1), expand_sizes=(3, 3, 3, 3), drop_path_rate=0.2)
_TINY = dict(_RELEASED, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_SMALL = dict(_RELEASED, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_BASE = dict(_RELEASED, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))


# Each constructor's keyword arguments override its architecture (timm.create_model(name, embed_dim=64)).
@register_model
def focal_tiny_patch4_window7_224(pretrained: bool = False, **kwargs) -> FocalTransformer:
    model_args = _TINY
    return _create_focal('focal_tiny_patch4_window7_224', pretrained, **dict(model_args, **kwargs))


@register_model
def focal_tiny_useconv_patch4_window7_224(pretrained: bool = False, **kwargs) -> FocalTransformer:
    model_args = dict(_TINY, use_conv_embed=True)
    return _create_focal('focal_tiny_useconv_patch4_window7_224', pretrained, **dict(model_args, **kwargs))


@register_model
def focal_small_patch4_window7_224(pretrained: bool = False, **kwargs) -> FocalTransformer:
    model_args = _SMALL
    return _create_focal('focal_small_patch4_window7_224', pretrained, **dict(model_args, **kwargs))


@register_model
def focal_small_useconv_patch4_window7_224(pretrained: bool = False, **kwargs) -> FocalTransformer:
    model_args = dict(_SMALL, use_conv_embed=True)
    return _create_focal('focal_small_useconv_patch4_window7_224', pretrained, **dict(model_args, **kwargs))


@register_model
def focal_base_patch4_window7_224(pretrained: bool = False, **kwargs) -> FocalTransformer:
    model_args = _BASE
    return _create_focal('focal_base_patch4_window7_224', pretrained, **dict(model_args, **kwargs))


@register_model
def focal_base_useconv_patch4_window7_224(pretrained: bool = False, **kwargs) -> FocalTransformer:
    model_args = dict(_BASE, use_conv_embed=True)
    return _create_focal('focal_base_useconv_patch4_window7_224', pretrained, **dict(model_args, **kwargs))
