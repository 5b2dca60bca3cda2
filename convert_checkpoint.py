# --------------------------------------------------------
# Focal Transformer: checkpoint conversion
# Licensed under The MIT License [see LICENSE for details]
# --------------------------------------------------------
"""Convert a checkpoint into a safetensors file of its model weights, in the released layout.

    python3 convert_checkpoint.py focal_tiny_patch4_window7_224.pdparams focal_tiny_patch4_window7_224.safetensors

SOURCE is anything the loaders read (a PaddleViT .pdparams, a released or training .pth, a
safetensors file), a path or an http(s):// / file:// URL. The result holds no pickle, and every
loader (--resume, --pretrained, timm's pretrained file, the backbone loaders) reads it. It is
written atomically and only once the source has been read completely. Exit status 0, or 2 with
one `error: ...` line.
"""
import argparse
import sys

from models.checkpoint import CheckpointError, write_safetensors

SUFFIX = '.safetensors'


def cli(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('source', help='checkpoint to convert: path or http(s):// / file:// URL')
    parser.add_argument('destination', help=f'the file to write, ending in {SUFFIX}')
    args = parser.parse_args(argv)
    if not args.destination.endswith(SUFFIX):
        parser.error(f"destination {args.destination} must end in {SUFFIX}")
    try:
        count = write_safetensors(args.source, args.destination)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: cannot write {args.destination}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(f"{args.destination}: {count} tensors from {args.source}")
    return 0


if __name__ == '__main__':
    sys.exit(cli())
