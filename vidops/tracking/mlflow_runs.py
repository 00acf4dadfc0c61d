"""MLflow runs for stages: one experiment per pipeline, one parent run per pipeline run,
a nested run per stage. The default store is SQLite inside the workdir."""

from __future__ import annotations

import getpass
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.abstract_context import RunContextProvider
from mlflow.tracking.context.registry import _run_context_provider_registry as _providers
from mlflow.utils.mlflow_tags import MLFLOW_USER

from vidops.config import Config
from vidops.tracking.redact import redact_obj, redact_uri
from vidops.tracking.workdir import Workdir

# MLflow's params are capped in length; longer values are truncated with a marker.
_PARAM_MAX = 6000


class _RunUser(RunContextProvider):
    """MLflow takes MLFLOW_TRACKING_USERNAME, a credential (from the vidops-mlflow Secret on
    a cluster), for the `mlflow.user` of every run and logged model it creates; vidops has it
    record the OS user instead, as MLflow does when no credential is set. Registered after
    MLflow's own providers, so its tag is the one kept."""

    def in_context(self) -> bool:
        return True

    def tags(self) -> dict[str, str]:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "unknown"
        return {MLFLOW_USER: user}


if not any(isinstance(p, _RunUser) for p in getattr(_providers, "_registry", [])):
    _providers.register(_RunUser)


def redact(uri: str) -> str:
    """A URI without credentials (a Postgres password, say), fit for stage.json and logs."""
    return redact_uri(uri)


def tracking_uri(cfg: Config, workdir: Workdir) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.uri or (
        f"sqlite:///{workdir.mlflow_db}"
    )


def configure(cfg: Config, workdir: Workdir) -> str:
    uri = tracking_uri(cfg, workdir)
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI to the environment, which
    # would then outrank the config of every later workdir in this process and in its
    # children. Keep the user's environment as it was.
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before
    return uri


def ensure_experiment(name: str, workdir: Workdir) -> str:
    """The experiment's id, creating it (with artifacts in the workdir when local) if needed."""
    client = MlflowClient()
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = None
    if mlflow.get_tracking_uri().startswith("sqlite:"):
        workdir.mlflow_artifacts.mkdir(parents=True, exist_ok=True)
        location = workdir.mlflow_artifacts.as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # Another process created it between our lookup and create.
        return client.get_experiment_by_name(name).experiment_id


def start_parent_run(cfg: Config, workdir: Workdir, experiment: str, run_name: str) -> str:
    """A parent run for a whole pipeline run; stage runs nest under its id."""
    configure(cfg, workdir)
    experiment_id = ensure_experiment(experiment, workdir)
    run = MlflowClient().create_run(experiment_id, run_name=run_name)
    return run.info.run_id


def end_run(run_id: str, status: str = "FINISHED") -> None:
    MlflowClient().set_terminated(run_id, status=status)


@contextmanager
def stage_run(
    cfg: Config, workdir: Workdir, stage: str, experiment: str, parent_run_id: str | None
) -> Iterator[mlflow.ActiveRun]:
    """An MLflow run for one stage execution; FAILED if the stage raises."""
    configure(cfg, workdir)
    experiment_id = ensure_experiment(experiment, workdir)
    with mlflow.start_run(
        experiment_id=experiment_id,
        run_name=stage,
        parent_run_id=parent_run_id or None,
        tags={"vidops.stage": stage},
        log_system_metrics=False,
    ) as run:
        log_params(cfg)
        yield run


def log_params(cfg: Config) -> None:
    """The resolved configuration as params of the active run (long values truncated),
    credentials inside URI-valued settings redacted (vidops.tracking.redact)."""
    flat = {key: redact_obj(value) for key, value in cfg.flat().items()}
    mlflow.log_params({
        key: (str(value)[: _PARAM_MAX - 3] + "...") if len(str(value)) > _PARAM_MAX else value
        for key, value in flat.items()
    })


def log_dataset(
    manifest: pd.DataFrame, name: str, digest: str, source: str, context: str
) -> None:
    """Record a dataset version on the active run: the manifest's schema and row count, the
    DVC md5 as its digest and the remote location as its source."""
    with warnings.catch_warnings():
        # MLflow hints about integer columns and ambiguous source types; neither applies.
        warnings.simplefilter("ignore", UserWarning)
        dataset = mlflow.data.from_pandas(manifest, source=redact_uri(source), name=name,
                                          digest=digest)
        mlflow.log_input(dataset, context=context)


def log_file(path: Path, artifact_path: str | None = None) -> None:
    """Log a file, or a directory under its own name, as artifacts of the active run (under
    `artifact_path` when given)."""
    path = Path(path)
    if path.is_dir():
        where = f"{artifact_path}/{path.name}" if artifact_path else path.name
        mlflow.log_artifacts(str(path), artifact_path=where)
    else:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)
