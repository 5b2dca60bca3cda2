"""A/B of two versions of Focal-T (or one against Swin-T) in one process: alternating rounds.

On a shared or noisy machine two runs of `throughput.py` can differ by more than the change being
measured. This builds both models in one process (the second with the first's weights, so that
both compute the same function), warms them up, then times them in alternation, A before B in
even rounds and B before A in odd ones, and prints the median and best round of each and their
ratio (above 1: B is faster), and the middle half of the round-by-round ratios, whose width is the
run's noise.

    python3 benchmarks/ab.py ../before .                    # two checkouts' Focal-T, inference
    python3 benchmarks/ab.py ../before . --mode train       # training step (forward, backward, AdamW)
    python3 benchmarks/ab.py swin .                         # timm's Swin-T against this checkout
    python3 benchmarks/ab.py swin . --bf16                  # both under bf16 autocast
    python3 benchmarks/ab.py ../before . --mode train --batch-size 1 --detector-size 800 1216

`--detector-size H W` measures detection backbones instead: the four stage maps of an H x W image,
Focal-T with the detection recipes' focal windows (15, 13, 9, 7), both models with the recipes' drop
path (0.2), a training step's loss the sum of the maps' means.

A checkout is a directory holding this repository's `models/` package; its Focal-T is imported
under its own module name, so the two versions do not clash.
"""
import argparse
import importlib
import importlib.util
import os
import statistics
import sys

import timm
import torch

from throughput import DETECTION_DROP_PATH, DETECTION_FOCAL_WINDOWS, alternating_rounds

MODEL = 'focal_tiny_patch4_window7_224'


def focal_from(checkout: str, alias: str, **model_kwargs) -> torch.nn.Module:
    package = os.path.join(os.path.abspath(checkout), 'models')
    spec = importlib.util.spec_from_file_location(alias, os.path.join(package, '__init__.py'),
                                                  submodule_search_locations=[package])
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module
    spec.loader.exec_module(module)
    return getattr(importlib.import_module(f'{alias}.focal_transformer'), MODEL)(**model_kwargs)


def build(side: str, alias: str, img_size: int, detector: bool) -> torch.nn.Module:
    if side == 'swin':
        if detector:
            return timm.create_model('swin_tiny_patch4_window7_224', features_only=True, dynamic_img_size=True,
                                     drop_path_rate=DETECTION_DROP_PATH)
        return timm.create_model('swin_tiny_patch4_window7_224', img_size=img_size)
    if detector:
        return focal_from(side, alias, focal_windows=DETECTION_FOCAL_WINDOWS, drop_path_rate=DETECTION_DROP_PATH)
    return focal_from(side, alias, img_size=img_size)


def stage_maps(model: torch.nn.Module, images: torch.Tensor) -> list:
    """A detection backbone's four stage maps: timm's features_only Swin-T, or Focal-T's intermediates."""
    if hasattr(model, 'forward_intermediates'):
        return model.forward_intermediates(images, intermediates_only=True, output_fmt='NHWC')
    return model(images)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('a', help="a checkout, or 'swin'")
    parser.add_argument('b', help='a checkout')
    parser.add_argument('--mode', choices=('infer', 'train'), default='infer')
    parser.add_argument('--rounds', type=int, default=10, help='timed rounds per model')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--threads', type=int, default=os.cpu_count())
    parser.add_argument('--bf16', action='store_true', help='both models under bf16 autocast')
    parser.add_argument('--detector-size', type=int, nargs=2, metavar=('H', 'W'),
                        help='detection backbones on an H x W image instead of classifiers (see above)')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    detector = args.detector_size is not None
    models = [build(args.a, 'models_a', args.img_size, detector), build(args.b, 'models_b', args.img_size, detector)]
    if args.a != 'swin':
        models[1].load_state_dict(models[0].state_dict())
    size = tuple(args.detector_size) if detector else (args.img_size, args.img_size)
    images = torch.randn(args.batch_size, 3, *size)
    optimizers = [torch.optim.AdamW(m.parameters()) for m in models]

    def precision():
        return torch.autocast('cpu', torch.bfloat16, enabled=args.bf16)

    def step(i: int):
        with precision():
            run(i)

    def run(i: int):
        model = models[i]
        if args.mode == 'infer':
            model.eval()
            with torch.inference_mode():
                stage_maps(model, images) if detector else model(images)
        else:
            model.train()
            optimizers[i].zero_grad(set_to_none=True)
            if detector:
                loss = sum(stage_map.float().mean() for stage_map in stage_maps(model, images))
            else:
                loss = model(images).logsumexp(-1).sum()
            loss.backward()
            optimizers[i].step()

    if args.a != 'swin':
        with torch.inference_mode():
            with precision():
                logits = [stage_maps(model.eval(), images[:1])[-1] if detector else model.eval()(images[:2])
                          for model in models]
            difference = (logits[0].float() - logits[1].float()).abs().max()
        print(f'largest {"last stage map" if detector else "logit"} difference between A and B '
              f'({logits[0].dtype}): {difference:.2e}')
    for i in (0, 1, 0, 1):
        step(i)
    times = alternating_rounds([lambda: step(0), lambda: step(1)], 1, args.rounds, torch.device('cpu'))
    for name, t in zip(('A ' + args.a, 'B ' + args.b), times):
        print(f'{name:40s} median {statistics.median(t) * 1e3:8.1f} ms   best {min(t) * 1e3:8.1f} ms')
    setting = args.mode + (', bf16 autocast' if args.bf16 else '')
    print(f'B speed-up over A ({setting}, batch {args.batch_size}, {"x".join(map(str, size)) if detector else size[0]} '
          f'px, {args.threads} threads): '
          f'median {statistics.median(times[0]) / statistics.median(times[1]):.3f}x, '
          f'best {min(times[0]) / min(times[1]):.3f}x')
    if args.rounds >= 2:
        # rounds are paired (A and B back to back), so their ratios show how much of the above is noise
        low, _, high = statistics.quantiles([a / b for a, b in zip(*times)], n=4)
        print(f'round by round, B speed-up over A: middle half {low:.3f}x-{high:.3f}x '
              '(A and B alike if it spans 1.000x)')


if __name__ == '__main__':
    main()
