"""Focal Transformer (Yang et al., "Focal Self-attention for Local-Global Interactions in Vision
Transformers", NeurIPS 2021): the network, its checkpoint filter and timm's registry.

Computes the function of the released ImageNet-1K checkpoints (checked against the reference
implementation's outputs and gradients: tests/reference), parameter names and shapes included, at
the size the model is built for and at any other input size. The block structure (window,
neighbours, shift, pooled levels, parameter shapes) is fixed at construction, from the stage sizes
of the size it is built for; the maps between blocks are (B, H, W, C) of whatever size the input
gives. Stage sizes follow the convolutions of the stem and the downsamplings, as in the reference:
pixels and odd rows or columns that a patch does not cover are dropped (floor division), and each
block pads its map to a multiple of the window.

A block projects its map's tokens and pooled cells together into rows of q, k, v; the index tables
of `attention_tables` say which rows each window's queries and key slots read, and
`window_attention` attends them.
"""
import dataclasses
import functools
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.fx.experimental._config
import torch.utils.checkpoint
from timm.layers import DropPath, Mlp, resample_abs_pos_embed, to_2tuple, trunc_normal_
from timm.models import (build_model_with_cfg, generate_default_cfgs, register_model, register_notrace_function,
                         resolve_pretrained_cfg)
from timm.models._features import feature_take_indices

from .attention_tables import block_attention_tables, neighbour_key_positions, relative_position_index
from .checkpoint import CheckpointError, key_mismatch, model_weights, read_checkpoint
from .class_orders import head_for_classes
from .pretrained import HEAD, GeometryMismatch, TransferReport, adapt_tensor, missing_tensor_note, surplus_tensor_note
from .window_attention import window_attention

__all__ = ['FocalTransformer', 'checkpoint_filter_fn']

POOL_METHODS = ('none', 'fc', 'conv', 'mean', 'max')
EXPAND_LAYERS = ('all', 'even', 'odd')
# Names of the integer tables the reference stores in its checkpoints; ours are derived instead.
REFERENCE_BUFFER_PREFIXES = ('relative_position_index', 'valid_ind_rolled', 'valid_ind_unfold')

# Leaves for torch.fx, which patches a wrapped name in the module that calls it: they take sizes from
# their inputs, and the tables are looked up when run.
torch.fx.wrap('block_attention_tables')
torch.fx.wrap('window_attention')


