"""Frame-count rules of the causal video VAE and of CogVideoX training.

The CogVideoX VAE keeps the first frame on its own and compresses every following group of
`temporal_ratio` frames into one latent frame, so only 1 + k * ratio frames map onto whole
latent frames; anything else is silently cropped or padded inside diffusers. Checking here
turns that into an error that says which counts would work.
"""

from __future__ import annotations


def _nearest(n: int, step: int) -> str:
    below = max(1, (n - 1) // step * step + 1)
    above = below + step if below < n else below
    return str(below) if below == above else f"{below} or {above}"


def check_vae_frames(n: int, temporal_ratio: int = 4) -> int:
    """`n` if the VAE encodes it into whole latent frames (k * ratio + 1), else ValueError."""
    if n < 1 or (n - 1) % temporal_ratio:
        raise ValueError(
            f"the CogVideoX VAE needs {temporal_ratio}k+1 frames (1, {1 + temporal_ratio}, "
            f"{1 + 2 * temporal_ratio}, ...); got {n}, nearest valid: {_nearest(n, temporal_ratio)}"
        )
    return n


def check_cogvideox_train_frames(n: int) -> int:
    """`n` if CogVideoX can be trained on it (8N+1 frames, e.g. 49), else ValueError.

    The model was trained on 49 frames (13 latent frames); its positional embeddings and the
    diffusers training scripts assume an odd number of latent frames, hence 8N+1.
    """
    if n < 9 or (n - 1) % 8:
        raise ValueError(
            f"CogVideoX training needs 8N+1 frames (9, 17, ..., 49); got {n}, "
            f"nearest valid: {_nearest(max(n, 9), 8)}"
        )
    return n


def latent_frames(n: int, temporal_ratio: int) -> int:
    """Latent frames the causal VAE produces for `n` video frames."""
    return (n - 1) // temporal_ratio + 1
