"""Audit: trace a model to the exact videos it learned from, and a video to every model.

Everything is read from the records, never from whatever the workdir holds now: the model
card names the dataset versions (DVC md5s) it learned from and the MLflow runs that made
them; each version's manifests come from the DVC remote by that md5 (a dataset version is a
`.dir` listing of content-addressed objects), each stage's stage.json and Great Expectations
summary from its MLflow run. Walking them gives, per source video, whether it reached the
training data, and if not, at which stage it was rejected and why.

    model_lineage(MODEL)      registry version -> training runs -> dataset versions ->
                              clips -> sources, rejections, GX results (+ verification)
    source_usage(SHA|URI)     every dataset version, clip and registered version with it
"""

from __future__ import annotations

import hashlib
import io
import json
import tempfile
from datetime import datetime, timezone
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import fsspec
import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from vidops.config import Config
from vidops.media.files import write_json_atomic
from vidops.stage import MANIFEST, REJECTED, STAGE_JSON, StageError
from vidops.tracking import mlflow_runs
from vidops.tracking.dvc import object_path, remote_url
from vidops.tracking.redact import redact_obj, redact_uri
from vidops.tracking.workdir import Workdir, code_version

LINEAGE_JSON, LINEAGE_HTML = "lineage.json", "lineage.html"
_CLIP_FIELDS = ("clip_id", "source_sha256", "start_frame", "end_frame", "start_s", "end_s",
                "sharpness", "motion", "caption", "caption_origin", "face_count",
                "faces_blurred")


class AuditError(StageError):
    """A record the audit needs is missing (exit 2); a mismatch is a finding, not this."""


class DvcRemote:
    """Read-only access to a DVC remote's content-addressed objects (local path or any
    fsspec URL)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)

    def _path(self, md5: str) -> str:
        return object_path(self.root, md5)

    def read(self, md5: str) -> bytes:
        try:
            with self.fs.open(self._path(md5), "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            raise AuditError(f"object {md5} is not on the DVC remote {self.url}") from None

    def files(self, dir_md5: str) -> dict[str, str]:
        """relpath -> md5 of every file of a dataset version."""
        return {e["relpath"]: e["md5"] for e in json.loads(self.read(dir_md5))}

    def table(self, dir_md5: str, relpath: str) -> pd.DataFrame:
        files = self.files(dir_md5)
        if relpath not in files:
            return pd.DataFrame()
        return pd.read_parquet(io.BytesIO(self.read(files[relpath])))

    def mismatches(self, dir_md5: str) -> list[dict[str, str]]:
        """Objects of a version whose bytes no longer hash to their address (and sources
        under media/ whose sha256 no longer matches their name)."""
        found = []

        def check(md5: str, label: str) -> bytes | None:
            try:
                data = self.read(md5)
            except AuditError:
                found.append({"what": "missing DVC object", "path": label, "expected": md5,
                              "found": "missing"})
                return None
            actual = hashlib.md5(data).hexdigest()
            if actual != md5.removesuffix(".dir"):
                found.append({"what": "DVC object changed", "path": label,
                              "expected": md5, "found": actual})
            return data

        listing = check(dir_md5, f"{dir_md5} (listing)")
        if listing is None:
            return found
        for entry in json.loads(listing):
            data = check(entry["md5"], entry["relpath"])
            stem = Path(entry["relpath"]).stem
            if data is not None and entry["relpath"].startswith("media/") and len(stem) == 64:
                actual = hashlib.sha256(data).hexdigest()
                if actual != stem:
                    found.append({"what": "source copy changed", "path": entry["relpath"],
                                  "expected": stem, "found": actual})
        return found


# ---------------------------------------------------------------------------------------------
# Records: MLflow runs and the registry


@cache
def _run_artifact_json(run_id: str, name: str) -> dict[str, Any] | None:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=name,
                                                       dst_path=tmp)
        except (MlflowException, OSError):
            return None
        return json.loads(Path(path).read_text(encoding="utf-8"))


def _stage_record(dataset: dict[str, Any]) -> dict[str, Any]:
    """A dataset version's stage.json as its MLflow run recorded it (the workdir's copy when
    the run's artifacts are gone and the copy still has the same version)."""
    found = _run_artifact_json(dataset["mlflow_run_id"], STAGE_JSON)
    if found is None:
        local = Path(dataset["dir"]) / STAGE_JSON
        if local.is_file():
            candidate = json.loads(local.read_text(encoding="utf-8"))
            if candidate["dvc"]["md5"] == dataset["dvc_md5"]:
                found = candidate
    if found is None:
        raise AuditError(f"no record of dataset {dataset['dvc_md5']}: its MLflow run "
                         f"{dataset['mlflow_run_id']} has no {STAGE_JSON}")
    return found


