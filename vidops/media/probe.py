"""Probing: what a video file is, read from its container without decoding it whole.

The probe demuxes every packet of the video stream (cheap: no decoding) to count frames
exactly and to notice truncation, then decodes one frame at the start, the middle and the end
of the stream (at keyframes) with the decoder's error detection set to fail loudly, where it
would otherwise conceal damage and return garbage frames. That is enough to tell a real,
decodable video from a truncated, garbled or mislabelled file at a small fraction of the cost
of a full decode.
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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _decode_one(container: av.container.InputContainer, stream: av.VideoStream) -> None:
    for frame in container.decode(stream):
        frame.to_ndarray(format="rgb24")
        return
    raise ProbeError("the video stream yields no decodable frame")


def probe_video(path: Path, min_packet_coverage: float = 0.98) -> ProbeResult:
    path = Path(path)
    if path.stat().st_size == 0:
        raise ProbeError("empty file (0 bytes)")
    try:
        container = av.open(str(path), metadata_errors="ignore")
    except (av.error.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise ProbeError(f"cannot open: {exc}") from exc
    with container:
        if not container.streams.video:
            raise ProbeError("no video stream")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if not ctx.width or not ctx.height:
            raise ProbeError(f"video stream has no frame size (codec {ctx.name})")
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        if fps <= 0:
            raise ProbeError("video stream has no frame rate")

        # Damaged bitstreams must raise, not be concealed by the decoder.
        ctx.options = {"err_detect": "explode"}
        packets, keyframes, end_ts = 0, [], 0.0
        try:
            for packet in container.demux(stream):
                if packet.size == 0:  # the demuxer's end-of-stream marker
                    continue
                packets += 1
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
            _decode_one(container, stream)
            for pts in sorted({keyframes[len(keyframes) // 2], keyframes[-1]} if keyframes
                              else set()):
                container.seek(pts, stream=stream, any_frame=False)
                _decode_one(container, stream)
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
        )


def copy_hash_probe(
    uri: str, dest: Path, min_packet_coverage: float, chunk: int = 1 << 20
) -> dict[str, Any]:
    """Copy one input (any fsspec URI) to `dest` while hashing it, then probe the copy.

    One read of the source serves both the sha256 and the local copy the probe (and every
    later stage) works on. Runs in a worker process; returns plain data, never raises for a
    bad input: `error` says what was wrong.
    """
    digest = hashlib.sha256()
    size = 0
    try:
        with fsspec.open(uri, "rb") as src, open(dest, "wb") as out:
            while block := src.read(chunk):
                digest.update(block)
                out.write(block)
                size += len(block)
    except OSError as exc:
        Path(dest).unlink(missing_ok=True)
        return {"sha256": None, "size": size, "probe": None, "error": f"cannot read: {exc}"}
    try:
        result = probe_video(dest, min_packet_coverage).to_dict()
        error = None
    except ProbeError as exc:
        # The decoder names the file it opened, a temporary copy; name the input instead.
        result, error = None, str(exc).replace(str(dest), uri)
    return {"sha256": digest.hexdigest(), "size": size, "probe": result, "error": error}