@torch.fx.wrap
@register_notrace_function
def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero-pad the bottom and right of a (B, H, W, C) map so that H and W are multiples of
    `multiple` (a map smaller than `multiple` is padded up to it)."""
    H, W = x.shape[1], x.shape[2]
    # written as ceil division so that a symbolic padded size is visibly a multiple
    pad_h = (H + multiple - 1) // multiple * multiple - H
    pad_w = (W + multiple - 1) // multiple * multiple - W
    # While compiling, pad whatever the (possibly symbolic) amounts: a branch would fix the size.
    if torch.compiler.is_compiling() or pad_h > 0 or pad_w > 0:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    return x


@torch.fx.wrap
@register_notrace_function
def crop_to(x: torch.Tensor, H: int, W: int) -> torch.Tensor:
    """The top-left (H, W) of a (B, Hp, Wp, C) map with Hp >= H, Wp >= W."""
    if torch.compiler.is_compiling():
        # gathers: a slice would ask the tracer to prove H <= Hp, which it cannot for symbolic sizes
        return x.index_select(1, torch.arange(H, device=x.device)).index_select(2, torch.arange(W, device=x.device))
    return x[:, :H, :W]


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

    def attention_bias(self) -> torch.Tensor:
        """(nH, ws², n_keys) learned logit bias, the same for every window: the relative-position,
        neighbour and pooled-level tables side by side along the key slots.

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
        return torch.cat(parts, dim=-1)

    def forward(self, padded_map: torch.Tensor, pooled: List[torch.Tensor]) -> torch.Tensor:
        """padded_map: (B, Hp, Wp, C) normalized, padded, shifted; pooled: (B, Gh_k, Gw_k, C) per level.

        Returns (B, Hp, Wp, C). The map's tokens and each level's cells are projected together: one
        row of q, k, v per token.
        """
        B, Hp, Wp, C = padded_map.shape[0], padded_map.shape[1], padded_map.shape[2], padded_map.shape[3]
        query_index, key_index, mask = block_attention_tables(
            padded_map, self.window_size, self.expand_size, self.shift_size, self.focal_window, self.pooled_levels,
            self.neighbour_positions)
        # The reference gives out-of-grid cells a zero key and value; they are masked with -inf, so no
        # zero row is needed (writing one into the rows would make autograd copy the rows' gradient).
        tokens = [padded_map.flatten(1, 2)] + [cells.flatten(1, 2) for cells in pooled]
        qkv = self.qkv(torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0])
        out = window_attention(qkv, query_index, key_index, self.attention_bias().to(qkv.dtype), mask, self.scale,
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

    def pooling_cells(self, padded_map: torch.Tensor, level: int) -> torch.Tensor:
        """The part of the padded map (B, Hp, Wp, C) that level `level`'s cells cover: (B, Gh·g, Gw·g, C).

        The grid has 2**level cells per window along each axis, of g = ws // 2**level tokens; where
        that leaves rows or columns over (ws not a multiple of 2**level), half of them (rounded down)
        are dropped at the top/left and the rest at the bottom/right.
        """
        ws = self.window_size
        cell = ws >> level
        if cell << level == ws:
            return padded_map
        Hp, Wp = padded_map.shape[1], padded_map.shape[2]
        Hg, Wg = Hp // ws * (1 << level) * cell, Wp // ws * (1 << level) * cell
        top, left = (Hp - Hg) // 2, (Wp - Wg) // 2
        return padded_map[:, top:top + Hg, left:left + Wg]

    def pool(self, padded_map: torch.Tensor) -> List[torch.Tensor]:
        """One token per cell of each pooled level's grid: [(B, Gh_k, Gw_k, C)] from (B, Hp, Wp, C)."""
        B, C, ws = padded_map.shape[0], padded_map.shape[3], self.window_size
        pooled: List[torch.Tensor] = []
        for k, layer in enumerate(self.pool_layers):  # fc and conv pooling
            cells = self.pooling_cells(padded_map, k)
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
                cells = self.pooling_cells(padded_map, k)
                cells = cells.reshape(B, cells.shape[1] // cell, cell, cells.shape[2] // cell, cell, C)
                pooled.append(cells.mean(dim=(2, 4)) if self.pool_method == 'mean' else cells.amax(dim=(2, 4)))
        return pooled

    def attention_branch(self, x: torch.Tensor) -> torch.Tensor:
        """The residual branch of attention: norm1, padding to the window, shift, focal attention,
        and back to x's (B, H, W, C)."""
        H, W = x.shape[1], x.shape[2]
        padded_map = pad_to_multiple(self.norm1(x), self.window_size)
        if self.shift_size > 0:
            padded_map = torch.roll(padded_map, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
        out = self.attn(padded_map, self.pool(padded_map))
        if self.shift_size > 0:
            out = torch.roll(out, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        return crop_to(out, H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attn = self.attention_branch(x)
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


def _embedding_convolution(patch_size: int, use_conv_embed: bool, is_stem: bool) -> Tuple[int, int, int]:
    """(kernel, stride, padding) of a patch embedding: (patch_size, patch_size, 0), or with
    use_conv_embed the overlapped (7, 4, 2) of the stem and (3, 2, 1) of a downsampling."""
    if use_conv_embed:
        return (7, 4, 2) if is_stem else (3, 2, 1)
    return patch_size, patch_size, 0


def _convolution_output_size(size: Tuple[int, int], convolution: Tuple[int, int, int]) -> Tuple[int, int]:
    kernel, stride, padding = convolution
    return (size[0] + 2 * padding - kernel) // stride + 1, (size[1] + 2 * padding - kernel) // stride + 1


class PatchEmbed(nn.Module):
    """Strided convolution from (B, C, H, W) to LayerNorm'ed (B, H', W', C') maps, of the size the
    convolution's own arithmetic gives (`output_size`): a stem or downsampling without overlap drops
    the pixels a patch does not cover (floor division), as the reference does."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int, use_conv_embed: bool = False,
                 is_stem: bool = False, norm: bool = True, use_pre_norm: bool = False):
        super().__init__()
        kernel, stride, padding = self.convolution = _embedding_convolution(patch_size, use_conv_embed, is_stem)
        self.in_chans, self.embed_dim, self.kernel_size = in_chans, embed_dim, kernel
        self.pre_norm = nn.GroupNorm(1, in_chans) if use_pre_norm else None
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel, stride=stride, padding=padding)
        self.norm = nn.LayerNorm(embed_dim) if norm else None

    def output_size(self, input_size: Tuple[int, int]) -> Tuple[int, int]:
        return _convolution_output_size(input_size, self.convolution)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H', W', C') with (H', W') = output_size((H, W))."""
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
    """Blocks at one resolution, then (except for the last stage) a patch embedding that halves it:
    a stride-2 convolution, whose arithmetic rounds an odd map down (kernel 2) or, with the
    overlapped embedding (kernel 3, padding 1), up."""

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
        return self.downsample(x.permute(0, 3, 1, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_downsample(self.forward_blocks(x))

    def flops(self) -> float:
        flops = sum(block.flops() for block in self.blocks)
        if self.downsample is not None:
            flops += self.downsample.flops(self.downsample.output_size(self.input_resolution))
        return flops


def _per_stage(name: str, values: Sequence, num_stages: int) -> list:
    values = list(values)
    if len(values) < num_stages:
        raise ValueError(f'{name} has {len(values)} entries, expected one per stage ({num_stages}): {values}')
    return values[:num_stages]


def _stage_resolutions(img_size: Tuple[int, int], patch_size: int, num_stages: int,
                       use_conv_embed: bool) -> List[Tuple[int, int]]:
    """Map size of each stage for an image, as the stem's and the downsamplings' convolutions give it."""
    resolutions = [_convolution_output_size(img_size, _embedding_convolution(patch_size, use_conv_embed, True))]
    for _ in range(num_stages - 1):
        resolutions.append(_convolution_output_size(resolutions[-1], _embedding_convolution(2, use_conv_embed, False)))
    return resolutions


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


@torch.jit.unused
def _exporting() -> bool:
    return torch.compiler.is_exporting()


@torch.jit.unused
def _window_counts_of_any_size():
    """While exporting the stages (after the stem): sizes reasoned about for any value, as torch.export
    does for the input's own dimensions.

    A stage's map and window counts derive from the input size and are 1 at some sizes and more at
    others (Focal-T at 224 px: one window at the last stage, four at the third; below 64 px a 1x1 last
    map). Otherwise each size test of the tables, pooling, reshapes, norms and convolutions (a
    broadcast, a contiguity check) would be settled at the example's sizes and fix the exported input
    size to the sizes that give them.
    """
    return torch.fx.experimental._config.patch(backed_size_oblivious=True)


class FocalTransformer(nn.Module):
    """Focal Transformer image classifier (keyword arguments as the reference implementation's).

    Takes (B, in_chans, H, W) of any size of at least `patch_size * 2**(stages - 1)` pixels a side;
    `strict_img_size=True` accepts `img_size` only. `img_size` fixes the block structure (window
    shrunk where a stage map is no larger than the window, as the reference does) and the size of
    `absolute_pos_embed`, which is resampled for other sizes.

    Stage maps: the stem, Conv2d(kernel = stride = patch_size), gives H // patch_size, and each
    downsampling, Conv2d(kernel 2, stride 2), halves a map rounding down (232 px: 58, 29, 14, 7), as
    the reference does at every size. With `use_conv_embed` the convolutions' own arithmetic holds:
    the stem, Conv2d(7, stride 4, padding 2), gives (H + 1) // 4 and each downsampling, Conv2d(3,
    stride 2, padding 1), halves rounding up (233 px: 58, 29, 15, 8); the reference runs no odd map
    there, so those sizes are this codebase's. `global_pool` is timm's: 'avg' or ''.

    timm's conventions: forward_features gives (B, H, W, C) maps (`output_fmt` 'NHWC'),
    forward_intermediates/features_only the stage maps, torch.fx, TorchScript and torch.export work.

    torch.export with a dynamic batch, height and width works from an example of any size, the built
    one included, and covers every size from the minimum up (the stages' map and window counts are not
    fixed to the example's): e.g. `torch.export.export(model, (torch.randn(2, 3, 224, 224),),
    dynamic_shapes={'x': {0: Dim('batch', min=1, max=64), 2: Dim('height', min=64, max=2048),
    3: Dim('width', min=64, max=2048)}})`. The example batch must be at least 2, as torch.export
    fixes a dimension it sees as 1.
    """

    def __init__(self, img_size: Union[int, Tuple[int, int]] = 224, patch_size: int = 4, in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, mlp_ratio: float = 4.,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, drop_rate: float = 0.,
                 attn_drop_rate: float = 0., drop_path_rate: float = 0.1, ape: bool = False,
                 patch_norm: bool = True, use_checkpoint: bool = False, use_shift: bool = False,
                 focal_stages: Sequence[int] = (0, 1, 2, 3), focal_levels: Sequence[int] = (1, 1, 1, 1),
                 focal_windows: Sequence[int] = (7, 5, 3, 1), focal_pool: str = 'fc',
                 expand_sizes: Sequence[int] = (3, 3, 3, 3),
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
        self.use_conv_embed = use_conv_embed
        self.min_img_size = patch_size * 2 ** (num_stages - 1)
        if min(img_size) < self.min_img_size:
            raise ValueError(f'img_size {img_size} is too small for {num_stages} stages with patch_size {patch_size}: '
                             f'at least {self.min_img_size} pixels a side')
        resolutions = _stage_resolutions(img_size, patch_size, num_stages, use_conv_embed)

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
        resolutions = _stage_resolutions(img_size, self.patch_size, len(self.layers), self.use_conv_embed)
        if self.absolute_pos_embed is not None:
            resampled = resample_abs_pos_embed(self.absolute_pos_embed, new_size=list(resolutions[0]),
                                               old_size=list(self.patches_resolution), num_prefix_tokens=0)
            self.absolute_pos_embed = nn.Parameter(resampled)
        self.img_size = img_size
        self.patches_resolution = resolutions[0]
        for stage, resolution in zip(self.layers, resolutions):
            stage.set_input_resolution(resolution)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, H0, W0, embed_dim), the stem's output size (see the class docstring)."""
        x = check_image_size(x, self.img_size, self.min_img_size, self.strict_img_size)
        x = self.patch_embed(x)
        if self.absolute_pos_embed is not None:
            x = add_position_embedding(x, self.absolute_pos_embed, self.patches_resolution)
        return self.pos_drop(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normalized last-stage map (B, H_last, W_last, C_last)."""
        x = self._embed(x)
        if not torch.jit.is_scripting() and _exporting():
            with _window_counts_of_any_size():
                return self._forward_stages(x)
        return self._forward_stages(x)

    def _forward_stages(self, x: torch.Tensor) -> torch.Tensor:
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
        if not torch.jit.is_scripting() and _exporting():
            with _window_counts_of_any_size():
                return self._forward_intermediate_stages(x, take_indices, last, norm, output_fmt, intermediates_only)
        return self._forward_intermediate_stages(x, take_indices, last, norm, output_fmt, intermediates_only)

    def _forward_intermediate_stages(self, x: torch.Tensor, take_indices: List[int], last: int, norm: bool,
                                     output_fmt: str, intermediates_only: bool
                                     ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        num_stages = len(self.layers)
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


def checkpoint_filter_fn(state_dict: dict, model: nn.Module, adapt: bool = False, source: str = 'the checkpoint',
                         target: str = 'this model', report: Optional[TransferReport] = None,
                         classes: Sequence[str] = (), class_order: str = '') -> dict:
    """The state dict that `model.load_state_dict(strict=True)` takes from a checkpoint's contents: the one
    filter between every reader (models.checkpoint.read_checkpoint) and every model.

    `state_dict`: a state dict, raw or under 'model' (the original's layout and ours), with the names of a
    DDP or compiled model allowed. The reference's integer index buffers, which this model derives
    instead, are dropped. With `adapt` False (resuming, evaluating, timm's pretrained_cfg) every other
    tensor must fit `model`, any model, exactly. With `adapt` True (--pretrained, backbones) `model` is a
    FocalTransformer that may differ in image size, window, focal windows, neighbour keys or classes, and
    each of its tensors is copied, resized where only the geometry differs, or started fresh
    (models.pretrained), each recorded in `report`. Anything else that does not fit is a CheckpointError
    naming `source`, `target` and the keys.

    `classes`: the names of the model's classes (MODEL.CLASS_NAMES). Where they and the checkpoint head's
    classes are ImageNet synsets (its saved 'classes', `class_order` or its row count: models.class_orders),
    the head's rows are picked by synset, adapt or not (an ImageNet-22K head evaluated or fine-tuned as
    ImageNet-1K's), recorded as `report.head`.
    """
    unwrapped = model_weights(state_dict, source)
    checkpoint = {key: value for key, value in unwrapped.items()
                  if not key.rsplit('.', 1)[-1].startswith(REFERENCE_BUFFER_PREFIXES + ('attn_mask',))}
    report = report if report is not None else TransferReport()
    report.dropped_buffers = len(unwrapped) - len(checkpoint)
    expected = model.state_dict()
    if classes and all(key in checkpoint and key in expected for key in HEAD):
        report.head = head_for_classes(state_dict, checkpoint['head.weight'], checkpoint['head.bias'],
                                       expected['head.weight'], expected['head.bias'], classes, class_order, source)
        if report.head is not None:
            checkpoint.update({'head.weight': report.head.weight, 'head.bias': report.head.bias})
    missing, wrong_shape, result = [], [], {}
    for key, fresh in expected.items():
        old = checkpoint.get(key)
        if old is not None and old.shape == fresh.shape:
            result[key] = old
            report.add(key, tuple(old.shape), tuple(fresh.shape), 'copied')
        elif not adapt:
            if old is None:
                missing.append(key)
            else:
                wrong_shape.append(f'{key} {tuple(old.shape)} vs {tuple(fresh.shape)}')
        elif old is None:
            why = missing_tensor_note(key)
            if why is None:
                missing.append(key)
            else:
                result[key] = fresh.clone()
                report.add(key, None, tuple(fresh.shape), 'fresh', why)
        else:
            try:  # on the CPU: the model may already sit on a GPU, the checkpoint not
                result[key], action, note = adapt_tensor(key, old.cpu(), fresh.cpu())
            except GeometryMismatch as mismatch:
                wrong_shape.append(f'{key} {tuple(old.shape)} vs {tuple(fresh.shape)}{mismatch.why}')
                continue
            report.add(key, tuple(old.shape), tuple(fresh.shape), action, note)
    unexpected = []
    for key, old in checkpoint.items():
        if key in expected:
            continue
        why = surplus_tensor_note(key) if adapt else None
        if why is None:
            unexpected.append(key)
        else:
            report.add(key, tuple(old.shape), None, 'ignored', why)
    mismatch = key_mismatch(missing, unexpected, wrong_shape)
    if mismatch:
        raise CheckpointError(f'{source} does not fit {target} (another architecture?): {mismatch}')
    return result


def _create_focal(variant: str, pretrained: bool = False, **kwargs) -> FocalTransformer:
    filter_fn = checkpoint_filter_fn
    if pretrained:
        # timm would read the file or URL with torch.load; models.checkpoint reads it instead (every format
        # it accepts, nothing unpickled unrestricted, a cache entry per URL), and timm is given its contents,
        # which the filter adapts to the model asked for (another size, window or number of classes).
        pretrained_cfg = resolve_pretrained_cfg(variant, kwargs.pop('pretrained_cfg', None),
                                                kwargs.pop('pretrained_cfg_overlay', None))
        location = pretrained_cfg.file or pretrained_cfg.url
        if pretrained_cfg.state_dict is None and location:
            pretrained_cfg = dataclasses.replace(pretrained_cfg, state_dict=read_checkpoint(location))
        kwargs['pretrained_cfg'] = pretrained_cfg
        filter_fn = functools.partial(checkpoint_filter_fn, adapt=True, source=location or variant)
    model = build_model_with_cfg(
        FocalTransformer, variant, pretrained,
        pretrained_filter_fn=filter_fn,
        feature_cfg=dict(feature_cls='getter', out_indices=(0, 1, 2, 3)),
        **kwargs)
    for built in (model, getattr(model, 'model', None)):  # a feature wrapper holds the network as .model
        getattr(built, 'pretrained_cfg', {}).pop('state_dict', None)  # the weights are loaded: keep no copy
    return model


def _cfg(file_name: Optional[str], **kwargs) -> dict:
    """timm's pretrained config of a variant; `file_name` None: no released weights (Focal-L)."""
    return {
        'url': f'https://projects4jw.blob.core.windows.net/model/focal-transformer/imagenet1k/{file_name}'
               if file_name else '',
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
    'focal_large_patch4_window7_224': _cfg(None),
})

# The recipe every released model shares: two focal levels with fc pooling, expand size 3.
_RELEASED = dict(window_size=7, focal_pool='fc', focal_stages=(0, 1, 2, 3), focal_levels=(2, 2, 2, 2),
                 focal_windows=(7, 5, 3, 1), expand_sizes=(3, 3, 3, 3), drop_path_rate=0.2)
_TINY = dict(_RELEASED, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_SMALL = dict(_RELEASED, embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_BASE = dict(_RELEASED, embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))
# Focal-L, the paper's ImageNet-22K model (never released). Its layout is inferred, not read from the paper
# (whose text is not reachable here): Swin-L's shape with the released recipe's focal settings is the one
# whose UPerNet at 640 px with ADE20K's 150 classes has the 240M parameters of the paper's table (237.5M
# here; window 12 would give about 254M).
_LARGE = dict(_RELEASED, embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48))


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


@register_model
def focal_large_patch4_window7_224(pretrained: bool = False, **kwargs) -> FocalTransformer:
    model_args = _LARGE
    return _create_focal('focal_large_patch4_window7_224', pretrained, **dict(model_args, **kwargs))
