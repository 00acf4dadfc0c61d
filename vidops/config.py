"""One configuration object for every stage: params.yaml, then a profile, then overrides.

The defaults live in exactly one place, `params.yaml` (shipped inside the package), so the
models below declare types and constraints but no defaults. `extra="forbid"` turns a typo in a
profile or a `--set` into an error that names the key instead of a silently ignored setting.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)


class ConfigError(ValueError):
    """The configuration could not be loaded or does not validate; the message names the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Experiments(_Strict):
    curation: str
    training: str


class TrackingConfig(_Strict):
    uri: str | None
    experiments: Experiments
    registered_model: str


class DvcConfig(_Strict):
    remote: str | None


class SampleCounts(_Strict):
    shapes: int = Field(ge=1)
    shapes_finetune: int = Field(ge=1, alias="shapes-finetune")
    photos: int = Field(ge=1)


SampleKind = Literal["shapes", "shapes-finetune", "photos", "defects"]


class SamplesConfig(_Strict):
    kinds: list[SampleKind] = Field(min_length=1)
    finetune_kinds: list[SampleKind] = Field(min_length=1)
    counts: SampleCounts


class IngestLimits(_Strict):
    max_pixels: int = Field(ge=1)
    max_frames: int = Field(ge=1)
    max_bytes: int = Field(ge=1)
    max_caption_chars: int = Field(ge=1)


class IngestConfig(_Strict):
    video_extensions: list[str] = Field(min_length=1)
    workers: int = Field(ge=0)
    default_license: str | None
    min_packet_coverage: float = Field(gt=0, le=1)
    allowed_schemes: list[str] = Field(min_length=1)
    limits: IngestLimits

    @field_validator("allowed_schemes")
    @classmethod
    def _schemes(cls, value: list[str]) -> list[str]:
        for scheme in value:
            if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
                raise ValueError(f"{scheme!r} is not a URI scheme (lowercase, e.g. file, s3)")
        return value


class NormaliseConfig(_Strict):
    fps: float = Field(gt=0)
    short_side: int = Field(ge=16)
    crf: int = Field(ge=0, le=51)
    preset: Literal["ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow",
                    "slower", "veryslow"]


class FilterConfig(_Strict):
    min_width: int = Field(ge=1)
    min_height: int = Field(ge=1)
    min_duration_s: float = Field(ge=0)
    max_aspect_ratio: float = Field(ge=1)
    min_fps: float = Field(gt=0)
    analysis_short_side: int = Field(ge=16)
    sample_fps: float = Field(gt=0)
    scene_threshold: float = Field(gt=0)
    min_scene_s: float = Field(ge=0)
    min_clip_s: float = Field(gt=0)
    max_clip_s: float = Field(gt=0)
    blurry_threshold: float = Field(ge=0)
    static_threshold: float = Field(ge=0)
    phash_distance: int = Field(ge=0, le=64)
    thumbnail_distance: float = Field(ge=0)
    normalise: NormaliseConfig
    workers: int = Field(ge=0)


class AnnotateConfig(_Strict):
    captioner: str | None
    allow_fallback_caption: bool
    max_caption_chars: int = Field(ge=1)
    keyframe_quality: int = Field(ge=1, le=100)
    workers: int = Field(ge=0)


class PrivacyConfig(_Strict):
    blur_faces: bool


class CurationConfig(_Strict):
    shards: int = Field(ge=1)


class PipelineConfig(_Strict):
    local_root: str
    finetune: bool


class ImagesConfig(_Strict):
    cpu: str
    gpu: str


class VaeBootstrapConfig(_Strict):
    size: Literal["tiny", "small"]
    temporal_ratio: Literal[1, 2, 4]
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    kl_weight: float = Field(ge=0)
    foreground_weight: float = Field(ge=0)
    colour_augment: float = Field(ge=0, le=1)
    holdout_clips: int = Field(ge=1)


class VaeConfig(_Strict):
    path: str | None
    bootstrap: VaeBootstrapConfig


class TextEncoderConfig(_Strict):
    path: str | None
    max_length: int = Field(ge=1)


class TransformerConfig(_Strict):
    arch: Literal["latte", "cogvideox"]
    size: Literal["tiny", "S", "B", "L", "XL"]
    patch_size: int = Field(ge=1)
    caption_layout_rank: int = Field(ge=0)
    path: str | None


class ModelsConfig(_Strict):
    vae: VaeConfig
    text_encoder: TextEncoderConfig
    transformer: TransformerConfig


