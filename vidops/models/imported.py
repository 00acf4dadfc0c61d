"""Bases trained outside vidops: a diffusers CogVideoX pipeline as a vidops model folder.

`vidops finetune --base` and `vidops encode --vae-from-model` take vidops model folders (and
MLflow URIs of them). A CogVideoX checkpoint as published (`THUDM/CogVideoX-2b`, or a folder
saved by `CogVideoXPipeline.save_pretrained`) is a diffusers pipeline instead: `transformer/`,
`vae/`, `text_encoder/` + `tokenizer/` (T5), `scheduler/`. `import_pipeline` describes it as a
model folder once: the transformer and VAE files hard-linked (copied only across filesystems),
the scheduler config as published (CogVideoX's own noise schedule, which the fine-tune then
trains under), the empty-caption embedding computed by its text encoder, and a card that
says where it came from, its latent geometry and that its training data is not known here.
Everything downstream (the data check, LoRA, SFT, merge, generate) then treats it like a
vidops base.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import diffusers
from diffusers import CogVideoXTransformer3DModel
from safetensors import safe_open

from vidops.config import Config
from vidops.data.latent_cache import write_empty_caption
from vidops.media.files import exclusive_lock, link_tree
from vidops.models.folder import (
    CARD,
    CARD_FORMAT,
    MLFLOW_SCHEMES,
    MODEL_INDEX,
    ModelFolderError,
    model_card_markdown,
    read_card,
)
from vidops.models.folder import resolve_model as resolve_vidops_model
from vidops.models.frames import check_cogvideox_train_frames, latent_frames
from vidops.models.text import TextEncoder
from vidops.models.vae import spatial_ratio, temporal_ratio, vae_digest
from vidops.tracking.workdir import Workdir, code_version
from vidops.train.objectives import objective_of

# Pipelines whose parts vidops can fine-tune and sample (text-to-video CogVideoX 1.0 / 1.5).
PIPELINES = {"CogVideoXPipeline": CogVideoXTransformer3DModel}
IMPORTED_DIR = "imported"


def is_pipeline(ref: str | Path) -> bool:
    """Whether `ref` names a diffusers pipeline rather than a vidops model: a folder with a
    model_index.json and no vidops card, or a hub id (`owner/name`) that is no local path."""
    text = str(ref)
    if text.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        return False
    local = Path(text).expanduser()
    if local.exists():
        return (local / MODEL_INDEX).is_file() and not (local / CARD).is_file()
    return re.fullmatch(r"[\w.-]+/[\w.-]+", text) is not None


def pipeline_folder(ref: str | Path) -> Path:
    """The local folder of a pipeline: the folder itself, or a hub id's snapshot (from the
    local hub cache, or downloaded when the network allows: the user named it)."""
    local = Path(str(ref)).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(ref)))
    except Exception as exc:  # offline, unknown id, no access: one message
        raise ModelFolderError(f"{ref} is no folder and cannot be fetched from the hub: {exc}"
                               ) from exc


def _stored_parameters(folder: Path) -> int:
    """Parameters in a folder's safetensors files, read from their headers."""
    total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as tensors:
            names = tensors.keys()  # a safe_open handle is not iterable itself
            total += sum(math.prod(tensors.get_slice(k).get_shape()) for k in names)
    return total


