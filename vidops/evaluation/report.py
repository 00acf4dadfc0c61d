"""A self-contained `report.html` for one model evaluation.

One file with everything inlined (CSS, SVG plots, base64 GIF/PNG previews) so it can be
attached to a registry entry or an MLflow run and read offline years later: nothing
external to go stale. Values are compared against other evaluations of the same schema
(champion, base model) so a reviewer sees at a glance what a candidate changes.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable
from numbers import Real
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from vidops.media.video import read_frames

PREVIEW_FRAMES = 49  # GIF previews keep at most this many frames: the page stays small
STRIP_FRAMES = 8
MIN_SHORT_SIDE = 128  # tiny videos are upscaled (nearest) so they can be seen at all
MAX_LONG_SIDE = 320  # big ones are shrunk: previews, not archives
CANDIDATE = "this model"
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2")
ATTRIBUTES = ("colour", "direction", "shape")
GROUP_LABELS = {"overall": "overall", "train": "train", "held_out": "held-out",
                "new_concept": "new concept", "custom": "custom"}

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1200px;
 padding:0 1em;color:#1f2328}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.6em}
.meta{color:#57606a;margin:.2em 0}
table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #d0d7de;padding:.25em .6em;text-align:right;
 font-variant-numeric:tabular-nums}
th{background:#f6f8fa}td:first-child,th:first-child{text-align:left}
.good{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:600}.same{color:#8c959f}
.na{color:#8c959f}.n{color:#8c959f;font-size:.85em}
.plots{display:flex;flex-wrap:wrap;gap:1em}.plots svg{max-width:100%;height:auto}
.prompt{margin-top:1.2em}.badge{font-size:.75em;padding:.1em .5em;border-radius:1em;
 background:#eaeef2;margin-left:.5em;vertical-align:middle}.badge.held{background:#fff1c2}
.card{display:flex;gap:1em;align-items:flex-start;border:1px solid #d0d7de;border-radius:6px;
 padding:.6em;margin:.5em 0;flex-wrap:wrap}
.card img{image-rendering:pixelated;max-width:100%}.card .info{font-size:.9em}
.missing{color:#cf222e;font-weight:600}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _float(value: Any) -> float | None:
    """A finite number or None: NaN, None, strings and missing keys all render as n/a."""
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _num(value: Any) -> str:
    """3 significant digits; large values (FD) as integers rather than scientific notation."""
    x = _float(value)
    if x is None:
        return "n/a"
    return f"{x:.0f}" if abs(x) >= 1000 else f"{x:.3g}"


def _mean(ci: Any) -> Any:
    return ci.get("mean") if isinstance(ci, dict) else None


def _available(block: Any) -> bool:
    return isinstance(block, dict) and block.get("available") is not False


def _reason(block: Any) -> str:
    reason = block.get("reason") if isinstance(block, dict) else None
    return f'<span class="na">not available: {_e(reason or "missing")}</span>'


def _ci(ci: Any) -> str:
    """`mean [low, high] n=N` as HTML; the CI only when both ends are numbers."""
    if not _available(ci):
        return _reason(ci)
    lo, hi, n = _float(ci.get("ci_low")), _float(ci.get("ci_high")), ci.get("n")
    text = _num(ci.get("mean"))
    if lo is not None and hi is not None:
        text += f" [{_num(lo)}, {_num(hi)}]"
    return text + (f' <span class="n">n={_e(n)}</span>' if n is not None else "")


def _delta(candidate: Any, other: Any, higher_is_better: Any) -> str:
    """Candidate minus comparison, green when the candidate is better, red when worse, grey
    when equal or when the metric has no known direction."""
    a, b = _float(candidate), _float(other)
    if a is None or b is None:
        return '<td class="na">n/a</td>'
    d = a - b
    if abs(d) <= 1e-9 or not isinstance(higher_is_better, bool):
        cls = "same"
    else:
        cls = "good" if (d > 0) == higher_is_better else "bad"
    return f'<td class="{cls}">{d:+.3g}</td>'


def _info(metrics: dict, comparisons: dict[str, dict]) -> dict[str, dict]:
    """metric_info of all evaluations, the candidate's winning: a comparison may know more."""
    info: dict[str, dict] = {}
    for m in [*comparisons.values(), metrics]:
        info.update({k: v for k, v in (m.get("metric_info") or {}).items() if isinstance(v, dict)})
    return info


def _label(info: dict[str, dict], name: str) -> str:
    return str(info.get(name, {}).get("label") or name)


