"""The ingest component: `vidops.stages.ingest.run_ingest` as a KFP task."""

from typing import NamedTuple

from kfp import dsl

from vidops.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def ingest(
    sources: list,
    workdir: str,
    config_json: str,
    manifest: dsl.Output[dsl.Dataset],
    out_dir: str = "",
    dataset: str = "",
    parent_run_id: str = "",
    quiet: bool = True,
) -> NamedTuple("IngestOutputs", out_dir=str, dvc_md5=str, mlflow_run_id=str, kept=int,
                rejected=int):
    from vidops.components.publish import publish_stage
    from vidops.config import config_from_json
    from vidops.stages.ingest import run_ingest
    from vidops.tracking.workdir import Workdir

    work = Workdir.at(workdir)
    info = run_ingest(list(sources), out_dir or work.stage_dir("ingest", dataset),
                      cfg=config_from_json(config_json), workdir=work,
                      parent_run_id=parent_run_id or None, quiet=quiet)
    return publish_stage(info, manifest)
