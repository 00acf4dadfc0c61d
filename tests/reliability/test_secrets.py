"""No secret ever appears in any output.

Distinct canary secrets are planted where credentials really come from: the environment
(MLflow, AWS, KFP), a secret file (`NAME_FILE`), the user info and the presigned query of
source URIs (served by a local HTTP server that checks them, so ingest really uses them),
and a credential-bearing `tracking.uri` in the configuration. The stages run in-process
through `vidops.cli.main`; afterwards every byte of the workdir (MLflow's SQLite store and
artifacts, parquet tables decoded too, the DVC repo and remote, stage.json, validation
results, lineage), the compiled pipeline YAML, what the KFP API server received (bodies and
every header but Authorization, where the token belongs) and everything printed or logged is
searched for each canary, raw and base64-encoded. Nothing may be found.
"""

from __future__ import annotations

import base64
import csv
import json
import logging
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pandas as pd
import pytest

from tests.kfp_api import KfpApi
from tests.local_http import LocalHttpServer, QuietHandler
from vidops.cli import main
from vidops.tracking.redact import (
    inline_credentials,
    redact_frame,
    redact_text,
    redact_uri,
    secrets_from_files,
)

pytestmark = pytest.mark.reliability

USER = "vidops-reader"
ENV_SECRETS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID",
               "AWS_SECRET_ACCESS_KEY", "KFP_TOKEN")
# Small, fast settings (as tests/test_pipeline.py's end-to-end run uses).
FAST = ["ingest.workers=1", "filter.workers=1", "annotate.workers=1",
        "annotate.allow_fallback_caption=true", "models.vae.bootstrap.steps=4",
        "models.vae.bootstrap.holdout_clips=1", "train.steps=2", "train.batch_size=2",
        "train.checkpoint_every=1", "train.log_every=1",
        "train.sample_prompts=[a red circle moving left]", "generate.steps=2",
        "evaluate.seeds=[1]", "evaluate.prompt_set=custom",
        "evaluate.prompts=[a red circle moving right]", "evaluate.batch_size=1",
        "registry.thresholds.adherence_colour=null",
        "registry.thresholds.adherence_direction=null"]


def _canary(label: str) -> str:
    return f"CANARY-{label}-{uuid.uuid4().hex}"


