"""A self-contained `lineage.html`: the content of lineage.json laid out for an auditor.

lineage.json answers "what exactly did this model learn from, and may we use it?", but a
JSON file is hard to read and a dashboard link goes stale. This page is one file with
everything inlined (CSS, a hand-written SVG chart, a few lines of JavaScript for the clip
search) so it can travel with the model and be opened offline years later; with JavaScript
off it still shows every row. Every string is escaped (captions and URIs come from the
outside world) and absent values render as "—", so a partial lineage still gets its page.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Iterable, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

NA = "—"
SHORT = 16  # hex digits shown of a digest; the full value sits in the title attribute
KEPT_COLOUR, REJECTED_COLOUR = "#2da44e", "#cf222e"

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1300px;
 padding:0 1em;color:#1f2328}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #d0d7de;padding-bottom:.2em;margin-top:1.6em}
.meta{color:#57606a;margin:.2em 0}code{font-size:.9em}
table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #d0d7de;padding:.25em .6em;text-align:left;vertical-align:top}
th{background:#f6f8fa}td.num{text-align:right;font-variant-numeric:tabular-nums}
.na{color:#8c959f}.good{color:#1a7f37;font-weight:600}.bad{color:#cf222e;font-weight:600}
.box{border-radius:6px;padding:.6em 1em;margin:.6em 0;border:1px solid}
.box.ok{background:#dafbe1;border-color:#1a7f37}.box.warn{background:#fff8c5;border-color:#9a6700}
.box.err{background:#ffebe9;border-color:#cf222e}
.used{color:#1a7f37;font-weight:600}.rejected{color:#cf222e;font-weight:600}
.not_used{color:#8c959f;font-weight:600}
.badge{font-size:.75em;padding:.1em .5em;border-radius:1em;background:#eaeef2;margin-left:.4em;
 white-space:nowrap}.badge.held{background:#fff1c2}
.caption{max-width:30em}svg{max-width:100%;height:auto}
#clip-search{padding:.3em .5em;width:24em;max-width:100%}
"""

# Filters the clip table by any text in a row; the box stays hidden without JavaScript.
SCRIPT = """
(function(){
 var box=document.getElementById("clip-search"),count=document.getElementById("clip-count");
 var rows=document.querySelectorAll("#clips tbody tr"),total=rows.length;
 box.hidden=false;
 box.addEventListener("input",function(){
  var q=box.value.toLowerCase(),shown=0;
  rows.forEach(function(r){var hit=r.textContent.toLowerCase().indexOf(q)>=0;
   r.style.display=hit?"":"none";if(hit)shown++;});
  count.textContent=(q?shown+" of ":"")+total+" clips";
 });
})();
"""


def _e(value: Any) -> str:
    """Escaped text; None and empty strings become "—" so a gap is visible, not blank."""
    return NA if value is None or value == "" else html.escape(str(value))


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, Real):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _num(value: Any, fmt: str = ".3g") -> str:
    x = _float(value)
    return NA if x is None else format(x, fmt)


def _count(value: Any) -> int:
    """A non-negative int for arithmetic (chart widths); anything else counts as 0."""
    x = _float(value)
    return max(int(x), 0) if x is not None else 0


def _short(digest: Any, n: int = SHORT) -> str:
    """The first n characters (after any `sha256:` style prefix) in <code>, the full digest
    as a tooltip: tables stay narrow, nothing is lost."""
    if digest is None or digest == "":
        return NA
    text = str(digest)
    algo, sep, rest = text.partition(":")
    shown = rest if sep and algo.isalnum() and len(algo) <= 8 else text
    return f'<code title="{html.escape(text)}">{html.escape(shown[:n])}</code>'


def _size(value: Any) -> str:
    x = _float(value)
    if x is None:
        return NA
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(x) < 1024 or unit == "GiB":
            return f"{x:.0f} {unit}" if unit == "B" else f"{x:.1f} {unit}"
        x /= 1024
    return NA  # unreachable


def _list(values: Any) -> str:
    items = [v for v in values or [] if v is not None and v != ""]
    return ", ".join(html.escape(str(v)) for v in items) if items else NA


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], numeric: Iterable[int] = (),
           empty: str = "none", attrs: str = "") -> str:
    """A table of already-escaped cells; `numeric` column indices are right-aligned."""
    numeric = set(numeric)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                         for i, c in enumerate(row)) + "</tr>" for row in rows)
    if not body:
        return f'<p class="na">{html.escape(empty)}</p>'
    return (f"<table{attrs}><thead><tr>" + "".join(f"<th>{h}</th>" for h in head)
            + f"</tr></thead><tbody>{body}</tbody></table>")


