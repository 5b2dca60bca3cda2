"""Focal Transformer (Yang et al., "Focal Self-attention for Local-Global Interactions in Vision
Transformers", NeurIPS 2021).

Computes the function of the released ImageNet-1K checkpoints (see
`shared/reference/FOCAL_ATTENTION.md`), parameter names and shapes included. Everything that depends
only on the configuration (which token each key slot reads, which bias entry each logit takes, the
shift and out-of-grid masks) is built once as index tables; a forward pass is then one gather for
the keys/values, a lookup of each bias table and one fused attention call per block.
"""
import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, Mlp, trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from .unwrap import unwrap_state_dict

__all__ = ['FocalTransformer', 'checkpoint_filter_fn', 'neighbour_key_positions']

POOL_METHODS = ('none', 'fc', 'conv', 'mean', 'max')
EXPAND_LAYERS = ('all', 'even', 'odd')
# The reference adds -100 to logits that must vanish; in float32 exp(-100) is lost next to any real
# logit, so this is the same function as leaving the key out.
MASK_VALUE = -100.0
# Names of the integer tables the reference stores in its checkpoints; ours are derived instead.
REFERENCE_BUFFER_PREFIXES = ('relative_position_index', 'valid_ind_rolled', 'valid_ind_unfold')


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


