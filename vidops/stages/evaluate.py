"""Evaluate: every candidate model measured the same way.

MODEL generates a fixed prompt set (config `evaluate`), one video per (prompt, seed), in
batches whose videos depend on their own seed only. Each video gets the book's baseline metrics
and VBench-style ones computable without downloaded networks (`vidops.evaluation.metrics`).
Shapes prompts are read back from the pixels (colour, direction, shape) for prompt adherence,
overall and per group: combinations seen in training, held-out combinations, and the
fine-tune's new colours. Other prompts get a CLIP score when a CLIP model is configured; without
one the score is reported as not available. The set as a whole is compared with real clips the
model never trained on (the held-out clips its card lists, or `--reference`): a Frechet
distance on the model's own VAE encoder features, and FVD when an I3D network is configured.
Per-video values are aggregated with 95 % confidence intervals.

Writes `metrics.json`, `samples/` and `report.html` into the output folder and logs them to an
MLflow run; the report compares with the current champion and with any `compare` evaluations.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import product
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import torch

from vidops.config import Config, EvaluateConfig
from vidops.data.samples import COLOURS, DIRECTIONS, FINETUNE_COLOURS, HOLDOUT, SHAPES, caption_for
from vidops.evaluation import metrics as vm
from vidops.evaluation.report import write_report
from vidops.evaluation.shapes import parse_prompt, read_shape_video
from vidops.media.files import write_json_atomic
from vidops.models.folder import (
    LoadedModel,
    load_model_folder,
    model_identity,
    read_card,
)
from vidops.models.imported import resolve_model_ref
from vidops.models.lora import merge_lora
from vidops.models.sampling import generate, sampling_settings, save_video
from vidops.models.vae import read_clip, resolve_device
from vidops.stage import ItemProgress, StageError, load_output
from vidops.tracking import mlflow_runs
from vidops.tracking.redact import redact_obj, redact_uri
from vidops.tracking.registry import REGISTRATION_JSON
from vidops.tracking.workdir import Workdir, code_version

log = logging.getLogger(__name__)

METRICS_JSON = "metrics.json"
REPORT_HTML = "report.html"
SAMPLES_DIR = "samples"
# Adherence groups that measure what a model was trained for; `new_concept` (colours only a
# fine-tune teaches) is reported beside them, not folded in, so base and fine-tune compare.
DOMAIN_GROUPS = ("train", "held_out")
HEADLINE_INFO = {
    "adherence_colour": vm.MetricInfo("colour adherence", True,
                                      "share of shapes videos whose colour reads as asked"),
    "adherence_direction": vm.MetricInfo("direction adherence", True,
                                         "share of shapes videos moving the asked way"),
    "adherence_shape": vm.MetricInfo("shape adherence", True,
                                     "share of shapes videos whose shape reads as asked"),
    "held_out_both": vm.MetricInfo("held-out colour and direction", True,
                                   "share of held-out combinations right in both"),
    "new_concept_colour": vm.MetricInfo("new colour adherence", True,
                                        "share of the fine-tune colours' videos read as asked"),
    "clip_score": vm.MetricInfo("CLIP score", True, "100 x cosine(image, text), mean"),
    "fd_vae": vm.MetricInfo("Frechet distance (VAE features)", False,
                            "to held-out real clips, on the model's own VAE encoder features"),
    "fvd": vm.MetricInfo("FVD", False, "Frechet distance of I3D features to held-out clips"),
}


@dataclass(frozen=True)
class EvalCase:
    prompt: str
    seed: int
    group: str  # train | held_out | new_concept | custom


def prompt_cases(ev: EvaluateConfig) -> list[EvalCase]:
    """The fixed prompt set, seed-major: every prompt once per seed."""
    if ev.prompt_set == "custom":
        prompts = [(p, "custom") for p in ev.prompts]
    else:
        # Every colour x direction once, the shapes cycled over them (skipping a held-out
        # combination), then every held-out combination, then the new colours in every
        # direction: each colour, shape and direction is asked for.
        prompts = []
        for i, (colour, direction) in enumerate(product(COLOURS, DIRECTIONS)):
            shape = next(s for k in range(len(SHAPES))
                         if (colour, s := SHAPES[(i + k) % len(SHAPES)], direction) not in HOLDOUT)
            prompts.append((caption_for(colour, shape, direction), "train"))
        prompts += [(caption_for(*combo), "held_out") for combo in HOLDOUT]
        prompts += [(caption_for(colour, SHAPES[i % len(SHAPES)], direction), "new_concept")
                    for colour in FINETUNE_COLOURS for i, direction in enumerate(DIRECTIONS)]
    return [EvalCase(prompt, seed, group) for seed in ev.seeds for prompt, group in prompts]


def evaluate(
    model_ref: str | Path,
    out_dir: Path,
    *,
    cfg: Config,
    workdir: Workdir,
    reference: Path | None = None,
    compare: dict[str, Path] | None = None,
    parent_run_id: str | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Evaluate MODEL into `out_dir`; returns what metrics.json holds."""
    ev = cfg.evaluate
    out_dir = Path(out_dir).resolve()
    model_dir = resolve_model_ref(model_ref, cfg=cfg, workdir=workdir)
    device = resolve_device(ev.device)
    model = load_model_folder(model_dir, device, download_dir=workdir.downloads)
    if model.base_path is not None:
        # Folded into the weights, an adapter samples ~4x faster and gives the same videos.
        merge_lora(model.denoiser.transformer)
    how = sampling_settings(cfg, model.card, {"steps": ev.steps, "sampler": ev.sampler,
                                              "guidance_scale": ev.guidance_scale})
    settings = {**how.model_dump(), "seeds": list(ev.seeds), "prompt_set": ev.prompt_set,
                "fps": model.fps}
    cases = prompt_cases(ev)
    # An earlier evaluation in this folder (its samples, and what registering it did) is
    # replaced, not mixed in; metrics.json, which makes the folder an evaluation that register
    # accepts, goes first and comes back last, so an evaluation killed half-way is none.
    (out_dir / METRICS_JSON).unlink(missing_ok=True)
    shutil.rmtree(out_dir / SAMPLES_DIR, ignore_errors=True)
    (out_dir / REGISTRATION_JSON).unlink(missing_ok=True)
    (out_dir / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)

    mlflow_runs.configure(cfg, workdir)
    experiment_id = mlflow_runs.ensure_experiment(cfg.tracking.experiments.training, workdir)
    with mlflow.start_run(experiment_id=experiment_id, run_name="evaluate",
                          parent_run_id=parent_run_id or None,
                          tags={"vidops.stage": "evaluate",
                                "vidops.model": redact_uri(str(model_ref))},
                          log_system_metrics=False) as run:
        mlflow_runs.log_params(cfg)
        videos, rows = _generate_all(model, cases, settings, ev.batch_size, out_dir, quiet)
        _score_adherence(rows, videos)
        clip = _clip_scores(ev, rows, videos, device)
        distribution = _distribution(model, cfg, videos, reference)
        result = {
            "format": 1,
            "model": {"ref": str(model_ref), "path": str(model_dir),
                      "kind": model.card.get("kind"), "name": model.card.get("name"),
                      "digest": model_identity(model_dir),
                      "mlflow_run_id": model.card.get("mlflow_run_id")},
            "created_at": datetime.now(timezone.utc).isoformat(),
            "code_version": code_version(),
            "settings": settings,
            "videos": rows,
            "metrics": {name: vm.mean_ci([r["metrics"][name] for r in rows])
                        for name in vm.VIDEO_METRICS},
            "adherence": _adherence_summary(rows),
            "clip_score": clip,
            "distribution": distribution,
            "mlflow_run_id": run.info.run_id,
            "parent_run_id": parent_run_id or None,
        }
        result["headline"] = headline(result)
        result["metric_info"] = {name: vars(info) for name, info in
                                 {**vm.VIDEO_METRICS, **HEADLINE_INFO}.items()}
        result = redact_obj(_plain(result))
        write_report(out_dir, result, _comparisons(cfg, workdir, compare, result))
        write_json_atomic(out_dir / METRICS_JSON, result, allow_nan=False)
        mlflow.log_metrics({k: v for k, v in result["headline"].items() if _finite(v)})
        mlflow.log_metrics({f"{k}_mean": v["mean"] for k, v in result["metrics"].items()
                            if _finite(v["mean"])})
        mlflow.set_tags({"vidops.model_digest": result["model"]["digest"],
                         "vidops.eval_dir": str(out_dir)})
        for name in (METRICS_JSON, REPORT_HTML, SAMPLES_DIR):
            mlflow_runs.log_file(out_dir / name, artifact_path="evaluation")
    return result


