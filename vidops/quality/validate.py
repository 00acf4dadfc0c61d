"""Validate a stage's manifest against its suite: validation.json and Data Docs, offline.

GX keeps its configuration, results and docs in a project directory. A stage output must be
self-contained and reproducible, so each call builds a throwaway file-mode project in a
temporary directory, runs one Checkpoint there (which renders the docs), copies the rendered
site into the stage output and deletes the project. Creating that project costs tens of
milliseconds; importing GX (seconds, once per process) dominates and is not repeated.
"""

from __future__ import annotations

import html
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from vidops.config import Config
from vidops.quality.suites import build_suite, import_gx, suite_name

if TYPE_CHECKING:
    from great_expectations.core import ExpectationSuiteValidationResult
    from great_expectations.core.expectation_validation_result import (
        ExpectationValidationResult,
    )

log = logging.getLogger(__name__)

VALIDATION_JSON = "validation.json"
DATA_DOCS = "data_docs"
# How many offending values a failure message quotes: enough to recognise, short enough to log.
EXAMPLES = 5

# GX registers the active project in a process-wide singleton; two validations in threads of
# one process must not interleave their projects.
_LOCK = threading.Lock()
_REMOTE_ASSET = re.compile(r"https://great-expectations-web-assets\.s3\.[a-z0-9-]+\.amazonaws\.com/"
                           r"([\w.-]+)(\?[^\"' )]*)?")


@dataclass(frozen=True)
class ValidationReport:
    """The outcome of one manifest validation, small enough for stage.json and MLflow."""

    stage: str
    success: bool
    evaluated: int
    successful: int
    failed: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "success": self.success, "evaluated": self.evaluated,
                "successful": self.successful, "failed": list(self.failed)}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _condition_text(condition: Any) -> str:
    """GX stores a row condition as a dict; its Condition object prints as `height > 128`."""
    from great_expectations.expectations.row_conditions import deserialize_row_condition

    try:
        return repr(deserialize_row_condition(condition))
    except (TypeError, ValueError):
        return repr(condition)


def _exception_message(result: ExpectationValidationResult) -> str | None:
    """GX reports a failed metric as a dict of metric id -> exception info, or flat."""
    info = result.exception_info or {}
    if info.get("raised_exception"):
        return str(info.get("exception_message"))
    for value in info.values():
        if isinstance(value, dict) and value.get("raised_exception"):
            return str(value.get("exception_message"))
    return None


def describe_failure(result: ExpectationValidationResult) -> str:
    """One line a person can act on: which expectation, on what, and what was found."""
    config = result.expectation_config
    kwargs = config.kwargs if config is not None else {}
    label = config.type if config is not None else "expectation"
    columns = [kwargs[k] for k in ("column", "column_A", "column_B") if k in kwargs]
    if "column_list" in kwargs:
        columns += list(kwargs["column_list"])
    if columns:
        label += f"({', '.join(str(c) for c in columns)})"
    if kwargs.get("row_condition"):
        label += f" where {_condition_text(kwargs['row_condition'])}"

    message = _exception_message(result)
    if message is not None:
        return f"{label}: error: {message}"
    found = result.result or {}
    if "unexpected_count" in found:
        examples = list(found.get("partial_unexpected_list") or [])[:EXAMPLES]
        return f"{label}: {found['unexpected_count']} unexpected, e.g. {_short(examples)}"
    mismatched = (found.get("details") or {}).get("mismatched")
    if mismatched and mismatched.get("missing"):
        return f"{label}: missing {_short(sorted(mismatched['missing']))}"
    if "observed_value" in found:
        wanted = ", ".join(f"{k}={kwargs[k]!r}" for k in ("value", "min_value", "max_value")
                           if kwargs.get(k) is not None)
        return f"{label}: observed {_short(found['observed_value'])}" + (
            f", expected {wanted}" if wanted else "")
    return f"{label}: failed"


def _failures(suite_order: list[str], result: ExpectationSuiteValidationResult) -> list[str]:
    """Failures in suite order (GX evaluates and reports in its own order)."""
    rank = {expectation_id: i for i, expectation_id in enumerate(suite_order)}
    failed = [r for r in result.results if not r.success]
    failed.sort(key=lambda r: rank.get(getattr(r.expectation_config, "id", None) or "",
                                       len(rank)))
    return [describe_failure(r) for r in failed]


def _docs_site(context: Any, project_root: Path) -> Path:
    for site in context.get_docs_sites_urls(site_name="local_site"):
        url = site.get("site_url") or ""
        if url.startswith("file://"):
            return Path(url[len("file://"):]).parent
    return project_root / "gx" / "uncommitted" / "data_docs" / "local_site"


def _summary_html(report: ValidationReport, suite: str, docs: Path) -> str:
    """A static block for the top of index.html.

    GX fills its index table with jQuery and bootstrap-table loaded from CDNs, so offline (a
    cluster, a laptop on a plane) the index is empty. Plain HTML with links to the rendered
    pages keeps the docs usable without the network.
    """
    links = []
    for page in sorted(docs.glob("validations/**/*.html")) + sorted(
            docs.glob("expectations/*.html")):
        rel = page.relative_to(docs).as_posix()
        kind = "validation result" if rel.startswith("validations/") else "expectation suite"
        links.append(f'<li><a href="{html.escape(rel)}">{kind}: {html.escape(rel)}</a></li>')
    failed = "".join(f"<li><code>{html.escape(line)}</code></li>" for line in report.failed)
    status = "passed" if report.success else "FAILED"
    colour = "#1a7f37" if report.success else "#cf222e"
    return (
        '<div id="vidops-validation-summary" style="margin:1em 2em;padding:1em;'
        f'border:2px solid {colour};font-family:sans-serif">'
        f"<h2>vidops {html.escape(report.stage)} manifest: suite "
        f'<code>{html.escape(suite)}</code> <span style="color:{colour}">{status}</span></h2>'
        f"<p>{report.successful} of {report.evaluated} expectations met.</p>"
        + (f"<p>Failed expectations:</p><ul>{failed}</ul>" if failed else "")
        + f"<ul>{''.join(links)}</ul></div>"
    )


