"""The `vidops` command. Heavy imports happen inside the commands so `vidops --help` is fast
and worker processes that re-import this module start quickly.

Exit codes: 0 success, 1 a gate refused (data or model quality), 2 bad usage or bad input.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vidops.config import Config
    from vidops.tracking.workdir import Workdir

EXIT_OK, EXIT_GATE, EXIT_USAGE = 0, 1, 2
PIPELINE_NAMES = ["lifecycle", "curation", "training"]


def _common(top: bool) -> argparse.ArgumentParser:
    """Global options, accepted before or after the subcommand. The subcommand's copy has no
    defaults of its own, or argparse would let it overwrite what was given before it."""

    def default(value):
        return value if top else argparse.SUPPRESS

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", default=default(None),
                        help="profile layered over params.yaml (a path, or the name of a "
                        "shipped profile such as tiny)")
    # argparse copies a subcommand's values over the top level's, so the two --set lists
    # have their own names and are joined in main(): `vidops --set a=1 run --set b=2` keeps
    # both.
    common.add_argument("--set", dest="overrides" if top else "sub_overrides", action="append",
                        default=default([]), metavar="KEY=VALUE",
                        help="override one setting (repeatable)")
    common.add_argument("--workdir", type=Path, default=default(None),
                        help="holds the MLflow store, DVC repo and remote, stage outputs "
                        "(default ./vidops-work)")
    common.add_argument("--quiet", action="store_true", default=default(False),
                        help="no progress output")
    return common


def build_parser() -> argparse.ArgumentParser:
    common = _common(top=False)
    parser = argparse.ArgumentParser(prog="vidops", parents=[_common(top=True)],
                                     description="MLOps for text-to-video diffusion models.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("samples", parents=[common], help="write a sample corpus")
    p.add_argument("dir", type=Path)
    p.add_argument("--kind", required=True,
                   choices=["shapes", "shapes-finetune", "photos", "defects"])
    p.add_argument("--count", type=int, default=None)
    p.add_argument("--seed", type=int, default=None, help="default: the config's seed")

    p = sub.add_parser("ingest", parents=[common], help="probe, hash and version source videos")
    p.add_argument("--source", dest="sources", nargs="+", action="extend", required=True,
                   metavar="URI", help="folder, CSV/JSONL manifest, CogVideo folder, or file")
    p.add_argument("--out", type=Path, default=None, help="default <workdir>/data/ingest")

    p = sub.add_parser("filter", parents=[common],
                       help="gates, quality scores, scene split, dedup, normalised clips")
    p.add_argument("--in", dest="in_dir", type=Path, default=None,
                   help="an ingest output (default <workdir>/data/ingest)")
    p.add_argument("--out", type=Path, default=None, help="default <workdir>/data/filter")
    p.add_argument("--shard", type=Path, default=None,
                   help="a shard file: filter only the sources it lists")

    p = sub.add_parser("annotate", parents=[common],
                       help="captions, keyframes, faces (optional blur), tags")
    p.add_argument("--in", dest="in_dir", type=Path, default=None,
                   help="a filter output (default <workdir>/data/filter)")
    p.add_argument("--out", type=Path, default=None, help="default <workdir>/data/annotate")

    p = sub.add_parser("merge", parents=[common],
                       help="merge annotated shards with a cross-shard dedup")
    p.add_argument("--in", dest="in_dirs", type=Path, nargs="+", required=True)
    p.add_argument("--out", type=Path, default=None, help="default <workdir>/data/curated")

    p = sub.add_parser("encode", parents=[common],
                       help="VAE latents + text embeddings, content-addressed cache")
    p.add_argument("--in", dest="in_dir", type=Path, default=None,
                   help="a curated (or annotate) output (default <workdir>/data/curated)")
    p.add_argument("--out", type=Path, default=None, help="default <workdir>/data/encode")
    p.add_argument("--shard", type=Path, default=None,
                   help="a shard file (by clip_id): encode only the clips it lists")
    p.add_argument("--vae-from-model", default=None, metavar="MODEL",
                   help="encode in this model's latent space (its VAE, text encoder and clip "
                   "geometry): data to fine-tune it on; a model folder, MLflow URI or diffusers "
                   "CogVideoX pipeline (folder or hub id)")

    p = sub.add_parser("merge-encoded", parents=[common],
                       help="merge encoded shards into one latent dataset")
    p.add_argument("--in", dest="in_dirs", type=Path, nargs="+", required=True)
    p.add_argument("--out", type=Path, default=None, help="default <workdir>/data/encoded")

    p = sub.add_parser("pretrain", parents=[common],
                       help="train a Latte diffusion transformer from scratch on latents")
    p.add_argument("--data", type=Path, default=None,
                   help="an encoded dataset (default <workdir>/data/encoded)")
    p.add_argument("--out", type=Path, default=None,
                   help="the model folder (default <workdir>/models/pretrain)")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="resume", action="store_const", const="require",
                        default="auto", help="continue from the latest checkpoint in --out "
                        "(the default whenever one exists); an error if there is none")
    resume.add_argument("--no-resume", dest="resume", action="store_const", const="never",
                        help="start afresh, deleting earlier checkpoints in --out")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine: DDP under torchrun (gloo on CPU)")
    p.add_argument("--parent-run-id", default="",
                   help="the MLflow run to nest under (a pipeline's launcher sets it)")

    p = sub.add_parser("finetune", parents=[common],
                       help="adapt a trained model to new data: LoRA or full fine-tuning")
    p.add_argument("--data", type=Path, default=None,
                   help="an encoded dataset in the base's latent space "
                   "(default <workdir>/data/finetune-encoded)")
    p.add_argument("--base", required=True,
                   help="a model folder, an MLflow model URI (models:/vidgen@champion), or a "
                   "diffusers CogVideoX pipeline: a folder or hub id (THUDM/CogVideoX-2b), "
                   "imported once into <workdir>/models/imported/")
    p.add_argument("--method", choices=["lora", "sft"], default=None,
                   help="default: finetune.method")
    p.add_argument("--out", type=Path, default=None,
                   help="the model folder (default <workdir>/models/finetune)")
    p.add_argument("--merge", action="store_true",
                   help="lora: write a merged model (the adapter folded into the weights; "
                   "the adapter stays in adapter/)")
    resume = p.add_mutually_exclusive_group()
    resume.add_argument("--resume", dest="resume", action="store_const", const="require",
                        default="auto", help="continue from the latest checkpoint in --out")
    resume.add_argument("--no-resume", dest="resume", action="store_const", const="never",
                        help="start afresh, deleting earlier checkpoints in --out")
    p.add_argument("--nproc", type=int, default=1,
                   help="processes on this machine: torchrun (DDP for lora, DeepSpeed ZeRO "
                   "for sft; gloo on CPU)")
    p.add_argument("--parent-run-id", default="",
                   help="the MLflow run to nest under (a pipeline's launcher sets it)")

    p = sub.add_parser("generate", parents=[common], help="text to video with a trained model")
    p.add_argument("--model", required=True,
                   help="a model folder, an MLflow model URI (models:/vidgen@champion), or a "
                   "diffusers CogVideoX pipeline: a folder or hub id (THUDM/CogVideoX-2b), "
                   "imported once into <workdir>/models/imported/")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", type=Path, required=True, help="the MP4 to write")
    p.add_argument("--seed", type=int, default=None, help="default: the config's seed")
    # Defaults: generate.*, else the model's own sampling settings (its card).
    p.add_argument("--steps", type=int, default=None, help="default: the model's (its card)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the model's, from its card)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--sampler", choices=["ddim", "dpm", "euler"], default=None)
    p.add_argument("--gif", action="store_true", help="also write an animated GIF")
    p.add_argument("--lora", type=Path, default=None, metavar="PATH",
                   help="apply this LoRA adapter (a fine-tune folder or its adapter/) to MODEL")
    p.add_argument("--lora-scale", type=float, default=1.0,
                   help="strength of the adapter (of --lora, or of a LoRA MODEL): 0 is the base")

    p = sub.add_parser("evaluate", parents=[common],
                       help="generate a fixed prompt set and measure it: metrics.json, "
                       "samples, report.html")
    p.add_argument("--model", required=True,
                   help="a model folder, an MLflow model URI (models:/vidgen@champion), or a "
                   "diffusers CogVideoX pipeline")
    p.add_argument("--out", type=Path, default=None,
                   help="default <workdir>/eval/<model folder name>")
    p.add_argument("--reference", type=Path, default=None, metavar="DIR",
                   help="real clips to compare with (a curated dataset); default: the clips "
                   "the model's training held out")
    p.add_argument("--compare", action="append", default=[], metavar="LABEL=DIR",
                   help="another evaluation to show beside this one in the report "
                   "(repeatable; the champion is always shown)")

    p = sub.add_parser("register", parents=[common],
                       help="register an evaluated model; champion only if every gate passes")
    p.add_argument("--model", required=True, help="the model folder (or MLflow URI) evaluated")
    p.add_argument("--eval", dest="eval_dir", type=Path, required=True,
                   help="its evaluation (vidops evaluate --out)")
    p.add_argument("--no-promote", dest="promote", action="store_false",
                   help="register and check the gates, but leave the champion alias alone")

    p = sub.add_parser("lineage", parents=[common],
                       help="audit: a model back to its source videos, or a source forward "
                       "to every model")
    p.add_argument("model", nargs="?", default=None,
                   help="a model folder or MLflow URI (models:/vidgen@champion)")
    p.add_argument("--source", default=None, metavar="SHA256|URI",
                   help="the reverse question: every dataset version and registered model "
                   "with content from this source")
    p.add_argument("--verify", action="store_true",
                   help="re-hash the DVC objects and source files the lineage names; exit 1 "
                   "on any mismatch")
    p.add_argument("--out", type=Path, default=None,
                   help="where lineage.json and lineage.html go (default "
                   "<workdir>/lineage/<model>)")

    p = sub.add_parser("run", parents=[common],
                       help="run the pipeline locally through kfp.local")
    p.add_argument("--source", dest="sources", nargs="+", action="extend", default=[],
                   metavar="URI", help="default: the sample corpus")
    p.add_argument("--finetune-source", dest="finetune_sources", nargs="+", action="extend",
                   default=[], metavar="URI",
                   help="lifecycle: the corpus to fine-tune on (default with the samples: "
                   "samples.finetune_kinds)")
    p.add_argument("--pipeline", default="lifecycle", choices=PIPELINE_NAMES,
                   help="lifecycle (default): curation then training; training starts from a "
                   "curated dataset (--data)")
    p.add_argument("--data", type=Path, default=None,
                   help="training pipeline: the curated dataset (default <workdir>/data/curated)")

    p = sub.add_parser("compile", parents=[common], help="compile a pipeline to KFP YAML")
    p.add_argument("--pipeline", required=True, choices=PIPELINE_NAMES)
    p.add_argument("--out", type=Path, required=True)

    # A Kubeflow Pipelines endpoint: --host, else KFP_HOST / KF_PIPELINES_ENDPOINT, else the
    # in-cluster service; a token from KFP_TOKEN or the pod's projected service-account token.
    endpoint = argparse.ArgumentParser(add_help=False)
    endpoint.add_argument("--host", default=None, help="the KFP API endpoint")
    endpoint.add_argument("--namespace", default=None,
                          help="the KFP namespace (multi-user Kubeflow: the profile)")
    remote_run = argparse.ArgumentParser(add_help=False)
    remote_run.add_argument("pipeline", nargs="?", default="lifecycle", choices=PIPELINE_NAMES)
    remote_run.add_argument("--source", dest="sources", nargs="+", action="extend", default=[],
                            metavar="URI", help="source videos as the pods see them "
                            "(s3://..., or a path on the workdir volume)")
    remote_run.add_argument("--finetune-source", dest="finetune_sources", nargs="+",
                            action="extend", default=[], metavar="URI",
                            help="lifecycle: the corpus to fine-tune on")
    remote_run.add_argument("--data", default=None,
                            help="training pipeline: the curated dataset folder")
    remote_run.add_argument("--experiment", default="vidops", help="the KFP experiment")
    remote_run.add_argument("--service-account", default=None,
                            help="the Kubernetes service account the run's pods use "
                            "(manifests/: vidops-pipeline-runner)")
    remote_run.add_argument("--no-cache", action="store_true",
                            help="run every task, whatever KFP's cache holds")
    p = sub.add_parser("submit", parents=[common, endpoint, remote_run],
                       help="compile a pipeline and start a run of it on Kubeflow Pipelines "
                       "(--workdir: the workdir as the pods see it; default "
                       "kubernetes.workdir_mount)")
    p.add_argument("--run-name", default=None)
    p = sub.add_parser("schedule", parents=[common, endpoint, remote_run],
                       help="a recurring run of a pipeline on Kubeflow Pipelines")
    p.add_argument("--cron", required=True, metavar="EXPR",
                   help="when: standard 5-field cron (\"0 3 * * 0\": Sundays 03:00) or "
                   "KFP's 6-field form with seconds first")
    p.add_argument("--name", default=None, help="the recurring run's name")
    p = sub.add_parser("status", parents=[common, endpoint],
                       help="a Kubeflow Pipelines run's state and its tasks' states")
    p.add_argument("run_id")
    p.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                   help="wait up to this long for the run to finish")
    return parser


def _stderr(message: str) -> None:
    """An error for the user; any URI in it (a source, an endpoint) without credentials."""
    from vidops.tracking.redact import redact_text

    print(redact_text(message), file=sys.stderr)


class _RedactingFilter(logging.Filter):
    """Log records as they are emitted, with credentials inside URIs masked."""

    def filter(self, record: logging.LogRecord) -> bool:
        from vidops.tracking.redact import redact_text

        message = record.getMessage()
        redacted = redact_text(message)
        if redacted is not message:
            record.msg, record.args = redacted, None
        return True


def _setup_logging(quiet: bool) -> None:
    level = logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    # MLflow configures its own handler; --quiet must reach it (and alembic's migrations).
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(level)
    for name in ("", "mlflow", "alembic"):
        for handler in logging.getLogger(name).handlers:
            if not any(isinstance(f, _RedactingFilter) for f in handler.filters):
                handler.addFilter(_RedactingFilter())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.quiet)

    from vidops.config import ConfigError, load_config
    from vidops.data.sources import SourceError
    from vidops.stage import GateError, StageError

    try:
        from vidops.tracking.redact import secrets_from_files

        secrets_from_files()
        cfg = load_config(args.config,
                          [*args.overrides, *getattr(args, "sub_overrides", [])])
        return _dispatch(args, cfg)
    except GateError as exc:
        _stderr(f"vidops: gate refused: {exc}")
        return EXIT_GATE
    except (ConfigError, SourceError, StageError) as exc:
        _stderr(f"vidops: error: {exc}")
        return EXIT_USAGE
    except Exception as exc:
        full = _out_of_space(exc)
        if full is None:
            raise
        # The stage that ran out removed its partial output; nothing half-written is left
        # for a later stage to read. Free space (or move --workdir) and run it again.
        _stderr(f"vidops: error: no space left on device ({full}); the stage's partial "
                "output was removed: free space and run it again")
        return EXIT_USAGE


def _out_of_space(exc: BaseException) -> str | None:
    """What ran out of space, when `exc` (or what caused it) is a full disk: a write that
    failed with ENOSPC, or SQLite's (the MLflow store's) "database or disk is full"."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno == errno.ENOSPC:
            return f"writing {current.filename or 'the workdir'}"
        if "database or disk is full" in str(current):
            return "the MLflow store's database"
        current = current.__cause__ or current.__context__
    return None