def _registered(client: MlflowClient, ref: str, identity: str, name: str
                ) -> dict[str, Any] | None:
    version = None
    if ref.startswith("models:/"):
        target = ref.removeprefix("models:/")
        if "@" in target:
            model_name, alias = target.split("@", 1)
            version = client.get_model_version_by_alias(model_name, alias)
        else:
            model_name, number = target.rsplit("/", 1)
            version = client.get_model_version(model_name, number)
    else:  # a folder: the newest version registered from these very weights
        try:
            versions = client.search_model_versions(f"name='{name}'")
        except MlflowException:
            versions = []
        same = [v for v in versions if v.tags.get("vidops.model_digest") == identity]
        # Search results leave aliases out: read the version itself.
        version = (client.get_model_version(name, max(int(v.version) for v in same))
                   if same else None)
    if version is None:
        return None
    return {"name": version.name, "version": str(version.version),
            "aliases": sorted(version.aliases), "run_id": version.run_id,
            "tags": dict(version.tags)}


def _training_run(client: MlflowClient, card: dict[str, Any], model_dir: Path
                  ) -> dict[str, Any] | None:
    run_id = card.get("mlflow_run_id")
    if not run_id:
        return None
    run = client.get_run(run_id)
    keep = ("train.", "finetune.", "models.", "encode.", "seed")
    return {"stage": card.get("kind"), "mlflow_run_id": run_id, "status": run.info.status,
            "start_time": datetime.fromtimestamp(run.info.start_time / 1000, timezone.utc
                                                 ).isoformat(),
            "code_version": run.data.tags.get("vidops.code_version", card.get("code_version")),
            "params": {k: v for k, v in sorted(run.data.params.items()) if k.startswith(keep)},
            "model_dir": str(model_dir)}


# ---------------------------------------------------------------------------------------------
# Model -> sources


