"""The per-clip work of the annotate stage: one decode for keyframe, faces and colours.

This module runs in the stage's worker processes, so it imports only what that work needs
(numpy, PyAV, OpenCV): a spawned worker imports it in well under a second, where the stage
module would also pull in pandas and MLflow.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import av
import cv2
import numpy as np

from vidops.media import colours, faces
from vidops.media.files import link_or_copy
from vidops.media.video import write_video

KEYFRAME_ANNOTATOR = "vidops-keyframe 1"
# Frames at 1/4, 1/2 and 3/4 of the clip: face_count is the maximum over them, the middle one
# is the keyframe, and a captioner gets all three.
SAMPLES = 3
# With privacy.blur_faces, faces are also looked for this often: a face that enters between
# the three samples must be blurred too, and boxes are held between detections.
DETECT_HZ = 4.0


class ClipError(RuntimeError):
    """A clip could not be decoded."""


@dataclass(frozen=True)
class ClipJob:
    """What a worker needs to annotate one clip (plain data: it crosses process boundaries)."""

    clip_id: str
    src: Path  # the input clip
    out_dir: Path  # the stage's output directory; media go under clips/ and keyframes/
    keyframe_quality: int
    blur_faces: bool
    crf: int  # for re-encoded (face-blurred) clips, the filter's normalisation CRF
    want_frames: bool  # return the sampled frames, for a captioner
    # Decoder threads: 1 in a pool that already runs a process per core, 0 (FFmpeg's choice)
    # when clips are annotated one after another.
    threads: int = 0

    @property
    def clip_relpath(self) -> str:
        return f"clips/{self.clip_id}.mp4"

    @property
    def keyframe_relpath(self) -> str:
        return f"keyframes/{self.clip_id}.jpg"


@dataclass
class ClipResult:
    face_count: int = 0
    faces_blurred: bool = False
    brightness: float = 0.0
    colours: list[str] = field(default_factory=list)
    frames: list[np.ndarray] | None = None  # the sampled frames, when asked for
    error: str | None = None  # why the clip could not be read; nothing was written then


def sample_indices(frame_count: int, samples: int = SAMPLES) -> list[int]:
    """Evenly spaced inner frames; for 3 samples the middle one is frame_count // 2."""
    return sorted({frame_count * (k + 1) // (samples + 1) for k in range(samples)})


def _decoded(path: Path, threads: int) -> Iterator[av.VideoFrame]:
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ClipError("no video stream")
        stream = container.streams.video[0]
        if threads == 1:
            stream.thread_count = 1
        else:
            stream.thread_type = "AUTO"
        yield from container.decode(stream)


def _frames(path: Path, threads: int) -> Iterator[np.ndarray]:
    for frame in _decoded(path, threads):
        yield frame.to_ndarray(format="rgb24")


def _stream_info(path: Path) -> tuple[int, float]:
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ClipError("no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        return int(stream.frames or 0), float(rate) if rate else 0.0


def _count_frames(path: Path, threads: int) -> int:
    return sum(1 for _ in _decoded(path, threads))


@dataclass
class _Scan:
    decoded: int
    kept: dict[int, np.ndarray]
    # Every box found, per frame looked at (including frames looked at only to confirm).
    detections: dict[int, list[faces.Box]]
    # Per analysed frame, its boxes that an adjacent frame confirms (faces.confirmed).
    confirmed: dict[int, list[faces.Box]]


def _scan(path: Path, keep: set[int], detect: set[int], threads: int) -> _Scan:
    """One decode: keep some frames, look for faces on others and confirm what is found."""
    kept: dict[int, np.ndarray] = {}
    detections: dict[int, list[faces.Box]] = {}
    confirmed: dict[int, list[faces.Box]] = {}
    awaiting_next: dict[int, list[faces.Box]] = {}  # frame 0 has no previous frame
    previous: av.VideoFrame | None = None

    def boxes_on(index: int, frame: av.VideoFrame) -> list[faces.Box]:
        if index not in detections:
            detections[index] = faces.detect_faces(frame.to_ndarray(format="rgb24"))
        return detections[index]

    decoded = 0
    for index, frame in enumerate(_decoded(path, threads)):
        decoded = index + 1
        if index in keep:
            # RGB conversion costs as much as decoding: only for frames used.
            kept[index] = frame.to_ndarray(format="rgb24")
        if index - 1 in awaiting_next:
            confirmed[index - 1] = faces.confirmed(awaiting_next.pop(index - 1),
                                                   boxes_on(index, frame))
        if index in detect:
            boxes = boxes_on(index, frame)
            if not boxes:
                confirmed[index] = []
            elif previous is not None:
                confirmed[index] = faces.confirmed(boxes, boxes_on(index - 1, previous))
            else:
                awaiting_next[index] = boxes
        previous = frame
    for index in awaiting_next:  # a one-frame clip: nothing to confirm against
        confirmed[index] = []
    return _Scan(decoded, kept, detections, confirmed)


def _blur_clip(src: Path, dst: Path, detections: dict[int, list[faces.Box]], reach: int,
               fps: float, crf: int, threads: int) -> None:
    frames = (faces.blur_regions(frame, faces.hold_boxes(detections, index, reach))
              for index, frame in enumerate(_frames(src, threads)))
    dst.parent.mkdir(parents=True, exist_ok=True)
    write_video(dst, frames, fps, crf=crf)


def _analyse(job: ClipJob) -> ClipResult:
    frame_count, fps = _stream_info(job.src)
    if frame_count <= 0:  # containers that do not index their frames
        frame_count = _count_frames(job.src, job.threads)
    if frame_count <= 0:
        raise ClipError("no decodable frames")
    stride = max(1, round(fps / DETECT_HZ)) if fps > 0 else 6
    scan: _Scan | None = None
    for _ in range(2):
        samples = sample_indices(frame_count)
        detect = set(samples)
        if job.blur_faces:
            detect |= set(range(0, frame_count, stride))
        scan = _scan(job.src, set(samples), detect, job.threads)
        if all(i in scan.kept for i in samples):
            break
        # The header promised frames the stream does not have: sample what is there.
        frame_count = scan.decoded
        if frame_count <= 0:
            raise ClipError("no decodable frames")
    assert scan is not None
    samples = sample_indices(frame_count)
    if not all(i in scan.kept for i in samples):
        raise ClipError(f"frame count changes between decodes ({frame_count})")

    keyframe = scan.kept[frame_count // 2]
    keyframe_path = job.out_dir / job.keyframe_relpath
    keyframe_path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(keyframe_path), cv2.cvtColor(keyframe, cv2.COLOR_RGB2BGR),
                       [cv2.IMWRITE_JPEG_QUALITY, job.keyframe_quality]):
        raise OSError(f"cannot write {keyframe_path}")

    face_count = max((len(boxes) for boxes in scan.confirmed.values()), default=0)
    clip_path = job.out_dir / job.clip_relpath
    blurred = job.blur_faces and face_count > 0
    if blurred:
        _blur_clip(job.src, clip_path, scan.detections, stride, fps or 24.0, job.crf,
                   job.threads)
    else:
        link_or_copy(job.src, clip_path)
    return ClipResult(
        face_count=face_count,
        faces_blurred=blurred,
        brightness=round(colours.brightness(keyframe), 3),
        colours=colours.dominant_colours(keyframe),
        frames=[scan.kept[i] for i in samples] if job.want_frames else None,
    )


def annotate_clip(job: ClipJob) -> ClipResult:
    """Keyframe, faces (blurred when asked), colours and the clip file for one clip.

    A clip that cannot be decoded comes back with `error` set and leaves nothing behind;
    anything else (a full disk, a bug) is raised: it is no property of the clip.
    """
    try:
        return _analyse(job)
    except (ClipError, av.error.FFmpegError) as exc:
        for relpath in (job.clip_relpath, job.keyframe_relpath):
            (job.out_dir / relpath).unlink(missing_ok=True)
        return ClipResult(error=f"{type(exc).__name__}: {exc}")


def init_worker() -> None:
    """Pool initializer: one OpenCV thread per process, since the pool already uses every core."""
    cv2.setNumThreads(1)