def _inject_summary(index: Path, block: str) -> None:
    text = index.read_text(encoding="utf-8")
    match = re.search(r"<body[^>]*>", text)
    at = match.end() if match else 0
    index.write_text(text[:at] + "\n" + block + "\n" + text[at:], encoding="utf-8")


def _localise_site(docs: Path) -> None:
    """Make the copied site self-contained and small.

    GX pages load their logo from GX's S3 bucket with the project id in the query string; the
    same image ships in static/images, so pages point there instead. The static folder also
    carries ~3 MB of animated GIFs that no generated page uses; stage outputs are versioned
    with DVC for every run, so unreferenced images are dropped.
    """
    images = docs / "static" / "images"
    pages = sorted(docs.rglob("*.html"))
    for page in pages:
        text = page.read_text(encoding="utf-8")
        prefix = os.path.relpath(images, page.parent).replace(os.sep, "/")

        def local(match: re.Match[str], prefix: str = prefix) -> str:
            name = match.group(1)
            return f"{prefix}/{name}" if (images / name).is_file() else match.group(0)

        page.write_text(_REMOTE_ASSET.sub(local, text), encoding="utf-8")
    texts = [p.read_text(encoding="utf-8") for p in [*pages, *docs.rglob("*.css")]]
    for image in images.glob("*") if images.is_dir() else []:
        if not any(image.name in text for text in texts):
            image.unlink()


def _jsonable(value: Any) -> Any:
    """Round-trip through JSON so numpy scalars and the like in GX's dicts cannot break it."""
    return json.loads(json.dumps(value, default=str))


def validate_manifest(stage: str, manifest: pd.DataFrame, cfg: Config, out_dir: Path,
                      counts: dict[str, Any] | None = None) -> ValidationReport:
    """Validate `manifest` with the suite of `stage`; write out_dir/validation.json and
    out_dir/data_docs/index.html. Never raises for bad data: the report says what failed.

    counts: the stage's accounting (stage.json's counts); when it has "kept", the manifest
    must have exactly that many rows.
    """
    started = time.perf_counter()
    expected = None if counts is None or counts.get("kept") is None else int(counts["kept"])
    suite = build_suite(stage, cfg, expected_rows=expected)  # ValueError for an unknown stage
    gx = import_gx()
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.core.run_identifier import RunIdentifier
    from great_expectations.data_context.types.base import ProgressBarsConfig

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = suite_name(stage)
    with _LOCK, tempfile.TemporaryDirectory(prefix="vidops-gx-") as tmp:
        context = gx.get_context(mode="file", project_root_dir=tmp)
        # tqdm bars per metric batch would flood stage logs.
        context.variables.progress_bars = ProgressBarsConfig(globally=False,
                                                             metric_calculations=False)
        context.enable_analytics(False)  # besides the environment variable; also saves the above
        asset = context.data_sources.add_pandas("vidops").add_dataframe_asset(
            name=f"{stage}-manifest")
        batch = asset.add_batch_definition_whole_dataframe("manifest")
        suite = context.suites.add(suite)
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=name, data=batch, suite=suite))
        checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=name, validation_definitions=[definition],
            actions=[UpdateDataDocsAction(name="update_data_docs")],
            result_format={"result_format": "SUMMARY"}))
        outcome = checkpoint.run(batch_parameters={"dataframe": manifest},
                                 run_id=RunIdentifier(run_name=name))
        result = next(iter(outcome.run_results.values()))

        statistics = dict(result.statistics)
        report = ValidationReport(
            stage=stage,
            success=bool(result.success),
            evaluated=int(statistics.get("evaluated_expectations", 0)),
            successful=int(statistics.get("successful_expectations", 0)),
            failed=_failures([e.id or "" for e in suite.expectations], result),
        )
        docs = out_dir / DATA_DOCS
        shutil.rmtree(docs, ignore_errors=True)
        shutil.copytree(_docs_site(context, Path(tmp)), docs)
        _localise_site(docs)
        _inject_summary(docs / "index.html", _summary_html(report, name, docs))
        full = result.to_json_dict()

    elapsed = time.perf_counter() - started
    document = {
        "stage": stage,
        "suite": name,
        "success": report.success,
        "statistics": statistics,
        "failed": report.failed,
        "counts": counts,
        "gx_version": gx.__version__,
        "duration_s": round(elapsed, 3),
        "data_docs": f"{DATA_DOCS}/index.html",
        "result": full,
    }
    (out_dir / VALIDATION_JSON).write_text(
        json.dumps(_jsonable(document), indent=2, sort_keys=False) + "\n", encoding="utf-8")
    log.info("%s: suite %s %s (%d/%d expectations) in %.2fs", stage, name,
             "passed" if report.success else "FAILED", report.successful, report.evaluated,
             elapsed)
    return report