def model_lineage(model_ref: str | Path, *, cfg: Config, workdir: Workdir,
                  verify: bool = False) -> dict[str, Any]:
    """The complete lineage of MODEL (schema: README, "Lineage")."""
    from vidops.models.folder import base_folder, model_identity, read_card
    from vidops.models.imported import resolve_model_ref

    mlflow_runs.configure(cfg, workdir)
    client = MlflowClient()
    model_dir = resolve_model_ref(model_ref, cfg=cfg, workdir=workdir)
    card = read_card(model_dir)
    identity = model_identity(model_dir)
    base_dir = base_folder(model_dir, workdir.downloads)
    cards = [("model", card, model_dir)]
    if base_dir is not None:
        cards.append(("base", read_card(base_dir), base_dir))
    if not any(c.get("data") for _, c, _ in cards):
        raise AuditError(f"{model_ref} was trained outside vidops: no data lineage recorded")

    remote = DvcRemote(remote_url(workdir, cfg.dvc.remote))
    datasets, tables = [], {}
    for role, c, _ in cards:
        for entry in (c.get("data") or {}).get("datasets", []):
            record = _stage_record(entry)
            md5 = entry["dvc_md5"]
            tables[md5] = (remote.table(md5, MANIFEST), remote.table(md5, REJECTED))
            datasets.append({
                "name": Path(entry["dir"]).name, "stage": record["stage"], "role": role,
                "dvc_md5": md5, "remote": record["dvc"]["remote"],
                "nfiles": record["dvc"]["nfiles"],
                "manifest_sha256": entry.get("manifest_sha256"),
                "validation": record.get("validation"), "counts": record["counts"],
                "mlflow_run_id": entry["mlflow_run_id"],
                "finished_at": record["finished_at"]})

    # The clips each model learned from: its training dataset (the first of its chain) minus
    # the clips training held out.
    trained: dict[str, set[str]] = {}
    held_out: set[str] = set()
    for _, c, _ in cards:
        data = c.get("data") or {}
        if not data.get("datasets"):
            continue
        manifest = tables[data["datasets"][0]["dvc_md5"]][0]
        held = set((data.get("held_out") or {}).get("clip_ids") or [])
        held_out |= held
        for clip_id, sha in zip(manifest["clip_id"].astype(str),
                                manifest["source_sha256"].astype(str), strict=True):
            if clip_id not in held:
                trained.setdefault(sha, set()).add(clip_id)

    rejected = []
    for ds in datasets:
        frame = tables[ds["dvc_md5"]][1]
        for row in frame.to_dict("records"):
            rejected.append({"stage": ds["stage"], "dataset": ds["name"],
                             **{k: None if pd.isna(row.get(k)) else str(row.get(k))
                                for k in ("id", "source_uri", "source_sha256", "reason",
                                          "detail")}})

    sources = _sources(datasets, tables, trained, rejected, held_out)
    clips = _clips(datasets, tables, held_out,
                   set().union(*trained.values()) if trained else set())
    used = [s for s in sources if s["status"] == "used"]
    ingested = sum(d["counts"]["input"] for d in datasets if d["stage"] == "ingest")
    lineage = {
        "format": 1,
        "created_at": datetime.now(timezone.utc).isoformat(),
        "code_version": code_version(),
        "model": {"ref": str(model_ref), "path": str(model_dir), "name": card.get("name"),
                  "kind": card.get("kind"), "digest": identity,
                  "registered": _registered(client, str(model_ref), identity,
                                            cfg.tracking.registered_model)},
        "training_runs": [r for _, c, d in cards if (r := _training_run(client, c, d))],
        "datasets": datasets,
        "sources": sources,
        "clips": clips,
        "rejected": rejected,
        "funnel": [{"stage": d["stage"], "dataset": d["name"], "input": d["counts"]["input"],
                    "kept": d["counts"]["kept"], "rejected": d["counts"]["rejected"]}
                   for d in reversed(datasets)],
        "licenses": {"seen": sorted({s["license"] for s in used if s["license"]}),
                     "sources_without_license": sum(1 for s in used if not s["license"])},
        "accounting": {"sources": len(sources), **{
            k: sum(1 for s in sources if s["status"] == k)
            for k in ("used", "rejected", "not_used")},
            "ingested": ingested, "complete": len(sources) == ingested},
        "verification": verify_lineage(remote, datasets, sources) if verify else None,
    }
    return redact_obj(lineage)


def _sources(datasets: list[dict[str, Any]], tables: dict[str, Any],
             trained: dict[str, set[str]], rejected: list[dict[str, Any]],
             held_out: set[str]) -> list[dict[str, Any]]:
    """One row per ingested input (kept or refused at ingest), with what became of it."""
    reasons: dict[str, list[dict[str, Any]]] = {}
    for r in rejected:
        for key in (r["source_uri"], r["source_sha256"]):
            if key:
                reasons.setdefault(key, []).append(r)
    rows = []
    for ds in (d for d in datasets if d["stage"] == "ingest"):
        manifest, refused = tables[ds["dvc_md5"]]
        for row in manifest.to_dict("records"):
            sha, uri = str(row["source_sha256"]), str(row["source_uri"])
            # Its own rejections by URI; by content only where a row lacks the URI (an
            # ingest `duplicate` of this content is another input's fate, not this one's).
            found = reasons.get(uri) or [r for r in reasons.get(sha, [])
                                         if not r["source_uri"]]
            if sha in trained:
                status, why = "used", None
            elif found:
                status, why = "rejected", found
            else:
                status, why = "not_used", None
            rows.append({
                "source_sha256": sha, "source_uri": uri,
                "license": None if pd.isna(row.get("license")) else str(row["license"]),
                "size_bytes": int(row["size_bytes"]) if "size_bytes" in row else None,
                "ingested_at": ds["finished_at"], "status": status,
                "stage": why[-1]["stage"] if why else None,
                "reason": ", ".join(sorted({r["reason"] for r in why})) if why else
                ("held out for evaluation" if status == "not_used" and held_out else None),
                "detail": why[-1]["detail"] if why else None,
                "clips": len(trained.get(sha, ())), "dataset": ds["name"]})
        for row in refused.to_dict("records"):
            rows.append({
                "source_sha256": None if pd.isna(row.get("source_sha256"))
                else str(row["source_sha256"]),
                "source_uri": str(row["source_uri"]), "license": None, "size_bytes": None,
                "ingested_at": ds["finished_at"], "status": "rejected", "stage": "ingest",
                "reason": str(row["reason"]), "detail": str(row.get("detail") or ""),
                "clips": 0, "dataset": ds["name"]})
    return rows


