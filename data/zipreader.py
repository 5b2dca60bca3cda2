# --------------------------------------------------------
# Focal Transformer: reading members of zip files
# Licensed under The MIT License [see LICENSE for details]
# --------------------------------------------------------
"""Reads files inside zip archives, keeping each archive open between reads."""
import os
import zipfile

from .image_io import DataError


class ZipReader:
    """One open handle per (process, archive): DataLoader workers are forked, and a handle
    shared with the parent would share its file position."""

    _handles = {}

    @classmethod
    def archive(cls, zip_path):
        key = (os.getpid(), zip_path)
        if key not in cls._handles:
            try:
                cls._handles[key] = zipfile.ZipFile(zip_path, 'r')
            except (OSError, zipfile.BadZipFile) as err:
                raise DataError(f"cannot open zip file {zip_path}: {err}") from None
        return cls._handles[key]

    @classmethod
    def read(cls, zip_path, member):
        """The bytes of ``member`` in the archive ``zip_path``."""
        try:
            return cls.archive(zip_path).read(member)
        except KeyError:
            raise DataError(f"{zip_path} has no file {member}") from None
        except (OSError, zipfile.BadZipFile) as err:
            raise DataError(f"cannot read {member} from {zip_path}: {err}",
                            path=f'{zip_path}@/{member}') from None