def _needles(secret: str) -> list[bytes]:
    """The forms a secret could be written in: as is, its random part (survives a
    compressor's back-reference to the common prefix), base64 at each byte alignment (an
    HTTP Basic header, a JSON-in-base64 blob) and hex."""
    raw = secret.encode()
    found = [raw, raw.split(b"-")[-1], raw.hex().encode()]
    for pad in range(3):
        encoded = base64.b64encode(b"\0" * pad + raw)
        # Drop the characters that mix padding or neighbours in.
        found.append(encoded[(4 * pad + 2) // 3 + 1: -4])
        found.append(base64.urlsafe_b64encode(b"\0" * pad + raw)[(4 * pad + 2) // 3 + 1: -4])
    return found


class _Sources(LocalHttpServer):
    """A local HTTP server of video files that refuses any request without the credential:
    HTTP Basic auth (`http://user:PASSWORD@...`) or a presigned-style query
    (`?X-Amz-Credential=...&X-Amz-Signature=...`)."""

    def __init__(self, root: Path, password: str, credential: str, signature: str) -> None:
        self.hits: list[str] = []
        expected = "Basic " + base64.b64encode(f"{USER}:{password}".encode()).decode()
        sources = self

        class Handler(QuietHandler):
            def _authorised(self) -> bool:
                query = parse_qs(urlsplit(self.path).query)
                return (self.headers.get("Authorization") == expected
                        or (query.get("X-Amz-Credential") == [credential]
                            and query.get("X-Amz-Signature") == [signature]))

            def _serve(self, body: bool) -> None:
                if not self._authorised():
                    self.send_response(403)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path = root / urlsplit(self.path).path.lstrip("/")
                if not path.is_file():
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = path.read_bytes()
                sources.hits.append(path.name)
                status, start, end = 200, 0, len(data)
                ranged = self.headers.get("Range", "")
                if ranged.startswith("bytes="):
                    first, _, last = ranged[6:].partition("-")
                    start = int(first or 0)
                    end = min(len(data), int(last) + 1 if last else len(data))
                    status = 206
                self.send_response(status)
                self.send_header("Content-Type", "video/mp4")
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(end - start))
                if status == 206:
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
                self.end_headers()
                if body:
                    self.wfile.write(data[start:end])

            def do_HEAD(self) -> None:
                self._serve(body=False)

            def do_GET(self) -> None:
                self._serve(body=True)

        super().__init__(Handler)


@pytest.fixture
def secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Canaries in the environment, in a secret file, and for the sources and configuration."""
    planted = {name: _canary(name) for name in ENV_SECRETS}
    for name, value in planted.items():
        monkeypatch.setenv(name, value)
    # A secret file, the Docker/Kubernetes way: read into AWS_SESSION_TOKEN at start-up.
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    planted["AWS_SESSION_TOKEN"] = _canary("AWS_SESSION_TOKEN")
    secret_file = tmp_path / "secrets" / "aws-session-token"
    secret_file.parent.mkdir()
    secret_file.write_text(planted["AWS_SESSION_TOKEN"] + "\n")
    monkeypatch.setenv("AWS_SESSION_TOKEN_FILE", str(secret_file))
    planted |= {label: _canary(label) for label in (
        "SOURCE_PASSWORD", "SOURCE_CREDENTIAL", "SOURCE_SIGNATURE", "MANIFEST_COLUMN",
        "TRACKING_PASSWORD")}
    for name in ("KFP_HOST", "KF_PIPELINES_ENDPOINT", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(name, raising=False)
    return planted


def _scan_bytes(data: bytes, where: str, secrets: dict[str, str]) -> list[str]:
    return [f"{name} in {where}" for name, value in secrets.items()
            if any(needle in data for needle in _needles(value))]


def _scan_tree(root: Path, secrets: dict[str, str]) -> tuple[list[str], int, int]:
    """Every file under root, as bytes, and parquet tables decoded as well (their pages may
    be compressed); returns (findings, files, bytes)."""
    found, files, size = [], 0, 0
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink()):
        data = path.read_bytes()
        files, size = files + 1, size + len(data)
        found += _scan_bytes(data, str(path.relative_to(root)), secrets)
        if data[:4] == b"PAR1":
            try:
                text = pd.read_parquet(path).to_json(default_handler=str)
            except Exception:  # not a table of ours (a DVC object of another kind)
                continue
            found += _scan_bytes(text.encode(), f"{path.relative_to(root)} (decoded)",
                                 secrets)
    return found, files, size


def _serve_corpus(tmp_path: Path) -> Path:
    """Three short shape videos (and a byte-identical copy of one) to serve."""
    served = tmp_path / "served"
    assert main(["samples", str(served), "--kind", "shapes", "--count", "3", "--quiet"]) == 0
    videos = sorted(served.glob("*.mp4"))
    assert len(videos) == 3
    (served / "copy.mp4").write_bytes(videos[0].read_bytes())
    return served


def _sources(tmp_path: Path, host: str, secrets: dict[str, str], videos: list[str]
             ) -> tuple[list[str], str]:
    """The ingest sources: a Basic-auth URL, a manifest of presigned URLs (with a secret in a
    column ingest does not read), a duplicate and a missing file, both with credentials."""
    basic = f"http://{USER}:{secrets['SOURCE_PASSWORD']}@{host}"
    presigned = (f"?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential="
                 f"{secrets['SOURCE_CREDENTIAL']}&X-Amz-Expires=3600"
                 f"&X-Amz-Signature={secrets['SOURCE_SIGNATURE']}")
    manifest = tmp_path / "inputs" / "presigned.csv"
    manifest.parent.mkdir()
    with manifest.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["uri", "caption", "api_key"])
        writer.writerow([f"http://{host}/{videos[1]}{presigned}", "a shape moving",
                         secrets["MANIFEST_COLUMN"]])
        writer.writerow([f"http://{host}/{videos[2]}{presigned}", "a shape moving",
                         secrets["MANIFEST_COLUMN"]])
        writer.writerow([f"{basic}/missing.mp4", "gone", secrets["MANIFEST_COLUMN"]])
    return ([f"{basic}/{videos[0]}", f"{basic}/copy.mp4", str(manifest)],
            f"http://{host}/{videos[1]}{presigned}")


def _allowed_http() -> list[str]:
    """ingest reads http only when its scheme allow-list (where there is one) says so."""
    from vidops.config import load_config

    return (["--set", "ingest.allowed_schemes=[file,http]"]
            if "allowed_schemes" in type(load_config("tiny").ingest).model_fields else [])


def _run_data_stages(work: Path, tmp_path: Path, secrets: dict[str, str], host: str,
                     videos: list[str], settings: list[str]) -> dict[str, Any]:
    srcs, presigned_url = _sources(tmp_path, host, secrets, videos)

    def vidops(*argv: str) -> int:
        return main(["--config", "tiny", "--workdir", str(work), *settings, *argv])

    data = work / "data"
    assert vidops("ingest", "--source", *srcs) == 0
    ingest = pd.read_parquet(data / "ingest" / "manifest.parquet")
    rejected = pd.read_parquet(data / "ingest" / "rejected.parquet")
    # The credentials were used: every served video was read and kept, the copy is a
    # duplicate, the missing file (a manifest row) unreadable; the rows name them redacted.
    assert len(ingest) == 3, ingest
    assert sorted(rejected["reason"]) == ["duplicate", "unreadable"], rejected
    assert all("***" in uri for uri in ingest["source_uri"])
    assert vidops("filter", "--in", str(data / "ingest"), "--out", str(data / "filter")) == 0
    assert vidops("annotate", "--in", str(data / "filter"),
                  "--out", str(data / "annotate")) == 0
    assert vidops("encode", "--in", str(data / "annotate"), "--out", str(data / "encoded")) == 0
    # The reverse audit joins on the recorded (redacted) URI, given the real one.
    assert vidops("lineage", "--source", presigned_url) == 0
    return {"presigned_url": presigned_url}


def _check_lineage_output(capfd: pytest.CaptureFixture[str], presigned_url: str) -> str:
    out, err = capfd.readouterr()
    usage = json.loads(out[out.rindex('{\n  "source"'):])
    assert usage["source"] == redact_uri(presigned_url)
    assert "ingest" in {d["name"] for d in usage["datasets"]} and len(usage["datasets"]) >= 3
    return out + err


def _compile_and_submit(tmp_path: Path, secrets: dict[str, str], monkeypatch) -> list[dict]:
    """compile and submit (credentials from the environment only) against a local KFP API;
    inline credentials in the configuration or the sources are refused before anything is
    sent."""
    out = tmp_path / "out"
    assert main(["compile", "--pipeline", "lifecycle", "--out", str(out / "lifecycle.yaml")]) == 0
    inline = f"http://{USER}:{secrets['TRACKING_PASSWORD']}@mlflow.example:5000"
    with KfpApi() as api:
        monkeypatch.setenv("KFP_HOST", api.url)
        assert main(["submit", "lifecycle", "--source", "s3://bucket/raw/",
                     "--finetune-source", "s3://bucket/ft/"]) == 0
        assert main(["schedule", "curation", "--cron", "0 3 * * 0",
                     "--source", "s3://bucket/raw/"]) == 0
        before = len(api.requests)
        # Refused: a password in tracking.uri, a presigned source, a token as a user name.
        assert main(["submit", "lifecycle", "--source", "s3://bucket/raw/",
                     "--set", f"tracking.uri={inline}"]) == 2
        assert main(["submit", "curation", "--source",
                     f"https://b.s3.amazonaws.com/v.mp4?X-Amz-Signature="
                     f"{secrets['SOURCE_SIGNATURE']}"]) == 2
        assert main(["submit", "curation", "--source",
                     f"https://{secrets['SOURCE_PASSWORD']}@host/v/"]) == 2
        assert main(["compile", "--pipeline", "curation", "--out", str(out / "refused.yaml"),
                     "--set", f"tracking.uri={inline}"]) == 2
        assert not (out / "refused.yaml").exists()
        # Nothing was created for the refused ones (the client only said hello).
        assert [r["method"] for r in api.requests[before:]] == ["GET"] * 3
        requests = api.requests
    # The token went where it belongs, and only there.
    assert {r["authorization"] for r in requests} == {f"Bearer {secrets['KFP_TOKEN']}"}
    return [{k: v for k, v in r.items() if k != "authorization"} for r in requests]


def _refusals(tmp_path: Path, secrets: dict[str, str]) -> None:
    """Credentials inline where they would be stored are refused, and not echoed."""
    work = tmp_path / "work"
    inline = f"https://{USER}:{secrets['TRACKING_PASSWORD']}@dav.example/remote"
    assert main(["--workdir", str(work), "ingest", "--source", str(tmp_path / "served"),
                 "--set", f"dvc.remote={inline}"]) == 2
    assert main(["--workdir", str(work), "--set", f"seed={inline}", "ingest", "--source",
                 str(tmp_path / "served")]) == 2
    assert main(["--workdir", str(work), "run", "--source",
                 f"http://{USER}:{secrets['TRACKING_PASSWORD']}@h/v.mp4"]) == 2


def _assert_nothing_found(tmp_path: Path, secrets: dict[str, str], printed: str,
                          requests: list[dict], caplog: pytest.LogCaptureFixture,
                          report: Path | None = None) -> None:
    found, files, size = [], 0, 0
    for root in (tmp_path / "work", tmp_path / "out"):
        more, n, b = _scan_tree(root, secrets)
        found, files, size = found + more, files + n, size + b
    found += _scan_bytes(printed.encode(), "stdout/stderr", secrets)
    found += _scan_bytes(caplog.text.encode(), "log records", secrets)
    sent = json.dumps(requests).encode()
    found += _scan_bytes(sent, "KFP API requests", secrets)
    assert files > 50 and (tmp_path / "work" / "mlflow.db").is_file()
    if report is not None:
        report.write_text(json.dumps({"files": files, "bytes": size, "printed": len(printed),
                                      "log_chars": len(caplog.text), "kfp_request_bytes":
                                      len(sent), "canaries": sorted(secrets),
                                      "found": found}, indent=2))
    assert not found, found


def _scan_report() -> Path | None:
    import os

    target = os.environ.get("VIDOPS_SECRETS_REPORT")
    return Path(target) if target else None


def test_no_planted_secret_reaches_any_output(tmp_path, secrets, monkeypatch, capfd, caplog):
    """samples, ingest (Basic auth, presigned manifest, duplicate, missing), filter,
    annotate, encode, lineage --source, compile, submit, schedule and the refusals."""
    caplog.set_level(logging.INFO)
    served = _serve_corpus(tmp_path)
    videos = sorted(p.name for p in served.glob("*.mp4") if p.name != "copy.mp4")
    work = tmp_path / "work"
    # The environment names the store actually used, so the configuration can hold a
    # tracking.uri with a password: it is recorded (stage.json, MLflow params) redacted.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    settings = [*_allowed_http(), *[a for s in FAST for a in ("--set", s)], "--set",
                f"tracking.uri=http://{USER}:{secrets['TRACKING_PASSWORD']}@mlflow.example:5000"]
    with _Sources(served, secrets["SOURCE_PASSWORD"], secrets["SOURCE_CREDENTIAL"],
                  secrets["SOURCE_SIGNATURE"]) as server:
        info = _run_data_stages(work, tmp_path, secrets, server.host, videos, settings)
    assert set(server.hits) >= {*videos, "copy.mp4"}
    printed = _check_lineage_output(capfd, info["presigned_url"])
    stage = json.loads((work / "data" / "ingest" / "stage.json").read_text())
    assert stage["params"]["tracking"]["uri"] == f"http://{USER}:***@mlflow.example:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")

    requests = _compile_and_submit(tmp_path, secrets, monkeypatch)
    _refusals(tmp_path, secrets)
    out, err = capfd.readouterr()
    printed += out + err
    assert "tracking.uri (a password in its user info)" in err
    assert "dvc.remote carries credentials inline" in err
    _assert_nothing_found(tmp_path, secrets, printed, requests, caplog, _scan_report())


@pytest.mark.slow
def test_no_planted_secret_reaches_any_output_through_training_and_registry(
        tmp_path, secrets, monkeypatch, capfd, caplog):
    """The same, on through pretrain, evaluate, register and lineage MODEL (json + html)."""
    caplog.set_level(logging.INFO)
    served = _serve_corpus(tmp_path)
    videos = sorted(p.name for p in served.glob("*.mp4") if p.name != "copy.mp4")
    work = tmp_path / "work"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{work / 'mlflow.db'}")
    settings = [*_allowed_http(), *[a for s in FAST for a in ("--set", s)], "--set",
                f"tracking.uri=http://{USER}:{secrets['TRACKING_PASSWORD']}@mlflow.example:5000"]
    with _Sources(served, secrets["SOURCE_PASSWORD"], secrets["SOURCE_CREDENTIAL"],
                  secrets["SOURCE_SIGNATURE"]) as server:
        _run_data_stages(work, tmp_path, secrets, server.host, videos, settings)

    def vidops(*argv: str) -> int:
        return main(["--config", "tiny", "--workdir", str(work), *settings, *argv])

    model = work / "models" / "pretrain"
    assert vidops("pretrain", "--data", str(work / "data" / "encoded"), "--out",
                  str(model)) == 0
    assert vidops("evaluate", "--model", str(model), "--out", str(work / "eval" / "m")) == 0
    assert vidops("register", "--model", str(model), "--eval", str(work / "eval" / "m")) in (0, 1)
    assert vidops("lineage", str(model), "--out", str(work / "lineage")) == 0
    assert (work / "lineage" / "lineage.html").is_file()
    out, err = capfd.readouterr()
    _assert_nothing_found(tmp_path, secrets, out + err, [], caplog)


# ---------------------------------------------------------------------------------------------
# The redaction rules themselves (fast)


@pytest.mark.parametrize(("uri", "recorded"), [
    ("postgresql://mlflow:s3cret@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
    ("http://user:pw@mlflow:5000", "http://user:***@mlflow:5000"),
    ("https://ghp_abc@github.com/o/r.mp4", "https://***@github.com/o/r.mp4"),
    ("https://b.s3.amazonaws.com/k.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AK%2F1"
     "&X-Amz-Signature=f00&X-Amz-Security-Token=t0k",
     "https://b.s3.amazonaws.com/k.mp4?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=***"
     "&X-Amz-Signature=***&X-Amz-Security-Token=***"),
    ("https://a.blob.core.windows.net/c/v.mp4?sv=2022&sig=abc%3D&se=1",
     "https://a.blob.core.windows.net/c/v.mp4?sv=2022&sig=***&se=1"),
    ("https://h/v.mp4?token=1&access_token=2&password=3&key=4&page=5",
     "https://h/v.mp4?token=***&access_token=***&password=***&key=***&page=5"),
    ("s3://bucket/raw/", "s3://bucket/raw/"),
    ("ssh://git@host/repo", "ssh://git@host/repo"),
    ("/data/videos/a.mp4", "/data/videos/a.mp4"),
    ("sqlite:////work/mlflow.db", "sqlite:////work/mlflow.db"),
])
def test_redact_uri(uri, recorded):
    assert redact_uri(uri) == recorded
    assert redact_uri(recorded) == recorded  # idempotent: a record redacts to itself
    assert bool(inline_credentials(uri)) == (uri != recorded)


def test_redact_text_frames_and_secret_files(tmp_path):
    message = ("cannot read: 403, url=URL('http://u:pw1@127.0.0.1:9/v.mp4?sig=pw2') "
               "(token=pw3)")
    assert not any(s in redact_text(message) for s in ("pw1", "pw2", "pw3"))
    frame = pd.DataFrame({"source_uri": ["http://u:pw@h/a.mp4", "/x/b.mp4"], "n": [1, 2],
                          "phashes": [[1, 2], [3]]})
    assert redact_frame(frame)["source_uri"].tolist() == ["http://u:***@h/a.mp4", "/x/b.mp4"]
    assert frame["source_uri"][0] == "http://u:pw@h/a.mp4"  # the input is left alone
    clean = frame.iloc[1:]
    assert redact_frame(clean) is clean  # nothing to redact: no copy
    (tmp_path / "pw").write_text("from-file\n")
    env = {"MLFLOW_TRACKING_PASSWORD_FILE": str(tmp_path / "pw"), "KFP_TOKEN": "set",
           "KFP_TOKEN_FILE": str(tmp_path / "pw")}
    assert secrets_from_files(env) == ["MLFLOW_TRACKING_PASSWORD"]
    assert env["MLFLOW_TRACKING_PASSWORD"] == "from-file" and env["KFP_TOKEN"] == "set"


def test_the_scan_finds_every_form_it_looks_for(tmp_path):
    """The search itself: a secret written raw, inside a Basic header, base64-encoded at any
    alignment, hex-encoded, or in a snappy-compressed parquet table is found."""
    secret = _canary("X")
    planted = {"X": secret}
    header = base64.b64encode(f"user:{secret}".encode())
    for pad in range(3):
        blob = base64.b64encode(b"\1" * pad + secret.encode() + b"tail")
        assert _scan_bytes(b"..." + blob + b"...", "blob", planted) == ["X in blob"]
    assert _scan_bytes(b"Authorization: Basic " + header, "h", planted) == ["X in h"]
    assert _scan_bytes(secret.encode().hex().encode(), "hex", planted) == ["X in hex"]
    pd.DataFrame({"a": [f"{secret}-{i}" for i in range(50)]}).to_parquet(tmp_path / "t.parquet")
    (tmp_path / "clean.txt").write_text("nothing here")
    found, files, _ = _scan_tree(tmp_path, planted)
    assert files == 2 and found and all(f.startswith("X in t.parquet") for f in found)
