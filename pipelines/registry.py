"""The pipelines that can be compiled and run, by name."""

from collections.abc import Callable

from vidops.pipelines.curation import curation_pipeline

PIPELINES: dict[str, Callable] = {"curation": curation_pipeline}