def import_pipeline(ref: str | Path, out: Path, *, cfg: Config) -> Path:
    """Write the vidops model folder of the diffusers pipeline `ref` at `out`; returns `out`.

    The clip geometry is the transformer's own (`sample_frames` x its sample size times the
    VAE's spatial ratio); the frame rate is the configured one (`filter.normalise.fps` over
    `encode.stride`: 8 fps in the CogVideoX profiles, as CogVideoX was trained).
    """
    source = pipeline_folder(ref)
    index = json.loads((source / MODEL_INDEX).read_text())
    kind = index.get("_class_name")
    if kind not in PIPELINES:
        raise ModelFolderError(f"{ref} is a {kind}; vidops imports {', '.join(PIPELINES)}")
    for part in ("transformer", "vae", "scheduler", "text_encoder", "tokenizer"):
        if not (source / part).is_dir():
            raise ModelFolderError(f"{ref} has no {part}/ folder: not a complete {kind}")
    # Configs and tensor headers only: the import never holds a 2B transformer in memory.
    tc = SimpleNamespace(**PIPELINES[kind].load_config(source / "transformer"))
    vae_config = json.loads((source / "vae" / "config.json").read_text())
    scheduler = json.loads((source / "scheduler" / "scheduler_config.json").read_text())
    frames = int(tc.sample_frames)
    t_ratio, s_ratio = temporal_ratio(vae_config), spatial_ratio(vae_config)
    if t_ratio > 1:  # CogVideoX's own VAE: 49 frames = 13 latent frames
        check_cogvideox_train_frames(frames)
    latent_shape = [int(tc.in_channels), latent_frames(frames, t_ratio),
                    int(tc.sample_height), int(tc.sample_width)]
    text = TextEncoder(source, max_length=int(tc.max_text_seq_length))
    if text.dim != int(tc.text_embed_dim):
        raise ModelFolderError(f"{ref}: its text encoder gives {text.dim}-d embeddings, its "
                               f"transformer takes {tc.text_embed_dim}")

    tmp = out.with_name(f".partial-{out.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    for part in ("transformer", "vae"):
        link_tree(source / part, tmp / part)
    (tmp / "scheduler").mkdir(parents=True)
    (tmp / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    embeds, mask = text.encode([""])
    write_empty_caption(tmp, {"prompt_embeds": embeds[0], "prompt_mask": mask[0]})
    (tmp / MODEL_INDEX).write_text(json.dumps({
        "_class_name": "VidopsTextToVideo", "_diffusers_version": diffusers.__version__,
        "transformer": ["diffusers", PIPELINES[kind].__name__],
        "scheduler": ["diffusers", scheduler.get("_class_name", "DDPMScheduler")],
        "vae": ["diffusers", "AutoencoderKLCogVideoX"]}, indent=2) + "\n")
    stride = cfg.encode.stride
    objective = objective_of(scheduler)
    card = {
        "format": CARD_FORMAT, "name": str(ref), "kind": "imported", "arch": "cogvideox",
        "size": "pretrained", "objective": objective,
        "parameters": _stored_parameters(source / "transformer"),
        "latent": {"shape": latent_shape, "scale": float(vae_config.get("scaling_factor", 1.0))},
        "video": {"frames": frames, "height": int(tc.sample_height) * s_ratio,
                  "width": int(tc.sample_width) * s_ratio, "stride": stride,
                  "fps": cfg.filter.normalise.fps / stride},
        "text_encoder": {"name": str(ref), "path": str(source), "identity": text.identity,
                         "max_length": int(tc.max_text_seq_length), "dim": text.dim},
        "vae": {"path": None, "digest": vae_digest(tmp / "vae")},
        # What a fine-tune inherits: the objective; the schedule itself is scheduler/.
        "training": {"steps": None, "settings": {
            "objective": objective,
            "beta_schedule": scheduler.get("beta_schedule", "linear"),
            "num_train_timesteps": int(scheduler.get("num_train_timesteps", 1000))}},
        "source": {"pipeline": str(ref), "path": str(source), "class": kind},
        "data": None,  # trained outside vidops: its training data is not known here
        "mlflow_run_id": None,
        "code_version": code_version(),
        "created_at": datetime.now(timezone.utc).isoformat(),
    }
    (tmp / CARD).write_text(json.dumps(card, indent=2) + "\n")
    (tmp / "README.md").write_text(model_card_markdown(card))
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    return out


def resolve_model_ref(ref: str | Path, *, cfg: Config, workdir: Workdir) -> Path:
    """A vidops model folder for any MODEL argument: a model folder, an MLflow URI of one
    (downloaded into the workdir), or a diffusers pipeline, imported once into
    `<workdir>/models/imported/<name>` (re-imported when the pipeline folder it came from has
    changed)."""
    if str(ref).startswith(MLFLOW_SCHEMES):
        from vidops.tracking import mlflow_runs

        mlflow_runs.configure(cfg, workdir)
    if not is_pipeline(ref):
        return resolve_vidops_model(ref, workdir.downloads)
    slug = re.sub(r"[^\w.-]+", "-", str(ref).strip("/")).strip("-")[-80:] or "pipeline"
    imported = workdir.models / IMPORTED_DIR
    out = imported / slug
    source = pipeline_folder(ref)
    # Every rank of a distributed fine-tune resolves the base: one imports, the rest reuse.
    with exclusive_lock(imported / f".{slug}.lock"):
        if (out / CARD).is_file():
            card = read_card(out)
            stamp = (source / "transformer").stat().st_mtime
            if card.get("source", {}).get("path") == str(source) and \
                    (out / "transformer").stat().st_mtime >= stamp:
                return out
        return import_pipeline(ref, out, cfg=cfg)


__all__ = ["IMPORTED_DIR", "PIPELINES", "import_pipeline", "is_pipeline", "pipeline_folder",
           "resolve_model_ref"]
