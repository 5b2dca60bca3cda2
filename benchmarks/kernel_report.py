"""The fused attention's Triton kernels compiled for a CUDA target on this machine, no GPU needed: shared
memory, registers and spills of each kernel, for every attention shape the configs produce.

Every configs/**.yaml (the six released layouts, the 384 fine-tuning configs, the detection and
segmentation recipes, the demos) gives its blocks' attention shapes (window, queries, key slots, head
dim; key slots depend only on the block, not on the map size, so odd and padded maps add none); each
maps to the kernels' tile sizes (`models.triton_attention.launch_config`). Every distinct tile
configuration is compiled by Triton for the target (`--capability 90`: sm_90a, H100 and H200) in each
dtype, with a mask (the interface that passes bias and mask apart), and the ptxas that Triton ships
reports registers and spills (`ptxas -v` on the PTX, with Triton's own options); shared memory is
Triton's (dynamic, so ptxas does not see it).

    python3 benchmarks/kernel_report.py                       # sm_90, bf16 fp16 fp32
    python3 benchmarks/kernel_report.py --dtypes bfloat16 --json
"""
import argparse
import glob
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict

import torch
import triton

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

DTYPES = {'bfloat16': torch.bfloat16, 'float16': torch.float16, 'float32': torch.float32}