def _dispatch(args: argparse.Namespace, cfg: Config) -> int:
    from vidops.tracking.workdir import Workdir

    if args.command in _WITHOUT_WORKDIR:
        return _WITHOUT_WORKDIR[args.command](args, cfg)
    return _WITH_WORKDIR[args.command](args, cfg, Workdir.at(args.workdir))


def _samples(args: argparse.Namespace, cfg: Config) -> int:
    from vidops.data.samples import write_samples

    report = write_samples(args.dir, args.kind, count=args.count,
                           seed=cfg.seed if args.seed is None else args.seed)
    print(f"wrote {len(report.files)} {args.kind} videos to {report.out_dir}")
    return EXIT_OK


def _compile(args: argparse.Namespace, cfg: Config) -> int:
    from vidops.pipelines.compile import compile_pipeline

    print(f"wrote {compile_pipeline(args.pipeline, args.out, cfg)}")
    return EXIT_OK


def _run(args: argparse.Namespace, cfg: Config, workdir: Workdir) -> int:
    from vidops.pipelines.local import PipelineFailed, run_local, summary_table

    try:
        summary = run_local(args.pipeline, cfg, workdir, args.sources, quiet=args.quiet,
                            curated_dir=args.data, finetune_sources=args.finetune_sources)
    except PipelineFailed as exc:
        _stderr(f"vidops: {exc}")
        print(f"see {workdir.run_summary}", file=sys.stderr)
        return EXIT_GATE if exc.gate else EXIT_USAGE
    print(summary_table(summary))
    return EXIT_OK


