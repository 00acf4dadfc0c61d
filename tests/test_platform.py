"""The compiled pipelines carry what a cluster needs: images, resources, GPUs for training
only, the workdir volume in every task, credentials only from Secrets, retries, caching."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from kfp import components

from vidops.config import load_config
from vidops.pipelines.compile import compile_pipeline
from vidops.pipelines.registry import PIPELINES

CREDENTIAL_ENV = {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "AWS_ACCESS_KEY_ID",
                  "AWS_SECRET_ACCESS_KEY"}


def _compile(tmp_path: Path, name: str = "lifecycle", **overrides: Any
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    out = compile_pipeline(name, tmp_path / f"{name}.yaml", cfg)
    # What a user does with the file: it loads back as a KFP component.
    assert components.load_component_from_file(str(out)).name == f"vidops-{name}"
    spec, platform = yaml.safe_load_all(out.read_text())
    return spec, platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def _stage(executor: str) -> str:
    """exec-merge-encoded-2 -> merge-encoded."""
    name = executor.removeprefix("exec-")
    head, _, tail = name.rpartition("-")
    return head if tail.isdigit() else name


def _tasks(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every container task of the pipeline and its sub-DAGs, by executor label."""
    found = {}
    dags = [spec["root"]["dag"], *(c["dag"] for c in spec["components"].values() if "dag" in c)]
    for dag in dags:
        for task in dag["tasks"].values():
            comp = spec["components"][task["componentRef"]["name"]]
            if "executorLabel" in comp:
                found[comp["executorLabel"]] = task
    return found


def test_lifecycle_yaml_sets_every_task_up_for_the_cluster(tmp_path):
    cfg = load_config()
    spec, platform = _compile(tmp_path)
    executors = spec["deploymentSpec"]["executors"]
    tasks = _tasks(spec)
    stages = {_stage(name) for name in executors}
    assert stages == {"ingest", "shard", "filter", "annotate", "merge", "encode",
                      "merge-encoded", "pretrain", "finetune", "evaluate", "register",
                      "promote"}
    assert set(platform) == set(executors) == set(tasks)
    for name, executor in executors.items():
        stage, container = _stage(name), executor["container"]
        res = container["resources"]
        wanted = cfg.resources.for_stage(stage)
        # Resources on every task, requests = limits.
        assert res["resourceCpuRequest"] == res["resourceCpuLimit"] == wanted.cpu, name
        assert res["resourceMemoryRequest"] == res["resourceMemoryLimit"] == wanted.memory
        settings = platform[name]
        training = stage in ("pretrain", "finetune")
        # GPUs, the CUDA image and GPU nodes for the training stages only.
        if training:
            assert res["accelerator"]["resourceType"] == "nvidia.com/gpu"
            assert int(res["accelerator"]["resourceCount"]) == wanted.gpus >= 1
            assert container["image"] == cfg.images.gpu
            assert settings["nodeSelector"]["labels"] == cfg.kubernetes.gpu_node_selector
            assert settings["tolerations"][0]["key"] == "nvidia.com/gpu"
        else:
            assert "accelerator" not in res, name
            assert container["image"] == cfg.images.cpu, name
            assert "nodeSelector" not in settings and "tolerations" not in settings
        # The workdir volume in every task.
        assert settings["pvcMount"] == [{
            "constant": "vidops-workdir", "mountPath": "/mnt/vidops",
            "pvcNameParameter": {"runtimeValue": {"constant": "vidops-workdir"}}}]
        # Credentials only from Secrets; endpoints from the ConfigMap.
        from_secrets = {e["envVar"] for s in settings["secretAsEnv"] for e in s["keyToEnv"]}
        assert from_secrets == CREDENTIAL_ENV
        assert {e["envVar"] for c in settings["configMapAsEnv"] for e in c["keyToEnv"]} == {
            "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL"}
        assert not CREDENTIAL_ENV & {e["name"] for e in container.get("env", [])}
        assert settings["securityContext"]["runAsNonRoot"] is True
        assert int(settings["securityContext"]["runAsUser"]) > 0
        # Data stages retry with backoff and are cached on their inputs' versions; training
        # is not cached by default; ingest and the registry stages never are.
        task = tasks[name]
        if stage in ("shard", "filter", "annotate", "merge", "encode", "merge-encoded"):
            assert task["cachingOptions"] == {"enableCache": True}, name
        else:
            assert not task.get("cachingOptions", {}).get("enableCache"), name
        if stage in ("ingest", "shard", "filter", "annotate", "merge", "encode",
                     "merge-encoded"):
            assert task["retryPolicy"]["maxRetryCount"] == 3
            assert task["retryPolicy"]["backoffDuration"] == "30s"
        else:
            assert "retryPolicy" not in task, name
    # No parameter of the pipeline is a credential.
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert set(params) == {"sources", "finetune_sources", "workdir", "config_json",
                           "parent_run_id", "quiet"}


