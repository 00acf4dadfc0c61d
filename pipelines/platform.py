"""Cluster settings of every task in the compiled pipelines, from config.

One function, `on_cluster`, is the only place a task learns how it runs on Kubernetes; every
task of every pipeline passes through it, so a task cannot miss the workdir volume or the
credentials. What it sets, by the kind of stage:

| | data stages | training stages | evaluate, register, promote |
| --- | --- | --- | --- |
| image | `images.cpu` | `images.gpu` | `images.cpu` (`images.gpu` with GPUs) |
| resources | `resources.<stage>`: requests = limits | same, plus GPUs | same |
| GPU nodes | - | `kubernetes.gpu_node_selector`, `gpu_tolerations` | evaluate, if it has GPUs |
| retries | `kubernetes.data_retries` (backoff) | none: rerun by choice, resumes | none |
| KFP cache | `kubernetes.cache_data` | `kubernetes.cache_training` | never |

and for all of them: the workdir PVC mounted at `kubernetes.workdir_mount`, credentials as
environment variables from Secrets (never parameters, so never in the run's spec or logs),
endpoints from a ConfigMap, image pull secrets, and a non-root security context.

A cached task is safe because the data stages take their input's DVC md5 as a parameter
(`input_md5`): KFP's cache key changes with the data, not only with its path. kfp.local ignores
all of this, so the embedded default runs the very same DAG.
"""

from __future__ import annotations

from typing import Any

from kfp import kubernetes

from vidops.config import TRAINING_STAGES, Config

DATA_STAGES = ("ingest", "shard", "filter", "annotate", "merge", "encode", "merge-encoded")
# Read and write the registry, whose state another run may have changed: never cached.
REGISTRY_STAGES = ("evaluate", "register", "promote")
# Hashes its sources, which may have changed behind the same URIs: never cached either.
UNCACHEABLE = ("ingest", *REGISTRY_STAGES)


def on_cluster(task: Any, stage: str, cfg: Config) -> Any:
    """Give `task` (a component of `stage`) its cluster settings; returns the task."""
    if stage not in (*DATA_STAGES, *TRAINING_STAGES, *REGISTRY_STAGES):
        raise ValueError(f"no cluster settings for stage {stage!r}")
    k8s = cfg.kubernetes
    training = stage in TRAINING_STAGES
    res = cfg.resources.for_stage(stage)

    task.set_container_image(cfg.images.gpu if training or res.gpus else cfg.images.cpu)
    task.set_cpu_request(res.cpu).set_cpu_limit(res.cpu)
    task.set_memory_request(res.memory).set_memory_limit(res.memory)
    if res.gpus:
        task.set_accelerator_type(res.accelerator or "nvidia.com/gpu")
        task.set_accelerator_limit(res.gpus)
        for key, value in k8s.gpu_node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)
        for toleration in k8s.gpu_tolerations:
            kubernetes.add_toleration(task, **toleration)

    if stage in UNCACHEABLE:
        task.set_caching_options(False)
    else:
        task.set_caching_options(k8s.cache_training if training else k8s.cache_data)
    if stage in DATA_STAGES and k8s.data_retries.attempts:
        retry = k8s.data_retries
        task.set_retry(num_retries=retry.attempts, backoff_duration=retry.backoff,
                       backoff_factor=retry.backoff_factor,
                       backoff_max_duration=retry.backoff_max)

    kubernetes.mount_pvc(task, pvc_name=k8s.workdir_pvc, mount_path=k8s.workdir_mount)
    for secret in k8s.secrets:
        kubernetes.use_secret_as_env(task, secret_name=secret.secret,
                                     secret_key_to_env={key: env for env, key
                                                        in secret.env.items()})
    if k8s.config_map and k8s.config_map_env:
        # Several variables may read the same key (one endpoint, two SDKs' variable names);
        # a key-to-variable map holds one variable per key, so one call per variable.
        for env, key in k8s.config_map_env.items():
            kubernetes.use_config_map_as_env(task, config_map_name=k8s.config_map,
                                             config_map_key_to_env={key: env})
    if k8s.image_pull_secrets:
        kubernetes.set_image_pull_secrets(task, list(k8s.image_pull_secrets))
    kubernetes.set_security_context(task, run_as_user=k8s.run_as_user,
                                    run_as_group=k8s.run_as_user, run_as_non_root=True)
    return task
