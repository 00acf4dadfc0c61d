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

A LoRA fine-tune writes a lighter folder that is a model all the same: no transformer, but
`adapter/` (diffusers' `pytorch_lora_weights.safetensors` and its settings) and a card whose
`base` names the model it adapts (its folder and MLflow URI, and the digest of the base
transformer's weights, checked when the two are put together again).

`MODEL` arguments accept such a folder or an MLflow URI (`models:/name@alias`,
`runs:/<id>/model`), which is downloaded first. A registered model is an MLflow pyfunc whose
artifacts are the model folder (`model/`) and, for a LoRA fine-tune, its base (`base/`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import diffusers
import torch
from diffusers import CogVideoXTransformer3DModel, LatteTransformer3DModel
from safetensors.torch import load_file

from vidops.config import Config
from vidops.media.files import link_tree
from vidops.models.identity import model_digest
from vidops.models.lora import ADAPTER_CONFIG, load_lora, merge_lora, save_lora
from vidops.models.text import TextEncoder
from vidops.models.transformer import CaptionLayout, Denoiser
from vidops.models.vae import file_digest, load_vae

CARD = "vidops_model.json"
MODEL_INDEX = "model_index.json"
EMPTY_CAPTION = "empty_caption.safetensors"
ADAPTER_DIR = "adapter"
# Where a registered (pyfunc) model keeps the model folder and a LoRA's base among its files.
PYFUNC_MODEL, PYFUNC_BASE = "model", "base"
TRANSFORMER_WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"
CARD_FORMAT = 1
# MODEL arguments with these prefixes name a model folder logged to MLflow.
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")
_TRANSFORMERS = {"LatteTransformer3DModel": LatteTransformer3DModel,
                 "CogVideoXTransformer3DModel": CogVideoXTransformer3DModel}


class ModelFolderError(ValueError):
    """Not a vidops model folder, or one whose parts do not fit together."""


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
        link_tree(vae_dir, out / "vae")
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


def tensors_digest(path: Path) -> str:
    """`model_digest` of a safetensors file's tensors, not of its bytes: the metadata header
    is written in hash-map order, which changes from one process to the next when it holds
    more than one entry (diffusers' LoRA files hold two), so the same adapter saved twice
    need not be the same bytes."""
    return model_digest({}, load_file(str(path)))


def transformer_digest(model_dir: Path) -> str:
    """The identity of a model folder's transformer weights: what an adapter was trained on."""
    return "sha256:" + file_digest(Path(model_dir) / TRANSFORMER_WEIGHTS)


def write_lora_folder(
    out: Path,
    *,
    denoiser: Denoiser,
    base_dir: Path,
    card: dict[str, Any],
) -> Path:
    """A LoRA fine-tune's folder at `out`: the adapter of `denoiser.transformer`, the base's
    scheduler and empty caption (a model folder must sample on its own terms), the card."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("transformer", "layout", "scheduler", "vae", ADAPTER_DIR):
        shutil.rmtree(out / name, ignore_errors=True)
    weights = save_lora(denoiser.transformer, out / ADAPTER_DIR,
                        extra={"base": card["base"]["path"]})
    link_tree(base_dir / "scheduler", out / "scheduler")
    shutil.copyfile(base_dir / EMPTY_CAPTION, out / EMPTY_CAPTION)
    base_index = json.loads((base_dir / MODEL_INDEX).read_text())
    index = {"_class_name": "VidopsTextToVideo", "_diffusers_version": diffusers.__version__,
             "base": card["base"]["path"], "adapter": ["peft", "LoRA"],
             "scheduler": base_index["scheduler"]}
    (out / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    card = {"format": CARD_FORMAT, **card}
    card["adapter"] = {**card.get("adapter", {}), "path": ADAPTER_DIR,
                       "bytes": weights.stat().st_size,
                       "base_transformer_bytes": (base_dir / TRANSFORMER_WEIGHTS).stat().st_size}
    (out / CARD).write_text(json.dumps(card, indent=2, default=str) + "\n")
    (out / "README.md").write_text(model_card_markdown(card))
    return out


def model_card_markdown(card: dict[str, Any]) -> str:
    data = card.get("data") or {}
    imported = card.get("kind") == "imported"
    if imported:
        training = (f"| training | outside vidops: imported from `{card['source']['pipeline']}`"
                    f" ({card['source']['class']}) |")
    else:
        training = (f"| training | {card['training']['steps']} steps, final loss "
                    f"{card['training'].get('final_loss', float('nan')):.4f} |")
    lines = [
        f"# {card.get('name', 'vidops model')}",
        "",
        f"Text-to-video latent diffusion, {card['arch']} ({card.get('size')}) trained "
        + ("outside vidops" if imported
           else f"by `vidops {card.get('kind', 'pretrain')}`")
        + f" with the {card['objective']} objective.",
        "",
        "| | |",
        "| --- | --- |",
        f"| video | {card['video']['frames']} frames, {card['video']['height']}x"
        f"{card['video']['width']}, {card['video']['fps']:g} fps |",
        f"| latents | {card['latent']['shape']} (scale {card['latent']['scale']:g}) |",
        f"| text encoder | {card['text_encoder']['identity']} |",
        f"| VAE | {card['vae']['digest']} |",
        f"| parameters | {card.get('parameters', 0):,} |",
        training,
        f"| MLflow run | {card.get('mlflow_run_id')} |",
        "",
        "## Data lineage",
        "",
        f"{data.get('clips', 0)} clips from {data.get('sources', 0)} source videos; "
        f"licenses: {', '.join(data.get('licenses') or ['none recorded'])}."
        if card.get("data") is not None else "Not recorded: trained outside vidops.",
        "",
        "| dataset | DVC md5 | MLflow run |",
        "| --- | --- | --- |",
    ]
    for ds in data.get("datasets", []):
        lines.append(f"| {ds['stage']} | {ds['dvc_md5']} | {ds['mlflow_run_id']} |")
    base = card.get("base")
    if base:
        adapter = card.get("adapter")
        lines += ["", "## Base model", "",
                  f"Fine-tuned ({card.get('method')}) from `{base.get('uri') or base['path']}` "
                  f"(transformer {base['transformer_digest']})."]
        if adapter:
            lines.append(f"LoRA rank {adapter['rank']}, alpha {adapter['alpha']:g} on "
                         f"{', '.join(adapter['targets'])}: `{ADAPTER_DIR}/` "
                         f"({adapter.get('bytes', 0):,} bytes).")
        base_data = base.get("data") or {}
        lines.append(f"The base learned from {base_data.get('clips', 0)} clips of "
                     f"{base_data.get('sources', 0)} source videos.")
    return "\n".join(lines) + "\n"


@dataclass
class LoadedModel:
    """A model folder's parts, ready to sample."""

    path: Path
    card: dict[str, Any]
    denoiser: Denoiser
    vae: Any  # None when loaded without codecs
    text: TextEncoder | None
    empty_caption: dict[str, torch.Tensor]
    scheduler_config: dict[str, Any]
    device: torch.device
    base_path: Path | None = None  # a LoRA fine-tune's base folder, as found at load time

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
    if text.startswith(MLFLOW_SCHEMES):
        import mlflow

        target = Path(mlflow.artifacts.download_artifacts(
            artifact_uri=text, dst_path=str(download_dir) if download_dir else None))
        registered = target / "artifacts" / PYFUNC_MODEL
        if (registered / CARD).is_file():
            return registered
        found = sorted(p.parent for p in target.rglob(CARD))
        if not found:
            raise ModelFolderError(f"{text} holds no vidops model folder")
        return found[0]
    path = Path(model).expanduser()
    read_card(path)
    return path


def model_identity(path: Path) -> str:
    """What a model's samples depend on, as one digest: its transformer weights, or a LoRA's
    adapter weights together with its base's transformer. Evaluations name it, and the
    registry checks an evaluation is of the model being registered."""
    path = Path(path)
    card = read_card(path)
    if (path / "transformer").is_dir():
        return transformer_digest(path)
    adapter = next((path / ADAPTER_DIR).glob("*.safetensors"), None)
    if not card.get("base") or adapter is None:
        raise ModelFolderError(f"{path} has neither a transformer nor a LoRA adapter")
    text = f"{card['base']['transformer_digest']}+{tensors_digest(adapter)}"
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def _base_folder(path: Path, card: dict[str, Any], download_dir: Path | None,
                 base_dir: Path | None = None) -> Path:
    """The base a LoRA folder adapts: `base_dir` when given, the registered model's own copy
    beside it, the folder it was trained on, or its MLflow URI; checked by digest."""
    base = card["base"]
    candidates = [base_dir, path.parent / PYFUNC_BASE, Path(base["path"])]
    for local in candidates:
        if local is not None and (local / CARD).is_file() and \
                transformer_digest(local) == base["transformer_digest"]:
            return local
    if base.get("uri"):
        fetched = resolve_model(base["uri"], download_dir)
        if transformer_digest(fetched) == base["transformer_digest"]:
            return fetched
    raise ModelFolderError(
        f"{path} is a LoRA adapter for the base model at {base['path']}"
        f"{' (' + base['uri'] + ')' if base.get('uri') else ''} with transformer "
        f"{base['transformer_digest']}, which is no longer there or has been retrained")


def base_folder(path: Path, download_dir: Path | None = None) -> Path | None:
    """The base of a LoRA model folder (None for a model with its own transformer)."""
    card = read_card(path)
    if card.get("base") and not (Path(path) / "transformer").is_dir():
        return _base_folder(Path(path), card, download_dir)
    return None


def adapter_dir(path: Path) -> Path:
    """The adapter of `--lora PATH`: a LoRA fine-tune's folder or the adapter folder itself."""
    path = Path(path)
    for candidate in (path, path / ADAPTER_DIR):
        if (candidate / ADAPTER_CONFIG).is_file():
            return candidate
    raise ModelFolderError(f"{path} holds no LoRA adapter ({ADAPTER_CONFIG})")


def load_model_folder(path: Path, device: str | torch.device = "cpu", *,
                      lora_scale: float = 1.0, download_dir: Path | None = None,
                      codecs: bool = True, base_dir: Path | None = None) -> LoadedModel:
    """The model at `path`, ready to sample. A LoRA fine-tune loads its base (`base_dir`
    when given) and applies its adapter at `lora_scale`. Without `codecs`, the VAE and text
    encoder are not loaded (vae and text None): what training on encoded data needs."""
    path = Path(path)
    card = read_card(path)
    if card.get("base") and not (path / "transformer").is_dir():
        base_path = _base_folder(path, card, download_dir, base_dir)
        base = load_model_folder(base_path, device, codecs=codecs)
        apply_lora(base, path / ADAPTER_DIR, lora_scale)
        base.path, base.card, base.base_path = path, card, base_path
        return base
    device = torch.device(device)
    index = json.loads((path / MODEL_INDEX).read_text())
    cls = _TRANSFORMERS.get(index["transformer"][1])
    if cls is None:
        raise ModelFolderError(f"{path}: unknown transformer class {index['transformer'][1]}")
    transformer = cls.from_pretrained(path / "transformer")
    vae = text = None
    if codecs:
        vae_source = path / "vae" if (path / "vae").is_dir() else card["vae"]["path"]
        vae = load_vae(vae_source).to(device).eval().requires_grad_(False)
        text_ref = card["text_encoder"]
        text = TextEncoder(text_ref["path"], max_length=int(text_ref["max_length"]),
                           device=device)
        if text.identity != text_ref["identity"]:
            raise ModelFolderError(
                f"{path}: the text encoder at {text_ref['path'] or text_ref['name']} is "
                f"{text.identity}, the model was trained with {text_ref['identity']}")
    scheduler_config = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    empty = load_file(str(path / EMPTY_CAPTION))
    layout = CaptionLayout.from_pretrained(path / "layout") if "layout" in index else None
    denoiser = Denoiser(transformer, layout).to(device).eval().requires_grad_(False)
    return LoadedModel(path, card, denoiser, vae, text, empty, scheduler_config, device)


def encode_config_for(cfg: Config, model_dir: Path) -> Config:
    """`cfg` with what encoding data for this model must match taken from its card: the VAE,
    the text encoder and the clip geometry (frames, stride, size). Data encoded so is in the
    model's latent space, as fine-tuning it needs."""
    card = read_card(model_dir)
    if card.get("base") and not (Path(model_dir) / "transformer").is_dir():
        model_dir = Path(card["base"]["path"])
        card = read_card(model_dir)
    vae = Path(model_dir) / "vae" if (Path(model_dir) / "vae").is_dir() else card["vae"]["path"]
    video, text = card["video"], card["text_encoder"]
    return cfg.with_overrides({
        "models.vae.path": str(vae), "models.text_encoder.path": text["path"],
        "models.text_encoder.max_length": int(text["max_length"]),
        "encode.frames": int(video["frames"]), "encode.stride": int(video["stride"]),
        "encode.height": int(video["height"]), "encode.width": int(video["width"])})


def apply_lora(model: LoadedModel, adapter: Path, scale: float = 1.0) -> None:
    """Apply the adapter at `adapter` to a loaded model's transformer (in place)."""
    load_lora(model.denoiser.transformer, adapter_dir(adapter), scale)
    model.denoiser.to(model.device).eval()


def merge_into_folder(model: LoadedModel, out: Path, card: dict[str, Any]) -> Path:
    """Write `model` (its adapter folded into the weights) as a normal model folder."""
    merge_lora(model.denoiser.transformer)
    source = model.base_path or model.path
    vae_dir = source / "vae" if (source / "vae").is_dir() else None
    return write_model_folder(out, denoiser=model.denoiser,
                              scheduler_config=model.scheduler_config,
                              empty_caption=source / EMPTY_CAPTION,
                              card={**card, "merged": True}, vae_dir=vae_dir)