def _run_request(args: argparse.Namespace, cfg: Config) -> Any:
    from vidops.pipelines.submit import RunRequest

    return RunRequest(
        pipeline=args.pipeline, inputs=[args.data] if args.data else list(args.sources),
        finetune_inputs=list(args.finetune_sources),
        workdir=str(args.workdir or cfg.kubernetes.workdir_mount),
        experiment=args.experiment, run_name=getattr(args, "run_name", None),
        service_account=args.service_account,
        enable_caching=False if args.no_cache else None)


def _remote(action: Callable[[argparse.Namespace, Config, Any], dict[str, Any]]
            ) -> Callable[[argparse.Namespace, Config], int]:
    """A command against a KFP endpoint: its result as JSON, or the reason it failed."""

    def command(args: argparse.Namespace, cfg: Config) -> int:
        from vidops.pipelines.submit import SubmitError, kfp_client

        try:
            result = action(args, cfg, kfp_client(args.host, args.namespace))
        except SubmitError as exc:
            _stderr(f"vidops: {exc}")
            return EXIT_USAGE
        print(json.dumps(result, indent=2))
        return EXIT_GATE if result.get("state") in ("FAILED", "CANCELED") else EXIT_OK

    return command


def _submit(args: argparse.Namespace, cfg: Config, client: Any) -> dict[str, Any]:
    from vidops.pipelines.submit import submit

    return submit(cfg, _run_request(args, cfg), client)


