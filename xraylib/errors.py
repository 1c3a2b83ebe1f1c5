"""The exceptions xraylib raises for problems a user can fix.

Every message names the object at fault (a file, an S3 key, a model file) and says what to
do. The command line prints `str(error)` as one line and exits non-zero; anything that is not
an `XrayError` is a bug in xraylib and keeps its traceback.
"""

from __future__ import annotations


class XrayError(Exception):
    """Base class: a problem with the user's data, locations, credentials or arguments."""


class LocationError(XrayError):
    """A location cannot be read or written: missing bucket, no credentials, empty prefix..."""


class DatasetError(XrayError):
    """The data does not have the expected layout: wrong number of classes, no images..."""


class ImageDecodeError(XrayError):
    """An image cannot be decoded: corrupt, truncated, too large, or not an image at all."""


class ModelFileError(XrayError):
    """A file is not a usable xraylib model: wrong format, unsafe contents, missing fields."""


class ConfigError(XrayError):
    """A parameter is out of range or inconsistent with another one."""


class TrainingJobError(XrayError):
    """A SageMaker training job cannot be started (no region, no role, no matching container), or it failed."""