def _generate_all(model: LoadedModel, cases: list[EvalCase], settings: dict[str, Any],
                  batch_size: int, out_dir: Path, quiet: bool
                  ) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    videos: list[np.ndarray] = []
    rows: list[dict[str, Any]] = []
    bar = ItemProgress("evaluate", len(cases), "video", quiet)
    for start in range(0, len(cases), batch_size):
        batch = cases[start:start + batch_size]
        generated = generate(model, [c.prompt for c in batch], seed=[c.seed for c in batch],
                             steps=settings["steps"], guidance_scale=settings["guidance_scale"],
                             sampler=settings["sampler"])
        for case, video in zip(batch, generated, strict=True):
            index = len(rows)
            name = f"{index:03d}-{case.prompt.replace(' ', '_')[:60]}-s{case.seed}.mp4"
            save_video(video, out_dir / SAMPLES_DIR / name, model.fps)
            videos.append(video)
            rows.append({"index": index, "prompt": case.prompt, "seed": case.seed,
                         "group": case.group, "file": f"{SAMPLES_DIR}/{name}",
                         "metrics": vm.video_metrics(video), "adherence": None,
                         "clip_score": None})
        bar.update(len(batch))
    bar.close()
    return videos, rows


def _score_adherence(rows: list[dict[str, Any]], videos: list[np.ndarray]) -> None:
    """Read colour, direction and shape back from the pixels of every shapes prompt."""
    for row, video in zip(rows, videos, strict=True):
        try:
            asked = dict(zip(("colour", "shape", "direction"), parse_prompt(row["prompt"]),
                             strict=True))
        except ValueError:
            continue  # not a shapes prompt: no pixel reading applies
        reading = read_shape_video(video)
        read = {"colour": reading.colour, "direction": reading.direction,
                "shape": reading.shape}
        row["adherence"] = {key: read[key] == asked[key] for key in read} | {"read": read}


