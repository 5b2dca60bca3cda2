"""How long a full-size .pdparams takes to read and to convert to safetensors.

    python3 benchmarks/checkpoint_read.py --model focal_base_patch4_window7_224

Writes a .pdparams as paddle.save writes PaddleViT's releases (a protocol-4 pickle of numpy
arrays, Linear weights as (in, out), with paddle's name table) holding random values of the
released model's names, shapes and dtypes (tests/reference/checkpoint_layouts.json), then times
`models.checkpoint.read_checkpoint` and `write_safetensors` on it (best of --rounds) and the
safetensors file's own read, for comparison.
"""
import argparse
import json
import os
import pickle
import sys
import tempfile
import timeit

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from models.checkpoint import read_checkpoint, write_safetensors  # noqa: E402

LAYOUTS = os.path.join(REPO, 'tests', 'reference', 'checkpoint_layouts.json')


def paddle_state_dict(layout, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for key, entry in layout['state_dict'].items():
        shape = entry['shape']
        if key.endswith('.weight') and len(shape) == 2:
            shape = shape[::-1]  # paddle's Linear weight is (in, out)
        dtype = np.dtype(entry['dtype'])
        arrays[key] = (rng.standard_normal(shape, dtype=np.float32).astype(dtype) if dtype.kind == 'f'
                       else rng.integers(0, 49, shape, dtype=dtype))
    arrays['StructuredToParameterName@@'] = {key: f'param_{index}' for index, key in enumerate(arrays)}
    return arrays


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='focal_base_patch4_window7_224')
    parser.add_argument('--rounds', type=int, default=3)
    args = parser.parse_args(argv)
    with open(LAYOUTS) as f:
        layout = json.load(f)[args.model]
    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, f'{args.model}.pdparams')
        destination = os.path.join(folder, f'{args.model}.safetensors')
        with open(source, 'wb') as f:
            pickle.dump(paddle_state_dict(layout), f, protocol=4)
        size_mb = os.path.getsize(source) / 2 ** 20
        read = min(timeit.repeat(lambda: read_checkpoint(source), number=1, repeat=args.rounds))
        convert = min(timeit.repeat(lambda: write_safetensors(source, destination), number=1, repeat=args.rounds))
        read_converted = min(timeit.repeat(lambda: read_checkpoint(destination), number=1, repeat=args.rounds))
    print(f"{args.model}: {len(layout['state_dict'])} tensors, {size_mb:.0f} MiB .pdparams; "
          f"read {read:.2f} s, convert to safetensors {convert:.2f} s, read the safetensors "
          f"{read_converted:.2f} s (best of {args.rounds})")


if __name__ == '__main__':
    main()
