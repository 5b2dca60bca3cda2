"""How close Focal-T can come to Swin-T on this CPU: a bound from parts measured in one run.

Focal-T's attention does about 4.1 times Swin-T's multiply-adds at 224 px (a stage-0 window's 49
queries read 230 keys against Swin's 49), in products too small to run at the CPU's full matrix
rate. This script measures, in one process, alternating rounds (batch 8, 224 px, float32):

- Swin-T (timm) and Focal-T: an inference pass and a training step (forward, backward, AdamW);
- Focal-T without its attention: `window_attention` replaced by a stand-in that returns the
  query rows' q (one copy), so projections, pooling, bias tables, MLPs, norms and the optimizer
  cost what they cost now, and the attention nothing (nor the bias tables' gradient);
- the attention's matrix products alone, at every block's shapes (windows and heads as the batch,
  contiguous operands, one image at a time or the whole batch at once, whichever is faster here):
  q·kᵀ and p·v for inference; for a training step also the backward's five (q·kᵀ recomputed,
  pᵀ·dO, dO·vᵀ, dS·k, dSᵀ·q).

Focal-T cannot take less than "without attention" plus "products alone": no softmax, mask, gather
or scatter, and every product at the rate of a plain batched matrix product. Swin-T's time over
that sum bounds the ratio this CPU allows Focal-T's function without changing what it computes.

The released layout's key slots are not all needed: 12 neighbour slots per window read a token
another slot reads too (their two biases could be merged into one by a log-sum-exp), and pooled
cells outside the grid are masked for every query. The second bound times the products at each
block's mean number of distinct, unmasked keys per window: what any exact rearrangement of the
keys could at best save.

    python3 benchmarks/ceiling.py --threads 2
"""
import argparse
import os
import time
from typing import Callable, Dict, List, Tuple

import timm
import torch
# this folder is the script's own path entry; importing throughput puts the repository on the path
from throughput import cpu_info

import models.focal_transformer as focal  # registers the focal models with timm


def distinct_keys(key_index: torch.Tensor, mask: torch.Tensor) -> int:
    """Mean over windows (rounded) of the distinct tokens a window's key slots read, leaving out the
    slots masked (-inf) for every query."""
    needed = torch.isfinite(mask).any(1)
    counts = [key_index[w][needed[w]].unique().numel() for w in range(key_index.shape[0])]
    return round(sum(counts) / len(counts))


def attention_shapes(model: torch.nn.Module, images: torch.Tensor) -> List[Tuple[int, int, int, int, int, int]]:
    """(windows, heads, queries, keys, head_dim, distinct keys) of every block's attention, from one
    forward."""
    shapes = []
    real = focal.window_attention

    def record(qkv, query_index, key_index, bias, mask, *args, **kwargs):
        (num_heads, queries, num_keys), num_windows = bias.shape, key_index.shape[0]
        shapes.append((num_windows, num_heads, queries, num_keys, qkv.shape[-1] // 3 // num_heads,
                       distinct_keys(key_index, mask)))
        return real(qkv, query_index, key_index, bias, mask, *args, **kwargs)

    focal.window_attention = record
    try:
        with torch.inference_mode():
            model.eval()(images[:1])
    finally:
        focal.window_attention = real
    return shapes