def _folded(label: str, items: dict | None) -> str:
    """key=value pairs folded away behind their count: long (tags, params), rarely read."""
    if not items:
        return ""
    rows = "<br>".join(f"<code>{html.escape(str(k))}={html.escape(str(v))}</code>"
                       for k, v in items.items())
    return f"<details><summary>{label} ({len(items)})</summary>{rows}</details>"


def _header(lineage: dict) -> str:
    model = lineage.get("model") or {}
    reg = model.get("registered")
    if isinstance(reg, dict):
        tags = _folded("tags", reg.get("tags"))
        registered = (f"registered <b>{_e(reg.get('name'))}</b> version <b>{_e(reg.get('version'))}"
                      f"</b> · aliases {_list(reg.get('aliases'))} · MLflow run "
                      f"<code>{_e(reg.get('run_id'))}</code>" + (f" · {tags}" if tags else ""))
    else:
        registered = '<span class="na">not registered</span>'
    return (f"<h1>Lineage: {_e(model.get('name') or 'model')}"
            f'<span class="badge">{_e(model.get("kind"))}</span></h1>'
            f'<p class="meta">ref <code>{_e(model.get("ref"))}</code> · digest '
            f'{_short(model.get("digest"))} · path <code>{_e(model.get("path"))}</code></p>'
            f'<p class="meta">{registered}</p>'
            f'<p class="meta">created {_e(lineage.get("created_at"))} · code '
            f'<code>{_e(lineage.get("code_version"))}</code> · lineage format '
            f'{_e(lineage.get("format"))}</p>')


def _summary(lineage: dict) -> str:
    acc = lineage.get("accounting") or {}
    lic = lineage.get("licenses") or {}
    if acc.get("complete") is True:
        status = '<div class="box ok">Every source is accounted for.</div>'
    else:
        status = ('<div class="box warn"><b>Accounting incomplete:</b> not every ingested source '
                  "is accounted for as used, rejected or not used"
                  + ("" if acc else " (no accounting recorded)") + ".</div>")
    missing = lic.get("sources_without_license")
    lic_cls = "bad" if _count(missing) > 0 else ""
    return ("<h2>Summary</h2>" + _table(
        ("sources", "used", "rejected", "not used", "licenses seen", "sources without license"),
        [(_e(acc.get("sources")), f'<span class="used">{_e(acc.get("used"))}</span>',
          f'<span class="rejected">{_e(acc.get("rejected"))}</span>',
          _e(acc.get("not_used")), _list(lic.get("seen")),
          f'<span class="{lic_cls}">{_e(missing)}</span>')], numeric=(0, 1, 2, 3, 5))
        + status)


def _verification(lineage: dict) -> str:
    ver = lineage.get("verification")
    if not isinstance(ver, dict):
        return '<h2>Verification</h2><p class="na">not verified</p>'
    mismatches = [m for m in ver.get("mismatches") or [] if isinstance(m, dict)]
    if not mismatches:
        return (f'<h2>Verification</h2><div class="box ok">All {_e(ver.get("checked"))} checked '
                "objects match.</div>")
    return (f'<h2>Verification</h2><div class="box err"><b>{len(mismatches)} of '
            f'{_e(ver.get("checked"))} checked objects do not match.</b></div>'
            + _table(("what", "path", "expected", "found"),
                     [(_e(m.get("what")), f"<code>{_e(m.get('path'))}</code>",
                       _short(m.get("expected"), 24), _short(m.get("found"), 24))
                      for m in mismatches]))


def _training(lineage: dict) -> str:
    rows = [(_e(r.get("stage")), f"<code>{_e(r.get('mlflow_run_id'))}</code>", _e(r.get("status")),
             _e(r.get("start_time")), f"<code>{_e(r.get('code_version'))}</code>",
             _folded("params", r.get("params")) or NA,
             f"<code>{_e(r.get('model_dir'))}</code>")
            for r in lineage.get("training_runs") or [] if isinstance(r, dict)]
    return "<h2>Training runs</h2>" + _table(
        ("stage", "MLflow run", "status", "started", "code", "params", "model dir"), rows,
        empty="no training runs recorded")