class EncodeConfig(_Strict):
    frames: int = Field(ge=1)
    stride: int = Field(ge=1)
    height: int = Field(ge=8)
    width: int = Field(ge=8)
    batch_size: int = Field(ge=1)
    sample_latents: bool
    shard_clips: int = Field(ge=1)
    device: str


Sampler = Literal["ddim", "dpm", "euler"]


class SamplingConfig(_Strict):
    """How a model is sampled. `train.sampling` is recorded in the card of every model
    trained, as the settings it is meant to be sampled with; `generate` and `evaluate` may
    override each field."""
    sampler: Sampler
    steps: int = Field(ge=1)
    guidance_scale: float = Field(ge=0)


class TrainConfig(_Strict):
    objective: Literal["epsilon", "v_prediction", "flow_matching"]
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
    num_train_timesteps: int = Field(ge=1)
    min_snr_gamma: float | None = Field(gt=0)
    caption_dropout: float = Field(ge=0, le=1)
    steps: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    grad_accumulation: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    weight_decay: float = Field(ge=0)
    adam_betas: tuple[float, float]
    warmup_steps: int = Field(ge=0)
    lr_schedule: Literal["cosine", "constant"]
    min_lr_ratio: float = Field(ge=0, le=1)
    max_grad_norm: float = Field(gt=0)
    ema_decay: float = Field(ge=0, lt=1)
    mixed_precision: Literal["no", "bf16", "fp16"]
    tf32: bool
    gradient_checkpointing: bool
    device: str
    checkpoint_every: int = Field(ge=1)
    keep_checkpoints: int = Field(ge=1)
    log_every: int = Field(ge=1)
    sample_every: int = Field(ge=0)
    sample_prompts: list[str]
    # Pods of one training run on a cluster: more than 1 runs pretraining as a Kubeflow
    # PyTorchJob (Training Operator), each pod with resources.pretrain's GPUs.
    nodes: int = Field(default=1, ge=1)
    holdout_fraction: float = Field(ge=0, lt=1)
    sampling: SamplingConfig

    @model_validator(mode="after")
    def _sampler_fits_objective(self) -> TrainConfig:
        # Said at load time, not by the first sample after hours of training.
        fits = ("euler", "dpm") if self.objective == "flow_matching" else ("ddim", "dpm")
        if self.sampling.sampler not in fits:
            raise ValueError(f"sampling.sampler {self.sampling.sampler!r} cannot sample a "
                             f"{self.objective} model: use one of {', '.join(fits)}")
        return self


class LoraConfig(_Strict):
    rank: int = Field(ge=1)
    alpha: float | None = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    targets: list[str] = Field(min_length=1)

    @property
    def scale_alpha(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank)


class SftConfig(_Strict):
    zero_stage: Literal[1, 2, 3]
    offload_optimizer: bool
    gradient_checkpointing: bool
    deepspeed_config: str | None


class FinetuneConfig(_Strict):
    method: Literal["lora", "sft"]
    # Keys of TrainConfig; checked against it when the whole Config validates.
    train: dict[str, Any]
    lora: LoraConfig
    sft: SftConfig


class GenerateConfig(_Strict):
    # None: the model's own setting (its card's `sampling`); models.sampling.sampling_settings.
    sampler: Sampler | None
    steps: int | None = Field(ge=1)
    guidance_scale: float | None = Field(ge=0)
    negative_prompt: str
    gif: bool


class EvaluateConfig(_Strict):
    prompt_set: Literal["shapes", "custom"]
    prompts: list[str]
    seeds: list[int] = Field(min_length=1)
    batch_size: int = Field(ge=1)
    steps: int | None = Field(ge=1)
    guidance_scale: float | None = Field(ge=0)
    sampler: Sampler | None
    clip_model: str | None
    i3d_path: str | None
    max_reference_clips: int = Field(ge=2)
    device: str

    @model_validator(mode="after")
    def _custom_has_prompts(self) -> EvaluateConfig:
        if self.prompt_set == "custom" and not self.prompts:
            raise ValueError("evaluate.prompt_set 'custom' needs evaluate.prompts")
        return self


class RegistryConfig(_Strict):
    # Headline metric -> the least (higher-is-better metrics) or most (the others) it may be;
    # null turns a gate of params.yaml off in a profile (OmegaConf merges dicts key by key).
    thresholds: dict[str, float | None]
    # Headline metric -> how much worse than the champion's it may be, in its own units.
    max_regression: dict[str, float | None]
    require_valid_data: bool
    license_deny: list[str]
    require_license: bool