def _schedule(args: argparse.Namespace, cfg: Config, client: Any) -> dict[str, Any]:
    from vidops.pipelines.submit import schedule

    return schedule(cfg, _run_request(args, cfg), args.cron, client, name=args.name)


def _status(args: argparse.Namespace, cfg: Config, client: Any) -> dict[str, Any]:
    from vidops.pipelines.submit import run_status

    del cfg
    return run_status(client, args.run_id, wait_s=args.wait)


def _torchrun(nproc: int) -> int:
    """Run this very command again under torchrun with `nproc` processes on this machine."""
    import os
    import subprocess

    argv = sys.argv[1:]
    cleaned, skip = [], False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--nproc":
            skip = True
            continue
        if item.startswith("--nproc="):
            continue
        cleaned.append(item)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "vidops.cli", *cleaned]
    env = dict(os.environ)
    # torchrun would otherwise pin every rank to one thread with a warning; split the cores.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(command, env=env)


def _pretrain(args: argparse.Namespace, cfg: Config, workdir: Workdir) -> int:
    import os

    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _torchrun(args.nproc)
    from vidops.stages.pretrain import pretrain
    from vidops.train.loop import TrainError

    try:
        summary = pretrain(args.data or workdir.stage_dir("encoded"),
                           args.out or workdir.models / "pretrain", cfg=cfg,
                           workdir=workdir, resume=args.resume, quiet=args.quiet,
                           parent_run_id=args.parent_run_id or None)
    except (TrainError, FileNotFoundError, ValueError) as exc:
        _stderr(f"vidops: error: {exc}")
        return EXIT_USAGE
    _print_training(summary)
    return EXIT_OK


