"""Container images the components run in, from the default configuration (images.*)."""

from vidops.config import load_config

_images = load_config().images
CPU_IMAGE: str = _images.cpu
GPU_IMAGE: str = _images.gpu
