"""Index tables of focal attention: which token each key slot of a window reads, which slots are
masked, and which bias entry each logit takes.

The bias indices and neighbour offsets depend only on a block's configuration and are built once, as
buffers. Which token a slot reads and the mask depend on the padded map size as well: those tables are
built once per (block configuration, padded map size, device) and kept in a bounded LRU cache shared
by all blocks and models (`attention_table_cache_info()`). Under TorchScript and torch.compile/export
the Python cache cannot be used, and `block_attention_tables` builds the same tables in the graph from
tensor ops on the (possibly symbolic) sizes.
"""
import functools
from typing import Optional, Tuple

import torch
from timm.models import register_notrace_function

__all__ = ['relative_position_index', 'neighbour_key_positions', 'shift_region_mask', 'attention_tables',
           'block_attention_tables', 'attention_table_cache_info', 'clear_attention_table_cache']

# Table sets kept: a model has a few block configurations, so this holds the tables of a few dozen
# input sizes, enough for a detector's multi-scale training.
TABLE_CACHE_SIZE = 128


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
    # own token, so no row is all -inf) and without the slow denormal exponentials of float32 exp(-100).
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


@register_notrace_function
def block_attention_tables(padded_map: torch.Tensor, window_size: int, expand_size: int, shift_size: int,
                           focal_window: int, pooled_levels: int, neighbour_positions: Optional[torch.Tensor]
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """attention_tables for a padded (B, Hp, Wp, C) map: from the cache in eager mode, built in the
    graph while compiling, exporting or scripting. A leaf for torch.fx: looked up when run."""
    padded_size = (padded_map.shape[1], padded_map.shape[2])
    if _building_graph():
        return attention_tables(padded_size, window_size, shift_size, focal_window, pooled_levels,
                                neighbour_positions, padded_map.device)
    return _cached_block_tables(padded_size, window_size, expand_size, shift_size, focal_window, pooled_levels,
                                padded_map.device)
