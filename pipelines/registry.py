"""The pipelines that can be compiled and run, by name: each a builder that takes the
configuration (for compile-time settings such as task resources) and returns the pipeline."""

from collections.abc import Callable

from vidops.config import Config
from vidops.pipelines import curation, lifecycle, training

PIPELINES: dict[str, Callable[[Config], Callable[..., None]]] = {
    "curation": curation.build,
    "training": training.build,
    "lifecycle": lifecycle.build,
}
# What each pipeline takes as its data input: source URIs, or a curated dataset directory.
INPUT_PARAMETER = {"curation": "sources", "training": "curated_dir", "lifecycle": "sources"}
# The MLflow experiment a pipeline's parent run lives in (config tracking.experiments.*).
EXPERIMENT = {"curation": "curation", "training": "training", "lifecycle": "training"}
