"""Focal-T's attention alone on a GPU, at each stage's shapes: the fused Triton kernels against SDPA, forward
and forward + backward, in one run.

Each stage's first block of `focal_tiny_patch4_window7_224` gives the tables (the map of a 224 px image,
cached as the model builds them), the learned bias and the mask; the rows are random (B, T, 3C) in
`--dtype`. Rows, per stage: SDPA as window_attention's default CUDA setting runs it (bias and mask added
per window before the call); the fused kernels on that sum; the fused kernels on the learned bias and mask
passed apart (what window_attention's fused setting runs). Times are triton.testing.do_bench medians in ms; the
speed-up is SDPA's time over the fused kernels'. The largest difference between the fused and SDPA
outputs is printed as a check of what is timed.

    python3 benchmarks/attention_kernels.py                      # batch 128, bf16
    python3 benchmarks/attention_kernels.py --batch-size 32 --dtype float32
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = {'bfloat16': torch.bfloat16, 'float16': torch.float16, 'float32': torch.float32}


def stage_cases(batch_size: int, dtype: torch.dtype):
    """(stage, qkv, query_index, key_index, learned bias (nH, ws², n_keys), mask, scale) per stage of Focal-T."""
    import timm
    import models  # noqa: F401  (registers the focal models with timm)
    from models.attention_tables import block_attention_tables
    from models.focal_transformer import pad_to_multiple

    torch.manual_seed(0)
    model = timm.create_model('focal_tiny_patch4_window7_224').cuda()
    size = 224 // 4
    for stage, layer in enumerate(model.layers):
        block = layer.blocks[0]
        attention = block.attn
        padded = pad_to_multiple(torch.empty(1, size, size, 1, device='cuda'), block.window_size)
        query_index, key_index, mask = block_attention_tables(
            padded, attention.window_size, attention.expand_size, attention.shift_size, attention.focal_window,
            attention.pooled_levels, attention.neighbour_positions)
        # the map's tokens, then each pooled level's cells (2**k a side per window)
        cells = sum(key_index.shape[0] << (2 * k) for k in range(attention.pooled_levels))
        tokens = padded.shape[1] * padded.shape[2] + cells
        qkv = torch.randn(batch_size, tokens, 3 * attention.dim, device='cuda', dtype=dtype)
        with torch.no_grad():
            learned = attention.attention_bias()
        yield stage, qkv, query_index, key_index, learned.to(dtype), mask, attention.scale
        size //= 2


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch-size', type=int, default=128)
    parser.add_argument('--dtype', choices=DTYPES, default='bfloat16')
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit('error: attention_kernels.py times CUDA kernels and no CUDA device is available')
    from triton.testing import do_bench
    from models.triton_attention import TRITON_AVAILABLE, fused_window_attention
    from models.window_attention import window_attention
    if not TRITON_AVAILABLE:
        sys.exit('error: Triton is not installed')

    dtype = DTYPES[args.dtype]
    print(f'{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch_size}, {args.dtype}; '
          f'ms per call (do_bench median)')
    header = (f'{"stage":>5s} {"queries x slots":>15s} {"heads":>5s} {"pass":>16s} {"SDPA":>8s} '
              f'{"fused":>8s} {"fused, mask apart":>18s} {"speed-up":>9s}  largest |fused - SDPA|')
    print(header)
    print('-' * len(header))
    for stage, qkv, query_index, key_index, learned, mask, scale in stage_cases(args.batch_size, dtype):
        per_window = learned.expand(key_index.shape[0], -1, -1, -1) + mask.unsqueeze(1).to(dtype)
        grad = torch.randn(qkv.shape[0], query_index.shape[0], qkv.shape[2] // 3, device='cuda', dtype=dtype)

        def sdpa(rows, table):  # the default CUDA setting, which adds bias and mask before SDPA
            return window_attention(rows, query_index, key_index, table, mask, scale)

        def fused(rows, table):
            return fused_window_attention(rows, query_index, key_index, table, None, scale)

        def fused_apart(rows, table):
            return fused_window_attention(rows, query_index, key_index, table, mask, scale)

        runs = ((sdpa, learned), (fused, per_window), (fused_apart, learned))
        with torch.no_grad():
            outputs = [run(qkv, table) for run, table in runs]
        difference = max((out.float() - outputs[0].float()).abs().max().item() for out in outputs[1:])
        for name in ('forward', 'forward+backward'):
            times = []
            for run, table in runs:
                rows, table = qkv.clone().requires_grad_(), table.clone().requires_grad_()
                if name == 'forward':
                    def step():
                        with torch.no_grad():
                            run(rows, table)
                else:
                    def step():
                        run(rows, table).backward(grad)
                times.append(do_bench(step, return_mode='median'))
            print(f'{stage:5d} {f"{query_index.shape[0] // key_index.shape[0]} x {key_index.shape[1]}":>15s} '
                  f'{learned.shape[0]:5d} {name:>16s} {times[0]:8.3f} {times[1]:8.3f} {times[2]:18.3f} '
                  f'{times[0] / min(times[1:]):8.2f}x  {difference:.2e}', flush=True)


if __name__ == '__main__':
    main()
