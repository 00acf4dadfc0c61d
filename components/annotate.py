"""The annotate component: captions, keyframes, faces and tags for one filtered shard."""

from typing import NamedTuple

from kfp import dsl

from vidops.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def annotate(
    in_dir: str,
    workdir: str,
    config_json: str,
    manifest: dsl.Output[dsl.Dataset],
    input_md5: str = "",
    parent_run_id: str = "",
    quiet: bool = True,
) -> NamedTuple("AnnotateOutputs", out_dir=str, dvc_md5=str, mlflow_run_id=str, kept=int,
                rejected=int):
    from pathlib import Path

    from vidops.components.publish import check_input, publish_stage
    from vidops.config import config_from_json
    from vidops.stages.annotate import run_annotate
    from vidops.tracking.workdir import Workdir

    work = Workdir.at(workdir)
    check_input(in_dir, input_md5)
    # [corpus-]filter-shard-NN -> [corpus-]annotate-shard-NN: the shard's name follows it
    # through the DAG, beside its filter output.
    out_dir = Path(in_dir).with_name(Path(in_dir).name.replace("filter", "annotate", 1))
    info = run_annotate(Path(in_dir), out_dir, cfg=config_from_json(config_json),
                        workdir=work, parent_run_id=parent_run_id or None, quiet=quiet)
    return publish_stage(info, manifest)
