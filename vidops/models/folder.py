"""Model folders: what pretrain and fine-tune write, and generate, evaluate and register load.

A diffusers-style layout, so the parts load with diffusers' own `from_pretrained`:

    model_index.json            the components and their classes
    transformer/                the denoiser (EMA weights), config.json + safetensors
    layout/                     vidops' CaptionLayout for that Latte, when it has one
    scheduler/                  the training noise schedule and objective
    vae/                        a bootstrapped VAE (copied: it is small and data-specific);
                                a VAE from a path or hub id is referenced in the card instead
    empty_caption.safetensors   the unconditional embedding classifier-free guidance uses
    vidops_model.json           the vidops model card: architecture, latent and video geometry,
                                text encoder and VAE references with their digests, training
                                settings and results, and the data lineage
    README.md                   the same card for people

`MODEL` arguments accept such a folder or an MLflow URI (`models:/name@alias`,
`runs:/<id>/model`), which is downloaded first.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import CogVideoXTransformer3DModel, LatteTransformer3DModel
from safetensors.torch import load_file

from vidops.media.files import link_or_copy
from vidops.models.text import TextEncoder
from vidops.models.transformer import CaptionLayout, Denoiser
from vidops.models.vae import load_vae

CARD = "vidops_model.json"
MODEL_INDEX = "model_index.json"
EMPTY_CAPTION = "empty_caption.safetensors"
CARD_FORMAT = 1
_TRANSFORMERS = {"LatteTransformer3DModel": LatteTransformer3DModel,
                 "CogVideoXTransformer3DModel": CogVideoXTransformer3DModel}


class ModelFolderError(ValueError):
    """Not a vidops model folder, or one whose parts do not fit together."""


def _copy_tree(src: Path, dst: Path) -> None:
    for path in sorted(src.rglob("*")):
        if path.is_file():
            link_or_copy(path, dst / path.relative_to(src))


def write_model_folder(
    out: Path,
    *,
    denoiser: Denoiser,
    scheduler_config: dict[str, Any],
    empty_caption: Path,
    card: dict[str, Any],
    vae_dir: Path | None,
) -> Path:
    """Write the folder at `out` (replacing any earlier model files; other files stay)."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("transformer", "layout", "scheduler", "vae"):
        shutil.rmtree(out / name, ignore_errors=True)
    transformer = denoiser.transformer
    transformer.save_pretrained(out / "transformer")
    if denoiser.layout is not None:
        denoiser.layout.save_pretrained(out / "layout")
    scheduler_dir = out / "scheduler"
    scheduler_dir.mkdir()
    (scheduler_dir / "scheduler_config.json").write_text(
        json.dumps(scheduler_config, indent=2, default=str) + "\n")
    if vae_dir is not None:
        _copy_tree(vae_dir, out / "vae")
    shutil.copyfile(empty_caption, out / EMPTY_CAPTION)
    index = {"_class_name": "VidopsTextToVideo", "_diffusers_version": diffusers.__version__,
             "transformer": ["diffusers", type(transformer).__name__],
             "scheduler": ["diffusers", scheduler_config.get("_class_name", "DDPMScheduler")]}
    if denoiser.layout is not None:
        index["layout"] = ["vidops", type(denoiser.layout).__name__]
    if vae_dir is not None:
        index["vae"] = ["diffusers", "AutoencoderKLCogVideoX"]
    (out / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    card = {"format": CARD_FORMAT, **card}
    (out / CARD).write_text(json.dumps(card, indent=2, default=str) + "\n")
    (out / "README.md").write_text(model_card_markdown(card))
    return out


def model_card_markdown(card: dict[str, Any]) -> str:
    data = card.get("data", {})
    lines = [
        f"# {card.get('name', 'vidops model')}",
        "",
        f"Text-to-video latent diffusion, {card['arch']} ({card.get('size')}) trained by "
        f"`vidops {card.get('kind', 'pretrain')}` with the {card['objective']} objective.",
        "",
        "| | |",
        "| --- | --- |",
        f"| video | {card['video']['frames']} frames, {card['video']['height']}x"
        f"{card['video']['width']}, {card['video']['fps']:g} fps |",
        f"| latents | {card['latent']['shape']} (scale {card['latent']['scale']:g}) |",
        f"| text encoder | {card['text_encoder']['identity']} |",
        f"| VAE | {card['vae']['digest']} |",
        f"| parameters | {card.get('parameters', 0):,} |",
        f"| training | {card['training']['steps']} steps, final loss "
        f"{card['training'].get('final_loss', float('nan')):.4f} |",
        f"| MLflow run | {card.get('mlflow_run_id')} |",
        "",
        "## Data lineage",
        "",
        f"{data.get('clips', 0)} clips from {data.get('sources', 0)} source videos; "
        f"licenses: {', '.join(data.get('licenses') or ['none recorded'])}.",
        "",
        "| dataset | DVC md5 | MLflow run |",
        "| --- | --- | --- |",
    ]
    for ds in data.get("datasets", []):
        lines.append(f"| {ds['stage']} | {ds['dvc_md5']} | {ds['mlflow_run_id']} |")
    return "\n".join(lines) + "\n"


@dataclass
class LoadedModel:
    """A model folder's parts, ready to sample."""

    path: Path
    card: dict[str, Any]
    denoiser: Denoiser
    vae: Any
    text: TextEncoder
    empty_caption: dict[str, torch.Tensor]
    scheduler_config: dict[str, Any]
    device: torch.device

    @property
    def latent_shape(self) -> list[int]:
        return list(self.card["latent"]["shape"])

    @property
    def fps(self) -> float:
        return float(self.card["video"]["fps"])


def read_card(path: Path) -> dict[str, Any]:
    card_file = Path(path) / CARD
    if not card_file.is_file():
        raise ModelFolderError(f"{path} is not a vidops model folder (no {CARD})")
    return json.loads(card_file.read_text(encoding="utf-8"))


def resolve_model(model: str | Path, download_dir: Path | None = None) -> Path:
    """A model folder for MODEL: the folder itself, or an MLflow model URI downloaded."""
    text = str(model)
    if text.startswith(("models:/", "runs:/", "mlflow-artifacts:/")):
        import mlflow

        target = mlflow.artifacts.download_artifacts(
            artifact_uri=text, dst_path=str(download_dir) if download_dir else None)
        found = [p.parent for p in Path(target).rglob(CARD)]
        if not found:
            raise ModelFolderError(f"{text} holds no vidops model folder")
        return found[0]
    path = Path(model).expanduser()
    read_card(path)
    return path


def load_model_folder(path: Path, device: str | torch.device = "cpu") -> LoadedModel:
    path = Path(path)
    card = read_card(path)
    device = torch.device(device)
    index = json.loads((path / MODEL_INDEX).read_text())
    cls = _TRANSFORMERS.get(index["transformer"][1])
    if cls is None:
        raise ModelFolderError(f"{path}: unknown transformer class {index['transformer'][1]}")
    transformer = cls.from_pretrained(path / "transformer")
    vae_source = path / "vae" if (path / "vae").is_dir() else card["vae"]["path"]
    vae = load_vae(vae_source)
    text_ref = card["text_encoder"]
    text = TextEncoder(text_ref["path"], max_length=int(text_ref["max_length"]), device=device)
    if text.identity != text_ref["identity"]:
        raise ModelFolderError(
            f"{path}: the text encoder at {text_ref['path'] or text_ref['name']} is "
            f"{text.identity}, the model was trained with {text_ref['identity']}")
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    empty = load_file(str(path / EMPTY_CAPTION))
    layout = CaptionLayout.from_pretrained(path / "layout") if "layout" in index else None
    denoiser = Denoiser(transformer, layout).to(device).eval().requires_grad_(False)
    return LoadedModel(path, card, denoiser, vae.to(device).eval().requires_grad_(False), text,
                       empty, scheduler_config, device)
