"""Run a training stage at the scale its task was given, from inside a pipeline task.

    one GPU, or CPU          -> in this process
    resources.<stage>.gpus>1 -> torchrun in this pod, one process per GPU
    train.nodes > 1          -> a Kubeflow PyTorchJob of train.nodes pods (pretraining only),
                                which this task creates and follows to the end

The processes of the last two run the `vidops` CLI on the shared workdir, with the task's
configuration written beside the model folder, and the task reads back the training.json
they wrote: the same training code at every scale.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from vidops.config import Config

JOB_CONFIG = "job-config.json"


def launch_training(stage: str, cli_args: list[str], out_dir: Path, cfg: Config,
                    run_here: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Train `stage` (pretrain or finetune); returns what its training.json records.

    `cli_args`: the stage's `vidops` command line without --config (the data, model and
    workdir); `run_here` trains in this process, for a single device."""
    from vidops.stages.training import TRAINING_JSON

    nodes = cfg.train.nodes if stage == "pretrain" else 1
    gpus = cfg.resources.for_stage(stage).gpus
    if nodes <= 1 and gpus <= 1:
        return run_here()
    from vidops.tracking.redact import refuse_inline_credentials

    # The file lies in the model folder (logged to MLflow, registered): credentials reach the
    # ranks and pods from the environment (Secrets), never inside it.
    refuse_inline_credentials(cfg.to_dict(), where=f"the {stage} job's {JOB_CONFIG}")
    out_dir.mkdir(parents=True, exist_ok=True)
    config_file = out_dir / JOB_CONFIG
    config_file.write_text(cfg.to_json() + "\n", encoding="utf-8")
    args = [stage, "--config", str(config_file), *cli_args]
    if nodes > 1:
        from vidops.deploy.pytorchjob import pytorchjob_manifest, run_pytorchjob

        manifest = pytorchjob_manifest(cfg, name=_job_name(stage), namespace=_namespace(),
                                       config_path=str(config_file), args=args)
        run_pytorchjob(manifest, timeout_s=cfg.kubernetes.job_timeout_s)
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={gpus}", "-m", "vidops.cli", *args]
        code = subprocess.call(command)
        if code:
            raise RuntimeError(f"{stage} under torchrun ({gpus} processes) exited {code}")
    return json.loads((out_dir / TRAINING_JSON).read_text(encoding="utf-8"))


def _job_name(stage: str) -> str:
    """Unique per KFP task pod (a retry is a new pod), short and DNS-safe whatever the pod's
    name: the operator names the job's pods and Services after it."""
    pod = os.environ.get("HOSTNAME", "local")
    return f"vidops-{stage}-{hashlib.sha1(pod.encode()).hexdigest()[:10]}"


def _namespace() -> str:
    """The namespace this pod runs in: the job's pods mount the same workdir PVC."""
    token_dir = Path("/var/run/secrets/kubernetes.io/serviceaccount")
    if (token_dir / "namespace").is_file():
        return (token_dir / "namespace").read_text(encoding="utf-8").strip()
    return os.environ.get("VIDOPS_NAMESPACE", "vidops")
