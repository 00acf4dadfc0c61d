"""Runs on a Kubeflow Pipelines endpoint: submit, schedule, status.

The pipeline is compiled from the same configuration the run is given, so its task settings
(images, resources, volumes, credentials, `pipelines.platform`) and its `config_json`
parameter never disagree. Authentication follows the KFP SDK's own mechanisms:

- `KFP_TOKEN` in the environment: sent as a bearer token (e.g. from `kubectl create token`);
- else a projected service-account token at `KF_PIPELINES_SA_TOKEN_PATH` (default
  `/var/run/secrets/kubeflow/pipelines/token`), as a pod in the cluster has;
- else none (a single-user KFP behind a port-forward).

The host is `--host`, else `KFP_HOST`, else `KF_PIPELINES_ENDPOINT`; in a pod with none of
them, the SDK finds the in-cluster `ml-pipeline` service itself.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from vidops.config import Config
from vidops.pipelines.compile import compile_pipeline
from vidops.pipelines.registry import INPUT_PARAMETER
from vidops.tracking.redact import refuse_inline_credentials

TOKEN_ENV = "KFP_TOKEN"
HOST_ENVS = ("KFP_HOST", "KF_PIPELINES_ENDPOINT")
FINAL_STATES = {"SUCCEEDED", "FAILED", "SKIPPED", "CANCELED"}


class SubmitError(RuntimeError):
    """The KFP endpoint could not be reached or refused the request."""


@dataclass
class RunRequest:
    """What a submitted or scheduled run is given."""

    pipeline: str
    inputs: list[str]  # source URIs, or one curated dataset folder (training)
    workdir: str  # as the tasks see it: under the workdir PVC's mount
    finetune_inputs: list[str] = field(default_factory=list)
    experiment: str = "vidops"
    run_name: str | None = None
    service_account: str | None = None
    enable_caching: bool | None = None  # None: what each task's settings say

    def arguments(self, cfg: Config) -> dict[str, Any]:
        """The pipeline's parameters. No credential is ever one: tasks read those from
        Secrets (config `kubernetes.secrets`), so a URI that carries one inline (a password,
        a presigned query) is refused (ConfigError)."""
        refuse_inline_credentials(cfg.to_dict(), [*self.inputs, *self.finetune_inputs],
                                  where=f"a {self.pipeline} run")
        args: dict[str, Any] = {"workdir": self.workdir, "config_json": cfg.to_json()}
        name = INPUT_PARAMETER[self.pipeline]
        if name == "curated_dir":
            if len(self.inputs) != 1:
                raise SubmitError("the training pipeline takes one curated dataset folder")
            args[name] = self.inputs[0]
        else:
            if not self.inputs:
                raise SubmitError(f"the {self.pipeline} pipeline needs --source URIs")
            args[name] = list(self.inputs)
        if self.pipeline == "lifecycle":
            args["finetune_sources"] = list(self.finetune_inputs)
        return args


def kfp_client(host: str | None = None, namespace: str | None = None) -> Any:
    import kfp
    from kfp.client import KF_PIPELINES_SA_TOKEN_ENV, KF_PIPELINES_SA_TOKEN_PATH
    from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

    host = host or next((os.environ[e] for e in HOST_ENVS if os.environ.get(e)), None)
    token_path = os.environ.get(KF_PIPELINES_SA_TOKEN_ENV, KF_PIPELINES_SA_TOKEN_PATH)
    kwargs: dict[str, Any] = {"host": host}
    if namespace:
        kwargs["namespace"] = namespace
    if os.environ.get(TOKEN_ENV):
        kwargs["existing_token"] = os.environ[TOKEN_ENV]
    elif host and Path(token_path).is_file():
        kwargs["credentials"] = ServiceAccountTokenVolumeCredentials(token_path)
    try:
        return kfp.Client(**kwargs)
    except Exception as exc:  # the SDK raises whatever its HTTP stack raised
        raise SubmitError(f"cannot reach Kubeflow Pipelines at {host or 'in-cluster'}: "
                          f"{exc}") from exc


def submit(cfg: Config, request: RunRequest, client: Any) -> dict[str, str]:
    """Compile and create one run; returns its id and experiment."""
    arguments = request.arguments(cfg)  # refused here, before anything is compiled or sent
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(request.pipeline, Path(tmp) / "pipeline.yaml", cfg)
        try:
            result = client.create_run_from_pipeline_package(
                str(package), arguments=arguments,
                run_name=request.run_name or _run_name(request.pipeline),
                experiment_name=request.experiment, enable_caching=request.enable_caching,
                service_account=request.service_account)
        except Exception as exc:
            raise SubmitError(f"KFP refused the run: {exc}") from exc
    return {"run_id": result.run_id, "experiment": request.experiment}


def _run_name(pipeline: str) -> str:
    return f"vidops-{pipeline} {datetime.now(timezone.utc):%Y-%m-%d %H:%M:%S} UTC"


def kfp_cron(expression: str) -> str:
    """KFP's scheduler reads cron with a seconds field first; a standard 5-field expression
    is taken as firing at second 0."""
    fields = expression.split()
    if len(fields) == 5:
        return " ".join(["0", *fields])
    if len(fields) == 6:
        return " ".join(fields)
    raise SubmitError(f"cron expression {expression!r}: expected 5 fields (minute hour "
                      "day-of-month month day-of-week) or 6 (with seconds first)")


def schedule(cfg: Config, request: RunRequest, cron: str, client: Any,
             name: str | None = None) -> dict[str, str]:
    """Create a recurring run (one at a time, no catch-up of missed runs)."""
    cron = kfp_cron(cron)
    arguments = request.arguments(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        package = compile_pipeline(request.pipeline, Path(tmp) / "pipeline.yaml", cfg)
        try:
            experiment = client.create_experiment(name=request.experiment)
            job = client.create_recurring_run(
                experiment_id=experiment.experiment_id,
                job_name=name or f"vidops-{request.pipeline}", cron_expression=cron,
                pipeline_package_path=str(package), params=arguments,
                max_concurrency=1, no_catchup=True, enable_caching=request.enable_caching,
                service_account=request.service_account)
        except Exception as exc:
            raise SubmitError(f"KFP refused the recurring run: {exc}") from exc
    return {"recurring_run_id": job.recurring_run_id, "cron": cron,
            "experiment": request.experiment}


def run_status(client: Any, run_id: str, wait_s: float = 0) -> dict[str, Any]:
    """A run's state and its tasks' states; `wait_s` > 0 waits for it to finish."""
    try:
        run = (client.wait_for_run_completion(run_id, timeout=wait_s) if wait_s
               else client.get_run(run_id))
    except TimeoutError:
        run = client.get_run(run_id)
    except Exception as exc:
        raise SubmitError(f"cannot read run {run_id}: {exc}") from exc
    tasks = []
    details = getattr(run, "run_details", None)
    for task in (getattr(details, "task_details", None) or []):
        tasks.append({"name": task.display_name, "state": str(task.state)})
    return {"run_id": run.run_id, "name": run.display_name, "state": str(run.state),
            "created_at": str(run.created_at), "finished_at": str(run.finished_at),
            "error": getattr(getattr(run, "error", None), "message", None),
            "tasks": sorted(tasks, key=lambda t: t["name"] or "")}
