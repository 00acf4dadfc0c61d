"""The encode stage: latents and caption embeddings of curated clips, cached by content.

A small curated dataset is built as a real finished stage output (run_stage with a body that
writes real H.264 clips), then encoded through the stage contract with a bootstrapped tiny
VAE, as `vidops encode` does.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import make_curated
from vidops.config import Config, load_config
from vidops.data.latent_dataset import LatentDataset
from vidops.data.shards import write_shards
from vidops.stage import load_output
from vidops.stages.encode import run_encode
from vidops.stages.merge_encoded import run_merge_encoded
from vidops.tracking.workdir import Workdir

# Few bootstrap steps and frames: these tests check the plumbing, test_models the VAE.
OVERRIDES = ["models.vae.bootstrap.steps=4", "models.vae.bootstrap.holdout_clips=1",
             "encode.frames=9", "encode.stride=1", "encode.height=32", "encode.width=32",
             "encode.batch_size=2", "encode.shard_clips=2", "curation.shards=2"]


def _cfg(*extra: str) -> Config:
    return load_config("tiny", [*OVERRIDES, *extra])


def _curated(workdir: Workdir, specs: list[tuple[str, int, int]], name: str = "curated") -> Path:
    return make_curated(workdir, specs, _cfg(), name)


# "short" has 6 frames, fewer than encode.frames.
SPECS = [("c0", 0, 24), ("c1", 1, 24), ("c2", 2, 24), ("short", 3, 6)]


@pytest.fixture(scope="module")
def encoded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workdir, Path, dict]:
    workdir = Workdir.at(tmp_path_factory.mktemp("enc") / "work")
    curated = _curated(workdir, SPECS)
    info = run_encode(curated, workdir.stage_dir("encode"), cfg=_cfg(), workdir=workdir,
                      quiet=True)
    return workdir, curated, info


def test_every_clip_gets_latents_of_the_configured_shape(encoded: tuple) -> None:
    _, _, info = encoded
    out = Path(info["output"]["dir"])
    enc = info["encoding"]
    ratio_t, ratio_s = enc["vae"]["temporal_ratio"], enc["vae"]["spatial_ratio"]
    channels = enc["latent_shape"][0]
    assert enc["latent_shape"] == [channels, (9 - 1) // ratio_t + 1, 32 // ratio_s,
                                   32 // ratio_s]
    assert info["counts"]["kept"] == 3 and info["counts"]["by_reason"] == {"too_short": 1}
    assert info["run"]["encoded"] == 3 and info["run"]["cache_hits"] == 0
    # The bootstrapped VAE: trained here, versioned with the latents, PSNR on held-out clips.
    assert enc["vae"]["source"] == "bootstrap" and enc["vae"]["holdout_clips"] == 1
    assert isinstance(enc["vae"]["psnr_holdout_db"], float)
    assert (out / "vae" / "config.json").is_file()

    data = LatentDataset(out, return_meta=True)
    assert sorted(data.clip_ids) == ["c0", "c1", "c2"]
    item = data[1]
    assert list(item["latents"].shape) == enc["latent_shape"]
    assert item["prompt_embeds"].shape == (32, 384) and item["prompt_mask"].sum() > 3
    assert item["caption"].startswith("a yellow square moving right")
    empty = data.empty_caption()
    assert empty["prompt_mask"].sum() == 2  # [CLS] [SEP]: the empty caption, for CFG
    assert not torch.equal(data[0]["latents"], data[1]["latents"])
    manifest, stage = load_output(out)
    assert stage["dvc"]["md5"] and stage["mlflow"]["run_id"]
    assert set(manifest.clip_id) == {"c0", "c1", "c2"}


def test_rerun_hits_the_cache_and_one_new_clip_encodes_one(encoded: tuple) -> None:
    workdir, _, first = encoded
    curated = _curated(workdir, SPECS, name="curated-again")  # same content, new folder
    again = run_encode(curated, workdir.stage_dir("encode-again"), cfg=_cfg(), workdir=workdir,
                       quiet=True)
    assert again["run"]["encoded"] == 0 and again["run"]["cache_hits"] == 3
    assert again["run"]["vae"]["reused"] is True
    # The same data, however this run came by it: the same dataset version. (A rerun after
    # a crash depends on it: training resumes only on the data it started on.)
    assert again["dvc"]["md5"] == first["dvc"]["md5"]
    a, b = (LatentDataset(Path(i["output"]["dir"])) for i in (first, again))
    assert all(torch.equal(a[i]["latents"], b[i]["latents"]) for i in range(len(a)))

    grown = _curated(workdir, [*SPECS, ("c4", 4, 24)], name="curated-grown")
    # A new clip changes the bootstrap's training set: pin the VAE to the first one, as a
    # user does with models.vae.path, to see the cache serve the old clips.
    vae = first["run"]["vae"]["path"]
    plus = run_encode(grown, workdir.stage_dir("encode-grown"), workdir=workdir, quiet=True,
                      cfg=_cfg(f"models.vae.path={vae}"))
    assert plus["run"]["encoded"] == 1 and plus["run"]["cache_hits"] == 3
    assert plus["encoding"]["vae"]["digest"] == first["encoding"]["vae"]["digest"]
    # Where that VAE lies is a run fact, not part of the dataset (two workdirs encoding the
    # same clips with it must version the same data); pretraining still finds it there.
    grown_dir = Path(plus["output"]["dir"])
    assert plus["run"]["vae"]["path"] == vae
    assert vae not in (grown_dir / "encoding.json").read_text()
    from vidops.stages.pretrain import _job

    assert str(_job(grown_dir, workdir.models / "unused", _cfg()).vae_source) == vae


def test_another_vae_reencodes_everything(encoded: tuple) -> None:
    workdir, curated, _ = encoded
    other = run_encode(curated, workdir.stage_dir("encode-other"), workdir=workdir, quiet=True,
                       cfg=_cfg("models.vae.bootstrap.steps=5"))
    assert other["run"]["encoded"] == 3 and other["run"]["cache_hits"] == 0


def test_sharded_encode_merges_into_the_same_dataset(encoded: tuple) -> None:
    workdir, curated, first = encoded
    manifest, _ = load_output(curated)
    shard_files = write_shards(manifest, 2, workdir.stage_dir("encode-shards"),
                               source_dir=curated, id_column="clip_id")
    outs = [Path(run_encode(curated, workdir.stage_dir(f"encode-shard-{i}"), cfg=_cfg(),
                            workdir=workdir, shard_file=Path(f), quiet=True,
                            dataset_name=f"encode-shard-{i}")["output"]["dir"])
            for i, f in enumerate(shard_files)]
    merged = run_merge_encoded(outs, workdir.stage_dir("encoded"), cfg=_cfg(), workdir=workdir,
                               quiet=True)
    whole, parts = LatentDataset(Path(first["output"]["dir"])), LatentDataset(
        Path(merged["output"]["dir"]))
    assert whole.clip_ids == parts.clip_ids
    assert all(torch.equal(whole[i]["latents"], parts[i]["latents"]) for i in range(len(whole)))
    assert json.loads((Path(merged["output"]["dir"]) / "encoding.json").read_text())[
        "vae"]["digest"] == first["encoding"]["vae"]["digest"]
