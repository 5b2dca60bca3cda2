# --------------------------------------------------------
# Focal Transformer: image decoding and data errors
# Licensed under The MIT License [see LICENSE for details]
# --------------------------------------------------------
"""Decoding images into RGB, with errors that name the file."""
import io
import os

from PIL import Image


class DataError(Exception):
    """Missing, empty or unreadable data; the message is one line naming the file or folder.
    ``path`` is the one image that cannot be read, when the error is about one.

    A DataLoader worker's exception reaches the main process re-created with the worker's whole
    traceback as its message; only the last line, the original message, is kept.
    """

    def __init__(self, message, path=None):
        last_line = str(message).strip().splitlines()[-1] if str(message).strip() else ''
        super().__init__(last_line.split('DataError: ', 1)[-1])
        self.path = path


def dataset_folder(path, what):
    """`path` (DATA.DATA_PATH), checked to be an existing folder; `what` says which folder is
    expected, for the error when none is given."""
    if not path:
        raise DataError(f"DATA.DATA_PATH is not set: pass --data-path ({what})")
    if not os.path.isdir(path):
        raise DataError(f"data folder not found: {path}")
    return path


def decode_rgb(source, name):
    """The RGB image in ``source`` (a path or the bytes of an image file); ``name`` is the file
    named in the error when it cannot be decoded."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return image.convert('RGB')
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {name}: {err}", path=name) from None


def load_rgb(path):
    """ImageFolder loader: the RGB image at ``path``."""
    return decode_rgb(path, path)