class TaskResources(_Strict):
    # Kubernetes quantities: `cpu: 16` or `cpu: "500m"`, `memory: 32G` alike. Requests and
    # limits are set alike (Guaranteed QoS: a training pod is never the first evicted).
    model_config = ConfigDict(extra="forbid", frozen=True, coerce_numbers_to_str=True)
    cpu: str
    memory: str
    accelerator: str | None = None
    gpus: int = Field(default=0, ge=0)


class ResourcesConfig(_Strict):
    """What each task of the compiled pipelines requests on a cluster, by component name."""

    ingest: TaskResources
    shard: TaskResources
    filter: TaskResources
    annotate: TaskResources
    merge: TaskResources
    encode: TaskResources
    merge_encoded: TaskResources
    pretrain: TaskResources
    finetune: TaskResources
    evaluate: TaskResources
    # `register` would shadow BaseModel.register: the YAML key is `register`.
    register_stage: TaskResources = Field(alias="register")
    promote: TaskResources

    def for_stage(self, stage: str) -> TaskResources:
        """The resources of a component by its name (`merge-encoded` or `merge_encoded`)."""
        field = stage.replace("-", "_")
        field = "register_stage" if field == "register" else field
        if field not in type(self).model_fields:
            raise KeyError(f"no resources.{stage} in the configuration")
        return getattr(self, field)

    @model_validator(mode="after")
    def _gpus_only_for_training(self) -> ResourcesConfig:
        # The CPU image runs every other stage: a GPU request there would idle a GPU.
        for name, info in type(self).model_fields.items():
            key = info.alias or name
            if key not in GPU_STAGES and getattr(self, name).gpus:
                raise ValueError(f"resources.{key}.gpus: only {', '.join(GPU_STAGES)} "
                                 f"run on GPU nodes")
        return self


# The stages that train: the CUDA image, GPU requests, not served from KFP's cache by default.
TRAINING_STAGES = ("pretrain", "finetune")
# Evaluation may have GPUs too (sampling a big model), when config asks; by default it has none.
GPU_STAGES = (*TRAINING_STAGES, "evaluate")


class SecretEnv(_Strict):
    """A Kubernetes Secret whose keys become environment variables of every task."""

    secret: str
    env: dict[str, str]  # ENV_VAR: key in the secret


class RetryConfig(_Strict):
    attempts: int = Field(ge=0)
    backoff: str  # a duration: "30s", "5m"
    backoff_factor: float = Field(ge=1)
    backoff_max: str


class KubernetesConfig(_Strict):
    """How the compiled pipelines run on a cluster (kfp-kubernetes task settings)."""

    workdir_pvc: str
    workdir_mount: str
    secrets: list[SecretEnv]
    config_map: str | None
    config_map_env: dict[str, str]
    image_pull_secrets: list[str]
    gpu_node_selector: dict[str, str]
    gpu_tolerations: list[dict[str, str]]
    data_retries: RetryConfig
    cache_data: bool
    cache_training: bool
    run_as_user: int = Field(ge=1)
    job_timeout_s: int = Field(ge=60)

    @field_validator("workdir_mount")
    @classmethod
    def _absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("must be an absolute path")
        return value


