"""Everything the fused attention needs measured on a GPU, in one run that fits a few minutes of device
time (8 by default): each section a subprocess under its own time limit, its output printed as it
comes, the most important first, so that a run cut short still shows them.

1. versions: the GPU, driver, torch and Triton.
2. tests: `pytest tests/test_cuda.py` (SDPA and the fused kernels against the math kernel in float32
   and bf16, bias-only training, bf16 inference, a compiled step, peak memory at batch 128).
3. kernels: `attention_kernels.py`, the fused kernels against SDPA at each Focal-T stage's shapes,
   forward and forward + backward, batch 128, bf16.
4. throughput: `throughput.py --device cuda --batch-size 128 --variants eager bf16 --cuda-attention
   sdpa fused`: Focal-T with each attention against Swin-T, training and inference images/s and peak
   memory.
5. compiled: the same with `--variants compile compile-bf16` (`--variants all` is sections 4 and 5):
   torch.compile takes minutes per model, so it comes last and takes the time that is left.

    python3 benchmarks/cuda_check.py                         # all sections, 480 s in all
    python3 benchmarks/cuda_check.py --sections compiled --budget 600
    python3 benchmarks/cuda_check.py --dry-run               # the commands and their limits; runs nothing
"""
import argparse
import os
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCHMARKS = os.path.join(REPO, 'benchmarks')
THROUGHPUT = [sys.executable, os.path.join(BENCHMARKS, 'throughput.py'), '--device', 'cuda', '--batch-size', '128',
              '--cuda-attention', 'sdpa', 'fused', '--variants']
# (name, command, most seconds it may take); the limits add up to the default budget
SECTIONS = [
    ('versions', [sys.executable, '-c', 'import torch, triton; print(torch.cuda.get_device_name(), "| torch",'
                  ' torch.__version__, "| CUDA", torch.version.cuda, "| Triton", triton.__version__)'], 30),
    ('tests', [sys.executable, '-m', 'pytest', '-q', '-s', '-p', 'no:cacheprovider', 'tests/test_cuda.py'], 180),
    ('kernels', [sys.executable, os.path.join(BENCHMARKS, 'attention_kernels.py'), '--batch-size', '128'], 60),
    ('throughput', THROUGHPUT + ['eager', 'bf16'], 120),
    ('compiled', THROUGHPUT + ['compile', 'compile-bf16'], 90),
]
DEFAULT_BUDGET = sum(limit for _, _, limit in SECTIONS)


def run_section(command: list, limit: float) -> str:
    """Run `command` in the repository with its output passed through; 'ok', 'failed (status N)' or 'cut
    at the time limit' (the whole process group is stopped: throughput.py measures in subprocesses)."""
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True)
    try:
        status = process.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return 'cut at the time limit'
    return 'ok' if status == 0 else f'failed (status {status})'


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    names = [name for name, _, _ in SECTIONS]
    parser.add_argument('--sections', nargs='+', choices=names, default=names, help='sections to run, in order')
    parser.add_argument('--budget', type=float, default=DEFAULT_BUDGET,
                        help='seconds for the whole run; a section gets its own limit or what is left, '
                             'the last one everything left')
    parser.add_argument('--dry-run', action='store_true', help='print the sections and their limits; run nothing')
    args = parser.parse_args()
    chosen = [section for section in SECTIONS if section[0] in args.sections]
    if not args.dry_run:
        import torch
        if not torch.cuda.is_available():
            sys.exit('error: no CUDA device, nothing to measure (--dry-run prints what would run)')

    start = time.monotonic()
    planned = 0.  # a dry run counts each section as taking its whole limit
    outcomes = []
    for index, (name, command, limit) in enumerate(chosen):
        left = args.budget - (planned if args.dry_run else time.monotonic() - start)
        limit = left if index == len(chosen) - 1 else min(limit, left)
        print(f'\n=== {name}: {" ".join(command)} (at most {limit:.0f} s)', flush=True)
        if args.dry_run:
            planned += limit
            continue
        if limit <= 0:
            outcomes.append((name, 'skipped: no time left'))
            continue
        section_start = time.monotonic()
        outcome = run_section(command, limit)
        outcomes.append((name, f'{outcome}, {time.monotonic() - section_start:.0f} s'))
    if outcomes:
        print('\n=== summary: ' + '; '.join(f'{name} {outcome}' for name, outcome in outcomes))
    sys.exit(1 if any(not outcome.startswith('ok') for _, outcome in outcomes) else 0)


if __name__ == '__main__':
    main()