def _header(metrics: dict) -> str:
    model = metrics.get("model") or {}
    s = metrics.get("settings") or {}
    seeds = list(s.get("seeds") or [])
    seed_text = ", ".join(map(str, seeds[:8])) + (f", … ({len(seeds)} seeds)" if len(seeds) > 8
                                                  else "")
    parts = [f"{s['steps']} steps" if "steps" in s else None,
             f"guidance {s['guidance_scale']}" if "guidance_scale" in s else None,
             f"sampler {s['sampler']}" if "sampler" in s else None,
             f"seeds {seed_text}" if seeds else None,
             f"prompt set {s['prompt_set']}" if "prompt_set" in s else None,
             f"{s['fps']} fps" if "fps" in s else None]
    digest = str(model.get("digest") or "")[:16]
    return (f"<h1>Evaluation: {_e(model.get('name') or 'model')} "
            f"<span class=\"badge\">{_e(model.get('kind') or '?')}</span></h1>"
            f"<p class=\"meta\">ref <code>{_e(model.get('ref'))}</code>"
            + (f" · digest <code>{_e(digest)}</code>" if digest else "")
            + (f" · MLflow run <code>{_e(model.get('mlflow_run_id'))}</code>"
               if model.get("mlflow_run_id") else "")
            + f"</p><p class=\"meta\">created {_e(metrics.get('created_at'))} · code "
            f"<code>{_e(metrics.get('code_version'))}</code></p>"
            f"<p class=\"meta\">{_e(' · '.join(p for p in parts if p))}</p>")


def _comparison_head(comparisons: dict[str, dict]) -> str:
    return "".join(f"<th>{_e(label)}</th><th>Δ</th>" for label in comparisons)


def _headline(metrics: dict, comparisons: dict[str, dict], info: dict[str, dict]) -> str:
    names = list(metrics.get("headline") or {})
    for other in comparisons.values():
        names += [n for n in other.get("headline") or {} if n not in names]
    if not names:
        return "<h2>Headline</h2><p class=\"na\">no headline metrics</p>"
    rows = []
    for name in names:
        value = (metrics.get("headline") or {}).get(name)
        hib = info.get(name, {}).get("higher_is_better")
        arrow = {True: " ↑", False: " ↓"}.get(hib, "") if isinstance(hib, bool) else ""
        others = [(o.get("headline") or {}).get(name) for o in comparisons.values()]
        cells = "".join(f"<td>{_num(o)}</td>{_delta(value, o, hib)}" for o in others)
        rows.append(f"<tr><td title=\"{_e(info.get(name, {}).get('description'))}\">"
                    f"{_e(_label(info, name))}{arrow}</td><td>{_num(value)}</td>{cells}</tr>")
    return ("<h2>Headline</h2><p class=\"meta\">Δ = this model − comparison; green is better."
            f"</p><table><tr><th>metric</th><th>{CANDIDATE}</th>{_comparison_head(comparisons)}"
            f"</tr>{''.join(rows)}</table>")


def _video_metric_names(metrics: dict) -> list[str]:
    names = list(metrics.get("metrics") or {})
    for video in metrics.get("videos") or []:
        names += [n for n in video.get("metrics") or {} if n not in names]
    return names


def _metric_table(metrics: dict, comparisons: dict[str, dict], info: dict[str, dict]) -> str:
    rows = []
    for name in _video_metric_names(metrics):
        ci = (metrics.get("metrics") or {}).get(name)
        hib = info.get(name, {}).get("higher_is_better")
        cells = "".join(
            f"<td>{_num(_mean((o.get('metrics') or {}).get(name)))}</td>"
            f"{_delta(_mean(ci), _mean((o.get('metrics') or {}).get(name)), hib)}"
            for o in comparisons.values())
        rows.append(f"<tr><td title=\"{_e(info.get(name, {}).get('description'))}\">"
                    f"{_e(_label(info, name))}</td><td>{_ci(ci)}</td>{cells}</tr>")
    return ("<h2>Video metrics</h2><p class=\"meta\">mean over videos [95% CI], n videos</p>"
            f"<table><tr><th>metric</th><th>{CANDIDATE}</th>{_comparison_head(comparisons)}</tr>"
            f"{''.join(rows)}</table>")