class Config(_Strict):
    seed: int
    tracking: TrackingConfig
    dvc: DvcConfig
    samples: SamplesConfig
    ingest: IngestConfig
    filter: FilterConfig
    annotate: AnnotateConfig
    privacy: PrivacyConfig
    curation: CurationConfig
    models: ModelsConfig
    encode: EncodeConfig
    train: TrainConfig
    finetune: FinetuneConfig
    generate: GenerateConfig
    evaluate: EvaluateConfig
    registry: RegistryConfig
    resources: ResourcesConfig
    pipeline: PipelineConfig
    images: ImagesConfig
    kubernetes: KubernetesConfig

    @model_validator(mode="after")
    def _finetune_train_valid(self) -> Config:
        # A bad key or value under finetune.train fails at load time, named in full.
        try:
            self.finetune_train()
        except ValidationError as exc:
            raise ValueError("; ".join(_problems(exc, prefix="finetune.train."))) from None
        return self

    @model_validator(mode="after")
    def _dvc_remote_without_credentials(self) -> Config:
        # DVC writes its remote's URL into the workdir's .dvc/config (and names it in its
        # errors): a credential there would be on disk for good. Named, never echoed.
        from vidops.tracking.redact import inline_credentials

        found = inline_credentials(self.dvc.remote or "")
        if found:
            raise ValueError(
                f"dvc.remote carries credentials inline ({', '.join(found)}): DVC would store "
                "them in the workdir's .dvc/config. Give them through the environment "
                "(AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY for s3://, "
                "GOOGLE_APPLICATION_CREDENTIALS for gs://, AZURE_STORAGE_* for azure://)")
        return self

    @model_validator(mode="after")
    def _cogvideox_frames_valid(self) -> Config:
        # A pretrained CogVideoX (with its 4x-in-time VAE) trains on 8N+1 frames only; say so
        # at load time, with the nearest valid counts, not deep inside a training step.
        if self.models.transformer.arch == "cogvideox" and self.models.transformer.path:
            from vidops.models.frames import check_cogvideox_train_frames

            try:
                check_cogvideox_train_frames(self.encode.frames)
            except ValueError as exc:
                raise ValueError(f"encode.frames: {exc}") from None
        return self

    def finetune_train(self) -> TrainConfig:
        """The training settings of a fine-tune: `train` with `finetune.train` replaced."""
        return TrainConfig.model_validate({**self.train.model_dump(),
                                           **self.finetune.train})

    def with_overrides(self, overrides: dict[str, Any]) -> Config:
        """This config with dotted keys replaced (validated like a --set)."""
        merged = OmegaConf.merge(OmegaConf.create(self.to_dict()),
                                 OmegaConf.from_dotlist([f"{k}={json.dumps(v)}"
                                                         for k, v in overrides.items()]))
        return config_from_dict(OmegaConf.to_container(merged, resolve=True))

    def to_dict(self) -> dict[str, Any]:
        """The resolved configuration as plain data, with the key spelling of params.yaml."""
        return self.model_dump(mode="json", by_alias=True)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def flat(self) -> dict[str, Any]:
        """Dotted keys -> values, for MLflow params and printing."""
        out: dict[str, Any] = {}

        def walk(prefix: str, node: Any) -> None:
            if isinstance(node, dict):
                for key, value in node.items():
                    walk(f"{prefix}{key}.", value)
            else:
                out[prefix[:-1]] = node

        walk("", self.to_dict())
        return out


def default_params_text() -> str:
    return resources.files("vidops").joinpath("params.yaml").read_text(encoding="utf-8")


def profile_path(name_or_path: str | Path) -> Path:
    """A profile is a YAML path, or the name of one shipped in configs/ (`tiny`, ...)."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"config profile not found: {path}")
        return path
    shipped = resources.files("vidops").joinpath("configs", f"{name_or_path}.yaml")
    if not shipped.is_file():
        raise ConfigError(f"config profile not found: {name_or_path} (no file, no shipped profile)")
    return Path(str(shipped))


def load_config(
    profile: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> Config:
    """params.yaml <- profile <- `key=value` overrides, validated into a Config."""
    import yaml

    layers = []
    try:
        layers = [OmegaConf.create(default_params_text())]
        if profile is not None:
            layers.append(OmegaConf.load(profile_path(profile)))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"--set expects key=value, got {item!r}")
        merged = OmegaConf.to_container(
            OmegaConf.merge(*layers, OmegaConf.from_dotlist(list(overrides))), resolve=True)
    # YAMLError: a --set value YAML cannot read (control characters, ...).
    except (OmegaConfBaseException, yaml.YAMLError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        from vidops.tracking.redact import redact_text

        raise ConfigError(f"invalid configuration{_blame(layers, overrides)}: "
                          f"{redact_text(str(exc))}") from None
    return config_from_dict(merged)


def _blame(layers: list[Any], overrides: list[str] | tuple[str, ...]) -> str:
    """ " (--set 'key')" for the first override that fails on its own, else ""."""
    for item in overrides:
        try:
            OmegaConf.to_container(OmegaConf.merge(*layers, OmegaConf.from_dotlist([item])),
                                   resolve=True)
        except Exception:  # any failure points at this item
            return f" (--set {item.split('=', 1)[0]!r})"
    return ""


def config_from_dict(data: Any) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError("invalid configuration: " + "; ".join(_problems(exc))) from None


def _problems(exc: ValidationError, prefix: str = "") -> list[str]:
    problems = []
    for err in exc.errors():
        key = prefix + ".".join(str(part) for part in err["loc"])
        if err["type"] == "extra_forbidden":
            problems.append(f"unknown key '{key}'")
        elif err["type"] == "missing":
            problems.append(f"missing key '{key}'")
        elif not err["loc"]:  # a model validator's own message names its keys
            problems.append(str(err["ctx"]["error"]) if "error" in err.get("ctx", {})
                            else err["msg"])
        else:
            from vidops.tracking.redact import redact_text

            problems.append(f"'{key}': {err['msg']} (got {redact_text(repr(err.get('input')))})")
    return problems


def config_from_json(text: str) -> Config:
    """The inverse of Config.to_json: how KFP components receive the driver's resolved config."""
    return config_from_dict(json.loads(text))
