"""Evaluation and promotion: how the lifecycle judges a trained model.

    evaluate -> register (challenger; gates) -> dsl.If(gates passed) -> promote (champion)

`register_candidate` is a sub-pipeline (a graph component), so that a second candidate can be
registered strictly after the first one's promotion settled: its gates then compare with the
champion that promotion left. None of these tasks is ever served from KFP's cache: the
registry they read may have changed since (`pipelines.platform`).
"""

from collections.abc import Callable
from typing import Any

from kfp import dsl

from vidops.components.evaluate import evaluate
from vidops.components.register import promote, register
from vidops.config import Config
from vidops.pipelines.platform import on_cluster


def evaluate_task(model_dir: Any, common: dict[str, Any], cfg: Config, compare_label: str = "",
                  compare_dir: Any = "") -> Any:
    return on_cluster(evaluate(model_dir=model_dir, compare_label=compare_label,
                               compare_dir=compare_dir, **common), "evaluate", cfg)


def register_candidate(cfg: Config) -> Callable[..., Any]:
    """The register-then-maybe-promote sub-pipeline, its tasks set up for `cfg`'s cluster."""

    @dsl.pipeline(name="register-candidate",
                  description="Register an evaluated model; promote it to champion if its "
                              "gates passed.")
    def register_candidate_pipeline(model_dir: str, eval_dir: str, workdir: str,
                                    config_json: str, parent_run_id: str = "") -> None:
        registered = on_cluster(register(model_dir=model_dir, eval_dir=eval_dir,
                                         workdir=workdir, config_json=config_json,
                                         parent_run_id=parent_run_id), "register", cfg)
        with dsl.If(registered.output == True, name="gates-passed"):  # noqa: E712 (KFP)
            on_cluster(promote(eval_dir=eval_dir, workdir=workdir, config_json=config_json),
                       "promote", cfg)

    return register_candidate_pipeline


def register_task(candidate: Callable[..., Any], model_dir: Any, eval_dir: Any,
                  common: dict[str, Any]) -> Any:
    return candidate(model_dir=model_dir, eval_dir=eval_dir, workdir=common["workdir"],
                     config_json=common["config_json"], parent_run_id=common["parent_run_id"])
