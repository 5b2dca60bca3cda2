# --------------------------------------------------------
# Focal Transformer: image decoding and data errors
# Licensed under The MIT License [see LICENSE for details]
# --------------------------------------------------------
"""Decoding images into RGB, with errors that name the file, and finding the images of folders."""
import io
import os

import numpy as np
from PIL import Image, ImageOps

# What find_images takes from a folder: the extensions torchvision's ImageFolder reads, and TIFF's long form.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')


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


def decode_rgb(source, name, as_displayed=False):
    """The RGB image in ``source`` (a path or the bytes of an image file); ``name`` is the file
    named in the error when it cannot be decoded. ``as_displayed``: first as a viewer shows it (read_photo)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return (_as_displayed(image) if as_displayed else image).convert('RGB')
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image {name}: {err}", path=name) from None


def load_rgb(path):
    """ImageFolder loader: the RGB image at ``path``."""
    return decode_rgb(path, path)


def read_photo(path):
    """The RGB image at ``path`` as a camera or an editor left it: turned upright by its EXIF orientation,
    16-bit and floating-point grey levels scaled to 8 bits by their type's range (a plain convert would
    clip them to white), palette, grey, CMYK and alpha images converted (alpha dropped, as training's
    load_rgb does). A DataError naming the file when it cannot be decoded."""
    return decode_rgb(path, path, as_displayed=True)


def _as_displayed(image):
    """`image` as a viewer shows it: EXIF orientation applied, 16-bit and float grey scaled to 8 bits."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith('I') or image.mode == 'F':
        levels = np.asarray(image, dtype=np.float64)
        top = 1. if image.mode == 'F' else 65535. if levels.max() > 255 else 255.
        image = Image.fromarray((levels / top * 255).clip(0, 255).round().astype(np.uint8))
    return image


def find_images(paths):
    """The image files named in ``paths``: files as given, folders searched recursively for IMAGE_EXTENSIONS
    (sorted, each file once). A DataError naming the path that does not exist or the folder without images."""
    found = []
    for path in paths:
        if os.path.isfile(path):
            found.append(path)
        elif os.path.isdir(path):
            in_folder = sorted(os.path.join(folder, name) for folder, _, names in os.walk(path)
                               for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
            if not in_folder:
                raise DataError(f"no images in {path}: expected files ending in {', '.join(IMAGE_EXTENSIONS)}")
            found += in_folder
        else:
            raise DataError(f"no such file or folder: {path}")
    return list(dict.fromkeys(found))