def _adherence_section(metrics: dict, comparisons: dict[str, dict]) -> str:
    out = ["<h2>Prompt adherence</h2>"]
    adherence = metrics.get("adherence")
    if not _available(adherence):
        out.append(f"<p>{_reason(adherence)}</p>")
    else:
        overall = [*ATTRIBUTES, "held_out_both"]
        comp = "".join(f"<th>{_e(label)}</th>" for label in comparisons)
        rows = "".join(
            f"<tr><td>{_e(name.replace('_', ' '))}</td><td>{_ci(adherence.get(name))}</td>"
            + "".join(f"<td>{_num(_mean((o.get('adherence') or {}).get(name)))}</td>"
                      for o in comparisons.values()) + "</tr>" for name in overall)
        out.append(f"<table><tr><th>rate</th><th>{CANDIDATE}</th>{comp}</tr>{rows}</table>")
        by_group = adherence.get("by_group") or {}
        rows = "".join(
            f"<tr><td>{_e(GROUP_LABELS.get(g, g))}</td>"
            + "".join(f"<td>{_ci((by_group.get(g) or {}).get(a))}</td>" for a in ATTRIBUTES)
            + "</tr>" for g in by_group)
        if rows:
            out.append("<h3>By prompt group</h3><table><tr><th>group</th>"
                       + "".join(f"<th>{a}</th>" for a in ATTRIBUTES) + f"</tr>{rows}</table>")
    clip = metrics.get("clip_score")
    out.append("<h2>CLIP score</h2>")
    if _available(clip):
        comp = "".join(f"<th>{_e(label)}</th>" for label in comparisons)
        cells = "".join(f"<td>{_num(_mean(o.get('clip_score')))}</td>"
                        for o in comparisons.values())
        out.append(f"<table><tr><th></th><th>{CANDIDATE}</th>{comp}</tr>"
                   f"<tr><td>CLIP score</td><td>{_ci(clip)}</td>{cells}</tr></table>")
    else:
        out.append(f"<p>{_reason(clip)}</p>")
    out.append("<h2>Distribution metrics</h2><table><tr><th>metric</th><th>value</th>"
               "<th>reference</th><th>reference clips</th><th>generated</th>"
               + "".join(f"<th>{_e(label)}</th>" for label in comparisons) + "</tr>")
    for name in ("fd_vae", "fvd"):
        block = (metrics.get("distribution") or {}).get(name)
        cells = "".join(
            f"<td>{_num(((o.get('distribution') or {}).get(name) or {}).get('value'))}</td>"
            for o in comparisons.values())
        if _available(block):
            out.append(f"<tr><td>{name}</td><td>{_num(block.get('value'))}</td>"
                       f"<td>{_e(block.get('label'))}</td><td>{_e(block.get('reference_clips'))}</td>"
                       f"<td>{_e(block.get('generated'))}</td>{cells}</tr>")
        else:
            out.append(f"<tr><td>{name}</td><td colspan=\"4\" style=\"text-align:left\">"
                       f"{_reason(block)}</td>{cells}</tr>")
    out.append("</table>")
    return "".join(out)


def _mpl(text: str) -> str:
    """Matplotlib would parse `$...$` in labels as mathtext (and can fail on it)."""
    return text.replace("$", r"\$")[:40]


def _svg(draw: Callable[[Figure], None], size: tuple[float, float], salt: str) -> str:
    """Draw on a pyplot-free Figure (no global backend state, nothing to close) and return
    the inline <svg>: text as text (small, crisp, searchable), ids salted per plot
    so several SVGs in one page do not share clip-path ids."""
    rc = {"svg.fonttype": "none", "svg.hashsalt": salt, "font.size": 8}
    with matplotlib.rc_context(rc):
        fig = Figure(figsize=size, layout="constrained")
        draw(fig)
        buf = io.BytesIO()
        # No RDF metadata block (creator, date): smaller, and the page is reproducible.
        fig.savefig(buf, format="svg",
                    metadata=dict.fromkeys(("Date", "Format", "Type", "Creator")))
    text = buf.getvalue().decode("utf-8")
    return text[text.index("<svg"):]


def _per_video(evaluation: dict, name: str) -> list[float]:
    values = [_float((v.get("metrics") or {}).get(name)) for v in evaluation.get("videos") or []]
    return [v for v in values if v is not None]


def _distribution_plot(name: str, label: str, hib: Any,
                       series: list[tuple[str, str, list[float]]], salt: str) -> str:
    """Strip plot, one row per evaluation: with a few dozen videos the individual points say
    more than a histogram, and rows never hide each other."""
    def draw(fig: Figure) -> None:
        ax = fig.subplots()
        rng = np.random.default_rng(0)
        for k, (_, colour, values) in enumerate(series):
            ax.scatter(values, k + rng.uniform(-0.2, 0.2, len(values)), s=12, color=colour,
                       alpha=0.7, linewidths=0)
            if values:
                ax.plot([np.mean(values)] * 2, [k - 0.32, k + 0.32], color=colour, lw=2)
        ax.set_yticks(range(len(series)), [_mpl(s[0]) for s in series])
        ax.set_ylim(len(series) - 0.5, -0.5)
        ax.grid(axis="x", alpha=0.3)
        arrow = {True: " (↑ better)", False: " (↓ better)"}.get(hib, "") if isinstance(
            hib, bool) else ""
        ax.set_title(_mpl(label) + arrow, loc="left")

    return _svg(draw, (5.0, 0.7 + 0.35 * len(series)), salt)


