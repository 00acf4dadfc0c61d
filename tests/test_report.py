"""The evaluation report: one self-contained HTML file that decodes, escapes and degrades."""

from __future__ import annotations

import base64
import copy
import io
import math
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vidops.evaluation.report import write_report
from vidops.media.video import write_video

METRICS = ("temporal_consistency", "sharpness", "motion", "temporal_flickering",
           "dynamic_degree", "motion_smoothness")
EVIL = 'a green <script>alert("x")</script> triangle moving up'
PROMPTS = [("a red circle moving right", "train", (220, 30, 30)),
           ("a blue square moving left", "held_out", (30, 30, 220)),
           (EVIL, "new_concept", (30, 200, 30))]


class Page(HTMLParser):
    """Collects what the assertions look at: image sources, SVG roots and headings."""

    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.svgs = 0
        self.headings: list[str] = []
        self._heading = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")
        self.svgs += tag == "svg"
        self._heading = tag == "h2"

    def handle_data(self, data: str) -> None:
        if self._heading:
            self.headings.append(data)
            self._heading = False


def _ci(mean: float, n: int = 3) -> dict:
    return {"mean": mean, "ci_low": mean - 0.1, "ci_high": mean + 0.1, "n": n}


def _evaluation(shift: float = 0.0) -> dict:
    """A metrics.json dict following the schema, values offset by `shift` per evaluation."""
    videos = []
    for i, (prompt, group, _) in enumerate(PROMPTS):
        metrics = {name: 0.5 + 0.1 * i + shift for name in METRICS}
        if i == 1:
            metrics["sharpness"] = math.nan
        videos.append({
            "index": i, "prompt": prompt, "seed": 1000 + i, "group": group,
            "file": f"samples/{i:02d}-s{1000 + i}.mp4", "metrics": metrics,
            "adherence": {"colour": True, "direction": i != 1, "shape": True,
                          "read": {"colour": "red", "direction": None if i == 1 else "right",
                                   "shape": "circle"}},
            "clip_score": None})
    groups = {g: {a: _ci(0.8 + shift) for a in ("colour", "direction", "shape")}
              for g in ("train", "held_out", "new_concept")}
    info = {name: {"label": name.replace("_", " "), "description": f"{name} of the video",
                   "higher_is_better": name != "temporal_flickering"} for name in METRICS}
    info |= {"adherence_colour": {"label": "colour adherence", "higher_is_better": True,
                                  "description": "colour read back from pixels"},
             "fd_vae": {"label": "FD (VAE)", "higher_is_better": False, "description": "FD"}}
    return {
        "format": 1,
        "model": {"ref": "vidgen@v4", "path": "/models/vidgen/v4", "kind": "finetune",
                  "name": "vidgen <v4>", "digest": "sha256:abc123", "mlflow_run_id": None},
        "created_at": "2025-01-01T00:00:00Z", "code_version": "deadbeef",
        "settings": {"steps": 4, "guidance_scale": 4.5, "sampler": "ddim",
                     "seeds": [1000, 1001, 1002], "prompt_set": "shapes", "fps": 8.0},
        "videos": videos,
        "metrics": {name: _ci(0.6 + shift) for name in METRICS} | {"sharpness": _ci(math.nan)},
        "adherence": {"colour": _ci(0.875 + shift), "direction": _ci(0.6), "shape": _ci(0.9),
                      "held_out_both": _ci(0.5), "by_group": groups},
        "clip_score": {"available": False, "reason": "no CLIP model offline"},
        "distribution": {
            "fd_vae": {"value": 12.5 + 10 * shift, "reference_clips": 64, "generated": 3,
                       "label": "tiny VAE latents"},
            "fvd": {"available": False, "reason": "I3D weights not installed"}},
        "headline": {"adherence_colour": 0.875 + shift, "fd_vae": 12.5 + 10 * shift,
                     "temporal_consistency": math.nan},
        "metric_info": info,
    }


