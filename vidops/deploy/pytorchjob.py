"""Multi-node pretraining as a Kubeflow Training Operator PyTorchJob.

With `train.nodes > 1` the pretrain task of the compiled pipeline does not train itself: it
launches a PyTorchJob of `train.nodes` pods (one Master, the rest Workers), each running
`torchrun -m vidops.cli pretrain ...` with `resources.pretrain.gpus` processes, and waits for
it. The operator's PET_* environment variables give torchrun the node count, the node's rank
and the master's address; the pods share the pipeline's workdir PVC.
"""

from __future__ import annotations

import copy
import logging
import re
import time
from importlib import resources
from typing import Any, Literal

import yaml

from vidops.config import Config

__all__ = ["GROUP", "PLURAL", "VERSION", "TrainingJobFailed", "job_outcome",
           "pytorchjob_manifest", "run_pytorchjob"]

log = logging.getLogger(__name__)

GROUP = "kubeflow.org"
VERSION = "v1"
PLURAL = "pytorchjobs"
SERVICE_ACCOUNT = "vidops-pipeline-runner"
WORKDIR_VOLUME = "workdir"
# Pods are named <job>-worker-<index>, and Services after them: DNS-1035 labels.
_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_MAX_NAME = 48


class TrainingJobFailed(RuntimeError):
    """The PyTorchJob failed or did not finish in time."""


def _template() -> dict[str, Any]:
    text = resources.files("vidops.deploy").joinpath("pytorchjob.yaml").read_text("utf-8")
    return yaml.safe_load(text)


def pytorchjob_manifest(cfg: Config, *, name: str, namespace: str, config_path: str,
                        args: list[str]) -> dict[str, Any]:
    """The PyTorchJob that runs `torchrun -m vidops.cli *args` on `cfg.train.nodes` pods.

    `args` is the vidops command line (it already carries `--config config_path`, the
    configuration file on the shared workdir every pod reads).
    """
    nodes = cfg.train.nodes
    if nodes < 2:
        raise ValueError(f"train.nodes is {nodes}: a single node trains inside the pipeline "
                         f"task itself, not as a PyTorchJob")
    if not _NAME.fullmatch(name) or len(name) > _MAX_NAME:
        raise ValueError(f"PyTorchJob name {name!r}: lower-case letters, digits and '-', "
                         f"starting with a letter, at most {_MAX_NAME} characters")
    if config_path not in args:
        raise ValueError(f"args {args} do not pass the configuration {config_path}")
    res = cfg.resources.pretrain
    kube = cfg.kubernetes

    job = _template()
    job["metadata"].update({"name": name, "namespace": namespace})
    job["spec"]["runPolicy"]["activeDeadlineSeconds"] = kube.job_timeout_s
    # The CRD types nprocPerNode as a string (torchrun's --nproc-per-node also takes "auto").
    job["spec"]["nprocPerNode"] = str(res.gpus or 1)

    replicas = job["spec"]["pytorchReplicaSpecs"]
    pod = replicas["Master"]["template"]["spec"]
    pod["securityContext"].update({"runAsUser": kube.run_as_user,
                                   "runAsGroup": kube.run_as_user,
                                   "fsGroup": kube.run_as_user})
    if kube.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": secret} for secret in kube.image_pull_secrets]
    if res.gpus:
        if not res.accelerator:
            raise ValueError("resources.pretrain.gpus needs resources.pretrain.accelerator")
        pod["nodeSelector"] = dict(kube.gpu_node_selector)
        pod["tolerations"] = [dict(toleration) for toleration in kube.gpu_tolerations]
    pod["volumes"].insert(0, {"name": WORKDIR_VOLUME,
                              "persistentVolumeClaim": {"claimName": kube.workdir_pvc}})

    container = pod["containers"][0]
    quantities: dict[str, Any] = {"cpu": res.cpu, "memory": res.memory}
    if res.gpus:
        quantities[res.accelerator] = res.gpus
    container.update({
        "image": cfg.images.gpu,
        "command": ["torchrun", "-m", "vidops.cli", *args],
        # Guaranteed QoS: requests and limits alike.
        "resources": {"requests": dict(quantities), "limits": dict(quantities)},
    })
    container["securityContext"]["runAsUser"] = kube.run_as_user
    container["env"].extend(_env(cfg))
    container["volumeMounts"].insert(0, {"name": WORKDIR_VOLUME,
                                         "mountPath": kube.workdir_mount})

    replicas["Worker"] = {"replicas": nodes - 1,
                          "restartPolicy": replicas["Master"]["restartPolicy"],
                          "template": copy.deepcopy(replicas["Master"]["template"])}
    return job


