"""Frame-count rules of the causal video VAE and of CogVideoX training.

The CogVideoX VAE keeps the first frame on its own and compresses every following group of
`temporal_ratio` frames into one latent frame, so only 1 + k * ratio frames map onto whole
latent frames. Its diffusers decoder also treats the first latent frame apart only when the
number of latent frames is odd (it decodes two at a time, the first chunk taking the odd one
out): 5 frames encode to 2 latent frames that decode to 8 frames. A round trip therefore needs
an odd latent count, i.e. 1 + 2k * ratio frames (9, 17, 49). Anything else would be silently
cropped, padded or stretched inside diffusers; these checks say which counts work instead.
"""

from __future__ import annotations


def _nearest(n: int, step: int) -> str:
    below = max(1, (n - 1) // step * step + 1)
    above = below + step if below < n else below
    return str(below) if below == above else f"{below} or {above}"


def check_vae_frames(n: int, temporal_ratio: int = 4, *, decode: bool = True) -> int:
    """`n` if the VAE encodes it into whole latent frames (k * ratio + 1) and, with `decode`,
    decodes them back to `n` frames (an odd number of latent frames); else ValueError."""
    if n < 1 or (n - 1) % temporal_ratio:
        raise ValueError(
            f"the CogVideoX VAE needs {temporal_ratio}k+1 frames (1, {1 + temporal_ratio}, "
            f"{1 + 2 * temporal_ratio}, ...); got {n}, nearest valid: {_nearest(n, temporal_ratio)}"
        )
    latents = latent_frames(n, temporal_ratio)
    if decode and latents % 2 == 0:
        raise ValueError(
            f"{n} frames encode to {latents} latent frames, which the CogVideoX decoder turns "
            f"into {latents * temporal_ratio} frames, not {n}: it needs an odd number of latent "
            f"frames, i.e. {2 * temporal_ratio}k+1 frames; nearest valid: "
            f"{_nearest(n, 2 * temporal_ratio)}"
        )
    return n


def check_cogvideox_train_frames(n: int) -> int:
    """`n` if CogVideoX can be trained on it (8N+1 frames, e.g. 49), else ValueError.

    CogVideoX was trained on 49 frames (13 latent frames) and its VAE decodes only odd latent
    counts, hence 8N+1.
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