def stand_in_attention(qkv, query_index, key_index, bias, mask, scale, dropout_p=0., training=False):
    """The shape and graph of window_attention's output at the cost of one copy: the query rows' q."""
    return qkv.narrow(1, 0, query_index.shape[0]).narrow(2, 0, qkv.shape[-1] // 3).contiguous()


def best_time(fn: Callable[[], None], rounds: int) -> float:
    fn()
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def product_times(shapes: List[tuple], batch_size: int, rounds: int) -> Dict[tuple, Dict[str, float]]:
    """Seconds per batch of one block's attention products, per distinct block shape: the forward's
    two ('infer') and those plus the backward's five ('train')."""
    per_shape = {}
    for shape in sorted(set(shapes), reverse=True):
        num_windows, num_heads, queries, num_keys, head_dim = shape
        best = {'forward': float('inf'), 'backward': float('inf')}
        for images in (1, batch_size):
            n = images * num_windows * num_heads
            q, d_out = torch.randn(n, queries, head_dim), torch.randn(n, queries, head_dim)
            k, v = torch.randn(n, num_keys, head_dim), torch.randn(n, num_keys, head_dim)
            p = torch.randn(n, queries, num_keys)
            repeat = batch_size // images
            fwd = [lambda: torch.bmm(q, k.transpose(1, 2)), lambda: torch.bmm(p, v)]
            bwd = [lambda: torch.bmm(q, k.transpose(1, 2)), lambda: torch.bmm(p.transpose(1, 2), d_out),
                   lambda: torch.bmm(d_out, v.transpose(1, 2)), lambda: torch.bmm(p, k),
                   lambda: torch.bmm(p.transpose(1, 2), q)]
            for name, products in (('forward', fwd), ('backward', bwd)):
                t = repeat * sum(best_time(product, rounds) for product in products)
                best[name] = min(best[name], t)
        per_shape[shape] = {'infer': best['forward'], 'train': best['forward'] + best['backward']}
    return per_shape


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--threads', type=int, default=os.cpu_count())
    parser.add_argument('--rounds', type=int, default=6, help='timed rounds per model and mode')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, 224, 224)
    models = {'Swin-T': timm.create_model('swin_tiny_patch4_window7_224'),
              'Focal-T': timm.create_model('focal_tiny_patch4_window7_224'),
              'Focal-T without attention': timm.create_model('focal_tiny_patch4_window7_224')}
    optimizers = {name: torch.optim.AdamW(model.parameters()) for name, model in models.items()}
    shapes = attention_shapes(models['Focal-T'], images)
    focal_attention = focal.window_attention

    def run(name: str, mode: str):
        model = models[name]
        if name.endswith('without attention'):
            focal.window_attention = stand_in_attention
        try:
            if mode == 'infer':
                with torch.inference_mode():
                    model.eval()(images)
            else:
                model.train()
                optimizers[name].zero_grad(set_to_none=True)
                model(images).logsumexp(-1).sum().backward()
                optimizers[name].step()
        finally:
            focal.window_attention = focal_attention

    times = {(name, mode): [] for name in models for mode in ('infer', 'train')}
    for mode in ('infer', 'train'):
        for name in models:
            run(name, mode)  # warm-up
        for r in range(args.rounds):
            order = list(models) if r % 2 == 0 else list(reversed(models))
            for name in order:
                start = time.perf_counter()
                run(name, mode)
                times[(name, mode)].append(time.perf_counter() - start)
    def over_distinct_keys(shape: tuple) -> tuple:
        return shape[:3] + (shape[5], shape[4])

    slot_shapes = [shape[:5] for shape in shapes]
    distinct_shapes = [over_distinct_keys(shape) for shape in shapes]
    per_shape = product_times(slot_shapes, args.batch_size, args.rounds)
    per_distinct_shape = product_times(distinct_shapes, args.batch_size, args.rounds)
    products = {mode: sum(per_shape[shape][mode] for shape in slot_shapes) for mode in ('infer', 'train')}
    distinct_products = {mode: sum(per_distinct_shape[shape][mode] for shape in distinct_shapes)
                         for mode in ('infer', 'train')}

    print(f'CPU: {cpu_info()[0]}; torch {torch.__version__}; {args.threads} threads; batch {args.batch_size}, 224 px, '
          f'float32; best of {args.rounds} rounds')
    print('attention products of one block, per shape (head dim, blocks of that shape): ms per batch and GFLOP/s')
    for shape in sorted(set(shapes), reverse=True):
        num_windows, num_heads, queries, num_keys, head_dim, num_distinct = shape
        t, t_distinct = per_shape[shape[:5]], per_distinct_shape[over_distinct_keys(shape)]
        flops = 2 * num_windows * num_heads * queries * num_keys * head_dim * args.batch_size
        print(f'  {num_windows:3d} windows x {num_heads:2d} heads, {queries} queries, {num_keys:3d} keys '
              f'(head dim {head_dim}, {shapes.count(shape)} blocks): inference {t["infer"] * 1e3:6.2f} ms '
              f'{2 * flops / t["infer"] / 1e9:5.0f} GFLOP/s, training {t["train"] * 1e3:6.2f} ms '
              f'{7 * flops / t["train"] / 1e9:5.0f} GFLOP/s; {num_distinct:3d} distinct keys: '
              f'{t_distinct["infer"] * 1e3:6.2f} / {t_distinct["train"] * 1e3:6.2f} ms')
    rows = {name: {mode: min(times[(name, mode)]) for mode in ('infer', 'train')} for name in models}
    rows['Focal-T attention products alone'] = products
    rows['bound: without attention + products'] = {
        mode: rows['Focal-T without attention'][mode] + products[mode] for mode in ('infer', 'train')}
    rows['products over distinct keys only'] = distinct_products
    rows['bound: without attention + those'] = {
        mode: rows['Focal-T without attention'][mode] + distinct_products[mode] for mode in ('infer', 'train')}
    print(f'{"ms per batch":40s}{"inference":>12s}{"training":>12s}')
    for name, row in rows.items():
        print(f'{name:40s}{row["infer"] * 1e3:12.1f}{row["train"] * 1e3:12.1f}')
    for mode in ('infer', 'train'):
        swin = rows['Swin-T'][mode]
        print(f'{mode}: Focal-T / Swin-T now {swin / rows["Focal-T"][mode]:.2f}x, '
              f'at most {swin / rows["bound: without attention + products"][mode]:.2f}x on this CPU, '
              f'{swin / rows["bound: without attention + those"][mode]:.2f}x over distinct keys only')


if __name__ == '__main__':
    main()
