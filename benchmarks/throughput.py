"""Focal-T against Swin-T, side by side in one run: inference and training images/s, training peak memory.

Each model is measured in its own subprocess (but see `--detector`) so that peak memory is its own. On
the CPU (default) the models run in float32 eager mode on all cores; peak memory is the growth of the
process's peak resident set over the built model (gradients, optimizer state, activations). With
`--device cuda` they run under bf16 autocast and peak memory is `torch.cuda.max_memory_allocated`.
Times are the best of `--repeats` rounds of `--steps` steps, which is the figure least disturbed by
other work on the machine.

`--variants` adds rows for the same two models under `torch.compile` and/or bf16 autocast; `all`
takes every variant, bf16 ones on the CPU only where it has bfloat16 instructions (avx512_bf16,
AMX). A compiled model's first steps (compilation) are not timed; on the CPU its peak memory is not
reported, since the compiler's own memory would be counted.

    python benchmarks/throughput.py                      # CPU, float32 eager, batch 8, 224 px
    python benchmarks/throughput.py --variants all       # + torch.compile and bf16 autocast rows
    python benchmarks/throughput.py --device cuda --batch-size 64
    python benchmarks/throughput.py --detector           # one 800x1216 image: backbone, Mask R-CNN
    python benchmarks/throughput.py --detector --methods mask_rcnn cascade_mask_rcnn atss sparse_rcnn reppoints_v2

`--detector` measures what a detection backbone sees: batch 1 at `--detector-size` (800x1216 by
default), Swin-T created with `dynamic_img_size=True` so that it takes that size: a backbone
inference row, and for each detector of `--methods` (torchvision's Mask R-CNN by default; the others
are models.detectors' with their 3x recipes' heads and pyramid levels as tasks/detection.py builds them)
a row of its inference and its training step with the same FPN on each backbone (its stage maps, each
LayerNormed, into torchvision's FeaturePyramidNetwork; one image with three boxes, and their masks for
the detectors that predict masks, AdamW); for the focal model it also times how long a forward at a
size whose index tables are not cached yet (the cache is cleared before each) spends building them.
The focal models take the detection recipes' focal windows (15 13 9 7; `--focal-windows 7 5 3 1`
measures the classifiers'), both backbones their recipes' drop path. Unlike the other modes,
`--detector` keeps every model in one process (it reports no memory) and times them in alternating
rounds, so that a machine that slows down during the run slows all of them: a row gives each model's
best round, and a last line the lowest, median and highest of the round-by-round ratios, whose
spread is the run's noise.

`--memory` measures only the training peak memory per image, each model with and without activation
checkpointing (timm's `set_grad_checkpointing`, what TRAIN.USE_CHECKPOINT sets): at each batch size of
`--memory-batches`, one process per model, setting and batch builds the model and AdamW, runs one training
step (so that the optimizer's state and the gradients exist; the gradients are zeroed, not freed), then
measures the growth of its peak resident set during a second step over the resident set before it: the
activations and temporaries of a step, what grows with the batch and what checkpointing saves. glibc is told to
return every freed block of 64 KiB or more to the system at once, so that the resident set is what the
process holds. The slope between the smallest and largest batch is the memory per image.

    python benchmarks/throughput.py --memory --models swin_large_patch4_window7_224 focal_large_patch4_window7_224

`--cuda-attention sdpa fused` (with `--device cuda`) measures the focal models once per CUDA attention
setting (`models.window_attention.set_cuda_attention`: PyTorch's SDPA, the fused Triton kernel, or
`auto`), each against the same baseline row; without it they run the default setting.

`--profile N` then says where the time goes: after timing, each model runs N more training steps
and N inference passes under `torch.profiler`, and the operators with the most self time (CPU
time, or CUDA kernel time with `--device cuda`) are printed under the table, model by model.

    python benchmarks/throughput.py --threads 2 --profile 3
"""
import argparse
import json
import os
import resource
import statistics
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


