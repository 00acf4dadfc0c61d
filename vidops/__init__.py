"""vidops: an MLOps platform for text-to-video diffusion models."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("vidops")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