def _validation(v: Any) -> str:
    if not isinstance(v, dict):
        return NA
    mark = ('<span class="good">✓</span>' if v.get("success") is True
            else '<span class="bad">✗</span>' if v.get("success") is False else "?")
    failed = [f for f in v.get("failed") or [] if f]
    return (f"{mark} {_e(v.get('suite'))} <span class=\"na\">{_e(v.get('successful'))}/"
            f"{_e(v.get('evaluated'))}</span>"
            + (f'<br><span class="bad">failed: {_list(failed)}</span>' if failed else ""))


def _datasets(lineage: dict) -> str:
    rows = []
    for d in lineage.get("datasets") or []:
        if not isinstance(d, dict):
            continue
        c = d.get("counts") or {}
        reasons = ", ".join(f"{html.escape(str(k))} {_e(v)}"
                            for k, v in (c.get("by_reason") or {}).items())
        rows.append((_e(d.get("name")), _e(d.get("stage")), _e(d.get("role")),
                     _short(d.get("dvc_md5"), 32), _e(d.get("nfiles")),
                     _short(d.get("manifest_sha256")), _validation(d.get("validation")),
                     _e(c.get("input")), _e(c.get("kept")),
                     _e(c.get("rejected")) + (f' <span class="na">({reasons})</span>'
                                              if reasons else ""),
                     f"<code>{_e(d.get('mlflow_run_id'))}</code>", _e(d.get("finished_at"))))
    return "<h2>Datasets</h2>" + _table(
        ("name", "stage", "role", "DVC md5", "files", "manifest sha256", "validation (GX)",
         "in", "kept", "rejected", "MLflow run", "finished"), rows, numeric=(4, 7, 8, 9),
        empty="no datasets recorded")


def _funnel_svg(funnel: list[dict]) -> str:
    """Horizontal stacked bars, kept then rejected, on one scale for all rows, so a stage
    that drops much of its input stands out. Hand-written: tiny, crisp, no plotting stack."""
    label_w, bar_w, text_w, row_h, top = 240, 460, 230, 26, 30
    scale = max([max(_count(r.get("input")), _count(r.get("kept")) + _count(r.get("rejected")))
                 for r in funnel] + [1])
    width, height = label_w + bar_w + text_w, top + row_h * len(funnel) + 6
    parts = [f'<svg viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
             'role="img" aria-label="per-stage funnel" font-family="system-ui,sans-serif" '
             'font-size="12">',
             f'<rect x="{label_w}" y="6" width="12" height="12" fill="{KEPT_COLOUR}"/>'
             f'<text x="{label_w + 16}" y="16">kept</text>'
             f'<rect x="{label_w + 60}" y="6" width="12" height="12" fill="{REJECTED_COLOUR}"/>'
             f'<text x="{label_w + 76}" y="16">rejected</text>']
    for i, r in enumerate(funnel):
        y = top + i * row_h
        label = f"{r.get('stage') or NA} ({r.get('dataset') or NA})"
        shown = label if len(label) <= 36 else label[:35] + "…"
        kept, rejected = _count(r.get("kept")), _count(r.get("rejected"))
        kw, rw = bar_w * kept / scale, bar_w * rejected / scale
        numbers = (f"{_e(r.get('kept'))} kept · {_e(r.get('rejected'))} rejected / "
                   f"{_e(r.get('input'))} in")
        parts.append(
            f"<g><title>{html.escape(label)}: {numbers}</title>"
            f'<text x="{label_w - 8}" y="{y + 14}" text-anchor="end">{html.escape(shown)}</text>'
            f'<rect x="{label_w}" y="{y}" width="{kw:.1f}" height="18" fill="{KEPT_COLOUR}"/>'
            f'<rect x="{label_w + kw:.1f}" y="{y}" width="{rw:.1f}" height="18" '
            f'fill="{REJECTED_COLOUR}"/>'
            f'<text x="{label_w + kw + rw + 6:.1f}" y="{y + 14}">{numbers}</text></g>')
    return "".join(parts) + "</svg>"


def _funnel(lineage: dict) -> str:
    funnel = [r for r in lineage.get("funnel") or [] if isinstance(r, dict)]
    body = _funnel_svg(funnel) if funnel else '<p class="na">no funnel recorded</p>'
    return f"<h2>Per-stage funnel</h2>{body}"


