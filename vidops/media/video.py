"""Writing and reading whole videos with real codecs (PyAV, i.e. FFmpeg's libraries)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

# Codec per container for what vidops writes itself. H.264 in MP4/MOV/MKV is what every
# decoder reads; WebM only admits VP8/VP9/AV1.
_CODEC_BY_SUFFIX = {".mp4": "libx264", ".mov": "libx264", ".mkv": "libx264", ".webm": "libvpx-vp9",
                    ".avi": "mpeg4"}


def x264_options(crf: int, preset: str) -> dict[str, str]:
    """x264 settings under which the same frames always encode to the same bytes, so that a
    re-run versions the same data (same DVC md5). One thread; and no macroblock-tree rate
    control: with it (presets `superfast` and slower) identical input gave different bytes
    from one process to the next (x264 in PyAV 18's wheels), which broke the cache of the
    encode stage and the reproducibility of the sample corpora."""
    return {"crf": str(crf), "preset": preset, "threads": "1", "x264-params": "mbtree=0"}


def write_video(
    path: Path,
    frames: Iterable[np.ndarray],
    fps: float,
    *,
    crf: int = 18,
    codec: str | None = None,
) -> None:
    """Encode RGB uint8 frames (H, W, 3) to `path`; the container follows the suffix.

    Output is bit-exact for identical frames and settings (no timestamps or encoder
    randomness in the bytes), so sample corpora and normalised clips are reproducible.
    """
    path = Path(path)
    codec = codec or _CODEC_BY_SUFFIX.get(path.suffix.lower(), "libx264")
    rate = Fraction(fps).limit_denominator(1001)
    with av.open(str(path), mode="w", options={"fflags": "+bitexact"}) as container:
        stream = None
        for frame in frames:
            if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                raise ValueError(
                    f"frames must be uint8 RGB (H, W, 3), got {frame.dtype} {frame.shape}")
            if stream is None:
                stream = container.add_stream(codec, rate=rate)
                stream.width, stream.height = frame.shape[1], frame.shape[0]
                stream.pix_fmt = "yuv420p"
                # One encoder thread: multi-threaded encoders may emit different bytes.
                options = {}
                if codec == "libx264":
                    options = x264_options(crf, "medium")
                elif codec.startswith("libvpx"):
                    options = {"crf": str(crf), "b": "0", "deadline": "good", "threads": "1"}
                stream.options = options
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            for packet in stream.encode(video_frame):
                container.mux(packet)
        if stream is None:
            raise ValueError(f"no frames to write to {path}")
        for packet in stream.encode():
            container.mux(packet)


def read_frames(path: Path, max_frames: int | None = None) -> Iterator[np.ndarray]:
    """Decode a video's first video stream to RGB uint8 frames, one at a time."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        for i, frame in enumerate(container.decode(stream)):
            if max_frames is not None and i >= max_frames:
                return
            yield frame.to_ndarray(format="rgb24")