def reset_peak_rss():
    """Start the process's peak resident set (VmHWM) again from its current resident set (Linux)."""
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')


def peak_rss_since_reset() -> int:
    with open('/proc/self/status') as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith('VmHWM:'))


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


# The detection recipes' focal windows (configs/detection, the paper's section 4.2), and the stochastic
# depth of both tiny backbones there: Swin-T's Mask R-CNN 3x config (drop_path_rate=0.2) and Focal-T's
DETECTION_FOCAL_WINDOWS = (15, 13, 9, 7)
DETECTION_DROP_PATH = 0.2


class TimmFPN(torch.nn.Module):
    """A timm `features_only` model's stage maps (NHWC; `returned_stages`, by default all four), each
    LayerNormed as Swin's detection backbone does, into torchvision's FeaturePyramidNetwork with
    `extra_blocks` (by default the max-pooled fifth level) or into `neck(widths)`: the same necks
    `models.detection.FocalFPN` puts on the focal stages."""

    def __init__(self, name: str, returned_stages: tuple = (0, 1, 2, 3), extra_blocks=None, neck=None):
        import timm
        from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool
        super().__init__()
        self.body = timm.create_model(name, features_only=True, dynamic_img_size=True, out_indices=returned_stages,
                                      drop_path_rate=DETECTION_DROP_PATH)
        widths = self.body.feature_info.channels()
        self.norms = torch.nn.ModuleList(torch.nn.LayerNorm(width) for width in widths)
        self.fpn = (neck(widths) if neck is not None else
                    FeaturePyramidNetwork(widths, 256, extra_blocks=extra_blocks or LastLevelMaxPool()))
        self.out_channels = self.fpn.out_channels if neck is not None else 256

    def forward(self, images):
        from collections import OrderedDict
        maps = OrderedDict((str(index), norm(stage_map).permute(0, 3, 1, 2))
                           for index, (norm, stage_map) in enumerate(zip(self.norms, self.body(images))))
        return self.fpn(maps)


def fpn_backbone(name: str, args, returned_stages: tuple = (0, 1, 2, 3), extra_blocks=None, neck=None):
    """`name`'s FPN backbone: models.detection's FocalFPN (at --focal-windows) or a TimmFPN."""
    from models.detection import focal_fpn_backbone
    if name.startswith('focal'):
        return focal_fpn_backbone(name, returned_stages=returned_stages, extra_blocks=extra_blocks, neck=neck,
                                  focal_windows=args.focal_windows, drop_path_rate=DETECTION_DROP_PATH)
    return TimmFPN(name, returned_stages, extra_blocks, neck)


def image_size(args) -> dict:
    """The detectors' transform arguments for one --detector-size image, which the data pipeline would resize."""
    height, width = args.detector_size
    return dict(min_size=height, max_size=max(height, width), _skip_resize=True)


def build_mask_rcnn(name: str, args):
    from torchvision.models.detection import MaskRCNN
    return MaskRCNN(fpn_backbone(name, args), 91, **image_size(args))


def build_cascade_mask_rcnn(name: str, args):
    """The 3x recipe's heads (models.detectors.cascade_rcnn's defaults) on Mask R-CNN's anchors."""
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from models.detectors import CascadeMaskRCNN
    anchors = AnchorGenerator([(32,), (64,), (128,), (256,), (512,)], [(0.5, 1.0, 2.0)] * 5)
    return CascadeMaskRCNN(fpn_backbone(name, args), 91, anchors, **image_size(args))


def build_atss(name: str, args):
    """ATSS on stages 1-3 with P6 and P7 from P5, as tasks/detection.py builds it."""
    from models.detection import LastLevelP6P7
    from models.detectors import ATSS
    return ATSS(fpn_backbone(name, args, (1, 2, 3), LastLevelP6P7(256, 256)), 91, **image_size(args))


def build_sparse_rcnn(name: str, args):
    """Sparse R-CNN on P2-P5 with the 3x recipe's 300 proposals."""
    from models.detectors import SparseRCNN
    return SparseRCNN(fpn_backbone(name, args), 91, num_proposals=300, detections_per_img=300, **image_size(args))