def _sources(lineage: dict) -> str:
    rows = []
    for s in lineage.get("sources") or []:
        if not isinstance(s, dict):
            continue
        status = str(s.get("status") or "")
        cls = status if status in ("used", "rejected", "not_used") else "na"
        why = " · ".join(_e(x) for x in (s.get("stage"), s.get("reason"), s.get("detail"))
                         if x not in (None, ""))
        rows.append((_short(s.get("source_sha256")), _e(s.get("source_uri")),
                     _e(s.get("license")), _size(s.get("size_bytes")), _e(s.get("ingested_at")),
                     f'<span class="{cls}">{_e(status.replace("_", " "))}</span>', why or NA,
                     _e(s.get("clips"))))
    return "<h2>Sources</h2>" + _table(
        ("sha256", "URI", "license", "size", "ingested", "status", "stage · reason · detail",
         "clips"), rows, numeric=(3, 7), empty="no sources recorded")


def _rejected(lineage: dict) -> str:
    """Sorted by pipeline stage (funnel order first), so each stage's rejections sit together."""
    order: dict[str, int] = {}
    for r in lineage.get("funnel") or []:
        if isinstance(r, dict):
            order.setdefault(str(r.get("stage")), len(order))
    items = [r for r in lineage.get("rejected") or [] if isinstance(r, dict)]
    items.sort(key=lambda r: (order.get(str(r.get("stage")), len(order)), str(r.get("stage")),
                              str(r.get("dataset")), str(r.get("id"))))
    rows = [(_e(r.get("stage")), _e(r.get("dataset")), f"<code>{_e(r.get('id'))}</code>",
             _e(r.get("source_uri")), _short(r.get("source_sha256")),
             f'<span class="rejected">{_e(r.get("reason"))}</span>', _e(r.get("detail")))
            for r in items]
    return f"<h2>Rejected inputs ({len(rows)})</h2>" + _table(
        ("stage", "dataset", "id", "source URI", "source sha256", "reason", "detail"), rows,
        empty="nothing rejected")


def _clips(lineage: dict) -> str:
    clips = [c for c in lineage.get("clips") or [] if isinstance(c, dict)]
    held = sum(c.get("held_out") is True for c in clips)
    rows = []
    for c in clips:
        faces = _e(c.get("face_count"))
        if c.get("faces_blurred") is not None:
            faces += " (blurred)" if c.get("faces_blurred") else " (not blurred)"
        sha = c.get("source_sha256")
        rows.append((
            f"<code>{_e(c.get('clip_id'))}</code>"
            + ('<span class="badge held">held out</span>' if c.get("held_out") is True else ""),
            # The full sha is otherwise only in a title attribute, which the search misses.
            _short(sha) + (f"<span hidden>{html.escape(str(sha))}</span>" if sha else ""),
            _e(c.get("dataset")), f"{_e(c.get('start_frame'))}–{_e(c.get('end_frame'))}",
            f"{_num(c.get('start_s'), '.2f')}–{_num(c.get('end_s'), '.2f')}",
            _num(c.get("sharpness")), _num(c.get("motion")), faces,
            f'<div class="caption">{_e(c.get("caption"))}</div>', _e(c.get("caption_origin"))))
    search = ('<p><input id="clip-search" type="search" hidden placeholder="filter clips: id, '
              'sha, caption…" aria-label="filter clips"></p>') if rows else ""
    return (f'<h2>Clips</h2><p class="meta"><span id="clip-count">{len(clips)} clips</span> · '
            f"{held} held out</p>{search}"
            + _table(("clip", "source sha256", "dataset", "frames", "seconds", "sharpness",
                      "motion", "faces", "caption", "caption origin"), rows,
                     numeric=(5, 6), empty="no clips recorded", attrs=' id="clips"')
            + (f"<script>{SCRIPT}</script>" if rows else ""))


def render_lineage_html(lineage: dict) -> str:
    """The page as a string (for tests and for callers that attach it elsewhere)."""
    name = (lineage.get("model") or {}).get("name") or "model"
    return ('<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
            f"<title>vidops lineage: {_e(name)}</title><style>{CSS}</style></head><body>"
            + _header(lineage) + _summary(lineage) + _verification(lineage)
            + _training(lineage) + _datasets(lineage) + _funnel(lineage) + _sources(lineage)
            + _rejected(lineage) + _clips(lineage) + "</body></html>\n")


def write_lineage_html(out: Path, lineage: dict) -> Path:
    """Write the lineage page to `out` and return it. Written to a temp file in the same
    folder and renamed, so a reader never sees half a page and an old page survives a crash."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".partial-{os.getpid()}-{out.name}")
    try:
        tmp.write_text(render_lineage_html(lineage), encoding="utf-8")
        tmp.replace(out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out
