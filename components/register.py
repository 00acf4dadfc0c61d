"""The register and promote components: the registry's two steps, with the promotion decision
between them left to the pipeline (a dsl.If on what register returns)."""

from kfp import dsl

from vidops.components.images import CPU_IMAGE


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def register(
    model_dir: str,
    eval_dir: str,
    workdir: str,
    config_json: str,
    parent_run_id: str = "",
) -> bool:
    """Registers the candidate as `challenger` and returns whether every gate passed. What
    happened is written to <eval_dir>/registration.json, which promote reads."""
    from vidops.config import config_from_json
    from vidops.tracking.registry import record_registration, register
    from vidops.tracking.workdir import Workdir

    result = register(model_dir, eval_dir, cfg=config_from_json(config_json),
                      workdir=Workdir.at(workdir), promote=False,
                      parent_run_id=parent_run_id or None)
    record_registration(eval_dir, result, parent_run_id)
    return bool(result["passed"])


@dsl.component(base_image=CPU_IMAGE, install_kfp_package=False)
def promote(eval_dir: str, workdir: str, config_json: str) -> str:
    """Moves `champion` to the version registered from `eval_dir`; returns the version."""
    from vidops.config import config_from_json
    from vidops.tracking.registry import promote_registered
    from vidops.tracking.workdir import Workdir

    return promote_registered(eval_dir, cfg=config_from_json(config_json),
                              workdir=Workdir.at(workdir))
