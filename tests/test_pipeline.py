"""The KFP side: compiled YAML, dvc.yaml in step with the DAG, and the local pipeline run
end to end through kfp.local."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml
from mlflow.tracking import MlflowClient

from vidops.config import load_config
from vidops.pipelines.compile import compile_pipeline

REPO = Path(__file__).resolve().parents[1]
DATA_STAGES = ["ingest", "filter", "annotate", "encode"]


def _compiled(tmp_path: Path, name: str = "curation", *overrides: str) -> dict:
    """The pipeline spec (the first document; the second holds its Kubernetes settings)."""
    cfg = load_config(None, list(overrides))
    path = compile_pipeline(name, tmp_path / f"{name}.yaml", cfg)
    return next(yaml.safe_load_all(path.read_text()))


def test_curation_pipeline_compiles_and_loads_back(tmp_path: Path) -> None:
    spec = _compiled(tmp_path)
    assert spec["pipelineInfo"]["name"] == "vidops-curation"
    assert {"comp-ingest", "comp-shard", "comp-filter", "comp-annotate", "comp-merge",
            "comp-encode", "comp-merge-encoded"} <= set(spec["components"])
    root_tasks = spec["root"]["dag"]["tasks"]
    loops = [t for t in root_tasks.values() if "parameterIterator" in t]
    loop_dags = [spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
                 for loop in loops]
    # filter and annotate fan out over shards of sources, encode over shards of clips.
    assert sorted(sorted(d) for d in loop_dags) == [["annotate", "filter"], ["encode"]]
    (curation,) = [d for d in loop_dags if "filter" in d]
    assert curation["annotate"]["dependentTasks"] == ["filter"]
    assert {"merge", "merge-encoded"} <= set(root_tasks)
    for stage in ("ingest", "filter", "annotate", "merge", "encode"):
        executor = spec["deploymentSpec"]["executors"][f"exec-{stage}"]["container"]
        assert executor["image"].startswith("ghcr.io/vidops/vidops-cpu")
        assert f"run_{stage}" in " ".join(executor["command"])
    assert set(spec["root"]["inputDefinitions"]["parameters"]) >= {"sources", "workdir",
                                                                   "config_json"}
    from kfp import components

    assert components.load_component_from_file(
        str(tmp_path / "curation.yaml")).name == "vidops-curation"


def test_lifecycle_pipeline_trains_after_curation_with_cluster_resources(tmp_path: Path
                                                                         ) -> None:
    spec = _compiled(tmp_path, "lifecycle", "resources.pretrain.gpus=2",
                     "resources.pretrain.accelerator=nvidia.com/gpu",
                     "resources.pretrain.cpu=16", "resources.pretrain.memory=64G")
    assert spec["pipelineInfo"]["name"] == "vidops-lifecycle"
    tasks = spec["root"]["dag"]["tasks"]
    assert tasks["pretrain"]["dependentTasks"] == ["merge-encoded"]
    assert tasks["pretrain"]["cachingOptions"] == {}  # caching off: a training run is new
    executor = spec["deploymentSpec"]["executors"]["exec-pretrain"]["container"]
    assert executor["image"].startswith("ghcr.io/vidops/vidops-gpu")
    resources = executor["resources"]
    assert resources["accelerator"]["resourceCount"] == "2"
    assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
    assert resources["resourceCpuLimit"] == "16" and resources["resourceMemoryLimit"] == "64G"

    # The fine-tune branch: the second corpus curated and encoded in the pretrained model's
    # latent space (its encode fan-out waits for pretrain), then fine-tuned from that model.
    assert tasks["finetune"]["dependentTasks"] == ["merge-encoded-2", "pretrain"]
    assert tasks["finetune"]["cachingOptions"] == {}
    assert [name for name, t in tasks.items() if name.startswith("shard")
            and "pretrain" in t.get("dependentTasks", [])] == ["shard-4"]
    finetune_exec = spec["deploymentSpec"]["executors"]["exec-finetune"]["container"]
    assert finetune_exec["image"].startswith("ghcr.io/vidops/vidops-gpu")
    inputs = spec["root"]["inputDefinitions"]["parameters"]
    assert inputs["finetune_sources"]["parameterType"] == "LIST"
    without = _compiled(tmp_path, "lifecycle", "pipeline.finetune=false")
    assert "finetune" not in without["root"]["dag"]["tasks"]

    training = _compiled(tmp_path, "training")
    assert set(training["root"]["inputDefinitions"]["parameters"]) >= {"curated_dir"}
    assert {"merge-encoded", "pretrain"} <= set(training["root"]["dag"]["tasks"])
    assert training["root"]["dag"]["tasks"]["pretrain"]["dependentTasks"] == ["merge-encoded"]


def test_dvc_yaml_runs_the_same_stages_as_the_kfp_dag(tmp_path: Path) -> None:
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    stages = dvc["stages"]
    assert list(stages) == DATA_STAGES
    spec = _compiled(tmp_path)
    executors = spec["deploymentSpec"]["executors"]
    config = load_config().to_dict()
    previous_out = None
    for name, stage in stages.items():
        assert stage["cmd"].split()[:2] == ["vidops", name]  # the command the component runs
        assert f"exec-{name}" in executors
        for section in stage["params"]:
            assert section in config, f"dvc.yaml names params section {section!r}"
        (out,) = [next(iter(o)) for o in stage["outs"]]
        if previous_out is not None:  # each stage reads the one before, as in the DAG
            assert previous_out in stage["deps"] and f"--in {previous_out}" in stage["cmd"]
        previous_out = out


def test_vidops_run_end_to_end_through_kfp_local(tmp_path: Path) -> None:
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "vidops.cli", "run", "--config", "tiny", "--workdir", str(work),
         "--set", "samples.counts.shapes=4", "--set", "models.vae.bootstrap.steps=20",
         "--set", "train.steps=4", "--set", "train.batch_size=2", "--set",
         "train.sample_prompts=[a red circle moving left]", "--set", "generate.steps=2",
         "--set", "samples.counts.shapes-finetune=3", "--set", "finetune.train.steps=2",
         "--set", "finetune.train.batch_size=2", "--set", "finetune.lora.rank=2",
         "--set", "evaluate.seeds=[1]", "--set", "evaluate.prompt_set=custom",
         "--set", "evaluate.prompts=[a red circle moving right,a blue square moving up]",
         "--set", "registry.thresholds.adherence_colour=null",
         "--set", "registry.thresholds.adherence_direction=null", "--quiet"],
        capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "curated" in proc.stdout and "filter" in proc.stdout

    summary = json.loads((work / "run-summary.json").read_text())
    # The pretraining corpus; the fine-tune corpus's outputs are prefixed (checked below).
    finetune_stages = [s for s in summary["stages"]
                       if Path(s["out_dir"]).name.startswith("finetune-")]
    summary["stages"] = [s for s in summary["stages"] if s not in finetune_stages]
    stages = {s["stage"]: s for s in summary["stages"] if s["stage"] in ("ingest", "curated")}
    # 4 shapes + defects (2 good originals and 7 defects: one unreadable, one duplicate).
    assert stages["ingest"]["counts"]["input"] == 13
    assert stages["ingest"]["counts"]["by_reason"] == {"duplicate": 1, "unreadable": 1}
    assert all(s["validation"] for s in summary["stages"])
    filters = [s for s in summary["stages"] if s["stage"] == "filter"]
    assert len(filters) == load_config("tiny").curation.shards

    # Every defect got its reason somewhere in the run; the good clips reached the end.
    expected = json.loads((work / "samples" / "defects" / "expected.json").read_text())
    decisions: dict[str, set[str]] = {}
    for stage in summary["stages"]:
        rejected = pd.read_parquet(Path(stage["out_dir"]) / "rejected.parquet")
        for uri, reason in zip(rejected.source_uri, rejected.reason, strict=True):
            decisions.setdefault(Path(uri).name, set()).add(reason)
    curated = pd.read_parquet(work / "data" / "curated" / "manifest.parquet")
    for uri in curated.source_uri:
        decisions.setdefault(Path(uri).name, set()).add("kept")
    for name, reason in expected.items():
        assert decisions[name] == {reason or "kept"}, name
    assert curated.caption.notna().all()
    assert all((work / "data" / "curated" / p).is_file() for p in curated.path)

    # ... and every curated clip has its latents, through the encode fan-out and its merge.
    from vidops.data.latent_dataset import LatentDataset

    encoded = LatentDataset(work / "data" / "encoded", return_meta=True)
    assert sorted(encoded.clip_ids) == sorted(curated.clip_id)
    assert len([s for s in summary["stages"] if s["stage"] == "encode"]) == 2
    assert encoded[0]["latents"].ndim == 4

    # An explicit client: mlflow.set_tracking_uri would export MLFLOW_TRACKING_URI to every
    # later test in this process.
    client = MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED"
    for stage in summary["stages"]:
        child = client.get_run(stage["mlflow_run_id"])
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert (work / ".dvc").is_dir() and (work / "datasets" / "curated.dvc").is_file()

    # ... then training: the model it trained on the encoded dataset, reported by the run.
    model, tuned = summary["models"]
    assert model["model_dir"] == str(work / "models" / "pretrain") and model["steps"] == 4
    assert f"pretrain model: {model['model_dir']}" in proc.stdout
    assert model["data_dir"] == str(work / "data" / "encoded")
    pretrain_run = client.get_run(model["mlflow_run_id"])
    assert pretrain_run.data.tags["mlflow.parentRunId"] == parent.info.run_id
    artifacts = {a.path for a in client.list_artifacts(model["mlflow_run_id"], "samples")}
    assert artifacts == {"samples/step-00000004"}  # the sample videos of the final step
    card = json.loads((work / "models" / "pretrain" / "vidops_model.json").read_text())
    assert card["data"]["clips"] == len(curated)

    # ... and the fine-tune branch: the shapes-finetune corpus through the same stages, into
    # their own outputs, encoded with the pretrained model's VAE, then a LoRA on that model.
    assert summary["model"] == tuned and tuned["stage"] == "finetune"
    assert f"finetune model: {tuned['model_dir']}" in proc.stdout
    assert {s["stage"] for s in finetune_stages} >= {"ingest", "filter", "annotate", "encode"}
    assert all(s["validation"] for s in finetune_stages)
    ft_ingest = next(s for s in finetune_stages if s["stage"] == "ingest")
    assert ft_ingest["counts"]["kept"] == 3
    assert tuned["data_dir"] == str(work / "data" / "finetune-encoded")
    tuned_card = json.loads((Path(tuned["model_dir"]) / "vidops_model.json").read_text())
    assert tuned_card["method"] == "lora" and tuned_card["base"]["path"] == model["model_dir"]
    ft_encoding = json.loads((work / "data" / "finetune-encoded" / "stage.json").read_text())
    assert ft_encoding["encoding"]["vae"]["digest"] == card["vae"]["digest"]
    assert client.get_run(tuned["mlflow_run_id"]).data.tags["mlflow.parentRunId"] == \
        parent.info.run_id

    # ... then both models evaluated and registered in turn: the pretrained one first (it
    # passes the thresholds a 4-step model can meet and there is no champion yet), then the
    # fine-tune, champion only if it does not regress against the pretrained one.
    base_eval, tuned_eval = summary["evaluations"]
    assert base_eval["model_dir"] == model["model_dir"]
    assert tuned_eval["model_dir"] == tuned["model_dir"]
    for judged in (base_eval, tuned_eval):
        assert Path(judged["report"]).is_file() and "temporal_consistency" in judged["headline"]
        assert f"report {judged['report']}" in proc.stdout
    assert base_eval["registered"]["version"] == "1" and tuned_eval["registered"]["version"] == "2"
    first = json.loads((Path(base_eval["eval_dir"]) / "registration.json").read_text())
    assert first["passed"] and first["promoted"] and first["champion_before"] is None
    assert "challenger" in tuned_eval["registered"]["aliases"]
    second = tuned_eval["registered"]
    assert second["passed"] == (not second["failed_gates"])
    assert (second["aliases"] == ["challenger", "champion"]) == second["passed"]
    champion = "2" if second["passed"] else "1"
    assert str(client.get_registered_model("vidgen").aliases["champion"]) == champion
    assert "models:/vidgen@champion" in proc.stdout
    version = client.get_model_version("vidgen", "1")
    assert version.tags["vidops.dvc_md5.encoded"] == json.loads(
        (work / "data" / "encoded" / "stage.json").read_text())["dvc"]["md5"]
    assert version.tags["vidops.pipeline_run_id"] == parent.info.run_id

    _audit_the_champion(work, expected, client)


def _audit_the_champion(work: Path, expected: dict[str, str], client: MlflowClient) -> None:
    """The lifecycle's champion traced back to every sample source from the records (DVC
    remote, MLflow), forward from a source to the models, and tampering caught."""
    import hashlib

    import mlflow

    from vidops.cli import main

    def vidops(*argv: str) -> int:
        return main(["--config", "tiny", "--workdir", str(work), "--quiet", *argv])

    try:
        out = work / "audit"
        assert vidops("lineage", "models:/vidgen@champion", "--verify", "--out", str(out)) == 0
        lineage = json.loads((out / "lineage.json").read_text())
        assert (out / "lineage.html").is_file()
        assert "champion" in lineage["model"]["registered"]["aliases"]
        assert lineage["accounting"]["complete"]
        assert lineage["verification"]["mismatches"] == []
        sources = {Path(s["source_uri"]).name: s for s in lineage["sources"]}
        for name, reason in expected.items():  # every defect: used, or refused and why
            status = sources[name]["status"]
            assert (status, sources[name]["reason"]) == (
                ("rejected", reason) if reason else ("used", None)), name
        for source in lineage["sources"]:  # sha256s as recorded are the files' own
            path = Path(source["source_uri"].removeprefix("file://"))
            if source["source_sha256"] and path.is_file():
                assert hashlib.sha256(path.read_bytes()).hexdigest() == source["source_sha256"]
        assert {d["dvc_md5"] for d in lineage["datasets"]} >= {json.loads(
            (work / "data" / n / "stage.json").read_text())["dvc"]["md5"]
            for n in ("ingest", "curated", "encoded")}

        # The reverse question: a used source names the champion, a refused one no model.
        used = next(s for s in lineage["sources"] if s["status"] == "used")
        champion = str(client.get_registered_model("vidgen").aliases["champion"])
        assert vidops("lineage", "--source", used["source_sha256"]) == 0
        usage = source_usage_json(work, used["source_sha256"])
        named = {m["version"]: m for m in usage["models"] if m["trained_on"]}
        assert "champion" in named[champion]["aliases"]
        refused = sources["blurry.mp4"]
        assert source_usage_json(work, refused["source_uri"])["models"] == []

        # A byte changed in the DVC remote, and a source file edited, are both reported.
        curated = next(d for d in lineage["datasets"] if d["name"] == "curated")["dvc_md5"]
        remote = work / "dvc-remote" / "files" / "md5"
        entry = json.loads((remote / curated[:2] / curated[2:]).read_text())[0]
        victim = remote / entry["md5"][:2] / entry["md5"][2:]
        victim.chmod(0o644)
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0xFF
        victim.write_bytes(bytes(data))
        edited = Path(used["source_uri"].removeprefix("file://"))
        edited.write_bytes(edited.read_bytes() + b"\0")
        assert vidops("lineage", "models:/vidgen@champion", "--verify", "--out",
                      str(out)) == 1
        found = json.loads((out / "lineage.json").read_text())["verification"]["mismatches"]
        assert {(m["what"], m["path"]) for m in found} >= {
            ("DVC object changed", entry["relpath"]), ("source file changed", str(edited))}
    finally:
        mlflow.set_tracking_uri(None)


def source_usage_json(work: Path, source: str) -> dict:
    from vidops.config import load_config as load
    from vidops.tracking.audit import source_usage
    from vidops.tracking.workdir import Workdir

    return source_usage(source, cfg=load("tiny"), workdir=Workdir.at(work))