def attention_shapes(config_path: str) -> set:
    """{(window, queries, key slots, head dim)} of the config's blocks, read from a narrow copy of its model
    (embed dim and heads divided by their common factor, at most two blocks a stage: the same blocks)."""
    from config import get_config
    from models.build import focal_arguments
    from models.focal_transformer import FocalAttention, FocalTransformer

    arguments = focal_arguments(get_config(argparse.Namespace(cfg=config_path, opts=[])))
    factor = math.gcd(arguments['embed_dim'], *arguments['num_heads'])
    arguments.update(embed_dim=arguments['embed_dim'] // factor,
                     num_heads=[heads // factor for heads in arguments['num_heads']],
                     depths=[min(depth, 2) for depth in arguments['depths']])
    torch.manual_seed(0)
    shapes = set()
    for module in FocalTransformer(**arguments).modules():
        if isinstance(module, FocalAttention):
            neighbours = 0 if module.neighbour_positions is None else module.neighbour_positions.shape[0]
            keys = module.window_size ** 2 + neighbours + sum(module.pooled_key_counts)
            shapes.add((module.window_size, module.window_size ** 2, keys, module.dim // module.num_heads))
    return shapes


MASKS = ('row', 'per-query', 'none')


def compile_kernels(dtype: torch.dtype, queries: int, num_keys: int, head_dim: int, capability: int,
                    mask: str = 'row') -> dict:
    """Both kernels compiled for one case and a CUDA target, with both gradients, as a launch would compile
    them: {name: Triton's compiled kernel}. `mask`: one row per window (unshifted blocks), one per query
    (shifted blocks) or none (the bias and mask added before the call). The arguments are small CPU
    tensors of the case's dtype and row layout (one head); each is specialised as Triton's launcher does
    (ints equal to 1 become constants, ints and pointers divisible by 16 say so), which decides the
    vector widths."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend
    from triton.compiler import ASTSource
    import models.triton_attention as fused

    qkv = torch.zeros(1, queries, 3 * head_dim, dtype=dtype)
    query_index, key_index = torch.arange(queries), torch.zeros(1, num_keys, dtype=torch.long)
    bias = torch.zeros(1, queries, num_keys, dtype=dtype)
    mask = None if mask == 'none' else torch.zeros(1, queries if mask == 'per-query' else 1, num_keys)
    out, lse = qkv.new_zeros(1, queries, head_dim), torch.zeros(1, 1, queries)
    launches = {
        '_forward_kernel': (fused._forward_kernel,
                            fused._forward_launch(qkv, query_index, key_index, bias, mask, 1., out, lse)),
        '_backward_kernel': (fused._backward_kernel, fused._backward_launch(
            out, qkv, query_index, key_index, bias, mask, out, lse, 1., torch.zeros(qkv.shape),
            torch.zeros(bias.shape), True, True)),
    }
    compiled = {}
    for name, (kernel, (_, args, constants)) in launches.items():
        constants = dict(constants)
        options = {key: constants.pop(key) for key in ('num_warps', 'num_stages')}
        signature, attrs = {}, {}
        for index, (param, value) in enumerate(zip(kernel.params, args)):
            kind, key = native_specialize_impl(CUDABackend, value, param.is_const, True, True)
            signature[param.name] = kind
            if kind == 'constexpr':
                constants[param.name] = key
            elif isinstance(key, str):
                attrs[(index,)] = CUDABackend.parse_attr(key)
        signature.update({name: 'constexpr' for name in constants if name not in signature})
        source = ASTSource(kernel, signature, constexprs=constants, attrs=attrs)
        compiled[name] = triton.compile(source, target=GPUTarget('cuda', capability, 32), options=options)
    return compiled


def ptxas_resources(ptx: str, capability: int) -> dict:
    """Registers, spill stores/loads and stack frame bytes that ptxas -v reports for the PTX."""
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as folder:
        source = os.path.join(folder, 'kernel.ptx')
        with open(source, 'w') as f:
            f.write(ptx)
        result = subprocess.run([get_ptxas(capability).path, '-v', '--regAllocOptLevel=2',
                                 f'--gpu-name={sm_arch_from_capability(capability)}', source,
                                 '-o', os.path.join(folder, 'kernel.cubin')],
                                capture_output=True, text=True, check=True)
    log = result.stdout + result.stderr
    frame = re.search(r'(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads', log)
    return {'registers': int(re.search(r'Used (\d+) registers', log).group(1)), 'stack': int(frame.group(1)),
            'spill_stores': int(frame.group(2)), 'spill_loads': int(frame.group(3))}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--capability', type=int, default=90, help='CUDA compute capability (90: H100, H200)')
    parser.add_argument('--dtypes', nargs='+', choices=DTYPES, default=list(DTYPES))
    parser.add_argument('--configs', nargs='+', help='config files (default: every configs/**.yaml)')
    parser.add_argument('--json', action='store_true', help='also print the report as one JSON line at the end')
    args = parser.parse_args()
    torch.set_num_threads(1)

    from models.triton_attention import TRITON_AVAILABLE
    if not TRITON_AVAILABLE:
        sys.exit('error: Triton is not installed; nothing to compile')
    from models.triton_attention import launch_config

    configs = args.configs or sorted(glob.glob(os.path.join(REPO, 'configs', '**', '*.yaml'), recursive=True))
    users = defaultdict(set)  # (dtype, launch configuration) -> the shapes that take it
    layouts = []
    for path in configs:
        shapes = sorted(attention_shapes(path))
        layouts.append({'config': os.path.relpath(path, REPO), 'shapes': shapes})
        for dtype_name in args.dtypes:
            for window, queries, keys, head_dim in shapes:
                users[dtype_name, launch_config(queries, head_dim, DTYPES[dtype_name])].add(
                    (window, queries, keys, head_dim))

    print(f'attention shapes of {len(configs)} configs (window, queries, key slots, head dim):')
    for layout in layouts:
        print(f'  {layout["config"]}: ' + ', '.join(f'{w}/{q}/{k}/{d}' for w, q, k, d in layout['shapes']))
    print(f'\nkernels compiled for sm_{args.capability} (Triton, with a mask); ptxas -v registers and spills')
    header = (f'{"kernel":17s} {"dtype":9s} {"BLOCK_M":>7s} {"BLOCK_N":>7s} {"BLOCK_D":>7s} {"warps":>5s} '
              f'{"stages":>6s} {"shared B":>9s} {"registers":>9s} {"spill st/ld B":>13s} {"stack B":>7s}  shapes')
    print(header)
    print('-' * len(header))
    rows = []
    for (dtype_name, config), shapes in sorted(users.items()):
        window, queries, keys, head_dim = max(shapes)
        compiled = compile_kernels(DTYPES[dtype_name], queries, keys, head_dim, args.capability)
        for name, kernel in compiled.items():
            warps, stages = ((config.forward_warps, config.forward_stages) if name == '_forward_kernel'
                             else (config.backward_warps, config.backward_stages))
            row = dict(kernel=name, dtype=dtype_name, block_m=config.block_m, block_n=config.block_n,
                       block_d=config.block_d, warps=warps, stages=stages, shared=kernel.metadata.shared,
                       **ptxas_resources(kernel.asm['ptx'], args.capability), shapes=sorted(shapes))
            rows.append(row)
            print(f'{name:17s} {dtype_name:9s} {config.block_m:7d} {config.block_n:7d} {config.block_d:7d} '
                  f'{warps:5d} {stages:6d} {row["shared"]:9d} {row["registers"]:9d} '
                  f'{row["spill_stores"]:>6d}/{row["spill_loads"]:<6d} {row["stack"]:7d}  '
                  + ' '.join(f'{q}x{k}x{d}' for _, q, k, d in sorted(shapes)), flush=True)
    if args.json:
        print(json.dumps({'capability': args.capability, 'layouts': layouts, 'kernels': rows}))


if __name__ == '__main__':
    main()
