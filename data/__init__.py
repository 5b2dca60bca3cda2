"""Data loading: ``build_loader(config)`` and the error type for bad data."""
from .build import build_loader, build_transform
from .image_io import DataError

__all__ = ['build_loader', 'build_transform', 'DataError']