def test_data_stages_take_their_inputs_version_as_the_cache_key(tmp_path):
    spec, _ = _compile(tmp_path)
    tasks = {name.removeprefix("exec-"): task for name, task in _tasks(spec).items()}
    # annotate and pretrain get the DVC md5 output of the task that wrote their input.
    annotate = tasks["annotate"]["inputs"]["parameters"]["input_md5"]
    assert annotate["taskOutputParameter"] == {"outputParameterKey": "dvc_md5",
                                               "producerTask": "filter"}
    pretrain = tasks["pretrain"]["inputs"]["parameters"]["input_md5"]
    assert pretrain["taskOutputParameter"]["producerTask"] == "merge-encoded"
    assert "base_run_id" in tasks["finetune"]["inputs"]["parameters"]


def test_cluster_settings_follow_config(tmp_path):
    spec, platform = _compile(
        tmp_path, "training", **{"images.gpu": "registry.example/vidops-gpu:9",
                                 "resources.pretrain.gpus": 4,
                                 "kubernetes.cache_training": "true",
                                 "kubernetes.workdir_pvc": "other-pvc"})
    pretrain = spec["deploymentSpec"]["executors"]["exec-pretrain"]["container"]
    assert pretrain["image"] == "registry.example/vidops-gpu:9"
    assert pretrain["resources"]["accelerator"]["resourceCount"] == "4"
    assert _tasks(spec)["exec-pretrain"]["cachingOptions"] == {"enableCache": True}
    assert all(s["pvcMount"][0]["constant"] == "other-pvc" for s in platform.values())


def test_only_training_and_evaluation_may_ask_for_gpus():
    from vidops.config import ConfigError

    with pytest.raises(ConfigError, match=r"resources\.filter\.gpus"):
        load_config(None, ["resources.filter.gpus=1"])
    cfg = load_config(None, ["resources.evaluate.gpus=1"])
    assert cfg.resources.for_stage("evaluate").gpus == 1


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_every_pipeline_compiles_with_its_workdir_in_every_task(tmp_path, name):
    spec, platform = _compile(tmp_path, name)
    assert set(platform) == set(spec["deploymentSpec"]["executors"])
    assert all(s["pvcMount"][0]["mountPath"] == "/mnt/vidops" for s in platform.values())


def test_a_task_refuses_an_input_folder_that_no_longer_holds_its_version(cfg, workdir):
    """What a cached upstream task hands on may since have been overwritten by another run:
    the data version in the folder's stage.json tells, and the task fails rather than read
    other data."""
    from tests.conftest import make_curated
    from vidops.components.publish import StaleInput, check_input, check_inputs
    from vidops.stage import load_output

    curated = make_curated(workdir, [("a", 0, 24), ("b", 1, 24)], cfg, caption="clip {seed}")
    md5 = load_output(curated)[1]["dvc"]["md5"]
    check_input(curated, md5)
    check_input(curated, "")  # no version handed over (a hand-run stage): nothing to check
    check_inputs([str(curated)], [md5])
    with pytest.raises(StaleInput, match="rerun with caching off"):
        check_input(curated, "0" * 32 + ".dir")
    with pytest.raises(StaleInput):
        check_inputs([str(curated), str(curated)], [md5])
