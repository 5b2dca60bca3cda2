"""Focal-T against Swin-T, side by side in one run: inference and training images/s, training peak memory.

Each model is measured in its own subprocess so that peak memory is its own. On the CPU (default)
the models run in float32 on all cores; peak memory is the growth of the process's peak resident
set over the built model (gradients, optimizer state, activations). With `--device cuda` they run
under bf16 autocast and peak memory is `torch.cuda.max_memory_allocated`. Times are the best of
`--repeats` rounds of `--steps` steps, which is the figure least disturbed by other work on the machine.

    python benchmarks/throughput.py                      # CPU, batch 8, 224 px
    python benchmarks/throughput.py --device cuda --batch-size 64
    python benchmarks/throughput.py --detector           # one 800x1216 image, inference only

`--detector` measures what a detection backbone sees: batch 1 at `--detector-size` (800x1216 by
default), inference only, Swin-T created with `dynamic_img_size=True` so that it takes that size;
for the focal model it also times a forward at a size whose index tables are not cached yet (the
cache is cleared before each), and the difference to a cached forward is the time to build them.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BASELINE = 'swin_tiny_patch4_window7_224'
CANDIDATE = 'focal_tiny_patch4_window7_224'


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def timed(fn, steps: int, repeats: int, device: torch.device) -> float:
    """Best seconds per step over `repeats` rounds of `steps` calls."""
    best = float('inf')
    for _ in range(repeats):
        if device.type == 'cuda':
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        if device.type == 'cuda':
            torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / steps)
    return best


def measure_detector(name: str, args) -> dict:
    import timm
    from models.focal_transformer import FocalTransformer, clear_attention_table_cache

    device = torch.device(args.device)
    torch.manual_seed(0)
    kwargs = {} if name.startswith('focal') else dict(dynamic_img_size=True)
    model = timm.create_model(name, **kwargs).to(device).eval()
    images = torch.randn(1, 3, *args.detector_size, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda')

    def infer_step():
        with torch.inference_mode(), autocast:
            model(images)

    def new_size_step():
        clear_attention_table_cache()
        infer_step()

    for _ in range(args.warmup):
        infer_step()
    infer_time = timed(infer_step, args.steps, args.repeats, device)
    row = {'model': name, 'params_m': sum(p.numel() for p in model.parameters()) / 1e6,
           'infer_img_s': 1 / infer_time, 'forward_ms': infer_time * 1e3}
    if isinstance(model, FocalTransformer):
        row['table_build_ms'] = (timed(new_size_step, args.steps, args.repeats, device) - infer_time) * 1e3
    return row


def measure(name: str, args) -> dict:
    import timm
    import models  # noqa: F401  (registers the focal models with timm)

    if args.detector:
        return measure_detector(name, args)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=args.img_size).to(device)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, 1000, (args.batch_size,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda')

    def train_step():
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer_step():
        with torch.inference_mode(), autocast:
            model(images)

    rss_before = current_rss_bytes()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    model.train()
    for _ in range(args.warmup):
        train_step()
    if device.type == 'cuda':
        train_memory = torch.cuda.max_memory_allocated()
    else:
        train_memory = peak_rss_bytes() - rss_before
    train_time = timed(train_step, args.steps, args.repeats, device)
    model.eval()
    for _ in range(args.warmup):
        infer_step()
    infer_time = timed(infer_step, args.steps, args.repeats, device)
    return {
        'model': name,
        'params_m': sum(p.numel() for p in model.parameters()) / 1e6,
        'infer_img_s': args.batch_size / infer_time,
        'train_img_s': args.batch_size / train_time,
        'train_peak_mib': train_memory / 2 ** 20,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--device', default='cpu', choices=('cpu', 'cuda'))
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--steps', type=int, default=5, help='steps per timed round')
    parser.add_argument('--repeats', type=int, default=3, help='timed rounds; the best is kept')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--threads', type=int, default=os.cpu_count(), help='CPU threads (default: all cores)')
    parser.add_argument('--detector', action='store_true',
                        help='batch 1 at --detector-size, inference only (Swin-T with dynamic_img_size=True)')
    parser.add_argument('--detector-size', type=int, nargs=2, default=(800, 1216), metavar=('H', 'W'))
    parser.add_argument('--models', nargs='+', default=[BASELINE, CANDIDATE],
                        help=f'timm model names; ratios are against the first ({BASELINE} by default)')
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.worker:
        print(json.dumps(measure(args.worker, args)))
        return
    if args.device == 'cuda' and not torch.cuda.is_available():
        sys.exit('error: --device cuda given but no CUDA device is available')

    rows = []
    for name in args.models:
        command = [sys.executable, os.path.abspath(__file__), '--worker', name] + [
            f'--{key.replace("_", "-")}={value}' for key, value in vars(args).items()
            if key not in ('worker', 'models', 'detector', 'detector_size')]
        if args.detector:
            command += ['--detector', '--detector-size', *map(str, args.detector_size)]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f'error: measuring {name} failed:\n{result.stderr.strip()}')
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))

    precision = 'bf16 autocast' if args.device == 'cuda' else 'float32'
    if args.detector:
        print_detector_rows(rows, args, precision)
        return
    print(f'device {args.device} ({precision}), batch {args.batch_size}, {args.img_size} px, '
          f'{args.threads} threads, best of {args.repeats}x{args.steps} steps')
    header = f'{"model":34s} {"params(M)":>9s} {"infer img/s":>12s} {"train img/s":>12s} {"train peak MiB":>15s}'
    print(header)
    print('-' * len(header))
    base = rows[0]
    for row in rows:
        print(f'{row["model"]:34s} {row["params_m"]:9.2f} {row["infer_img_s"]:12.2f} '
              f'{row["train_img_s"]:12.2f} {row["train_peak_mib"]:15.0f}')
    for row in rows[1:]:
        print(f'{row["model"]} / {base["model"]}: inference {row["infer_img_s"] / base["infer_img_s"]:.2f}x, '
              f'training {row["train_img_s"] / base["train_img_s"]:.2f}x, '
              f'training peak memory {row["train_peak_mib"] / base["train_peak_mib"]:.2f}x')


def print_detector_rows(rows: list, args, precision: str):
    height, width = args.detector_size
    print(f'device {args.device} ({precision}), batch 1, {height}x{width} px, inference, '
          f'{args.threads} threads, best of {args.repeats}x{args.steps} steps')
    header = f'{"model":34s} {"params(M)":>9s} {"forward ms":>11s} {"img/s":>8s} {"table build ms":>15s}'
    print(header)
    print('-' * len(header))
    for row in rows:
        build = f'{row["table_build_ms"]:15.1f}' if 'table_build_ms' in row else f'{"-":>15s}'
        print(f'{row["model"]:34s} {row["params_m"]:9.2f} {row["forward_ms"]:11.1f} {row["infer_img_s"]:8.2f} {build}')
    for row in rows[1:]:
        print(f'{row["model"]} / {rows[0]["model"]}: inference {row["infer_img_s"] / rows[0]["infer_img_s"]:.2f}x')


if __name__ == '__main__':
    main()
