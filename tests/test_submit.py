"""vidops submit / schedule / status against a Kubeflow Pipelines API (tests/kfp_api.py
serves the endpoints the KFP SDK calls): what a run is given and how it authenticates."""

from __future__ import annotations

import json

import pytest

from tests.kfp_api import KfpApi
from vidops.cli import main
from vidops.config import load_config
from vidops.pipelines.submit import kfp_cron


def _printed(capsys) -> dict:
    """The JSON vidops printed last (the KFP SDK prints links before it)."""
    lines = capsys.readouterr().out.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "{")
    return json.loads("\n".join(lines[start:]))


@pytest.fixture
def api(monkeypatch):
    for name in ("KFP_TOKEN", "KFP_HOST", "KF_PIPELINES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    with KfpApi() as server:
        yield server


def test_submit_sends_the_compiled_pipeline_its_parameters_and_the_token(
        api, monkeypatch, capsys):
    monkeypatch.setenv("KFP_TOKEN", "token-from-env")
    monkeypatch.setenv("KFP_HOST", api.url)
    code = main(["submit", "lifecycle", "--source", "s3://bucket/raw/", "--experiment", "nightly",
                 "--service-account", "vidops-pipeline-runner",
                 "--set", "images.cpu=registry.example/vidops-cpu:7"])
    assert code == 0
    runs = [r for r in api.requests if r["path"] == "/apis/v2beta1/runs"]
    assert len(runs) == 1
    body = runs[0]["body"]
    assert _printed(capsys) == {"run_id": next(iter(api.runs)), "experiment": "nightly"}
    # Every call carried the token; none carried it anywhere else.
    assert {r["authorization"] for r in api.requests} == {"Bearer token-from-env"}
    assert "token-from-env" not in json.dumps(body)
    assert body["service_account"] == "vidops-pipeline-runner"
    assert body["display_name"].startswith("vidops-lifecycle ")
    exp = api.experiments[body["experiment_id"]]
    assert exp["display_name"] == "nightly"
    params = body["runtime_config"]["parameters"]
    assert params["sources"] == ["s3://bucket/raw/"]
    assert params["finetune_sources"] == []
    assert params["workdir"] == "/mnt/vidops"  # the workdir volume as the pods see it
    # The pipeline was compiled from the configuration the run is given.
    sent_cfg = json.loads(params["config_json"])
    assert sent_cfg["images"]["cpu"] == "registry.example/vidops-cpu:7"
    # The pipeline spec and, beside it, the Kubernetes settings of its tasks.
    spec = body["pipeline_spec"]["pipeline_spec"]
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {"registry.example/vidops-cpu:7", load_config().images.gpu}
    platform = body["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]
    assert all(e["pvcMount"] for e in platform["deploymentSpec"]["executors"].values())


def test_submit_without_sources_or_endpoint_is_a_clear_error(api, capsys):
    assert main(["submit", "lifecycle", "--host", api.url]) == 2
    assert "needs --source" in capsys.readouterr().err
    assert main(["submit", "training", "--host", api.url]) == 2
    assert "one curated dataset folder" in capsys.readouterr().err


def test_no_cache_turns_caching_off_for_the_run(api):
    assert main(["submit", "training", "--host", api.url, "--data", "/mnt/vidops/data/curated",
                 "--no-cache"]) == 0
    body = api.requests[-1]["body"]
    assert body["runtime_config"]["parameters"]["curated_dir"] == "/mnt/vidops/data/curated"
    tasks = body["pipeline_spec"]["pipeline_spec"]["root"]["dag"]["tasks"]
    assert all(not t.get("cachingOptions", {}).get("enableCache") for t in tasks.values())


def test_schedule_creates_one_recurring_run_at_a_time(api, capsys):
    code = main(["schedule", "lifecycle", "--host", api.url, "--cron", "0 3 * * 0",
                 "--source", "s3://bucket/raw/", "--name", "weekly"])
    assert code == 0
    (job,) = api.recurring.values()
    assert job["display_name"] == "weekly"
    assert job["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * 0"
    assert job["max_concurrency"] in (1, "1") and job["no_catchup"] is True
    assert job["runtime_config"]["parameters"]["sources"] == ["s3://bucket/raw/"]
    assert _printed(capsys)["recurring_run_id"] == job["recurring_run_id"]


def test_cron_expressions():
    assert kfp_cron("0 3 * * 0") == "0 0 3 * * 0"
    assert kfp_cron("30 0 3 * * 0") == "30 0 3 * * 0"
    with pytest.raises(Exception, match="expected 5 fields"):
        kfp_cron("every sunday")


def test_status_reports_the_run_and_its_tasks(api, capsys):
    assert main(["submit", "lifecycle", "--host", api.url, "--source", "s3://b/raw/"]) == 0
    (run_id,) = api.runs
    capsys.readouterr()
    assert main(["status", run_id, "--host", api.url]) == 0
    status = _printed(capsys)
    assert status["state"] == "RUNNING"
    assert {t["name"]: t["state"] for t in status["tasks"]} == {"ingest": "SUCCEEDED",
                                                                "pretrain": "RUNNING"}
    api.runs[run_id]["state"] = "FAILED"
    assert main(["status", run_id, "--host", api.url]) == 1


def test_unreachable_endpoint_is_a_clear_error(capsys, monkeypatch):
    monkeypatch.delenv("KFP_TOKEN", raising=False)
    assert main(["status", "some-run", "--host", "http://127.0.0.1:9"]) == 2
    assert "cannot reach Kubeflow Pipelines at http://127.0.0.1:9" in capsys.readouterr().err