@pytest.fixture
def evaluation(tmp_path: Path) -> tuple[Path, dict]:
    """Three real little MP4s (a coloured square moving) and their metrics."""
    metrics = _evaluation()
    for i, (_, _, colour) in enumerate(PROMPTS):
        frames = []
        for t in range(5):
            frame = np.zeros((64, 64, 3), np.uint8)
            frame[24:40, 4 + 10 * t:20 + 10 * t] = colour
            frames.append(frame)
        (tmp_path / "samples").mkdir(exist_ok=True)
        write_video(tmp_path / metrics["videos"][i]["file"], frames, 8.0)
    return tmp_path, metrics


def _parse(path: Path) -> tuple[str, Page]:
    text = path.read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    return text, page


def _decode(src: str) -> Image.Image:
    match = re.fullmatch(r"data:image/(gif|png);base64,([A-Za-z0-9+/=]+)", src)
    assert match, src[:60]
    image = Image.open(io.BytesIO(base64.b64decode(match[2])))
    assert image.format.lower() == match[1]
    return image


def test_report_with_comparison(evaluation: tuple[Path, dict]) -> None:
    out_dir, metrics = evaluation
    champion = _evaluation(shift=-0.125)
    champion["headline"]["fd_vae"] = math.nan
    path = write_report(out_dir, metrics, {"champion (vidgen v3)": champion})
    assert path == out_dir / "report.html" and path.is_file()
    text, page = _parse(path)

    images = [_decode(src) for src in page.images]
    gifs = [im for im in images if im.format == "GIF"]
    assert len(gifs) == 3 and all(im.n_frames > 1 for im in gifs)
    assert all(min(im.size) >= 128 for im in gifs)  # 64 px videos upscaled
    assert len(images) - len(gifs) == 3  # one frame strip per video
    assert page.svgs == len(METRICS) + 1  # a distribution per metric and the adherence bars
    assert "http://" not in text.split("<body>")[1].replace("http://www.w3.org", "")

    headings = [h.strip() for h in page.headings]
    order = ["Headline", "Video metrics", "Prompt adherence", "CLIP score",
             "Distribution metrics", "Plots", "Samples"]
    assert [h for h in headings if h in order] == order
    assert "champion (vidgen v3)" in text
    # 0.875 vs 0.75, higher is better: green; fd_vae of the champion is NaN: n/a.
    assert '<td>0.875</td><td>0.75</td><td class="good">+0.125</td>' in text
    assert '<td>12.5</td><td>n/a</td><td class="na">n/a</td>' in text
    assert "no CLIP model offline" in text and "I3D weights not installed" in text
    assert "tiny VAE latents" in text and "held-out" in text
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "vidgen &lt;v4&gt;" in text
    assert "video missing" not in text


def test_report_without_comparisons(evaluation: tuple[Path, dict]) -> None:
    out_dir, metrics = evaluation
    metrics["adherence"] = {"available": False, "reason": "not a shapes model"}
    for video in metrics["videos"]:
        video["adherence"] = None
    text, page = _parse(write_report(out_dir, metrics))
    assert "not a shapes model" in text
    assert page.svgs == len(METRICS)  # no adherence to chart
    assert sum(src.startswith("data:image/gif") for src in page.images) == 3
    assert "Δ" not in text.split("<h2>Headline</h2>")[1].split("</table>")[0].split("</p>")[1]


def test_missing_and_broken_videos_are_noted(evaluation: tuple[Path, dict]) -> None:
    out_dir, metrics = evaluation
    (out_dir / metrics["videos"][0]["file"]).unlink()
    (out_dir / metrics["videos"][1]["file"]).write_bytes(b"not a video")
    extra = copy.deepcopy(metrics["videos"][2]) | {"index": 3, "file": None, "metrics": {}}
    metrics["videos"].append(extra)
    text, page = _parse(write_report(out_dir, metrics))
    assert f"video missing: {metrics['videos'][0]['file']}</p>" in text
    assert f"video missing: {metrics['videos'][1]['file']} (unreadable" in text
    assert text.count("video missing") == 3
    assert sum(src.startswith("data:image/gif") for src in page.images) == 1


def test_empty_evaluation_renders(tmp_path: Path) -> None:
    """A metrics dict that is mostly missing still gives a page, with n/a throughout."""
    text, page = _parse(write_report(tmp_path, {"model": {"name": "m"}, "videos": []}))
    assert "Evaluation: m" in text and page.images == [] and page.svgs == 0