def _adherence_plot(models: list[tuple[str, str, dict]], salt: str) -> str:
    """Bars per prompt group for each attribute, error bars the 95% CI: held-out and
    new-concept rates next to train rates show whether the model composes or memorises."""
    groups = ["overall"]
    for _, _, adherence in models:
        groups += [g for g in adherence.get("by_group") or {} if g not in groups]

    def rate(adherence: dict, group: str, attribute: str) -> Any:
        return (adherence.get(attribute) if group == "overall"
                else ((adherence.get("by_group") or {}).get(group) or {}).get(attribute))

    def draw(fig: Figure) -> None:
        axes = fig.subplots(1, len(ATTRIBUTES), sharey=True)
        width = 0.8 / len(models)
        for ax, attribute in zip(axes, ATTRIBUTES, strict=True):
            for m, (_, colour, adherence) in enumerate(models):
                for g, group in enumerate(groups):
                    ci = rate(adherence, group, attribute)
                    mean = _float(_mean(ci))
                    if mean is None:
                        continue
                    lo, hi = _float(ci.get("ci_low")), _float(ci.get("ci_high"))
                    err = ([[max(mean - lo, 0)], [max(hi - mean, 0)]]
                           if lo is not None and hi is not None else None)
                    ax.bar(g - 0.4 + width * (m + 0.5), mean, width, yerr=err, capsize=2,
                           color=colour)
            ax.set_xticks(range(len(groups)), [GROUP_LABELS.get(g, g) for g in groups],
                          rotation=20)
            ax.set_ylim(0, 1.05)
            ax.set_title(attribute)
            ax.grid(axis="y", alpha=0.3)
        axes[0].set_ylabel("adherence rate")
        fig.legend(handles=[Patch(color=colour, label=_mpl(label)) for label, colour, _ in models],
                   loc="outside right upper", fontsize=7)

    return _svg(draw, (8.5, 2.6), salt)


def _plots(metrics: dict, comparisons: dict[str, dict], info: dict[str, dict]) -> str:
    evaluations = [(CANDIDATE, metrics), *comparisons.items()]
    colours = {label: PALETTE[i % len(PALETTE)] for i, (label, _) in enumerate(evaluations)}
    svgs = []
    for name in _video_metric_names(metrics):
        series = [(label, colours[label], _per_video(e, name)) for label, e in evaluations]
        series = [s for s in series if s[2] or s[0] == CANDIDATE]
        if any(s[2] for s in series):
            svgs.append(_distribution_plot(name, _label(info, name),
                                           info.get(name, {}).get("higher_is_better"), series,
                                           f"vidops-report-{len(svgs)}"))
    models = [(label, colours[label], e["adherence"]) for label, e in evaluations
              if _available(e.get("adherence"))]
    if models:
        svgs.append(_adherence_plot(models, f"vidops-report-{len(svgs)}"))
    body = "".join(f"<div>{svg}</div>" for svg in svgs) or '<p class="na">nothing to plot</p>'
    return f"<h2>Plots</h2><div class=\"plots\">{body}</div>"


def _fit(frame: np.ndarray) -> np.ndarray:
    """Nearest-neighbour upscale of tiny frames (keeps the pixels a shapes model draws
    honest), bilinear downscale of large ones."""
    h, w = frame.shape[:2]
    if min(h, w) < MIN_SHORT_SIDE:
        k = math.ceil(MIN_SHORT_SIDE / min(h, w))
        return frame.repeat(k, axis=0).repeat(k, axis=1)
    if max(h, w) > MAX_LONG_SIDE:
        scale = MAX_LONG_SIDE / max(h, w)
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        return np.asarray(Image.fromarray(frame).resize(size, Image.Resampling.BILINEAR))
    return frame


def _spaced(count: int, limit: int) -> np.ndarray:
    return np.unique(np.linspace(0, count - 1, min(count, limit)).round().astype(int))