def shift_region_mask(padded_size: Tuple[int, int], window_size: int, shift_size: int) -> torch.Tensor:
    """(nW, ws², ws²) with MASK_VALUE between tokens of different regions of the rolled map.

    Built on the padded map, as Swin's detection backbone does, so that any map size works.
    """
    Hp, Wp = padded_size
    regions = torch.zeros(Hp, Wp, dtype=torch.long)
    bounds = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    region_id = 0
    for rows in bounds:
        for cols in bounds:
            regions[rows, cols] = region_id
            region_id += 1
    ws = window_size
    windows = regions.view(Hp // ws, ws, Wp // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
    different = windows[:, :, None] != windows[:, None, :]
    return different.float() * MASK_VALUE


def window_token_index(padded_size: Tuple[int, int], window_size: int) -> torch.Tensor:
    """(nW, ws²) flat index of each window's tokens in the padded map, windows row-major."""
    Hp, Wp = padded_size
    ws = window_size
    flat = torch.arange(Hp * Wp).view(Hp // ws, ws, Wp // ws, ws)
    return flat.permute(0, 2, 1, 3).reshape(-1, ws * ws)


def neighbour_token_index(padded_size: Tuple[int, int], window_size: int, expand_size: int) -> torch.Tensor:
    """(nW, n_neighbours) flat index of each window's neighbour keys, wrapping around the map."""
    Hp, Wp = padded_size
    ws = window_size
    top = torch.arange(0, Hp, ws).repeat_interleave(Wp // ws)
    left = torch.arange(0, Wp, ws).repeat(Hp // ws)
    offsets = neighbour_key_positions(window_size, expand_size)
    rows = (top[:, None] + offsets[None, :, 0]) % Hp
    cols = (left[:, None] + offsets[None, :, 1]) % Wp
    return rows * Wp + cols


def pooled_block_index(window_grid: Tuple[int, int], level: int, focal_window: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Cells of pooled level `level` that each window attends.

    Returns (index, valid): both (nW, K²) with K = focal_window + 2**level - 1; index is the flat
    cell index in the (nWh·2**level, nWw·2**level) grid, meaningful only where valid marks a cell
    inside the grid.
    """
    nWh, nWw = window_grid
    scale = 2 ** level
    K = focal_window + scale - 1
    Gh, Gw = nWh * scale, nWw * scale
    top = torch.arange(nWh).repeat_interleave(nWw) * scale - (focal_window - 1) // 2
    left = torch.arange(nWw).repeat(nWh) * scale - (focal_window - 1) // 2
    a, b = torch.meshgrid(torch.arange(K), torch.arange(K), indexing='ij')
    rows = top[:, None] + a.flatten()[None, :]
    cols = left[:, None] + b.flatten()[None, :]
    valid = (rows >= 0) & (rows < Gh) & (cols >= 0) & (cols < Gw)
    return rows * Gw + cols, valid


def crop_or_pad(z: torch.Tensor, target: Tuple[int, int]) -> torch.Tensor:
    """Fit (B, H, W, C) to (Ht, Wt) rows/cols: drop or zero-pad, the smaller half at the top/left."""
    H, W = z.shape[1:3]
    Ht, Wt = target
    if H > Ht:
        z = z[:, (H - Ht) // 2:(H - Ht) // 2 + Ht]
    if W > Wt:
        z = z[:, :, (W - Wt) // 2:(W - Wt) // 2 + Wt]
    pad_rows, pad_cols = max(Ht - H, 0), max(Wt - W, 0)
    if pad_rows or pad_cols:
        z = F.pad(z, (0, 0, pad_cols // 2, pad_cols - pad_cols // 2, pad_rows // 2, pad_rows - pad_rows // 2))
    return z


class _GatheredBiasedAttention(torch.autograd.Function):
    """softmax(q kᵀ · scale + bias) v with k, v gathered from a token source, for CPU training.

    PyTorch's CPU fused attention has no gradient for the bias, so SDPA falls back to the unfused
    path, which keeps every attention matrix and the gathered keys/values for the backward pass.
    This runs the fused forward and keeps only q, the un-gathered source, the output and the
    log-sum-exp; the backward pass re-gathers each image's keys and recomputes its probabilities.
    """

    @staticmethod
    def forward(ctx, q, kv_source, key_index, bias, scale):
        k, v = _gather_keys(kv_source, key_index)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, attn_mask=bias, scale=scale)
        ctx.save_for_backward(q, kv_source, key_index, bias, out, lse)
        ctx.scale = scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, kv_source, key_index, bias, out, lse = ctx.saved_tensors
        scale = ctx.scale
        slots = key_index.flatten()
        M, num_keys, head_dim = q.shape[1], key_index.shape[1], q.shape[-1]
        grad_q = torch.empty_like(q)
        grad_source = torch.zeros_like(kv_source) if ctx.needs_input_grad[1] else None
        # Probabilities and the bias gradient (summed over images) in at least float32, so that a
        # low-precision input does not round them per image; float64 stays float64.
        exact_dtype = torch.promote_types(q.dtype, torch.float32)
        grad_bias = torch.zeros_like(bias, dtype=exact_dtype) if ctx.needs_input_grad[3] else None
        grad_kv = q.new_empty(2, M, num_keys, head_dim)
        # One image at a time, gathering its keys again: the gathered keys and the
        # (heads·windows, ws², n_keys) intermediates then stay in cache.
        for b in range(q.shape[0]):
            k, v = kv_source[:, b].index_select(2, slots).view(2, M, num_keys, head_dim)
            logits = torch.matmul(q[b], k.transpose(-2, -1)).mul_(scale).add_(bias[0])
            probs = logits.to(exact_dtype).sub_(lse[b].unsqueeze(-1)).exp_().to(q.dtype)
            torch.matmul(probs.transpose(-2, -1), grad_out[b], out=grad_kv[1])
            grad_probs = torch.matmul(grad_out[b], v.transpose(-2, -1))
            row_dot = (grad_out[b] * out[b]).sum(dim=-1, keepdim=True)
            grad_logits = probs.mul_(grad_probs.sub_(row_dot))
            torch.matmul(grad_logits, k, out=grad_q[b])
            torch.matmul(grad_logits.transpose(-2, -1), q[b], out=grad_kv[0])
            grad_kv[0].mul_(scale)
            if grad_bias is not None:
                grad_bias[0].add_(grad_logits)
            if grad_source is not None:
                grad_source[:, b].index_add_(2, slots, grad_kv.view(2, kv_source.shape[2], -1, head_dim))
        grad_q.mul_(scale)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_q, grad_source, None, grad_bias, None


def _gather_keys(kv_source: torch.Tensor, key_index: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(2, B, nH, tokens, hd) source and (nW, n_keys) index -> k, v of shape (B, nH·nW, n_keys, hd)."""
    _, B, nH, _, head_dim = kv_source.shape
    num_windows, num_keys = key_index.shape
    kv = kv_source.index_select(3, key_index.flatten())
    return kv.view(2, B, nH * num_windows, num_keys, head_dim).unbind(0)


def gathered_attention(q: torch.Tensor, kv_source: torch.Tensor, key_index: torch.Tensor, bias: torch.Tensor,
                       scale: float, dropout_p: float = 0.) -> torch.Tensor:
    """Attention of q (B, nH·nW, ws², hd) to keys/values gathered from kv_source at key_index."""
    if q.device.type == 'cpu' and dropout_p == 0. and torch.is_grad_enabled() and bias.requires_grad:
        return _GatheredBiasedAttention.apply(q, kv_source, key_index, bias, scale)
    if torch.is_grad_enabled() and bias.requires_grad and not (q.requires_grad or kv_source.requires_grad):
        # Only the bias tables train here (frozen projections, first block). SDPA then skips the
        # log-sum-exp that CUDA's memory-efficient backward reads to get the bias gradient, and that
        # backward reads memory it does not own (pytorch/pytorch#148476). A q that asks for a
        # gradient (thrown away) makes the forward keep it.
        q = q.detach().requires_grad_()
    k, v = _gather_keys(kv_source, key_index)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)


class FocalAttention(nn.Module):
    """Attention of one block's windows to their own tokens, neighbour tokens and pooled levels.

    Key/value slots of every window, in the reference's order: ws² window tokens, the neighbour
    tokens (if expand_size > 0), then K_k² pooled cells for each pooled level k.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int, padded_size: Tuple[int, int],
                 expand_size: int, shift_size: int, focal_window: int, pooled_levels: int,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, attn_drop: float = 0.,
                 proj_drop: float = 0.):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.expand_size = expand_size
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        ws = window_size
        Hp, Wp = padded_size
        window_grid = (Hp // ws, Wp // ws)
        num_windows = window_grid[0] * window_grid[1]
        pooled_grids = [(window_grid[0] * 2 ** k, window_grid[1] * 2 ** k) for k in range(pooled_levels)]
        self.pooled_grids = pooled_grids
        pooled_sizes = [focal_window + 2 ** k - 1 for k in range(pooled_levels)]

        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * ws - 1) ** 2, num_heads))
        num_neighbours = 0
        if expand_size > 0:
            num_neighbours = 4 * ws * ws - 4 * (ws - expand_size) ** 2
            self.relative_position_bias_table_to_neighbors = nn.Parameter(
                torch.zeros(1, num_heads, ws * ws, num_neighbours))
            trunc_normal_(self.relative_position_bias_table_to_neighbors, std=.02)
        self.relative_position_bias_table_to_windows = nn.ParameterList()
        for K in pooled_sizes:
            table = nn.Parameter(torch.zeros(num_heads, (ws + K - 1) ** 2))
            trunc_normal_(table, std=.02)
            self.relative_position_bias_table_to_windows.append(table)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

        # Key slots index one token source: the padded map's tokens, then each pooled level's cells,
        # then a zero token that out-of-grid cells read.
        key_index = [window_token_index(padded_size, ws)]
        # Masks per key slot, (nW, ws² or 1, slots): only the shift mask depends on the query.
        if shift_size > 0:
            slot_mask = [shift_region_mask(padded_size, ws, shift_size)]
        else:
            slot_mask = [torch.zeros(num_windows, 1, ws * ws)]
        if expand_size > 0:
            key_index.append(neighbour_token_index(padded_size, ws, expand_size))
            slot_mask.append(torch.zeros(num_windows, 1, num_neighbours))
        source_offset = Hp * Wp
        zero_token = Hp * Wp + sum(gh * gw for gh, gw in pooled_grids)
        for k, K in enumerate(pooled_sizes):
            index, valid = pooled_block_index(window_grid, k, focal_window)
            key_index.append(torch.where(valid, index + source_offset, zero_token))
            slot_mask.append((~valid).float()[:, None] * MASK_VALUE)
            source_offset += pooled_grids[k][0] * pooled_grids[k][1]
        self.register_buffer('window_index', key_index[0].flatten(), persistent=False)
        self.register_buffer('key_index', torch.cat(key_index, dim=1), persistent=False)
        query_rows = ws * ws if shift_size > 0 else 1
        mask = torch.cat([m.expand(num_windows, query_rows, -1) for m in slot_mask], dim=2)
        self.register_buffer('mask', mask if mask.any() else None, persistent=False)  # (nW, ws² or 1, n_keys)

        # Bias entry of every (query, key slot) of the window and pooled tables; the neighbour table
        # already holds one value per (query, slot).
        self.register_buffer('window_bias_index', relative_position_index(ws, ws), persistent=False)
        for k, K in enumerate(pooled_sizes):
            self.register_buffer(f'pooled_bias_index_{k}', relative_position_index(ws, K), persistent=False)

    def attention_bias(self) -> torch.Tensor:
        """(1, nH·nW, ws², n_keys) additive logit bias, head-major: learned tables plus fixed masks.

        Each table is indexed on its own, so that its gradient arrives as a fresh tensor of the
        parameter's own layout (DDP's gradient buckets expect exactly that).
        """
        parts = [self.relative_position_bias_table[self.window_bias_index].permute(2, 0, 1)]
        if self.expand_size > 0:
            parts.append(self.relative_position_bias_table_to_neighbors[0])
        for k, table in enumerate(self.relative_position_bias_table_to_windows):
            parts.append(table[:, getattr(self, f'pooled_bias_index_{k}')])
        bias = torch.cat(parts, dim=-1).unsqueeze(1)  # (nH, 1, ws², n_keys)
        num_windows, num_keys = self.key_index.shape
        if self.mask is not None:
            bias = bias + self.mask
        else:
            bias = bias.expand(-1, num_windows, -1, -1)
        return bias.reshape(1, -1, bias.shape[-2], num_keys)

    def forward(self, z: torch.Tensor, pooled: List[torch.Tensor]) -> torch.Tensor:
        """z: (B, Hp, Wp, C) normalized, padded, shifted map; pooled: (B, Gh_k, Gw_k, C) per level.

        Returns (B, Hp, Wp, C). Attention runs on (B, nH·nW, ·, hd): heads outermost, so that
        gathering keys from a (2, B, nH, tokens, hd) source needs no further transpose.
        """
        B, Hp, Wp, C = z.shape
        ws, nH = self.window_size, self.num_heads
        head_dim = C // nH
        qkv = self.qkv(z).view(B, Hp * Wp, 3, nH, head_dim).permute(2, 0, 3, 1, 4)
        q = qkv[0].index_select(2, self.window_index).view(B, -1, ws * ws, head_dim)
        sources = [qkv[1:]]
        kv_weight, kv_bias = self.qkv.weight[C:], None if self.qkv.bias is None else self.qkv.bias[C:]
        for cells in pooled:
            kv = F.linear(cells.flatten(1, 2), kv_weight, kv_bias)
            sources.append(kv.view(B, -1, 2, nH, head_dim).permute(2, 0, 3, 1, 4))
        sources.append(z.new_zeros(2, B, nH, 1, head_dim))
        kv_source = torch.cat(sources, dim=3)
        bias = self.attention_bias().to(q.dtype)
        out = gathered_attention(q, kv_source, self.key_index, bias, self.scale,
                                 self.attn_drop if self.training else 0.)
        out = out.view(B, nH, Hp // ws, Wp // ws, ws, ws, head_dim).permute(0, 2, 4, 3, 5, 1, 6)
        out = self.proj(out.reshape(B, Hp, Wp, C))
        return self.proj_drop(out)


class FocalTransformerBlock(nn.Module):
    """Pre-norm block: focal attention then MLP, each with a residual (and optional layer scale)."""

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
        self.padded_size = (math.ceil(H / window_size) * window_size, math.ceil(W / window_size) * window_size)
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
            dim, num_heads, window_size, self.padded_size, expand_size, shift_size, focal_window,
            pooled_levels, qkv_bias=qkv_bias, qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), drop=drop)

    def pool(self, z: torch.Tensor, level: int) -> torch.Tensor:
        """Pool (B, Hp, Wp, C) into one token per cell of level `level`'s grid: (B, Gh, Gw, C)."""
        cell = self.window_size // 2 ** level
        Gh, Gw = self.attn.pooled_grids[level]
        z = crop_or_pad(z, (Gh * cell, Gw * cell))
        B, C = z.shape[0], z.shape[-1]
        if self.pool_method == 'conv':
            return self.pool_layers[level](z.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        cells = z.view(B, Gh, cell, Gw, cell, C)
        if self.pool_method == 'mean':
            return cells.mean(dim=(2, 4))
        if self.pool_method == 'max':
            return cells.amax(dim=(2, 4))
        fc = self.pool_layers[level]
        cells = cells.permute(0, 1, 3, 5, 2, 4).reshape(B, Gh, Gw, C, cell * cell)
        return F.linear(cells, fc.weight, fc.bias).squeeze(-1)

    def focal_attention(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        H, W = self.input_resolution
        Hp, Wp = self.padded_size
        z = self.norm1(x).view(B, H, W, C)
        if (Hp, Wp) != (H, W):
            z = F.pad(z, (0, 0, 0, Wp - W, 0, Hp - H))
        if self.shift_size > 0:
            z = torch.roll(z, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        pooled = [self.pool(z, k) for k in range(self.pooled_levels)]
        out = self.attn(z, pooled)
        if self.shift_size > 0:
            out = torch.roll(out, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        return out[:, :H, :W].reshape(B, L, C)

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
    """Strided convolution from (B, C, H, W) to LayerNorm'ed tokens (B, H'·W', C')."""

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
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        x = self.proj(x).flatten(2).transpose(1, 2)
        return self.norm(x) if self.norm is not None else x

    def flops(self, output_resolution: Tuple[int, int]) -> float:
        Ho, Wo = output_resolution
        flops = Ho * Wo * self.embed_dim * self.in_chans * self.kernel_size ** 2
        if self.norm is not None:
            flops += Ho * Wo * self.embed_dim
        return flops


class FocalStage(nn.Module):
    """Blocks at one resolution, then (except for the last stage) a patch embedding that halves it."""

    def __init__(self, dim: int, input_resolution: Tuple[int, int], blocks: List[FocalTransformerBlock],
                 downsample: Optional[PatchEmbed], use_checkpoint: bool = False):
        super().__init__()
        self.dim = dim
        self.input_resolution = input_resolution
        self.blocks = nn.ModuleList(blocks)
        self.downsample = downsample
        self.use_checkpoint = use_checkpoint

    def forward_blocks(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            if self.use_checkpoint and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    def forward_downsample(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample is None:
            return x
        H, W = self.input_resolution
        return self.downsample(x.transpose(1, 2).reshape(x.shape[0], -1, H, W))

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


class FocalTransformer(nn.Module):
    """Focal Transformer image classifier (keyword arguments as the reference implementation's)."""

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
                 layerscale_value: float = 1e-4, use_pre_norm: bool = False, **kwargs):
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
        img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        grid = (img_size[0] // patch_size, img_size[1] // patch_size)
        if min(grid) < 2 ** (num_stages - 1):
            raise ValueError(f'img_size {img_size} with patch_size {patch_size} is too small for {num_stages} stages')

        self.num_classes = num_classes
        self.num_features = embed_dim * 2 ** (num_stages - 1)
        self.embed_dim = embed_dim
        self.img_size = img_size
        self.patches_resolution = grid
        self.ape = ape
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size, use_conv_embed, is_stem=True,
                                      norm=patch_norm)
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=.02)
        self.pos_drop = nn.Dropout(p=drop_rate)

        drop_path = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        self.feature_info = []
        for i in range(num_stages):
            dim = embed_dim * 2 ** i
            resolution = (grid[0] // 2 ** i, grid[1] // 2 ** i)
            blocks = []
            for j in range(depths[i]):
                expand = expand_sizes[i]
                if (expand_layer == 'even' and j % 2 == 0) or (expand_layer == 'odd' and j % 2 == 1):
                    expand = 0
                blocks.append(FocalTransformerBlock(
                    dim, resolution, num_heads[i], window_size=window_size, expand_size=expand,
                    shift_size=window_size // 2 if use_shift and j % 2 == 1 else 0, mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate,
                    drop_path=drop_path[sum(depths[:i]) + j],
                    pool_method=focal_pool if i in focal_stages else 'none',
                    focal_level=focal_levels[i], focal_window=focal_windows[i],
                    use_layerscale=use_layerscale, layerscale_value=layerscale_value))
            downsample = None
            if i < num_stages - 1:
                downsample = PatchEmbed(dim, 2 * dim, 2, use_conv_embed, use_pre_norm=use_pre_norm)
            self.layers.append(FocalStage(dim, resolution, blocks, downsample, use_checkpoint))
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

    def set_grad_checkpointing(self, enable: bool = True):
        for stage in self.layers:
            stage.use_checkpoint = enable

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int):
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            self._init_weights(self.head)

    def _check_input(self, x: torch.Tensor):
        if tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f'input of size {tuple(x.shape[-2:])} given to a model built for {self.img_size}')

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x = self.patch_embed(x)
        if self.ape:
            x = x + self.absolute_pos_embed
        return self.pos_drop(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> normalized last-stage tokens (B, H_last·W_last, C_last)."""
        x = self._embed(x)
        for stage in self.layers:
            x = stage(x)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Union[int, Sequence[int], None] = None,
                              norm: bool = False, stop_early: bool = False, output_fmt: str = 'NCHW',
                              intermediates_only: bool = False):
        """Stage feature maps (B, C_i, H_i, W_i) before each downsampling, for dense prediction.

        `indices`: stage indices to return (an int n means the last n stages; None means all).
        `norm` applies the final norm to the last stage's map. Timm's `features_only=True` uses this.
        """
        if output_fmt != 'NCHW':
            raise ValueError(f'output_fmt {output_fmt!r} is not supported; use NCHW')
        num_stages = len(self.layers)
        if indices is None:
            wanted = list(range(num_stages))
        elif isinstance(indices, int):
            wanted = list(range(num_stages - indices, num_stages))
        else:
            wanted = [i % num_stages for i in indices]
        x = self._embed(x)
        intermediates = []
        last = max(wanted) if stop_early else num_stages - 1
        for i, stage in enumerate(self.layers[:last + 1]):
            x = stage.forward_blocks(x)
            if i in wanted:
                H, W = stage.input_resolution
                feature = self.norm(x) if norm and i == num_stages - 1 else x
                intermediates.append(feature.transpose(1, 2).reshape(x.shape[0], -1, H, W))
            x = stage.forward_downsample(x)
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

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
    return build_model_with_cfg(
        FocalTransformer, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3)),
        **kwargs)


def _cfg(file_name: str, **kwargs) -> dict:
    return {
        'url': f'https://projects4jw.blob.core.windows.net/model/focal-transformer/imagenet1k/{file_name}',
        'num_classes': 1000, 'input_size': (3, 224, 224), 'pool_size': None, 'crop_pct': 0.875,
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
_TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_SMALL = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))


@register_model
def focal_tiny_patch4_window7_224(pretrained: bool = False, **kwargs) -> FocalTransformer:
    return _create_focal('focal_tiny_patch4_window7_224', pretrained, **dict(_RELEASED, **_TINY, **kwargs))


@register_model
def focal_tiny_useconv_patch4_window7_224(pretrained: bool = False, **kwargs) -> FocalTransformer:
    return _create_focal('focal_tiny_useconv_patch4_window7_224', pretrained,
                         **dict(_RELEASED, **_TINY, use_conv_embed=True, **kwargs))


@register_model
def focal_small_patch4_window7_224(pretrained: bool = False, **kwargs) -> FocalTransformer:
    return _create_focal('focal_small_patch4_window7_224', pretrained, **dict(_RELEASED, **_SMALL, **kwargs))


@register_model
def focal_small_useconv_patch4_window7_224(pretrained: bool = False, **kwargs) -> FocalTransformer:
    return _create_focal('focal_small_useconv_patch4_window7_224', pretrained,
                         **dict(_RELEASED, **_SMALL, use_conv_embed=True, **kwargs))


@register_model
def focal_base_patch4_window7_224(pretrained: bool = False, **kwargs) -> FocalTransformer:
    return _create_focal('focal_base_patch4_window7_224', pretrained, **dict(_RELEASED, **_BASE, **kwargs))


@register_model
def focal_base_useconv_patch4_window7_224(pretrained: bool = False, **kwargs) -> FocalTransformer:
    return _create_focal('focal_base_useconv_patch4_window7_224', pretrained,
                         **dict(_RELEASED, **_BASE, use_conv_embed=True, **kwargs))
