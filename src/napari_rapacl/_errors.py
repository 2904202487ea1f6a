"""Exceptions raised for bad input.

Every message names the file (or value) and says what is wrong with it, so that a user who sees
only the message knows what to fix. All of them are ``ValueError`` subclasses (bar the
standard ``FileNotFoundError``, which is raised as is for missing files).
"""

from __future__ import annotations


class RapaclInputError(ValueError):
    """Base class: the input (a file, an array, a parameter) cannot be used as given."""


class UnsupportedFormatError(RapaclInputError):
    """The file's extension or layout is not one we can read."""


class CorruptFileError(RapaclInputError):
    """The file exists and has a known extension, but cannot be decoded (truncated, damaged)."""


class MissingPixelSizeError(RapaclInputError):
    """An operation needs microns per pixel and the slide has none."""


class SpotsOutsideImageError(RapaclInputError):
    """Spot centres fall outside the image they are meant to annotate."""


class DuplicateBarcodeError(RapaclInputError):
    """Two spots share one barcode."""


class NoOverlapError(RapaclInputError):
    """Counts and spot positions share no barcode."""


class InvalidCountsError(RapaclInputError):
    """Counts contain NaN, infinite or negative values."""


class DownloadError(RapaclInputError):
    """A dataset file could not be downloaded, or its checksum does not match."""


__all__ = [
    "CorruptFileError",
    "DownloadError",
    "DuplicateBarcodeError",
    "InvalidCountsError",
    "MissingPixelSizeError",
    "NoOverlapError",
    "RapaclInputError",
    "SpotsOutsideImageError",
    "UnsupportedFormatError",
]
