"""Denoising transformers: diffusers' Latte (from scratch, paper sizes) and CogVideoX."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import CogVideoXTransformer3DModel, LatteTransformer3DModel, ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

from vidops.config import Config


@dataclass(frozen=True)
class LatteSize:
    layers: int  # spatial + temporal block pairs
    hidden: int
    heads: int


# Latte paper, table 1 (the DiT sizes); tiny is vidops' CPU size for tests and demos.
LATTE_SIZES: dict[str, LatteSize] = {
    "tiny": LatteSize(layers=4, hidden=128, heads=4),
    "S": LatteSize(layers=12, hidden=384, heads=6),
    "B": LatteSize(layers=12, hidden=768, heads=12),
    "L": LatteSize(layers=24, hidden=1024, heads=16),
    "XL": LatteSize(layers=28, hidden=1152, heads=16),
}


def latte_config(
    size: str,
    *,
    in_channels: int,
    sample_size: int | tuple[int, int],
    num_frames: int,
    text_dim: int,
    patch_size: int = 2,
    learn_sigma: bool = False,
) -> dict[str, Any]:
    """LatteTransformer3DModel arguments, shaped like Latte-1's (adaLN-single, PixArt captions).

    `sample_size` and `num_frames` are in latent units. Latte adds its temporal positional
    embedding for exactly `num_frames` frames, so training and sampling must use that count.
    `learn_sigma` doubles the output channels: diffusers' LattePipeline keeps only the first
    half unless its scheduler learns the variance.
    """
    if size not in LATTE_SIZES:
        raise ValueError(f"unknown Latte size {size!r}; expected one of {', '.join(LATTE_SIZES)}")
    spec = LATTE_SIZES[size]
    height, width = (sample_size, sample_size) if isinstance(sample_size, int) else sample_size
    if height % patch_size or width % patch_size:
        raise ValueError(f"latent size {height}x{width} is not a multiple of patch {patch_size}")
    return {
        "num_attention_heads": spec.heads,
        "attention_head_dim": spec.hidden // spec.heads,
        "in_channels": in_channels,
        "out_channels": 2 * in_channels if learn_sigma else in_channels,
        "num_layers": spec.layers,
        # Captions are projected to the hidden size before cross-attention.
        "cross_attention_dim": spec.hidden,
        "caption_channels": text_dim,
        "attention_bias": True,
        # Square positional grid; PatchEmbed recomputes it for other aspect ratios.
        "sample_size": height,
        "patch_size": patch_size,
        "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000,
        "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False,
        "norm_eps": 1e-6,
        "video_length": num_frames,
    }


def build_latte(size: str, **kwargs: Any) -> LatteTransformer3DModel:
    """A randomly initialised Latte of `size` (arguments as for latte_config)."""
    return LatteTransformer3DModel(**latte_config(size, **kwargs))


def latte_mask_bias(mask: torch.Tensor, num_frames: int) -> torch.Tensor:
    """A [B, L] text mask (1 = token) as the additive bias Latte's cross-attention takes.

    Latte passes `encoder_attention_mask` unchanged to its spatial blocks, which see one row
    per frame, so the mask must already be a bias repeated per frame: [B * F, 1, L].
    """
    bias = (1 - mask.float()) * -10000.0
    return bias.repeat_interleave(num_frames, dim=0)[:, None, :]


def _from_pretrained(cls: type[ModelMixin], path: str, wanted: dict[str, int]) -> Any:
    """Load a pretrained denoiser and check it against the latents and text it will get: a
    mismatch would otherwise only fail deep inside its forward pass."""
    local = Path(path).expanduser()
    if local.is_dir():
        sub = "transformer" if (local / "transformer" / "config.json").is_file() else None
        model = cls.from_pretrained(local, subfolder=sub)
    else:
        try:
            model = cls.from_pretrained(path, subfolder="transformer")
        except (OSError, ValueError) as exc:
            raise FileNotFoundError(f"transformer {path!r} is no folder and cannot be loaded "
                                    f"from the hub cache or network: {exc}") from exc
    wrong = [f"{k} is {model.config[k]}, the data gives {v}"
             for k, v in wanted.items() if model.config[k] != v]
    if wrong:
        raise ValueError(f"{cls.__name__} at {path} does not fit the data: {', '.join(wrong)} "
                         f"(VAE latent channels, text encoder width/max_length, frames)")
    return model


def build_cogvideox(
    path: str | None = None,
    *,
    tiny: bool = True,
    in_channels: int = 16,
    text_dim: int = 4096,
    text_len: int = 226,
    latent_frames: int = 13,
    latent_hw: tuple[int, int] = (60, 90),
    temporal_ratio: int = 4,
    patch_size: int = 2,
) -> CogVideoXTransformer3DModel:
    """CogVideoX from a path or hub id (its transformer/ subfolder), or a tiny random one.

    CogVideoX puts text and video tokens in one sequence, with positions for exactly
    `max_text_seq_length` text tokens: the text encoder's max_length must equal `text_len`.
    """
    if path is not None:
        return _from_pretrained(CogVideoXTransformer3DModel, path, {
            "in_channels": in_channels, "text_embed_dim": text_dim,
            "max_text_seq_length": text_len})
    if not tiny:
        raise ValueError("a full-size CogVideoX needs pretrained weights: set "
                         "models.transformer.path (e.g. THUDM/CogVideoX-2b)")
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=32, in_channels=in_channels,
        out_channels=in_channels, time_embed_dim=64, text_embed_dim=text_dim, num_layers=2,
        sample_height=latent_hw[0], sample_width=latent_hw[1],
        sample_frames=(latent_frames - 1) * temporal_ratio + 1, patch_size=patch_size,
        temporal_compression_ratio=temporal_ratio, max_text_seq_length=text_len)


def build_transformer(
    cfg: Config,
    *,
    latent_channels: int,
    latent_frames: int,
    latent_hw: tuple[int, int],
    text_dim: int,
) -> LatteTransformer3DModel | CogVideoXTransformer3DModel:
    """The denoiser that models.transformer names, fitted to the latents and text embeddings."""
    spec = cfg.models.transformer
    if spec.arch == "cogvideox":
        return build_cogvideox(
            spec.path, tiny=spec.size == "tiny", in_channels=latent_channels, text_dim=text_dim,
            text_len=cfg.models.text_encoder.max_length, latent_frames=latent_frames,
            latent_hw=latent_hw, patch_size=spec.patch_size)
    if spec.path is not None:
        return _from_pretrained(LatteTransformer3DModel, spec.path, {
            "in_channels": latent_channels, "caption_channels": text_dim,
            "video_length": latent_frames})
    return build_latte(spec.size, in_channels=latent_channels, sample_size=latent_hw,
                       num_frames=latent_frames, text_dim=text_dim, patch_size=spec.patch_size)


class CaptionLayout(ModelMixin, ConfigMixin):
    """A caption-conditioned spatio-temporal embedding added to Latte's patch tokens.

    Latte's positional embeddings are fixed, and text reaches the video only through the
    spatial blocks' cross-attention, one frame at a time. A motion word must then be combined
    with the frame index and the position deep inside the network, and on the shapes corpus
    it never was within a CPU budget: direction-swapped captions scored the same loss as the
    true ones, while colour (one value for the whole clip) was learned (README, "The tiny
    profile").
    This embedding lets the caption say where content sits in each frame: `rank` learned
    maps over (frame, token, channel), mixed with weights from the pooled caption. The maps
    start at zero, so a fresh model starts as plain Latte.
    """

    @register_to_config
    def __init__(self, text_dim: int, hidden: int, frames: int, tokens_per_frame: int,
                 rank: int = 32) -> None:
        super().__init__()
        self.mix = torch.nn.Linear(text_dim, rank, bias=False)
        torch.nn.init.normal_(self.mix.weight, std=text_dim ** -0.5)
        self.maps = torch.nn.Parameter(torch.zeros(rank, frames, tokens_per_frame, hidden))

    def forward(self, text: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """[B, L, D] caption embeddings and their mask -> [B, frames, tokens, hidden]."""
        weight = mask.to(text.dtype)[..., None]
        pooled = (text * weight).sum(1) / weight.sum(1).clamp_min(1.0)
        return torch.einsum("br,rfnd->bfnd", self.mix(pooled), self.maps)


def build_caption_layout(cfg: Config, transformer: torch.nn.Module, *, latent_frames: int,
                         latent_hw: tuple[int, int], text_dim: int) -> CaptionLayout | None:
    """The CaptionLayout models.transformer.caption_layout_rank asks for (None for 0)."""
    rank = cfg.models.transformer.caption_layout_rank
    if rank == 0:
        return None
    if not isinstance(transformer, LatteTransformer3DModel):
        raise ValueError("models.transformer.caption_layout_rank applies to Latte only: "
                         "CogVideoX attends to the text in every block; set it to 0")
    config = transformer.config
    tokens = (latent_hw[0] // config.patch_size) * (latent_hw[1] // config.patch_size)
    return CaptionLayout(text_dim, config.num_attention_heads * config.attention_head_dim,
                         latent_frames, tokens, rank)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


class Denoiser(torch.nn.Module):
    """One calling convention over Latte and CogVideoX, for the training loop and samplers:
    latents [B, C, F, H, W], timesteps [B] (float), text [B, L, D] and its mask [B, L]
    -> the prediction, shaped like the latents.

    Latte takes channels before frames and a text mask (as a per-frame bias); CogVideoX takes
    frames before channels and attends over the padded text as its authors trained it.
    """

    def __init__(self, transformer: LatteTransformer3DModel | CogVideoXTransformer3DModel,
                 layout: CaptionLayout | None = None) -> None:
        super().__init__()
        self.transformer = transformer
        self.is_latte = isinstance(transformer, LatteTransformer3DModel)
        self.layout = layout
        self._layout_tokens: torch.Tensor | None = None
        if layout is not None:
            if not self.is_latte:
                raise ValueError("a CaptionLayout applies to Latte only")
            # Latte embeds patches inside its forward; a hook on that embedding is the one
            # place to add per-token conditioning without copying diffusers' forward.
            transformer.pos_embed.register_forward_hook(self._add_layout)

    def _add_layout(self, module: torch.nn.Module, inputs: Any, tokens: torch.Tensor
                    ) -> torch.Tensor:
        layout = self._layout_tokens
        if layout is None:
            raise RuntimeError("this Latte has a CaptionLayout: call it through its Denoiser")
        frames = tokens.shape[0] // layout.shape[0]
        if layout.shape[1:3] != (frames, tokens.shape[1]):
            raise ValueError(f"CaptionLayout has {layout.shape[1]} frames of {layout.shape[2]} "
                             f"tokens, the latents give {frames} of {tokens.shape[1]}: it fits "
                             "one latent size only")
        return tokens + layout.flatten(0, 1).to(tokens.dtype)

    def forward(self, latents: torch.Tensor, timesteps: torch.Tensor, text: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        channels = latents.shape[1]
        if self.is_latte:
            if self.layout is not None:
                self._layout_tokens = self.layout(text, mask)
            try:
                out = self.transformer(
                    latents, timestep=timesteps, encoder_hidden_states=text,
                    encoder_attention_mask=latte_mask_bias(mask, latents.shape[2]),
                    return_dict=False)[0]
            finally:
                self._layout_tokens = None
            # A learn_sigma Latte (LattePipeline's layout) also predicts a variance: dropped.
            return out[:, :channels]
        out = self.transformer(latents.permute(0, 2, 1, 3, 4), text, timesteps,
                               return_dict=False)[0]
        return out.permute(0, 2, 1, 3, 4)[:, :channels]

    def tokens_per_sample(self, latent_shape: torch.Size | tuple[int, ...]) -> int:
        """Video tokens the transformer sees for one latent [C, F, H, W]."""
        _, frames, height, width = latent_shape
        patch = int(self.transformer.config.patch_size)
        patch_t = int(getattr(self.transformer.config, "patch_size_t", None) or 1)
        return (frames // patch_t) * (height // patch) * (width // patch)


def build_denoiser(cfg: Config, *, latent_channels: int, latent_frames: int,
                   latent_hw: tuple[int, int], text_dim: int) -> Denoiser:
    """The transformer models.transformer names, with its CaptionLayout when it asks for one:
    what pretrain trains and what a model folder holds."""
    transformer = build_transformer(cfg, latent_channels=latent_channels,
                                    latent_frames=latent_frames, latent_hw=latent_hw,
                                    text_dim=text_dim)
    layout = build_caption_layout(cfg, transformer, latent_frames=latent_frames,
                                  latent_hw=latent_hw, text_dim=text_dim)
    return Denoiser(transformer, layout)
