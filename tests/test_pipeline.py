"""The KFP side: compiled YAML, and the local pipeline run end to end through kfp.local."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from mlflow.tracking import MlflowClient
from vidops.pipelines.compile import compile_pipeline


def test_curation_pipeline_compiles_and_loads_back(tmp_path: Path) -> None:
    out = compile_pipeline("curation", tmp_path / "curation.yaml")
    spec = yaml.safe_load(out.read_text())
    assert spec["pipelineInfo"]["name"] == "vidops-curation"
    assert "comp-ingest" in spec["components"]
    tasks = spec["root"]["dag"]["tasks"]
    assert "ingest" in tasks
    executor = spec["deploymentSpec"]["executors"]["exec-ingest"]["container"]
    assert executor["image"].startswith("ghcr.io/vidops/vidops-cpu")
    assert "run_ingest" in " ".join(executor["command"])
    assert set(spec["root"]["inputDefinitions"]["parameters"]) >= {"sources", "workdir",
                                                                   "config_json"}
    from kfp import components

    loaded = components.load_component_from_file(str(out))
    assert loaded.name == "vidops-curation"


def test_vidops_run_end_to_end_through_kfp_local(tmp_path: Path) -> None:
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "vidops.cli", "run", "--config", "tiny", "--workdir", str(work),
         "--set", "samples.counts.shapes=4", "--quiet"],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ingest" in proc.stdout and "kept" in proc.stdout

    summary = json.loads((work / "run-summary.json").read_text())
    (ingest,) = summary["stages"]
    # 4 shapes + defects (2 good originals and 7 defects: one unreadable, one duplicate).
    assert ingest["counts"]["input"] == 13
    assert ingest["counts"]["by_reason"] == {"duplicate": 1, "unreadable": 1}

    stage_json = json.loads((work / "data" / "ingest" / "stage.json").read_text())
    assert stage_json["dvc"]["md5"] == ingest["dvc_md5"]
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{work / 'mlflow.db'}")
    client = MlflowClient()
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    child = client.get_run(ingest["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert (work / ".dvc").is_dir() and (work / "datasets" / "ingest.dvc").is_file()
