"""Evaluation and promotion: how the lifecycle judges a trained model.

    evaluate -> register (challenger; gates) -> dsl.If(gates passed) -> promote (champion)

`register_candidate` is a sub-pipeline (a graph component), so that a second candidate can be
registered strictly after the first one's promotion settled: its gates then compare with the
champion that promotion left.
"""

from typing import Any

from kfp import dsl

from vidops.components.evaluate import evaluate
from vidops.components.register import promote, register


def evaluate_task(model_dir: Any, common: dict[str, Any], compare_label: str = "",
                  compare_dir: Any = "") -> Any:
    # Never served from KFP's cache: the champion it is compared with may have changed.
    return evaluate(model_dir=model_dir, compare_label=compare_label, compare_dir=compare_dir,
                    **common).set_caching_options(False)


@dsl.pipeline(name="register-candidate",
              description="Register an evaluated model; promote it to champion if its gates "
                          "passed.")
def register_candidate(model_dir: str, eval_dir: str, workdir: str, config_json: str,
                       parent_run_id: str = "") -> None:
    registered = register(model_dir=model_dir, eval_dir=eval_dir, workdir=workdir,
                          config_json=config_json, parent_run_id=parent_run_id
                          ).set_caching_options(False)
    with dsl.If(registered.output == True, name="gates-passed"):  # noqa: E712 (a KFP condition)
        promote(eval_dir=eval_dir, workdir=workdir, config_json=config_json
                ).set_caching_options(False)


def register_task(model_dir: Any, eval_dir: Any, common: dict[str, Any]) -> Any:
    return register_candidate(model_dir=model_dir, eval_dir=eval_dir,
                              workdir=common["workdir"], config_json=common["config_json"],
                              parent_run_id=common["parent_run_id"])