def _print_training(summary: dict) -> None:
    if summary:  # rank 0; other ranks return nothing
        print(json.dumps({k: summary[k] for k in (
            "model_dir", "steps", "resumed_from", "final_loss", "seconds", "world_size",
            "ranks_agree", "mlflow_run_id")}, indent=2))


def _finetune(args: argparse.Namespace, cfg: Config, workdir: Workdir) -> int:
    import os

    method = args.method or cfg.finetune.method
    if args.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _torchrun(args.nproc)
    from vidops.models.folder import ModelFolderError
    from vidops.models.lora import AdapterError
    from vidops.stages.finetune import finetune
    from vidops.train.loop import TrainError

    try:
        summary = finetune(args.data or workdir.stage_dir("finetune-encoded"), args.base,
                           args.out or workdir.models / "finetune", cfg=cfg,
                           workdir=workdir, method=method, merge=args.merge,
                           resume=args.resume, quiet=args.quiet,
                           parent_run_id=args.parent_run_id or None)
    except (TrainError, ModelFolderError, AdapterError, FileNotFoundError, ValueError) as exc:
        _stderr(f"vidops: error: {exc}")
        return EXIT_USAGE
    _print_training(summary)
    return EXIT_OK


def _generate(args: argparse.Namespace, cfg: Config, workdir: Workdir) -> int:
    from vidops.models.folder import ModelFolderError, apply_lora, load_model_folder
    from vidops.models.imported import resolve_model_ref
    from vidops.models.lora import AdapterError
    from vidops.models.sampling import generate, sampling_settings, save_video

    gen = cfg.generate
    try:
        model = load_model_folder(resolve_model_ref(args.model, cfg=cfg, workdir=workdir),
                                  lora_scale=1.0 if args.lora else args.lora_scale,
                                  download_dir=workdir.downloads)
        if args.lora:
            apply_lora(model, args.lora, args.lora_scale)
        how = sampling_settings(cfg, model.card, {"steps": args.steps, "sampler": args.sampler,
                                                  "guidance_scale": args.guidance})
        videos = generate(model, [args.prompt], seed=cfg.seed if args.seed is None else args.seed,
                          steps=how.steps, guidance_scale=how.guidance_scale,
                          sampler=how.sampler,
                          negative_prompt=(gen.negative_prompt if args.negative_prompt is None
                                           else args.negative_prompt))
    except (ModelFolderError, AdapterError, FileNotFoundError, ValueError) as exc:
        _stderr(f"vidops: error: {exc}")
        return EXIT_USAGE
    written = save_video(videos[0], args.out, model.fps, gif=args.gif or gen.gif)
    frames, height, width = videos.shape[1:4]
    print(json.dumps({"out": [str(p) for p in written], "frames": int(frames),
                      "height": int(height), "width": int(width), "fps": model.fps,
                      "sampling": how.model_dump()}))
    return EXIT_OK