def build_reppoints_v2(name: str, args):
    """RepPointsV2 of the 3x recipe: stages 1-3 into a 256-channel BiFPN of two repeats (P3-P7), its head."""
    from functools import partial
    from models.detectors import RepPointsV2
    from models.detectors.bifpn import BiFPN
    neck = partial(BiFPN, out_channels=256, num_outputs=5, repeats=2)
    return RepPointsV2(fpn_backbone(name, args, (1, 2, 3), neck=neck), 91, **image_size(args))


# --methods: name -> (label, build(model name, args), trained with masks), each detector at its COCO recipe's heads
DETECTOR_METHODS = {
    'mask_rcnn': ('Mask R-CNN', build_mask_rcnn, True),
    'cascade_mask_rcnn': ('Cascade Mask R-CNN', build_cascade_mask_rcnn, True),
    'atss': ('ATSS', build_atss, False),
    'sparse_rcnn': ('Sparse R-CNN', build_sparse_rcnn, False),
    'reppoints_v2': ('RepPointsV2', build_reppoints_v2, False),
}


def detector_training_step(name: str, method: str, args):
    """`method`'s detector on `name`'s backbone and its training step (forward, backward, AdamW)."""
    device = torch.device(args.device)
    _, build, with_masks = DETECTOR_METHODS[method]
    detector = build(name, args).to(device).train()
    optimizer = torch.optim.AdamW(detector.parameters(), lr=1e-4, weight_decay=0.05)
    height, width = args.detector_size
    images = [torch.rand(3, height, width, device=device)]
    boxes = torch.tensor([[100., 120., 400., 500.], [600., 200., 900., 700.], [300., 400., 1100., 780.]])
    targets = [{'boxes': boxes.to(device), 'labels': torch.tensor([1, 2, 3], device=device)}]
    if with_masks:
        masks = torch.zeros(3, height, width, dtype=torch.uint8)
        for mask, (x1, y1, x2, y2) in zip(masks, boxes.int().tolist()):
            mask[y1:y2, x1:x2] = 1
        targets[0]['masks'] = masks.to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda')

    def train_step():
        with autocast:
            loss = sum(detector(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return detector, train_step


def alternating_rounds(steps_by_model: list, steps: int, repeats: int, device: torch.device) -> list:
    """Seconds per step of each function in each of `repeats` rounds: a round times `steps` calls of every
    function in turn, first to last in even rounds and last to first in odd ones, so that a change in the
    machine's speed during the run reaches every model alike."""
    seconds = [[] for _ in steps_by_model]
    for round_index in range(repeats):
        order = range(len(steps_by_model)) if round_index % 2 == 0 else reversed(range(len(steps_by_model)))
        for i in order:
            seconds[i].append(timed(steps_by_model[i], steps, 1, device))
    return seconds


def table_build_seconds(infer_step, repeats: int) -> float:
    """Seconds a forward at a new input size spends building the focal blocks' index tables: the time
    spent in the table cache during a forward after clearing it (misses build; blocks of a configuration
    already built hit), best of `repeats`. Timed inside the cache, not as the difference between a
    forward with and one without a cleared cache, which is smaller than their noise."""
    from models import attention_tables
    cache = attention_tables._cached_attention_tables
    spent = []

    def timed_lookup(*key):
        start = time.perf_counter()
        tables = cache(*key)
        spent.append(time.perf_counter() - start)
        return tables

    attention_tables._cached_attention_tables = timed_lookup
    try:
        best = float('inf')
        for _ in range(repeats):
            cache.cache_clear()
            spent.clear()
            infer_step()
            best = min(best, sum(spent))
    finally:
        attention_tables._cached_attention_tables = cache
    return best


def measure_detectors(args) -> list:
    """--detector: every model of --models in this one process, timed in alternating rounds (backbone
    inference, then each method's training step and inference); a row per model as print_detector_rows
    reads it, with each measurement's per-round seconds under 'rounds'."""
    import timm
    import models  # noqa: F401  (registers the focal models with timm)
    from models.window_attention import set_cuda_attention

    device = torch.device(args.device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == 'cuda')
    images = torch.randn(1, 3, *args.detector_size, device=device)
    entries = [(name, attention) for name in args.models for attention in attention_settings(name, args)]

    def under_setting(attention, fn):
        """fn with `attention` (a --cuda-attention setting, or None: the default) in force while it runs,
        from the same random state at every call (drop path, the detectors' sampling), whichever the model
        and the round."""
        def run():
            set_cuda_attention(attention) if attention else set_cuda_attention()
            torch.manual_seed(0)
            fn()
        return run

    def timed_rounds(fns: list) -> list:
        for fn in fns:
            for _ in range(args.warmup):
                fn()
        return alternating_rounds(fns, args.steps, args.repeats, device)

    rows, infer_steps = [], []
    for name, attention in entries:
        torch.manual_seed(0)
        kwargs = dict(focal_windows=args.focal_windows) if name.startswith('focal') else dict(dynamic_img_size=True)
        model = timm.create_model(name, **kwargs).to(device).eval()

        def infer_step(model=model):
            with torch.inference_mode(), autocast:
                model(images)

        infer_steps.append(under_setting(attention, infer_step))
        rows.append({'model': name if attention is None else f'{name} ({attention})',
                     'params_m': sum(p.numel() for p in model.parameters()) / 1e6, 'methods': {}, 'rounds': {}})
    for row, seconds in zip(rows, timed_rounds(infer_steps)):
        row.update(infer_img_s=1 / min(seconds), forward_ms=min(seconds) * 1e3)
        row['rounds']['inference'] = seconds
    for (name, _), row, infer_step in zip(entries, rows, infer_steps):
        if name.startswith('focal'):
            row['table_build_ms'] = table_build_seconds(infer_step, args.repeats) * 1e3

    def measure_method(method: str) -> tuple:
        """`method`'s detector on each model: its parameters (M), per-round training step and inference
        seconds. Its detectors are freed on return, before the next method's are built."""
        detectors, train_steps = [], []
        for name, attention in entries:
            detector, train_step = detector_training_step(name, method, args)
            detectors.append(detector)
            train_steps.append(under_setting(attention, train_step))
        train_seconds = timed_rounds(train_steps)
        detect_steps = []
        for detector, (_, attention) in zip(detectors, entries):
            detector.eval()

            def detect(detector=detector):
                with torch.inference_mode(), autocast:
                    detector(list(images))

            detect_steps.append(under_setting(attention, detect))
        params = [sum(p.numel() for p in detector.parameters()) / 1e6 for detector in detectors]
        return params, train_seconds, timed_rounds(detect_steps)

    for method in args.methods:
        for row, params, trained, detected in zip(rows, *measure_method(method)):
            row['methods'][method] = dict(params_m=params,
                                          train_img_s=1 / min(trained), train_step_ms=min(trained) * 1e3,
                                          detect_img_s=1 / min(detected), detect_ms=min(detected) * 1e3)
            row['rounds'][f'{method} training'] = trained
            row['rounds'][f'{method} inference'] = detected
    return rows


def measure_memory(name: str, args) -> dict:
    """Peak resident-set growth of a training step after the first, at args.batch_size, with or without
    activation checkpointing (see the module docstring)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, img_size=args.img_size).train()
    model.set_grad_checkpointing(args.checkpointing)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    labels = torch.randint(0, 1000, (args.batch_size,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast = torch.autocast('cpu', dtype=torch.bfloat16, enabled=VARIANTS[args.variant].bf16)

    def train_step():
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # the gradients stay allocated: the same in every setting

    train_step()
    before = current_rss_bytes()
    reset_peak_rss()
    train_step()
    return {'model': name, 'params_m': sum(p.numel() for p in model.parameters()) / 1e6,
            'batch_size': args.batch_size, 'checkpointing': args.checkpointing,
            'step_peak_mib': (peak_rss_since_reset() - before) / 2 ** 20}


def measure(name: str, args) -> dict:
    import timm
    import models  # noqa: F401  (registers the focal models with timm)

    if args.memory:
        return measure_memory(name, args)
    if args.attention:
        from models.window_attention import set_cuda_attention
        set_cuda_attention(args.attention)
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
        'model': name if args.attention is None else f'{name} ({args.attention})',
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


def attention_settings(name: str, args) -> list:
    """The CUDA attention settings `name` is measured with: each of --cuda-attention for a focal model,
    the default (None) otherwise."""
    return args.cuda_attention if args.cuda_attention and name.startswith('focal') else [None]


def print_table(results: dict):
    """One row per variant and model, then per variant each model's ratios to the variant's first model."""
    columns = (f'{"variant":16s} {"model":40s} {"params(M)":>9s} {"infer img/s":>12s} '
               f'{"train img/s":>12s} {"train peak MiB":>15s}')
    print(columns)
    print('-' * len(columns))
    for key, rows in results.items():
        base = rows[0]
        for row in rows:
            memory = '-' if row['train_peak_mib'] is None else f'{row["train_peak_mib"]:.0f}'
            print(f'{VARIANTS[key].label:16s} {row["model"]:40s} {row["params_m"]:9.2f} '
                  f'{row["infer_img_s"]:12.2f} {row["train_img_s"]:12.2f} {memory:>15s}')
        for row in rows[1:]:
            memory = '-' if None in (row['train_peak_mib'], base['train_peak_mib']) else \
                f'{row["train_peak_mib"] / base["train_peak_mib"]:.2f}x'
            ratio = f'ratio {short_name(row["model"])} / {short_name(base["model"])}'
            print(f'{"":16s} {ratio:40s} {"":9s} {row["infer_img_s"] / base["infer_img_s"]:11.2f}x '
                  f'{row["train_img_s"] / base["train_img_s"]:11.2f}x {memory:>15s}')


def print_memory_table(results: dict, batches: list):
    """Per variant: each model's step peak at each batch, with and without checkpointing, and the slope
    (MiB per image); then each model's per-image figure against the first model's, and checkpointing's
    against none."""
    low, high = min(batches), max(batches)
    columns = (f'{"variant":16s} {"model":34s} {"checkpointing":>13s} '
               + ' '.join(f'{f"batch {b} MiB":>13s}' for b in batches) + f' {"MiB per image":>14s}')
    print(columns)
    print('-' * len(columns))
    for key, rows in results.items():
        per_image = {}
        for row in rows:
            peaks = row['peaks']
            per_image[row['model'], row['checkpointing']] = (peaks[high] - peaks[low]) / (high - low)
            print(f'{VARIANTS[key].label:16s} {row["model"]:34s} {"yes" if row["checkpointing"] else "no":>13s} '
                  + ' '.join(f'{peaks[b]:13.0f}' for b in batches)
                  + f' {per_image[row["model"], row["checkpointing"]]:14.1f}')
        models = list(dict.fromkeys(row['model'] for row in rows))
        for checkpointing in (False, True):
            for model in models[1:]:
                print(f'{"":16s} per image, {short_name(model)} / {short_name(models[0])}, checkpointing '
                      f'{"yes" if checkpointing else "no"}: '
                      f'{per_image[model, checkpointing] / per_image[models[0], checkpointing]:.2f}x')
        for model in models:
            print(f'{"":16s} per image, {short_name(model)} with / without checkpointing: '
                  f'{per_image[model, True] / per_image[model, False]:.2f}x')


def run_memory(args, variants: list):
    batches = sorted(set(args.memory_batches))
    print(f'device cpu, {args.img_size} px, training step peak memory at batches {" ".join(map(str, batches))}, '
          f'{args.threads} threads')
    # every freed block of 64 KiB or more goes back to the system: the resident set is what is held
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_='65536', MALLOC_TRIM_THRESHOLD_='0')
    results = {}
    for key in variants:
        results[key] = []
        for name in args.models:
            for checkpointing in (False, True):
                peaks = {}
                for batch in batches:
                    command = [sys.executable, os.path.abspath(__file__), '--worker', name, '--variant', key,
                               '--memory', f'--batch-size={batch}', f'--img-size={args.img_size}',
                               f'--threads={args.threads}'] + (['--checkpointing'] if checkpointing else [])
                    result = subprocess.run(command, capture_output=True, text=True, env=env)
                    if result.returncode != 0:
                        sys.exit(f'error: measuring {name} ({VARIANTS[key].label}, batch {batch}) failed:\n'
                                 f'{result.stderr.strip()}')
                    peaks[batch] = json.loads(result.stdout.strip().splitlines()[-1])['step_peak_mib']
                results[key].append({'model': name, 'checkpointing': checkpointing, 'peaks': peaks})
    print_memory_table(results, batches)


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
                        help='batch 1 at --detector-size: the backbones and --methods on them (Swin-T with '
                             'dynamic_img_size=True)')
    parser.add_argument('--detector-size', type=int, nargs=2, default=(800, 1216), metavar=('H', 'W'))
    parser.add_argument('--focal-windows', type=int, nargs=4, default=DETECTION_FOCAL_WINDOWS, metavar='N',
                        help="with --detector: the focal models' focal windows (configs/detection recipes')")
    parser.add_argument('--methods', nargs='+', choices=DETECTOR_METHODS, default=['mask_rcnn'],
                        help='with --detector: the detectors timed on each backbone, inference and training')
    parser.add_argument('--models', nargs='+', default=[BASELINE, CANDIDATE],
                        help=f'timm model names; ratios are against the first ({BASELINE} by default)')
    parser.add_argument('--variants', nargs='+', choices=(*VARIANTS, 'all'),
                        help='eager: float32; compile: float32 under torch.compile; bf16: bf16 autocast; '
                             'compile-bf16: both; all: every one (bf16 on the CPU only where it has bf16 '
                             'instructions). Default: eager on the CPU, bf16 on cuda')
    parser.add_argument('--profile', type=int, default=0, metavar='N',
                        help='after timing, profile N training steps and N inference passes per model '
                             'and print the operators with the most self time')
    parser.add_argument('--memory', action='store_true',
                        help='training peak memory per image only, with and without activation checkpointing')
    parser.add_argument('--memory-batches', type=int, nargs='+', default=(1, 3), metavar='N',
                        help='with --memory: the batch sizes measured; the per-image figure is the slope '
                             'between the smallest and the largest')
    parser.add_argument('--checkpointing', action='store_true', help=argparse.SUPPRESS)
    parser.add_argument('--cuda-attention', nargs='+', choices=('sdpa', 'fused', 'auto'),
                        help='with --device cuda: measure the focal models once per CUDA attention setting '
                             '(models.window_attention.set_cuda_attention); default: its default')
    parser.add_argument('--worker', help=argparse.SUPPRESS)
    parser.add_argument('--attention', help=argparse.SUPPRESS)
    parser.add_argument('--variant', default='eager', choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.detector and (args.variants or args.profile):
        parser.error('--detector measures plain inference; it takes no --variants or --profile')
    if args.memory and (args.detector or args.profile or args.device != 'cpu' or len(set(args.memory_batches)) < 2):
        parser.error('--memory measures the CPU at two or more --memory-batches; it takes no --detector, --profile '
                     'or --device cuda')
    if args.cuda_attention and args.device != 'cuda':
        parser.error('--cuda-attention chooses the CUDA attention; it needs --device cuda')
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

    if args.memory:
        run_memory(args, variants)
        return
    if args.detector:  # both backbones in this process, in alternating rounds: no peak memory to keep apart
        print_detector_rows(measure_detectors(args), args, VARIANTS[variants[0]].label)
        return
    results = {}
    for key in variants:
        results[key] = []
        for name in args.models:
            for attention in attention_settings(name, args):
                command = [sys.executable, os.path.abspath(__file__), '--worker', name, '--variant', key] + [
                    f'--{option.replace("_", "-")}={value}' for option, value in vars(args).items()
                    if option not in ('worker', 'models', 'variants', 'variant', 'detector', 'detector_size',
                                      'focal_windows', 'methods', 'cuda_attention', 'attention', 'memory',
                                      'memory_batches', 'checkpointing')]
                if attention:
                    command += ['--attention', attention]
                result = subprocess.run(command, capture_output=True, text=True)
                if result.returncode != 0:
                    sys.exit(f'error: measuring {name} ({VARIANTS[key].label}) failed:\n{result.stderr.strip()}')
                results[key].append(json.loads(result.stdout.strip().splitlines()[-1]))

    print(f'device {args.device}, batch {args.batch_size}, {args.img_size} px, '
          f'best of {args.repeats}x{args.steps} steps')
    print_table(results)
    for key, rows in results.items():
        for row in rows:
            for mode, table in row['profiles'].items():
                print(f'\n{row["model"]}, {VARIANTS[key].label}, {mode}: {args.profile} steps\n{table}')


def print_detector_rows(rows: list, args, precision: str):
    height, width = args.detector_size
    labels = [DETECTOR_METHODS[method][0] for method in args.methods]
    print(f'device {args.device} ({precision}), batch 1, {height}x{width} px, backbone inference, '
          f'{", ".join(labels)} inference and training, focal windows {" ".join(map(str, args.focal_windows))}, '
          f'{args.threads} threads, best of {args.repeats} alternating rounds of {args.steps} steps')
    header = f'{"model":34s} {"params(M)":>9s} {"forward ms":>11s} {"img/s":>8s} {"table build ms":>15s}'
    print(header)
    print('-' * len(header))
    for row in rows:
        build = f'{row["table_build_ms"]:15.1f}' if 'table_build_ms' in row else f'{"-":>15s}'
        print(f'{row["model"]:34s} {row["params_m"]:9.2f} {row["forward_ms"]:11.1f} {row["infer_img_s"]:8.2f} {build}')
    header = (f'{"detector":19s} {"model":34s} {"params(M)":>9s} {"detect ms":>10s} {"train step ms":>14s} '
              f'{"train img/s":>12s}')
    print(header)
    print('-' * len(header))
    for method, label in zip(args.methods, labels):
        for row in rows:
            measured = row['methods'][method]
            print(f'{label:19s} {row["model"]:34s} {measured["params_m"]:9.2f} {measured["detect_ms"]:10.1f} '
                  f'{measured["train_step_ms"]:14.1f} {measured["train_img_s"]:12.3f}')
    for row in rows[1:]:
        ratios = [f'inference {row["infer_img_s"] / rows[0]["infer_img_s"]:.2f}x']
        for method, label in zip(args.methods, labels):
            mine, base = row['methods'][method], rows[0]['methods'][method]
            ratios.append(f'{label} inference {mine["detect_img_s"] / base["detect_img_s"]:.2f}x')
            ratios.append(f'{label} training {mine["train_img_s"] / base["train_img_s"]:.2f}x')
        print(f'{row["model"]} / {rows[0]["model"]}: {", ".join(ratios)}')
        spreads = []
        for key, label in [('inference', 'inference')] + [
                (f'{method} {mode}', f'{label} {mode}') for method, label in zip(args.methods, labels)
                for mode in ('inference', 'training')]:
            per_round = sorted(base / mine for base, mine in zip(rows[0]['rounds'][key], row['rounds'][key]))
            spreads.append(f'{label} {per_round[0]:.2f}/{statistics.median(per_round):.2f}/{per_round[-1]:.2f}x')
        print(f'  round by round (lowest/median/highest): {", ".join(spreads)}')


if __name__ == '__main__':
    main()