def _clips(datasets: list[dict[str, Any]], tables: dict[str, Any],
           held_out: set[str], trained: set[str]) -> list[dict[str, Any]]:
    """The annotated clip rows (cut points, scores, caption and its origin, faces) of every
    clip in the training data, from the curated datasets the encoded ones were made of, with
    the latent cache key each was trained from."""
    keys = {}  # clip_id -> its latent cache key, from the encoded datasets
    for ds in datasets:
        manifest = tables[ds["dvc_md5"]][0]
        if ds["stage"] == "encoded" and "key" in manifest:
            keys.update(zip(manifest["clip_id"].astype(str), manifest["key"].astype(str),
                            strict=True))
    rows = []
    seen: set[str] = set()
    for ds in datasets:
        manifest = tables[ds["dvc_md5"]][0]
        if ds["stage"] not in ("curated", "annotate") or "clip_id" not in manifest:
            continue
        for row in manifest.to_dict("records"):
            clip_id = str(row["clip_id"])
            if clip_id in seen or (clip_id not in trained and clip_id not in held_out):
                continue
            seen.add(clip_id)
            rows.append({**{k: _plain(row.get(k)) for k in _CLIP_FIELDS},
                         "held_out": clip_id in held_out, "dataset": ds["name"],
                         "cache_key": keys.get(clip_id)})
    return rows


def _plain(value: Any) -> Any:
    if value is None or (not isinstance(value, (list, tuple, dict)) and pd.isna(value)):
        return None
    if hasattr(value, "item"):
        return value.item()
    return value


def _local_file(uri: str) -> Path | None:
    parts = urlsplit(uri)
    if parts.scheme == "file":
        return Path(unquote(parts.path))
    if not parts.scheme:
        return Path(uri)
    return None  # a remote source: not re-read here


def verify_lineage(remote: DvcRemote, datasets: list[dict[str, Any]],
                   sources: list[dict[str, Any]]) -> dict[str, Any]:
    """Re-hash every object of every dataset version on the remote and every source file
    still at its URI; what no longer matches the records."""
    mismatches, checked = [], 0
    for ds in datasets:
        checked += len(remote.files(ds["dvc_md5"])) + 1
        mismatches += [{**m, "dataset": ds["name"]} for m in remote.mismatches(ds["dvc_md5"])]
    for source in sources:
        path = _local_file(source["source_uri"]) if source["source_sha256"] else None
        if path is None or not path.is_file():
            continue
        checked += 1
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != source["source_sha256"]:
            mismatches.append({"what": "source file changed", "path": str(path),
                               "expected": source["source_sha256"], "found": actual,
                               "dataset": source["dataset"]})
    return {"checked": checked, "mismatches": mismatches}


def write_lineage(out_dir: Path, lineage: dict[str, Any]) -> tuple[Path, Path]:
    from vidops.tracking.lineage_html import write_lineage_html

    out_dir.mkdir(parents=True, exist_ok=True)
    # The records are redacted already; what this run adds (the model reference, the
    # remote's URL, a verification path) is redacted the same way.
    lineage = redact_obj(lineage)
    path = write_json_atomic(out_dir / LINEAGE_JSON, lineage, default=str)
    return path, write_lineage_html(out_dir / LINEAGE_HTML, lineage)


# ---------------------------------------------------------------------------------------------
# Source -> datasets and models


