"""The content-addressed latent cache, its export, and the Dataset training reads it through."""

from __future__ import annotations

import hashlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler

from vidops.data import latent_cache
from vidops.data.latent_cache import (
    LatentCache,
    cache_key,
    export,
    write_empty_caption,
)
from vidops.data.latent_dataset import LatentDataset, LatentDatasetError

PARAMS = {"frames": 9, "height": 128, "width": 128, "max_text_len": 32}


def key(i: int, vae: str = "vae@1") -> str:
    return cache_key(f"sha256:{i:064x}", vae, "t5@1", PARAMS)


def tensors(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {"latents": torch.randn(4, 3, 16, 16, generator=g),
            "prompt_embeds": torch.randn(32, 384, generator=g),
            "prompt_mask": (torch.arange(32) < 3 + i % 20).to(torch.int64)}


def fill(cache: LatentCache, ids: range, shard_entries: int = 3) -> None:
    with cache.writer(shard_entries) as writer:
        for i in ids:
            writer.add(key(i), tensors(i))


def shard_files(cache: LatentCache) -> set[str]:
    return {p.name for p in cache.shards_dir.glob("*.safetensors")}


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(want) <= set(got)
    for name, tensor in want.items():
        assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape
        assert torch.equal(got[name], tensor), name


def in_child(body: Callable[[], None]) -> int:
    """Run body in a forked process and return its exit status (a kill shows as -signal)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            body()
            os._exit(0)
        except BaseException:
            os._exit(1)
    status = os.waitpid(pid, 0)[1]
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def test_cache_key_covers_every_component() -> None:
    base = key(1)
    assert len(base) == 64 and base == key(1)
    assert cache_key(f"sha256:{1:064x}", "vae@1", "t5@1", dict(reversed(PARAMS.items()))) == base
    variants = {key(2), key(1, vae="vae@2"),
                cache_key(f"sha256:{1:064x}", "vae@1", "t5@2", PARAMS),
                cache_key(f"sha256:{1:064x}", "vae@1", "t5@1", {**PARAMS, "frames": 17})}
    assert base not in variants and len(variants) == 4
    with pytest.raises(TypeError):
        cache_key("sha256:0", "vae", "t5", {"device": object()})


def test_write_lookup_reopen(tmp_path: Path) -> None:
    cache = LatentCache(tmp_path / "cache")
    with cache.writer(shard_entries=3) as writer:
        for i in range(10):
            writer.add(key(i), tensors(i))
        writer.add(key(9), tensors(9))  # a key already buffered is not stored twice
    assert writer.flushes == 4 and writer.entries_written == 10
    names = shard_files(cache)
    assert len(names) == 4
    for name in names:  # content-named
        digest = hashlib.sha256((cache.shards_dir / name).read_bytes()).hexdigest()
        assert name == f"{digest}.safetensors"
    assert not list(cache.segments_dir.iterdir())  # merged into index.parquet on exit

    reopened = LatentCache(tmp_path / "cache")
    hits = reopened.lookup([key(i) for i in range(12)] + [key(3, vae="vae@2")])
    assert sorted(hits) == sorted(key(i) for i in range(10))
    entry = hits[key(7)]
    assert entry.tensors["latents"].shape == (4, 3, 16, 16)
    assert entry.tensors["prompt_mask"].dtype == "int64"
    assert_same(reopened.read(entry), tensors(7))
    assert len(reopened.index_frame()) == 30


def test_dtypes_round_trip(tmp_path: Path) -> None:
    cache = LatentCache(tmp_path)
    odd = {"bf16": torch.randn(3, 5).to(torch.bfloat16), "flag": torch.tensor([True, False]),
           "i8": torch.arange(-3, 4, dtype=torch.int8), "f64": torch.randn(2, dtype=torch.float64),
           "view": torch.randn(8, 6)[2]}  # a view into a larger tensor
    with cache.writer() as writer:
        writer.add("k", odd)
    assert_same(cache.read(cache.lookup(["k"])["k"]), odd)


def test_rerun_encodes_nothing_and_one_new_clip_one_shard(tmp_path: Path) -> None:
    cache = LatentCache(tmp_path)
    fill(cache, range(10))
    before = {n: (cache.shards_dir / n).stat().st_ino for n in shard_files(cache)}

    wanted = [key(i) for i in range(11)]
    hits = cache.lookup(wanted)
    misses = [i for i in range(11) if key(i) not in hits]
    assert misses == [10]
    with cache.writer(shard_entries=3) as writer:
        for i in misses:
            writer.add(key(i), tensors(i))
    after = shard_files(cache)
    assert set(before) < after and len(after - set(before)) == 1
    assert all((cache.shards_dir / n).stat().st_ino == ino for n, ino in before.items())
    assert len(cache.lookup(wanted)) == 11

    with cache.writer() as writer:  # nothing missing: nothing written
        pass
    assert writer.flushes == 0 and shard_files(cache) == after
    assert not cache.lookup([key(i, vae="vae@2") for i in range(11)])  # a new VAE: all miss


def test_writer_buffer_is_bounded(tmp_path: Path) -> None:
    peaks = []
    for count in (8, 16):
        with LatentCache(tmp_path / str(count)).writer(shard_entries=4) as writer:
            for i in range(count):
                writer.add(key(i), tensors(i))
                assert writer.buffered < 4
        peaks.append(writer.peak_buffered)
        assert writer.flushes == count // 4
    assert peaks == [4, 4]


def test_exception_inside_writer_keeps_flushed_shards(tmp_path: Path) -> None:
    cache = LatentCache(tmp_path)
    with pytest.raises(RuntimeError), cache.writer(shard_entries=2) as writer:
        for i in range(5):
            writer.add(key(i), tensors(i))
        raise RuntimeError("encoder failed")
    assert sorted(cache.lookup(key(i) for i in range(5))) == sorted(key(i) for i in range(4))
    assert len(shard_files(cache)) == 2
    assert not list(cache.shards_dir.glob(".tmp@*"))


@pytest.mark.parametrize("stage", ["shard", "segment"])
def test_killed_writer_leaves_a_consistent_cache(tmp_path: Path, stage: str) -> None:
    """SIGKILL as the second shard is renamed into place (or as its index segment is)."""
    cache = LatentCache(tmp_path)
    target = cache.shards_dir if stage == "shard" else cache.segments_dir

    def body() -> None:
        real = os.replace
        replaced: list[str] = []

        def replace(src: str | Path, dst: str | Path) -> None:
            if Path(dst).parent == target:
                replaced.append(str(dst))
                if len(replaced) == 2:
                    os.kill(os.getpid(), signal.SIGKILL)
            real(src, dst)

        latent_cache.os.replace = replace  # type: ignore[assignment]  # the child only
        fill(cache, range(5), shard_entries=2)

    assert in_child(body) == -signal.SIGKILL
    hits = cache.lookup(key(i) for i in range(5))
    assert sorted(hits) == sorted([key(0), key(1)])
    referenced = {entry.shard for entry in hits.values()}
    assert all(n in referenced or stage == "segment" for n in shard_files(cache))
    if stage == "shard":
        assert len(list(cache.shards_dir.glob(".tmp@*"))) == 1  # complete but never named
    else:
        assert len(shard_files(cache)) == 2  # the orphan: renamed, never indexed

    # A re-run cleans up after the dead writer and recomputes what was lost (in other shards
    # than before: the same entries in the same shard would give the orphan's very name).
    fill(cache, [i for i in range(5) if key(i) not in hits], shard_entries=3)
    assert not list(cache.shards_dir.glob(".tmp@*"))
    assert len(cache.lookup(key(i) for i in range(5))) == 5
    removed = cache.gc(grace_s=0)
    assert len([p for p in removed if p.suffix == ".safetensors"]) == (stage == "segment")
    assert len(cache.lookup(key(i) for i in range(5))) == 5


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    cache = LatentCache(tmp_path)

    def writer(ids: range) -> Callable[[], None]:
        def body() -> None:
            with cache.writer(shard_entries=1) as w:
                for i in ids:
                    w.add(key(i), tensors(i))
                    cache.merge_index()  # as many index read-modify-writes as can be
        return body

    pids = []
    for ids in (range(0, 12), range(8, 20)):  # overlapping keys too
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                writer(ids)()
                os._exit(0)
            except BaseException:
                os._exit(1)
        pids.append(pid)
    assert [os.waitpid(pid, 0)[1] for pid in pids] == [0, 0]
    hits = cache.lookup(key(i) for i in range(20))
    assert len(hits) == 20
    assert_same(cache.read(hits[key(9)]), tensors(9))


def test_missing_shard_is_a_miss(tmp_path: Path) -> None:
    cache = LatentCache(tmp_path)
    fill(cache, range(6))
    lost = cache.lookup([key(0)])[key(0)].path
    lost.unlink()
    assert sorted(cache.lookup(key(i) for i in range(6))) == sorted(key(i) for i in range(3, 6))
    cache.gc()
    assert len(cache.index_frame()) == 9  # the lost shard's rows are pruned


def make_export(tmp_path: Path, ids: list[int], name: str = "out") -> tuple[Path, pd.DataFrame]:
    cache = LatentCache(tmp_path / "cache")
    fill(cache, range(7))
    rows = pd.DataFrame({"clip_id": [f"clip-{i:02d}" for i in ids], "key": [key(i) for i in ids],
                         "caption": [f"caption {i}" for i in ids],
                         "source_sha256": [f"{i:064x}" for i in ids]})
    out = tmp_path / name
    export(cache, rows, out)
    write_empty_caption(out, {"prompt_embeds": torch.zeros(32, 384),
                              "prompt_mask": torch.zeros(32, dtype=torch.int64)})
    return out, rows


def test_export_links_exactly_the_needed_shards_deterministically(tmp_path: Path) -> None:
    ids = [5, 0, 1, 4]  # shards of 3: entries 0-2, 3-5; entry 6's shard is not needed
    out, _ = make_export(tmp_path, ids)
    cache = LatentCache(tmp_path / "cache")
    entries = cache.lookup(key(i) for i in ids)
    needed = {e.shard for e in entries.values()}
    assert {p.name for p in (out / "latents").iterdir()} == needed and len(needed) == 2
    for entry in entries.values():  # hard links: no bytes copied
        assert (out / "latents" / entry.shard).stat().st_ino == entry.path.stat().st_ino

    index = pd.read_parquet(out / "manifest.parquet")
    assert index["clip_id"].tolist() == sorted(f"clip-{i:02d}" for i in ids)
    assert list(index.columns[:4]) == ["clip_id", "key", "shard", "tensors"]
    assert {"latents_shape", "prompt_mask_dtype", "prompt_embeds_begin", "caption",
            "source_sha256"} <= set(index.columns)
    assert index["latents_shape"].iloc[0].tolist() == [4, 3, 16, 16]

    again, _ = make_export(tmp_path, list(reversed(ids)), name="again")
    assert (again / "manifest.parquet").read_bytes() == (out / "manifest.parquet").read_bytes()
    assert (again / "empty_caption.safetensors").read_bytes() == (
        out / "empty_caption.safetensors").read_bytes()

    with pytest.raises(KeyError, match="clip-99"):
        export(cache, pd.DataFrame({"clip_id": ["clip-99"], "key": [key(99)]}), tmp_path / "x")


def test_dataset_returns_the_encoded_tensors(tmp_path: Path) -> None:
    ids = [6, 2, 3, 0, 5]
    out, _ = make_export(tmp_path, ids)
    dataset = LatentDataset(out, return_meta=True)
    order = sorted(ids)
    assert len(dataset) == 5
    assert dataset.clip_ids == [f"clip-{i:02d}" for i in order]
    assert dataset.captions == [f"caption {i}" for i in order]
    for index in (3, 0, 4, -1, 1, 2):
        item = dataset[index]
        i = order[index]
        assert_same(item, tensors(i))
        assert item["clip_id"] == f"clip-{i:02d}" and item["caption"] == f"caption {i}"
    with pytest.raises(IndexError):
        dataset[5]
    assert set(LatentDataset(out)[0]) == {"latents", "prompt_embeds", "prompt_mask"}
    empty = dataset.empty_caption()
    assert empty["prompt_embeds"].shape == (32, 384) and not empty["prompt_mask"].any()

    shards = [list(dataset.shard(rank, 2).indices) for rank in range(2)]
    assert sorted(shards[0] + shards[1]) == list(range(5))
    for rank in range(2):
        sampler = DistributedSampler(dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        batches = list(DataLoader(dataset, batch_size=2, sampler=sampler))
        assert sum(len(b["clip_id"]) for b in batches) == 3


def test_dataset_through_worker_processes(tmp_path: Path) -> None:
    out, _ = make_export(tmp_path, list(range(7)))
    dataset = LatentDataset(out, return_meta=True)
    dataset[0]  # the parent holds open handles: forked workers must not reuse them
    loader = DataLoader(dataset, batch_size=3, num_workers=2, shuffle=False)
    batches = list(loader)
    latents = torch.cat([b["latents"] for b in batches])
    assert latents.shape == (7, 4, 3, 16, 16)
    assert torch.equal(latents, torch.stack([tensors(i)["latents"] for i in range(7)]))
    assert [c for b in batches for c in b["clip_id"]] == dataset.clip_ids


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_items_are_memory_mapped_not_loaded(tmp_path: Path) -> None:
    out, _ = make_export(tmp_path, list(range(7)))
    dataset = LatentDataset(out)
    item = dataset[4]
    inode = (out / dataset._shard_paths[dataset._shard_of[4]]).stat().st_ino
    mappings = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        start, end = (int(x, 16) for x in fields[0].split("-"))
        mappings.append((start, end, int(fields[4])))
    for tensor in item.values():  # each tensor's data lies in a mapping of its shard file
        ptr = tensor.data_ptr()
        assert any(s <= ptr < e and ino == inode for s, e, ino in mappings)


def test_dataset_refuses_a_broken_export(tmp_path: Path) -> None:
    out, _ = make_export(tmp_path, list(range(4)))
    index = pd.read_parquet(out / "manifest.parquet")
    bad = index.copy()
    bad.at[1, "latents_shape"] = [4, 3, 16, 8]
    bad.to_parquet(out / "manifest.parquet")
    with pytest.raises(LatentDatasetError, match="clip-01"):
        LatentDataset(out)
    index.to_parquet(out / "manifest.parquet")
    LatentDataset(out)
    shard = out / index["shard"].iloc[0]
    shard.unlink()
    with pytest.raises(LatentDatasetError, match=shard.name):
        LatentDataset(out)
