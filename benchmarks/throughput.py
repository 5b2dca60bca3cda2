"""Focal-T against Swin-T, side by side in one run: inference and training images/s, training peak memory.

Each model is measured in its own subprocess so that peak memory is its own. On the CPU (default)
the models run in float32 eager mode on all cores; peak memory is the growth of the process's peak
resident set over the built model (gradients, optimizer state, activations). With `--device cuda`
they run under bf16 autocast and peak memory is `torch.cuda.max_memory_allocated`. Times are the
best of `--repeats` rounds of `--steps` steps, which is the figure least disturbed by other work on
the machine.

`--variants` adds rows for the same two models under `torch.compile` and/or bf16 autocast; `all`
takes every variant, bf16 ones on the CPU only where it has bfloat16 instructions (avx512_bf16,
AMX). A compiled model's first steps (compilation) are not timed; on the CPU its peak memory is not
reported, since the compiler's own memory would be counted.

    python benchmarks/throughput.py                      # CPU, float32 eager, batch 8, 224 px
    python benchmarks/throughput.py --variants all       # + torch.compile and bf16 autocast rows
    python benchmarks/throughput.py --device cuda --batch-size 64
    python benchmarks/throughput.py --detector           # one 800x1216 image, inference only

`--detector` measures what a detection backbone sees: batch 1 at `--detector-size` (800x1216 by
default), Swin-T created with `dynamic_img_size=True` so that it takes that size: a backbone
inference row, and a training row of torchvision's Mask R-CNN with the same FPN on each backbone
(its stage maps, each LayerNormed, into torchvision's FeaturePyramidNetwork; one image with three
boxes and masks, AdamW); for the focal model it also times a forward at a size whose index tables
are not cached yet (the cache is cleared before each), and the difference to a cached forward is
the time to build them. The focal models take the detection recipes' focal windows (15 13 9 7;
`--focal-windows 7 5 3 1` measures the classifiers').

`--detector --detectors reppoints_v2` adds, for each backbone, a training step and a full
inference of RepPointsV2 with its 3x recipe's neck and head (stages 1-3 into a 256-channel BiFPN of
two repeats, models.detectors.reppoints_v2) on the same image and boxes.

`--profile N` then says where the time goes: after timing, each model runs N more training steps
and N inference passes under `torch.profiler`, and the operators with the most self time (CPU
time, or CUDA kernel time with `--device cuda`) are printed under the table, model by model.

    python benchmarks/throughput.py --threads 2 --profile 3
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time
from typing import NamedTuple, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BASELINE = 'swin_tiny_patch4_window7_224'
CANDIDATE = 'focal_tiny_patch4_window7_224'


class Variant(NamedTuple):
    label: str
    compile: bool
    bf16: bool


VARIANTS = {
    'eager': Variant('float32 eager', compile=False, bf16=False),
    'compile': Variant('float32 compile', compile=True, bf16=False),
    'bf16': Variant('bf16 eager', compile=False, bf16=True),
    'compile-bf16': Variant('bf16 compile', compile=True, bf16=True),
}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def cpu_info() -> tuple:
    """(model name from /proc/cpuinfo, 'unknown' where it is absent; the bf16 instruction sets
    PyTorch found, which decide the model's CPU attention kernel in bf16)."""
    from models.window_attention import cpu_bf16_instructions

    name = 'unknown'
    try:
        with open('/proc/cpuinfo') as f:
            name = next((line.partition(':')[2].strip() for line in f if line.startswith('model name')), name)
    except OSError:
        pass
    return name, cpu_bf16_instructions()


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


def top_operators(fn, steps: int, device: torch.device, rows: int = 15) -> str:
    """torch.profiler's table of the operators with the most self time over `steps` calls of fn."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == 'cuda' else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if device.type == 'cuda':
            torch.cuda.synchronize()
    sort_by = 'self_cuda_time_total' if device.type == 'cuda' else 'self_cpu_time_total'
    return prof.key_averages().table(sort_by=sort_by, row_limit=rows, max_name_column_width=60)


class TimmFPN(torch.nn.Module):
    """A timm `features_only` model's four stage maps (NHWC), each LayerNormed as Swin's detection
    backbone does, into torchvision's FeaturePyramidNetwork with the max-pooled fifth level: the
    same neck `models.detection.FocalFPN` puts on the focal stages."""

    def __init__(self, name: str, out_indices=(0, 1, 2, 3), neck=None):
        import timm
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
        super().__init__()
        self.body = timm.create_model(name, features_only=True, dynamic_img_size=True, out_indices=out_indices)
        widths = self.body.feature_info.channels()
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(width) for width in widths)
        self.fpn = neck(widths) if neck else FeaturePyramidNetwork(widths, 256, extra_blocks=LastLevelMaxPool())
        self.out_channels = self.fpn.out_channels if neck else 256

    def forward(self, images):
        from collections import OrderedDict
        maps = OrderedDict((str(index), norm(stage_map).permute(0, 3, 1, 2))
                           for index, (norm, stage_map) in enumerate(zip(self.norms, self.body(images))))
        return self.fpn(maps)


def detection_sample(args, device, with_masks: bool) -> tuple:
    """One random image of `--detector-size` and three boxes (with their masks), as a batch."""
    height, width = args.detector_size
    images = [torch.rand(3, height, width, device=device)]
    boxes = torch.tensor([[100., 120., 400., 500.], [600., 200., 900., 700.], [300., 400., 1100., 780.]])
    target = {'boxes': boxes.to(device), 'labels': torch.tensor([1, 2, 3], device=device)}
    if with_masks:
        masks = torch.zeros(3, height, width, dtype=torch.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
            mask[y1:y2, x1:x2] = 1
        target['masks'] = masks.to(device)
    return images, [target]


def mask_rcnn_training_step(name: str, args):
    """A Mask R-CNN training step (forward, backward, AdamW) on `name`'s FPN backbone."""
    from torchvision.models.detection import MaskRCNN
    from models.detection import focal_fpn_backbone

    device = torch.device(args.device)
    backbone = (focal_fpn_backbone(name, focal_windows=args.focal_windows) if name.startswith('focal')
                else TimmFPN(name))
    height, width = args.detector_size
    detector = MaskRCNN(backbone, 91, min_size=height, max_size=max(height, width),
                        _skip_resize=True).to(device).train()
    images, targets = detection_sample(args, device, with_masks=True)
    return detector, training_step(detector, images, targets, device)


def reppoints_v2_detector(name: str, args):
    """RepPointsV2 of the 3x recipe (BiFPN 256 x 2 on stages 1-3, the head, 91 classes) on `name`."""
    from functools import partial
    from models.detection import focal_fpn_backbone
    from models.detectors import RepPointsV2
    from models.detectors.bifpn import BiFPN

    neck = partial(BiFPN, out_channels=256, num_outputs=5, repeats=2)
    backbone = (focal_fpn_backbone(name, returned_stages=(1, 2, 3), neck=neck, focal_windows=args.focal_windows)
                if name.startswith('focal') else TimmFPN(name, out_indices=(1, 2, 3), neck=neck))
    height, width = args.detector_size
    return RepPointsV2(backbone, 91, min_size=height, max_size=max(height, width),
                       _skip_resize=True).to(args.device)


def training_step(detector, images, targets, device):
    """A function of one training step of `detector` (forward, backward, AdamW) on `images`."""
    optimizer = torch.optim.AdamW(detector.parameters(), lr=1e-4, weight_decay=0.05)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda')

    def train_step():
        with autocast:
            loss = sum(detector(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return train_step


def measure_reppoints_v2(name: str, args, device) -> dict:
    """RepPointsV2's parameters, full inference time and training step time on `name`."""
    detector = reppoints_v2_detector(name, args)
    images, targets = detection_sample(args, device, with_masks=False)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda')

    def infer_step():
        with torch.inference_mode(), autocast:
            detector(images)

    detector.eval()
    for _ in range(args.warmup):
        infer_step()
    infer_time = timed(infer_step, args.steps, args.repeats, device)
    detector.train()
    train_step = training_step(detector, images, targets, device)
    for _ in range(args.warmup):
        train_step()
    train_time = timed(train_step, args.steps, args.repeats, device)
    return {'params_m': sum(p.numel() for p in detector.parameters()) / 1e6, 'infer_ms': infer_time * 1e3,
            'train_step_ms': train_time * 1e3}


def measure_detector(name: str, args) -> dict:
    import timm
    from models.attention_tables import clear_attention_table_cache
    from models.focal_transformer import FocalTransformer

    device = torch.device(args.device)
    torch.manual_seed(0)
    kwargs = dict(focal_windows=args.focal_windows) if name.startswith('focal') else dict(dynamic_img_size=True)
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
    detector, train_step = mask_rcnn_training_step(name, args)
    torch.manual_seed(0)  # the same proposals sampled for both backbones
    for _ in range(args.warmup):
        train_step()
    train_time = timed(train_step, args.steps, args.repeats, device)
    row.update(mask_rcnn_params_m=sum(p.numel() for p in detector.parameters()) / 1e6,
               train_img_s=1 / train_time, train_step_ms=train_time * 1e3)
    if 'reppoints_v2' in args.detectors:
        del detector
        row['reppoints_v2'] = measure_reppoints_v2(name, args, device)
    return row


def measure(name: str, args) -> dict:
    import timm
    import models  # noqa: F401  (registers the focal models with timm)

    if args.detector:
        return measure_detector(name, args)
    device = torch.device(args.device)
    variant = VARIANTS[args.variant]
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=args.img_size).to(device)
    forward = torch.compile(model) if variant.compile else model
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size, device=device)
    labels = torch.randint(0, 1000, (args.batch_size,), device=device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant.bf16)

    def train_step():
        with autocast:
            loss = torch.nn.functional.cross_entropy(forward(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer_step():
        with torch.inference_mode(), autocast:
            forward(images)

    model.train()
    if variant.compile:
        train_step()  # compiles; untimed and, on a GPU, before the peak memory is reset
    rss_before = current_rss_bytes()
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
    for _ in range(args.warmup):
        train_step()
    train_memory: Optional[float] = None
    if device.type == 'cuda':
        train_memory = torch.cuda.max_memory_allocated()
    elif not variant.compile:
        train_memory = peak_rss_bytes() - rss_before
    train_time = timed(train_step, args.steps, args.repeats, device)
    profiles = {}
    if args.profile:
        profiles['training'] = top_operators(train_step, args.profile, device)
    model.eval()
    if variant.compile:
        infer_step()  # compiles the inference graph; untimed
    for _ in range(args.warmup):
        infer_step()
    infer_time = timed(infer_step, args.steps, args.repeats, device)
    if args.profile:
        profiles['inference'] = top_operators(infer_step, args.profile, device)
    return {
        'model': name,
        'params_m': sum(p.numel() for p in model.parameters()) / 1e6,
        'infer_img_s': args.batch_size / infer_time,
        'train_img_s': args.batch_size / train_time,
        'train_peak_mib': None if train_memory is None else train_memory / 2 ** 20,
        'profiles': profiles,
    }


def chosen_variants(args, cpu_bf16: tuple) -> list:
    """`--variants` with `all` expanded; bf16 rows of `all` only where the CPU has bf16 instructions."""
    if args.variants is None:
        return ['bf16'] if args.device == 'cuda' else ['eager']
    if 'all' not in args.variants:
        return list(dict.fromkeys(args.variants))
    return [key for key, variant in VARIANTS.items()
            if not variant.bf16 or args.device == 'cuda' or cpu_bf16]


def short_name(model: str) -> str:
    return model.replace('_patch4_window7_224', '')


def print_table(results: dict):
    """One row per variant and model, then per variant each model's ratios to the variant's first model."""
    columns = (f'{"variant":16s} {"model":34s} {"params(M)":>9s} {"infer img/s":>12s} '
               f'{"train img/s":>12s} {"train peak MiB":>15s}')
    print(columns)
    print('-' * len(columns))
    for key, rows in results.items():
        base = rows[0]
        for row in rows:
            memory = '-' if row['train_peak_mib'] is None else f'{row["train_peak_mib"]:.0f}'
            print(f'{VARIANTS[key].label:16s} {row["model"]:34s} {row["params_m"]:9.2f} '
                  f'{row["infer_img_s"]:12.2f} {row["train_img_s"]:12.2f} {memory:>15s}')
        for row in rows[1:]:
            memory = '-' if None in (row['train_peak_mib'], base['train_peak_mib']) else \
                f'{row["train_peak_mib"] / base["train_peak_mib"]:.2f}x'
            ratio = f'ratio {short_name(row["model"])} / {short_name(base["model"])}'
            print(f'{"":16s} {ratio:34s} {"":9s} {row["infer_img_s"] / base["infer_img_s"]:11.2f}x '
                  f'{row["train_img_s"] / base["train_img_s"]:11.2f}x {memory:>15s}')


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
    parser.add_argument('--focal-windows', type=int, nargs=4, default=(15, 13, 9, 7), metavar='N',
                        help="with --detector: the focal models' focal windows (configs/detection recipes')")
    parser.add_argument('--detectors', nargs='+', choices=('mask_rcnn', 'reppoints_v2'), default=['mask_rcnn'],
                        help='with --detector: the detectors timed besides the backbone (Mask R-CNN always; '
                             'reppoints_v2 adds RepPointsV2 inference and training)')
    parser.add_argument('--models', nargs='+', default=[BASELINE, CANDIDATE],
                        help=f'timm model names; ratios are against the first ({BASELINE} by default)')
    parser.add_argument('--variants', nargs='+', choices=(*VARIANTS, 'all'),
                        help='eager: float32; compile: float32 under torch.compile; bf16: bf16 autocast; '
                             'compile-bf16: both; all: every one (bf16 on the CPU only where it has bf16 '
                             'instructions). Default: eager on the CPU, bf16 on cuda')
    parser.add_argument('--profile', type=int, default=0, metavar='N',
                        help='after timing, profile N training steps and N inference passes per model '
                             'and print the operators with the most self time')
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    parser.add_argument('--variant', default='eager', choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.detector and (args.variants or args.profile):
        parser.error('--detector measures plain inference; it takes no --variants or --profile')
    torch.set_num_threads(args.threads)

    if args.worker:
        print(json.dumps(measure(args.worker, args)))
        return
    if args.device == 'cuda' and not torch.cuda.is_available():
        sys.exit('error: --device cuda given but no CUDA device is available')

    cpu_name, cpu_bf16 = cpu_info()
    variants = chosen_variants(args, cpu_bf16)
    print(f'CPU: {cpu_name}, {os.cpu_count()} logical CPUs, bf16 instructions: '
          f'{" ".join(cpu_bf16) or "none"}; torch {torch.__version__}; {args.threads} threads')
    if args.device == 'cuda':
        print(f'GPU: {torch.cuda.get_device_name()}')
    if args.device == 'cpu' and not cpu_bf16 and any(VARIANTS[key].bf16 for key in variants):
        print('note: this CPU has no bf16 instructions; its bf16 rows convert to float32 to compute')
    if args.device == 'cpu' and 'all' in (args.variants or ()) and not cpu_bf16:
        print('note: bf16 rows left out, this CPU has no bf16 instructions')

    results = {}
    for key in variants:
        results[key] = []
        for name in args.models:
            command = [sys.executable, os.path.abspath(__file__), '--worker', name, '--variant', key] + [
                f'--{option.replace("_", "-")}={value}' for option, value in vars(args).items()
                if option not in ('worker', 'models', 'variants', 'variant', 'detector', 'detector_size',
                                  'focal_windows', 'detectors')]
            if args.detector:
                command += ['--detector', '--detector-size', *map(str, args.detector_size),
                            '--focal-windows', *map(str, args.focal_windows), '--detectors', *args.detectors]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                sys.exit(f'error: measuring {name} ({VARIANTS[key].label}) failed:\n{result.stderr.strip()}')
            results[key].append(json.loads(result.stdout.strip().splitlines()[-1]))

    if args.detector:
        for key in variants:
            print_detector_rows(results[key], args, VARIANTS[key].label)
        return
    print(f'device {args.device}, batch {args.batch_size}, {args.img_size} px, '
          f'best of {args.repeats}x{args.steps} steps')
    print_table(results)
    for key, rows in results.items():
        for row in rows:
            for mode, table in row['profiles'].items():
                print(f'\n{row["model"]}, {VARIANTS[key].label}, {mode}: {args.profile} steps\n{table}')


def print_detector_rows(rows: list, args, precision: str):
    height, width = args.detector_size
    print(f'device {args.device} ({precision}), batch 1, {height}x{width} px, backbone inference and '
          f'Mask R-CNN training, focal windows {" ".join(map(str, args.focal_windows))}, {args.threads} threads, '
          f'best of {args.repeats}x{args.steps} steps')
    header = (f'{"model":34s} {"params(M)":>9s} {"forward ms":>11s} {"img/s":>8s} {"table build ms":>15s} '
              f'{"Mask R-CNN(M)":>13s} {"train step ms":>14s} {"train img/s":>12s}')
    print(header)
    print('-' * len(header))
    for row in rows:
        build = f'{row["table_build_ms"]:15.1f}' if 'table_build_ms' in row else f'{"-":>15s}'
        print(f'{row["model"]:34s} {row["params_m"]:9.2f} {row["forward_ms"]:11.1f} {row["infer_img_s"]:8.2f} {build} '
              f'{row["mask_rcnn_params_m"]:13.2f} {row["train_step_ms"]:14.1f} {row["train_img_s"]:12.3f}')
    for row in rows[1:]:
        print(f'{row["model"]} / {rows[0]["model"]}: inference {row["infer_img_s"] / rows[0]["infer_img_s"]:.2f}x, '
              f'Mask R-CNN training {row["train_img_s"] / rows[0]["train_img_s"]:.2f}x')
    if 'reppoints_v2' in rows[0]:
        print(f'\nRepPointsV2 (BiFPN 256 x 2, 3x recipe head), batch 1, {height}x{width} px')
        print(f'{"model":34s} {"params(M)":>9s} {"inference ms":>13s} {"train step ms":>14s}')
        for row in rows:
            found = row['reppoints_v2']
            print(f'{row["model"]:34s} {found["params_m"]:9.2f} {found["infer_ms"]:13.1f} {found["train_step_ms"]:14.1f}')
        base = rows[0]['reppoints_v2']
        for row in rows[1:]:
            found = row['reppoints_v2']
            print(f'{row["model"]} / {rows[0]["model"]}: RepPointsV2 inference {base["infer_ms"] / found["infer_ms"]:.2f}x, '
                  f'training {base["train_step_ms"] / found["train_step_ms"]:.2f}x')


if __name__ == '__main__':
    main()