def _evaluate(args: argparse.Namespace, cfg: Config, workdir: Workdir) -> int:
    from vidops.models.folder import ModelFolderError
    from vidops.stages.evaluate import REPORT_HTML, evaluate

    compare = {}
    for item in args.compare:
        label, sep, folder = item.partition("=")
        if not sep:
            _stderr(f"vidops: error: --compare expects LABEL=DIR, got {item!r}")
            return EXIT_USAGE
        compare[label] = Path(folder)
    out = args.out or workdir.evaluations / Path(str(args.model).rstrip("/")).name
    try:
        result = evaluate(args.model, out, cfg=cfg, workdir=workdir, reference=args.reference,
                          compare=compare, quiet=args.quiet)
    except (ModelFolderError, FileNotFoundError, ValueError) as exc:
        _stderr(f"vidops: error: {exc}")
        return EXIT_USAGE
    print(json.dumps({"out": str(out), "report": str(out / REPORT_HTML),
                      "videos": len(result["videos"]), "headline": result["headline"]},
                     indent=2))
    return EXIT_OK


def _register(args: argparse.Namespace, cfg: Config, workdir: Workdir) -> int:
    from vidops.models.folder import ModelFolderError
    from vidops.tracking.registry import failed_gates, register

    try:
        result = register(args.model, args.eval_dir, cfg=cfg, workdir=workdir,
                          promote=args.promote)
    except (ModelFolderError, FileNotFoundError, ValueError) as exc:
        _stderr(f"vidops: error: {exc}")
        return EXIT_USAGE
    print(json.dumps({k: result[k] for k in ("name", "version", "model_uri", "aliases",
                                              "passed", "champion_before", "gates")}, indent=2))
    if not result["passed"]:
        print(f"vidops: gate refused: {result['name']} v{result['version']} stays challenger; "
              + "; ".join(failed_gates(result)), file=sys.stderr)
        return EXIT_GATE
    return EXIT_OK


