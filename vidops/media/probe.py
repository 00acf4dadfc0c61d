"""Probing: what a video file is, read from its container without decoding it whole.

The probe demuxes every packet of the video stream (cheap: no decoding) to count frames
exactly and to notice truncation, then decodes one frame at the start, the middle and the end
of the stream (at keyframes) with the decoder's error detection set to fail loudly, where it
would otherwise conceal damage and return garbage frames. That is enough to tell a real,
decodable video from a truncated, garbled or mislabelled file at a small fraction of the cost
of a full decode.

What a file may cost is bounded (`ProbeLimits`, from `ingest.limits`) before any frame is
decoded: its size in bytes (while copying), the frame size and the frame count its header
declares (the demuxer's count too, which stops at the limit). A file over a limit raises
`TooLargeError`. The decoder itself is given the pixel limit (FFmpeg's `max_pixels`), also
for the frames the demuxer may decode while opening the file, so a bitstream that declares a
larger frame than its container is refused by the decoder instead of being allocated.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import av
import fsspec


class ProbeError(Exception):
    """The file is not a decodable video; the message says why (the decoder's own words)."""

    reason = "unreadable"


class NoVideoError(ProbeError):
    """A readable media file without a video stream (audio only, subtitles, data)."""

    reason = "no_video"


class TooLargeError(ProbeError):
    """The file is over one of the ingest limits; never decoded."""

    reason = "too_large"


@dataclass(frozen=True)
class ProbeLimits:
    """What one input may cost (ingest.limits; params.yaml explains the defaults)."""

    max_pixels: int = 4096 * 4096
    max_frames: int = 216_000
    max_bytes: int = 20 << 30


def display_rotation(frame: av.VideoFrame) -> int:
    """The display rotation of a decoded frame (its display matrix), in degrees
    counter-clockwise, as 0, 90, 180 or 270."""
    try:
        angle = float(getattr(frame, "rotation", 0) or 0)
    except (TypeError, ValueError):
        return 0
    return round(angle / 90.0) % 4 * 90


@dataclass(frozen=True)
class ProbeResult:
    container: str
    codec: str
    pix_fmt: str
    width: int
    height: int
    fps: float
    frame_count: int
    duration_s: float
    has_audio: bool
    bit_rate: int
    rotation: int = 0  # display rotation, degrees counter-clockwise (0, 90, 180, 270)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_pixels(width: int, height: int, limits: ProbeLimits, what: str) -> None:
    if width * height > limits.max_pixels:
        raise TooLargeError(f"{what} {width}x{height} = {width * height} pixels, over "
                            f"ingest.limits.max_pixels ({limits.max_pixels}); not decoded")


def _decode_one(container: av.container.InputContainer, stream: av.VideoStream,
                limits: ProbeLimits) -> av.VideoFrame:
    for frame in container.decode(stream):
        _check_pixels(frame.width, frame.height, limits, "decoded frame")
        frame.to_ndarray(format="rgb24")
        return frame
    raise ProbeError("the video stream yields no decodable frame")


def _stream_kinds(container: av.container.InputContainer) -> str:
    kinds = []
    for s in container.streams:
        codec = getattr(getattr(s, "codec_context", None), "name", None)
        kinds.append(f"{s.type}{f' ({codec})' if codec else ''}")
    return ", ".join(kinds) or "none"


def probe_video(path: Path, min_packet_coverage: float = 0.98,
                limits: ProbeLimits | None = None) -> ProbeResult:
    path = Path(path)
    limits = limits or ProbeLimits()
    size = path.stat().st_size
    if size == 0:
        raise ProbeError("empty file (0 bytes)")
    if size > limits.max_bytes:
        raise TooLargeError(f"{size} bytes, over ingest.limits.max_bytes ({limits.max_bytes})")
    # The decoder's own pixel limit, for the frames avformat_find_stream_info may decode.
    guard = {"max_pixels": str(limits.max_pixels)}
    try:
        container = av.open(str(path), metadata_errors="ignore", options=guard)
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise ProbeError(f"cannot open: {exc}") from exc
    with container:
        if not container.streams.video:
            raise NoVideoError(f"no video stream (streams: {_stream_kinds(container)})")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if not ctx.width or not ctx.height:
            raise ProbeError(f"video stream has no frame size (codec {ctx.name})")
        _check_pixels(int(ctx.width), int(ctx.height), limits, "declared frame size")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        if fps <= 0:
            raise ProbeError("video stream has no frame rate")
        # The frame count the header declares, or its duration implies; nothing demuxed yet.
        seconds = (float(stream.duration * stream.time_base)
                   if stream.duration and stream.time_base else 0.0)
        seconds = max(seconds, container.duration / av.time_base if container.duration else 0.0)
        implied = max(int(stream.frames or 0), int(seconds * fps))
        if implied > limits.max_frames:
            raise TooLargeError(
                f"header declares {implied} frames ({seconds:.0f} s at {fps:.4g} fps), over "
                f"ingest.limits.max_frames ({limits.max_frames}); not decoded")

        # Damaged bitstreams must raise, not be concealed by the decoder.
        ctx.options = {"err_detect": "explode", **guard}
        packets, keyframes, end_ts = 0, [], 0.0
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's end-of-stream marker
                    continue
                packets += 1
                if packets > limits.max_frames:
                    raise TooLargeError(f"more than {limits.max_frames} frames "
                                        "(ingest.limits.max_frames); not decoded")
                if packet.pts is not None and packet.time_base is not None:
                    if packet.is_keyframe:
                        keyframes.append(packet.pts)
                    end_ts = max(end_ts, float((packet.pts + (packet.duration or 0))
                                               * packet.time_base))
        except av.error.FFmpegError as exc:
            raise ProbeError(f"corrupt container after {packets} packets: {exc}") from exc
        if packets == 0:
            raise ProbeError("video stream has no packets")
        declared = stream.frames
        if declared and packets < declared * min_packet_coverage:
            raise ProbeError(f"truncated: {packets} of {declared} frames present")
        start = float(stream.start_time * stream.time_base) if stream.start_time else 0.0
        # Containers without a frame count (Matroska, WebM) still announce a duration.
        announced = container.duration / av.time_base if container.duration else 0.0
        if not declared and announced and (end_ts - start) < announced * min_packet_coverage - (
            2.0 / fps
        ):
            raise ProbeError(f"truncated: {end_ts - start:.2f}s of {announced:.2f}s present")

        try:
            container.seek(0, stream=stream)
            rotation = display_rotation(_decode_one(container, stream, limits))
            for pts in sorted({keyframes[len(keyframes) // 2], keyframes[-1]} if keyframes
                              else set()):
                container.seek(pts, stream=stream, any_frame=False)
                _decode_one(container, stream, limits)
        except av.error.FFmpegError as exc:
            raise ProbeError(f"does not decode: {exc}") from exc

        duration = end_ts - start if end_ts > start else packets / fps
        return ProbeResult(
            container=container.format.name,
            codec=ctx.name,
            pix_fmt=ctx.pix_fmt or "",
            width=int(ctx.width),
            height=int(ctx.height),
            fps=round(fps, 4),
            frame_count=packets,
            duration_s=round(duration, 4),
            has_audio=bool(container.streams.audio),
            bit_rate=int(container.bit_rate or 0),
            rotation=rotation,
        )


def copy_hash_probe(
    uri: str, dest: Path, min_packet_coverage: float, chunk: int = 1 << 20,
    limits: ProbeLimits | None = None,
) -> dict[str, Any]:
    """Copy one input (any fsspec URI) to `dest` while hashing it, then probe the copy.

    One read of the source serves both the sha256 and the local copy the probe (and every
    later stage) works on; the copy stops at `limits.max_bytes`. Runs in a worker process;
    returns plain data, never raises for a bad input: `error` says what was wrong and
    `reason` is its code (unreadable, no_video, too_large).
    """
    limits = limits or ProbeLimits()
    digest = hashlib.sha256()
    size = 0

    def failed(reason: str, error: str) -> dict[str, Any]:
        Path(dest).unlink(missing_ok=True)
        return {"sha256": None, "size": size, "probe": None, "error": error, "reason": reason}

    try:
        with fsspec.open(uri, "rb") as src, open(dest, "wb") as out:
            while block := src.read(chunk):
                size += len(block)
                if size > limits.max_bytes:
                    return failed(TooLargeError.reason,
                                  f"more than {limits.max_bytes} bytes "
                                  "(ingest.limits.max_bytes); not read further")
                digest.update(block)
                out.write(block)
    except (OSError, ValueError, ImportError) as exc:  # a URL fsspec cannot handle
        return failed(ProbeError.reason, f"cannot read: {exc}")
    try:
        result = probe_video(dest, min_packet_coverage, limits).to_dict()
        error, reason = None, None
    except ProbeError as exc:
        # The decoder names the file it opened, a temporary copy; name the input instead.
        result, error, reason = None, str(exc).replace(str(dest), uri), exc.reason
    return {"sha256": digest.hexdigest(), "size": size, "probe": result, "error": error,
            "reason": reason}