def _previews(path: Path, fps: float) -> tuple[bytes, bytes]:
    """(animated GIF, PNG strip of up to 8 evenly spaced frames) of one video."""
    frames = [_fit(frame) for frame in read_frames(path)]
    if not frames:
        raise ValueError("no frames")
    pick = _spaced(len(frames), PREVIEW_FRAMES)
    images = [Image.fromarray(frames[i]) for i in pick]
    gif = io.BytesIO()
    # Dropped frames stretch the others: the preview keeps the video's duration.
    images[0].save(gif, format="GIF", save_all=True, append_images=images[1:], loop=0,
                   duration=round(1000 / fps * len(frames) / len(pick)))
    h = frames[0].shape[0]
    gap = np.full((h, 2, 3), 255, np.uint8)
    tiles = [part for i in _spaced(len(frames), STRIP_FRAMES) for part in (frames[i], gap)]
    png = io.BytesIO()
    Image.fromarray(np.concatenate(tiles[:-1], axis=1)).save(png, format="PNG", optimize=True)
    return gif.getvalue(), png.getvalue()


def _img(data: bytes, kind: str, alt: str) -> str:
    return (f'<img src="data:image/{kind};base64,{base64.b64encode(data).decode("ascii")}" '
            f'alt="{_e(alt)}">')


def _sample(out_dir: Path, video: dict, fps: float, info: dict[str, dict]) -> str:
    file = video.get("file")
    try:
        if not file or not (out_dir / file).is_file():
            raise FileNotFoundError
        gif, png = _previews(out_dir / file, fps)
        media = _img(gif, "gif", "preview") + _img(png, "png", "frames")
    except FileNotFoundError:
        media = f'<p class="missing">video missing: {_e(file)}</p>'
    except Exception as error:  # any decode failure is a note in the report, never a crash
        media = (f'<p class="missing">video missing: {_e(file)} '
                 f"(unreadable: {_e(type(error).__name__)}: {_e(error)})</p>")
    adherence = video.get("adherence")
    if isinstance(adherence, dict):
        read = adherence.get("read") or {}
        marks = {True: '<span class="good">✓</span>', False: '<span class="bad">✗</span>'}
        adh = " · ".join(f"{a} <b>{_e(read.get(a) or '—')}</b> {marks.get(adherence.get(a), '?')}"
                         for a in ATTRIBUTES)
    else:
        adh = '<span class="na">n/a</span>'
    values = " · ".join(f"{_e(_label(info, k))} {_num(v)}"
                        for k, v in (video.get("metrics") or {}).items())
    return (f'<div class="card">{media}<div class="info">seed <b>{_e(video.get("seed"))}</b>'
            f" · #{_e(video.get('index'))} · <code>{_e(file)}</code><br>read from pixels: {adh}"
            f"<br>CLIP score {_num(video.get('clip_score'))}<br>{values}</div></div>")


def _samples(out_dir: Path, metrics: dict, info: dict[str, dict]) -> str:
    fps = _float((metrics.get("settings") or {}).get("fps"))
    fps = fps if fps and fps > 0 else 8.0
    by_prompt: dict[str, list[dict]] = {}
    for video in metrics.get("videos") or []:
        by_prompt.setdefault(str(video.get("prompt", "")), []).append(video)
    out = ["<h2>Samples</h2>"]
    for prompt, videos in by_prompt.items():
        group = str(videos[0].get("group") or "")
        held = " held" if group in ("held_out", "new_concept") else ""
        out.append(f'<h3 class="prompt">{_e(prompt)}<span class="badge{held}">'
                   f"{_e(GROUP_LABELS.get(group, group) or 'ungrouped')}</span></h3>")
        out += [_sample(out_dir, video, fps, info) for video in videos]
    return "".join(out)


def write_report(out_dir: Path, metrics: dict, comparisons: dict[str, dict] | None = None
                 ) -> Path:
    """Write out_dir/report.html for the evaluation `metrics` (out_dir/metrics.json; video
    files relative to out_dir) and return its path. `comparisons` maps a label to another
    evaluation's metrics (same schema; its video files need not exist). Everything is
    inlined, so the file reads offline; missing values render as n/a, missing videos as a
    note, so a partial evaluation still gets its report."""
    out_dir = Path(out_dir)
    comparisons = {str(k): v for k, v in (comparisons or {}).items() if isinstance(v, dict)}
    info = _info(metrics, comparisons)
    name = (metrics.get("model") or {}).get("name") or "model"
    page = ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>vidops evaluation: {_e(name)}</title><style>{CSS}</style></head><body>"
            + _header(metrics) + _headline(metrics, comparisons, info)
            + _metric_table(metrics, comparisons, info) + _adherence_section(metrics, comparisons)
            + _plots(metrics, comparisons, info) + _samples(out_dir, metrics, info)
            + "</body></html>\n")
    path = out_dir / "report.html"
    tmp = path.with_name(f".partial-{path.name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
