"""The evaluate component: a model's fixed prompt set generated and measured."""

from typing import NamedTuple

from kfp import dsl

from vidops.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def evaluate(
    model_dir: str,
    workdir: str,
    config_json: str,
    metrics: dsl.Output[dsl.Metrics],
    report: dsl.Output[dsl.HTML],
    compare_label: str = "",
    compare_dir: str = "",
    parent_run_id: str = "",
    quiet: bool = True,
) -> NamedTuple("EvaluateOutputs", eval_dir=str):
    """Returns the evaluation folder; the headline metrics and report.html also go to KFP, so
    its UI shows them beside the run."""
    import math
    import shutil
    from pathlib import Path

    from vidops.config import config_from_json
    from vidops.stages.evaluate import REPORT_HTML, evaluate
    from vidops.tracking.workdir import Workdir

    work = Workdir.at(workdir)
    out_dir = work.evaluations / Path(model_dir).name
    result = evaluate(model_dir, out_dir, cfg=config_from_json(config_json), workdir=work,
                      compare={compare_label: Path(compare_dir)} if compare_dir else None,
                      parent_run_id=parent_run_id or None, quiet=quiet)
    for name, value in result["headline"].items():
        if math.isfinite(value):
            metrics.log_metric(name, value)
    Path(report.path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(out_dir / REPORT_HTML, report.path)
    return (str(out_dir),)