def _lineage(args: argparse.Namespace, cfg: Config, workdir: Workdir) -> int:
    import re

    from vidops.models.folder import ModelFolderError
    from vidops.tracking.audit import model_lineage, source_usage, write_lineage

    if (args.model is None) == (args.source is None):
        print("vidops: error: give MODEL or --source SHA256|URI (one of them)", file=sys.stderr)
        return EXIT_USAGE
    if args.source is not None:
        usage = source_usage(args.source, cfg=cfg, workdir=workdir)
        print(json.dumps(usage, indent=2))
        if not usage["models"]:
            _stderr(f"{args.source}: not used by any model")
        return EXIT_OK
    try:
        lineage = model_lineage(args.model, cfg=cfg, workdir=workdir, verify=args.verify)
    except (ModelFolderError, FileNotFoundError, ValueError) as exc:
        _stderr(f"vidops: error: {exc}")
        return EXIT_USAGE
    slug = re.sub(r"[^\w.-]+", "-", str(args.model)).strip("-")[-80:]
    json_path, html_path = write_lineage(args.out or workdir.root / "lineage" / slug, lineage)
    accounting, verification = lineage["accounting"], lineage["verification"]
    print(json.dumps({"lineage": str(json_path), "report": str(html_path),
                      "registered": lineage["model"]["registered"] and {
                          k: lineage["model"]["registered"][k]
                          for k in ("name", "version", "aliases")},
                      "accounting": accounting, "licenses": lineage["licenses"],
                      "verification": verification}, indent=2))
    if verification is not None and verification["mismatches"]:
        for m in verification["mismatches"]:
            # One object may belong to several dataset versions: each is named.
            where = f" in dataset {m['dataset']}" if m.get("dataset") else ""
            print(f"vidops: mismatch: {m['what']}: {m['path']}{where} (recorded "
                  f"{m['expected']}, now {m['found']})", file=sys.stderr)
        return EXIT_GATE
    return EXIT_OK


def _run_data_stage(args: argparse.Namespace, cfg: Config, workdir: Workdir) -> int:
    """One data stage under the stage contract; prints what a script needs from stage.json."""
    if args.command == "ingest":
        from vidops.stages.ingest import run_ingest

        info = run_ingest(args.sources, args.out or workdir.stage_dir("ingest"), cfg=cfg,
                          workdir=workdir, quiet=args.quiet)
    elif args.command == "filter":
        from vidops.data.shards import read_shard
        from vidops.stages.filter import run_filter

        shard_source = read_shard(args.shard)[2] if args.shard else None
        info = run_filter(args.in_dir or shard_source or workdir.stage_dir("ingest"),
                          args.out or workdir.stage_dir("filter"), shard_file=args.shard,
                          cfg=cfg, workdir=workdir, quiet=args.quiet)
    elif args.command == "annotate":
        from vidops.stages.annotate import run_annotate

        info = run_annotate(args.in_dir or workdir.stage_dir("filter"),
                            args.out or workdir.stage_dir("annotate"), cfg=cfg,
                            workdir=workdir, quiet=args.quiet)
    elif args.command == "encode":
        from vidops.stages.encode import config_for_model, run_encode

        if args.vae_from_model:
            cfg = config_for_model(cfg, args.vae_from_model, workdir)
        info = run_encode(args.in_dir or workdir.stage_dir("curated"),
                          args.out or workdir.stage_dir("encode"), shard_file=args.shard,
                          cfg=cfg, workdir=workdir, quiet=args.quiet)
    elif args.command == "merge-encoded":
        from vidops.stages.merge_encoded import MERGED, run_merge_encoded

        info = run_merge_encoded(args.in_dirs, args.out or workdir.stage_dir(MERGED), cfg=cfg,
                                 workdir=workdir, quiet=args.quiet)
    else:
        from vidops.stages.merge import run_merge

        info = run_merge(args.in_dirs, args.out or workdir.stage_dir("curated"), cfg=cfg,
                         workdir=workdir, quiet=args.quiet)
    print(json.dumps({"out_dir": info["output"]["dir"], "counts": info["counts"],
                      "validation": (info.get("validation") or {}).get("success"),
                      "dvc_md5": info["dvc"]["md5"],
                      "mlflow_run_id": info["mlflow"]["run_id"]}, indent=2))
    return EXIT_OK


# The commands by name; those in the first table need no workdir on this machine.
_WITHOUT_WORKDIR: dict[str, Callable[[argparse.Namespace, Config], int]] = {
    "samples": _samples,
    "compile": _compile,
    "submit": _remote(_submit),
    "schedule": _remote(_schedule),
    "status": _remote(_status),
}
_WITH_WORKDIR: dict[str, Callable[[argparse.Namespace, Config, Workdir], int]] = {
    **{stage: _run_data_stage for stage in
       ("ingest", "filter", "annotate", "merge", "encode", "merge-encoded")},
    "pretrain": _pretrain,
    "finetune": _finetune,
    "generate": _generate,
    "evaluate": _evaluate,
    "register": _register,
    "lineage": _lineage,
    "run": _run,
}

if __name__ == "__main__":
    sys.exit(main())
