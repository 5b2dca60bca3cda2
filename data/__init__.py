"""Data loading: ``build_loader(config)``, the error type for bad data, and the count of
unreadable training images."""
from .bad_samples import UnreadableImages
from .build import build_loader, build_transform
from .image_io import DataError, dataset_folder

__all__ = ['build_loader', 'build_transform', 'DataError', 'UnreadableImages', 'dataset_folder']