def _rates(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    return {key: vm.proportion_ci(sum(bool(r["adherence"][key]) for r in rows), len(rows))
            for key in keys}


def _adherence_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    scored = [r for r in rows if r["adherence"] is not None]
    if not scored:
        return {"available": False,
                "reason": "no shapes prompts: adherence is read from the pixels of shapes "
                          "videos only (other domains: evaluate.clip_model)"}
    domain = [r for r in scored if r["group"] in DOMAIN_GROUPS] or scored
    held = [r for r in scored if r["group"] == "held_out"]
    keys = ("colour", "direction", "shape")
    summary = _rates(domain, keys)
    summary["held_out_both"] = vm.proportion_ci(
        sum(r["adherence"]["colour"] and r["adherence"]["direction"] for r in held), len(held))
    summary["by_group"] = {group: _rates([r for r in scored if r["group"] == group], keys)
                           for group in dict.fromkeys(r["group"] for r in scored)}
    return summary


def _clip_scores(ev: EvaluateConfig, rows: list[dict[str, Any]], videos: list[np.ndarray],
                 device: torch.device) -> dict[str, Any]:
    if not ev.clip_model:
        return {"available": False, "reason": "no CLIP model configured (evaluate.clip_model)"}
    scorer = vm.ClipScorer(ev.clip_model, device=str(device))
    for row, video in zip(rows, videos, strict=True):
        row["clip_score"] = float(scorer(video, row["prompt"]))
    return vm.mean_ci([r["clip_score"] for r in rows])


# ---------------------------------------------------------------------------------------------
# Distribution metrics against real clips the model never trained on


def _reference_clips(model: LoadedModel, cfg: Config, reference: Path | None
                     ) -> tuple[list[torch.Tensor], str]:
    """Real clips at the model's geometry ([3, F, H, W] in [-1, 1]) and where they came from:
    every clip of `reference` (a curated dataset), or the held-out clips of the data the model
    (or, for a fine-tune that held none out, its base) trained on."""
    video = model.card["video"]
    geometry = {k: int(video[k]) for k in ("frames", "stride", "height", "width")}
    if reference is not None:
        manifest, _ = load_output(reference)
        return _read_clips(Path(reference), manifest, geometry,
                           cfg.evaluate.max_reference_clips), str(reference)
    card = model.card
    for path in (model.path, model.base_path):
        card = read_card(path) if path is not None else None
        held = ((card or {}).get("data") or {}).get("held_out", {}).get("clip_ids") or []
        if held:
            break
    else:
        raise StageError("the model's card lists no held-out clips (train.holdout_fraction "
                         "was 0): give --reference DIR")
    for dataset in card["data"]["datasets"]:
        try:
            manifest, info = load_output(Path(dataset["dir"]))
        except (StageError, FileNotFoundError):
            continue
        if info["dvc"]["md5"] != dataset["dvc_md5"]:
            continue  # the folder now holds another version of that dataset
        if {"clip_id", "path"} <= set(manifest.columns):
            rows = manifest[manifest["clip_id"].astype(str).isin(held)]
            return _read_clips(Path(dataset["dir"]), rows, geometry,
                               cfg.evaluate.max_reference_clips), dataset["dir"]
    raise StageError("the clip files of the model's training data (the dataset versions "
                     "its card names) are no longer in the workdir: give --reference DIR")


def _read_clips(folder: Path, manifest: Any, geometry: dict[str, int], limit: int
                ) -> list[torch.Tensor]:
    clips = []
    for path in manifest.sort_values("clip_id")["path"].head(limit):
        try:
            clips.append(read_clip(folder / path, **geometry))
        except ValueError as exc:  # too short for the model's window
            log.warning("reference clip skipped: %s", exc)
    return clips


@torch.no_grad()
def _vae_latents(model: LoadedModel, clips: list[torch.Tensor]) -> torch.Tensor:
    latents = []
    for start in range(0, len(clips), 8):
        batch = torch.stack(clips[start:start + 8]).to(model.device)
        latents.append(model.vae.encode(batch).latent_dist.mean.cpu())
    return torch.cat(latents)


def _as_clip(video: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(video).permute(3, 0, 1, 2).float().div(127.5).sub(1.0)


def _as_video(clip: torch.Tensor) -> np.ndarray:
    return clip.add(1).mul(127.5).round().clamp(0, 255).byte().permute(1, 2, 3, 0).numpy()


def _distribution(model: LoadedModel, cfg: Config, videos: list[np.ndarray],
                  reference: Path | None) -> dict[str, Any]:
    try:
        real, source = _reference_clips(model, cfg, reference)
    except StageError as exc:
        reason = str(exc)
        return {"fd_vae": {"available": False, "reason": reason},
                "fvd": {"available": False, "reason": reason}}
    if len(real) < 2:
        reason = f"{len(real)} reference clip(s) at {source}: a distance needs at least 2"
        return {"fd_vae": {"available": False, "reason": reason},
                "fvd": {"available": False, "reason": reason}}
    counts = {"reference_clips": len(real), "generated": len(videos), "reference": source}
    fake = _vae_latents(model, [_as_clip(v) for v in videos])
    fd = vm.frechet_distance(vm.vae_features(_vae_latents(model, real)), vm.vae_features(fake))
    out: dict[str, Any] = {"fd_vae": {
        "value": fd, **counts,
        "label": "Frechet distance on features of the model's own VAE encoder (not FVD: "
                 "comparable only between models sharing that VAE)"}}
    if cfg.evaluate.i3d_path:
        i3d = vm.I3DFeatures(cfg.evaluate.i3d_path)
        out["fvd"] = {"value": vm.fvd([_as_video(c) for c in real], videos, i3d), **counts,
                      "label": f"FVD (I3D at {cfg.evaluate.i3d_path})"}
    else:
        out["fvd"] = {"available": False,
                      "reason": "no I3D network configured (evaluate.i3d_path)"}
    return out


# ---------------------------------------------------------------------------------------------
# Summary


def headline(result: dict[str, Any]) -> dict[str, float]:
    """The few numbers a model is judged by: what the registry tags and gates on."""
    out: dict[str, float] = {}
    adherence = result["adherence"]
    if adherence.get("available", True):
        for key in ("colour", "direction", "shape"):
            out[f"adherence_{key}"] = adherence[key]["mean"]
        out["held_out_both"] = adherence["held_out_both"]["mean"]
        new = adherence["by_group"].get("new_concept")
        if new:
            out["new_concept_colour"] = new["colour"]["mean"]
    if result["clip_score"].get("available", True):
        out["clip_score"] = result["clip_score"]["mean"]
    for name in ("temporal_consistency", "motion_smoothness", "temporal_flickering"):
        out[name] = result["metrics"][name]["mean"]
    for name in ("fd_vae", "fvd"):
        if "value" in result["distribution"][name]:
            out[name] = result["distribution"][name]["value"]
    return {k: float(v) for k, v in out.items() if _finite(v)}


def _comparisons(cfg: Config, workdir: Workdir, compare: dict[str, Path] | None,
                 result: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Evaluations to compare with in the report: the registry's champion (unless it is this
    very model) and the `compare` folders."""
    from vidops.tracking.registry import champion_evaluation

    found: dict[str, dict[str, Any]] = {}
    champion = champion_evaluation(cfg, workdir)
    if champion is not None and champion[1]["model"]["digest"] != result["model"]["digest"]:
        found[champion[0]] = champion[1]
    for label, folder in (compare or {}).items():
        found[label] = json.loads((Path(folder) / METRICS_JSON).read_text(encoding="utf-8"))
    return found


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _plain(value: Any) -> Any:
    """Strict JSON: numpy scalars as Python numbers, NaN (not measured) as null."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