def _dataset_versions(client: MlflowClient, cfg: Config) -> dict[str, dict[str, Any]]:
    """Every dataset version the MLflow store knows of (stage outputs and inputs), by md5."""
    found: dict[str, dict[str, Any]] = {}
    names = [cfg.tracking.experiments.curation, cfg.tracking.experiments.training]
    experiments = [e.experiment_id for n in names if (e := client.get_experiment_by_name(n))]
    if not experiments:
        return found
    for run in client.search_runs(experiments, max_results=50000):
        for item in run.inputs.dataset_inputs:
            md5 = item.dataset.digest
            if md5.endswith(".dir") and md5 not in found:
                found[md5] = {"name": item.dataset.name, "dvc_md5": md5,
                              "mlflow_run_id": run.info.run_id,
                              "stage": run.data.tags.get("vidops.stage")}
    return found


def _held_out(client: MlflowClient, version: Any) -> set[str]:
    """The clips a registered version's training (and its base's) held out, from the cards
    inside its artifacts."""
    root = client.get_model_version_download_uri(version.name, version.version)
    held: set[str] = set()
    for part in ("model", "base"):
        with tempfile.TemporaryDirectory() as tmp:
            try:
                path = mlflow.artifacts.download_artifacts(
                    artifact_uri=f"{root}/artifacts/{part}/vidops_model.json", dst_path=tmp)
            except (MlflowException, OSError):
                continue
            card = json.loads(Path(path).read_text(encoding="utf-8"))
        held |= set(((card.get("data") or {}).get("held_out") or {}).get("clip_ids") or [])
    return held


def source_usage(source: str, *, cfg: Config, workdir: Workdir) -> dict[str, Any]:
    """Every dataset version, clip and registered model version with content from `source`
    (a sha256 or a URI), across the MLflow store and the DVC remote. A URI is matched in
    the redacted form the stages recorded it in (credentials masked: the same presigned URL
    matches with any signature), and reported so."""
    mlflow_runs.configure(cfg, workdir)
    client = MlflowClient()
    remote = DvcRemote(remote_url(workdir, cfg.dvc.remote))
    is_sha = len(source) == 64 and all(c in "0123456789abcdef" for c in source.lower())
    column = "source_sha256" if is_sha else "source_uri"
    source = source if is_sha else redact_uri(source)
    wanted = source.lower() if is_sha else source

    datasets, shas = [], set()
    for md5, info in sorted(_dataset_versions(client, cfg).items()):
        try:
            manifest, refused = remote.table(md5, MANIFEST), remote.table(md5, REJECTED)
        except AuditError:
            continue
        hits = manifest[manifest[column].astype(str) == wanted] if column in manifest else \
            manifest.iloc[0:0]
        refusals = refused[refused[column].astype(str) == wanted] if column in refused else \
            refused.iloc[0:0]
        if hits.empty and refusals.empty:
            continue
        shas |= set(hits.get("source_sha256", pd.Series(dtype=str)).astype(str))
        datasets.append({**info, "clips": sorted(hits["clip_id"].astype(str))
                         if "clip_id" in hits else [], "rows": len(hits),
                         "rejected": [{"reason": r["reason"], "detail": r.get("detail")}
                                      for r in refusals.to_dict("records")]})

    models = []
    name = cfg.tracking.registered_model
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException:
        versions = []
    by_md5 = {d["dvc_md5"]: d for d in datasets}
    for version in sorted(versions, key=lambda v: int(v.version)):
        # The training datasets: the first of the model's chain, and of its base's.
        recorded = json.loads(version.tags.get("vidops.datasets", "[]"))
        own = [d for d in recorded if not d.get("name", "").startswith("base.")]
        base = [d for d in recorded if d.get("name", "").startswith("base.")]
        hit = [by_md5[d["dvc_md5"]] for d in own[:1] + base[:1]
               if d["dvc_md5"] in by_md5 and by_md5[d["dvc_md5"]]["rows"]]
        if not hit:
            continue
        clips = sorted({c for d in hit for c in d["clips"]})
        held = _held_out(client, version)
        aliases = client.get_model_version(version.name, version.version).aliases
        models.append({"name": version.name, "version": str(version.version),
                       "aliases": sorted(aliases),
                       "datasets": [d["name"] for d in hit], "clips": clips,
                       "held_out_clips": sorted(set(clips) & held),
                       "trained_on": bool(set(clips) - held)})
    return {"source": source, "source_sha256": sorted(shas), "datasets": datasets,
            "models": models}