def _env(cfg: Config) -> list[dict[str, Any]]:
    """Credentials from Secrets and endpoints from the ConfigMap, as the pipeline tasks get
    them (never a literal value)."""
    env: list[dict[str, Any]] = []
    for secret in cfg.kubernetes.secrets:
        for variable, key in secret.env.items():
            env.append({"name": variable,
                        "valueFrom": {"secretKeyRef": {"name": secret.secret, "key": key}}})
    if cfg.kubernetes.config_map:
        for variable, key in cfg.kubernetes.config_map_env.items():
            env.append({"name": variable, "valueFrom": {"configMapKeyRef": {
                "name": cfg.kubernetes.config_map, "key": key}}})
    return env


def _final_condition(job: dict[str, Any]) -> dict[str, Any] | None:
    conditions = (job.get("status") or {}).get("conditions") or []
    for condition in reversed(conditions):
        if condition.get("status") == "True" and condition.get("type") in ("Succeeded",
                                                                            "Failed"):
            return condition
    return None


def job_outcome(job: dict[str, Any]) -> Literal["running", "succeeded", "failed"]:
    """What the job's status says: its last true Succeeded or Failed condition, else running
    (Created, Running, Restarting, Suspended, or no status yet)."""
    condition = _final_condition(job)
    if condition is None:
        return "running"
    return "succeeded" if condition["type"] == "Succeeded" else "failed"


def _custom_objects_api() -> Any:
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.CustomObjectsApi()


def _transient(exc: Exception) -> bool:
    status = getattr(exc, "status", None)
    return status in (429, 500, 502, 503, 504) or isinstance(exc, (ConnectionError,
                                                                   TimeoutError))


def run_pytorchjob(manifest: dict[str, Any], *, timeout_s: float, poll_s: float = 15.0) -> None:
    """Create the PyTorchJob and wait until it succeeds; raise `TrainingJobFailed` when it
    fails, or delete it and raise when it has not finished after `timeout_s` seconds."""
    api = _custom_objects_api()
    namespace = manifest["metadata"]["namespace"]
    name = manifest["metadata"]["name"]
    api.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, manifest)
    log.info("created PyTorchJob %s/%s", namespace, name)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            job = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        except Exception as exc:  # the API server restarting must not fail a 2-day run
            if not _transient(exc):
                raise
            log.warning("PyTorchJob %s/%s: %s; polling again", namespace, name, exc)
            job = {}
        outcome = job_outcome(job)
        if outcome == "succeeded":
            log.info("PyTorchJob %s/%s succeeded", namespace, name)
            return
        if outcome == "failed":
            condition = _final_condition(job) or {}
            raise TrainingJobFailed(
                f"PyTorchJob {namespace}/{name} failed: {condition.get('reason', '')}: "
                f"{condition.get('message', '')} (kubectl -n {namespace} logs "
                f"{name}-master-0)")
        if time.monotonic() >= deadline:
            api.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name,
                                                propagation_policy="Background")
            raise TrainingJobFailed(f"PyTorchJob {namespace}/{name} did not finish within "
                                    f"{timeout_s:g} s: deleted")
        time.sleep(poll_s)
