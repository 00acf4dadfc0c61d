"""Content-addressed cache of encoded clips (VAE latents, caption embeddings) and its export.

Layout of a cache (persistent, in the workdir, shared by every encode run):

    <root>/shards/<sha256>.safetensors   immutable, named by the sha256 of their bytes; tensors
                                         `<key>/<name>`, at most `shard_entries` keys each
    <root>/index.parquet                 one row per tensor: key, shard, name, shape, dtype,
                                         begin, end (absolute byte offsets within the shard)
    <root>/index.d/<sha256>.parquet      the rows of one shard not yet merged into index.parquet
    <root>/.lock                         flock: shared to read the index, exclusive to merge it

A writer makes every flushed shard durable on its own: shard written to a temporary file,
fsynced, renamed to its content name, then its index segment written the same way. A process
killed at any point leaves either a complete shard with its segment (a hit on the next run),
a shard without a segment (garbage `gc` removes, recomputed), or a temporary file (never
referenced). On exit the writer merges the segments into index.parquet under the exclusive
lock, so concurrent writers never lose each other's rows. Rows whose shard is gone are misses.

An export (`export`) is what training reads (`vidops.data.latent_dataset.LatentDataset`):

    <out>/latents/<sha256>.safetensors   hard links to exactly the shards the rows need
    <out>/manifest.parquet               one row per clip, sorted by clip_id (columns below):
                                         the encode stage's manifest is this index
    <out>/empty_caption.safetensors      the empty caption's embedding (`write_empty_caption`)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import struct
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from safetensors import safe_open

from vidops.data.manifest import write_table
from vidops.media.files import link_or_copy, pid_alive

CACHE_FORMAT = "vidops-latent-cache/1"
INDEX = "index.parquet"
EXPORT_INDEX = "manifest.parquet"  # an export is a stage output: its index is the manifest
LATENTS_DIR = "latents"
EMPTY_CAPTION = "empty_caption.safetensors"
# The encode stage's layout, here so that merge-encoded needs no model code to read it.
ENCODE_STAGE = "encode"  # also the cache's folder: <workdir>/cache/encode
ENCODING_JSON = "encoding.json"  # the VAE, text encoder and params a dataset was encoded with
VAE_DIR = "vae"  # a bootstrapped VAE, inside the dataset that needs it
SHARD_SUFFIX = ".safetensors"
MAX_HEADER = 100 << 20  # refuse absurd headers (a corrupt length) instead of reading them

_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
# safetensors' code of a dtype by its torch name ("float32" -> "F32"), for index validation.
DTYPE_CODES: dict[str, str] = {str(dt).removeprefix("torch."): code for dt, code in _DTYPES.items()}

INDEX_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("name", pa.string()),
    ("shape", pa.list_(pa.int64())), ("dtype", pa.string()),
    ("begin", pa.int64()), ("end", pa.int64()),
])


def cache_key(content_digest: str, vae_id: str, text_id: str, params: Mapping[str, Any]) -> str:
    """The identity of one encoded clip: 64 hex chars.

    `content_digest` must cover everything the tensors depend on besides the models and
    params: the clip's bytes *and* its caption (a re-captioned clip must miss). `params` are
    the encode params that change the output (resolution, frames, dtype, max text length...).
    """
    canonical = {"format": CACHE_FORMAT, "content": content_digest, "vae": vae_id,
                 "text": text_id, "params": dict(params)}
    # Like vidops.stage.digest_of, but without its default=str: a param that is not JSON
    # (whose str() may hold a memory address) must fail loudly, not miss forever. And not
    # importing vidops.stage keeps mlflow out of every DataLoader worker.
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class TensorInfo(NamedTuple):
    dtype: str  # torch name: "float32", "int64", ...
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets of the tensor's data within the shard file
    end: int


@dataclass(frozen=True, slots=True)
class CacheEntry:
    key: str
    shard: str  # file name under <root>/shards
    path: Path
    tensors: dict[str, TensorInfo]


# --- safetensors files -----------------------------------------------------------------------

def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_name(directory: Path) -> Path:
    # Host and pid in the name: only this host may judge (by pid) whether its writer is dead.
    return directory / f".tmp@{socket.gethostname()}@{os.getpid()}@{uuid.uuid4().hex}"


def _prepare(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype not in _DTYPES:
        raise TypeError(f"dtype {tensor.dtype} cannot be stored in a safetensors shard")
    tensor = tensor.detach().to("cpu").contiguous()
    # A view into a larger batch would keep the whole batch alive in the writer's buffer.
    if tensor.untyped_storage().nbytes() != tensor.nbytes:
        tensor = tensor.clone()
    return tensor


def _write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor],
                       metadata: Mapping[str, str]) -> tuple[str, dict[str, TensorInfo]]:
    """Write a safetensors file streaming (no second copy of the data in memory), fsync it.
    Returns the sha256 of its bytes and where each tensor lies. Same tensors, same bytes."""
    # Widest items first, like safetensors itself, so every tensor stays aligned to its size.
    names = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for name in names:
        t = tensors[name]
        header[name] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    start = 8 + len(raw)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for chunk in (struct.pack("<Q", len(raw)), raw):
            f.write(chunk)
            digest.update(chunk)
        for name in names:
            data = memoryview(tensors[name].reshape(-1).view(torch.uint8).numpy())
            f.write(data)
            digest.update(data)
        f.flush()
        os.fsync(f.fileno())
    info = {name: TensorInfo(str(tensors[name].dtype).removeprefix("torch."),
                             tuple(tensors[name].shape), start + header[name]["data_offsets"][0],
                             start + header[name]["data_offsets"][1]) for name in names}
    return digest.hexdigest(), info


def read_header(path: Path) -> tuple[int, dict[str, Any]]:
    """(offset of the data section, header) of a safetensors file, reading only the header."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) != 8:
            raise ValueError(f"{path} is not a safetensors file (truncated)")
        (size,) = struct.unpack("<Q", prefix)
        if size > MAX_HEADER:
            raise ValueError(f"{path} is not a safetensors file (header of {size} bytes)")
        return 8 + size, json.loads(f.read(size))


def write_empty_caption(out_dir: Path, tensors: Mapping[str, torch.Tensor]) -> Path:
    """Store the empty caption's embedding (classifier-free guidance) next to an export."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / EMPTY_CAPTION
    tmp = _tmp_name(out_dir)
    try:
        _write_safetensors(tmp, {n: _prepare(t) for n, t in tensors.items()},
                           {"format": CACHE_FORMAT, "caption": ""})
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --- the cache -------------------------------------------------------------------------------

def _write_index(table: pa.Table, path: Path) -> None:
    tmp = _tmp_name(path.parent)
    try:
        pq.write_table(table, tmp, compression="zstd")
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class LatentCache:
    """A persistent content-addressed store of tensors per key (see the module docstring)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.shards_dir = self.root / "shards"
        self.segments_dir = self.root / "index.d"
        self.index_path = self.root / INDEX
        for directory in (self.shards_dir, self.segments_dir):
            directory.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[None]:
        with open(self.root / ".lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def _read_rows(self, keys: list[str] | None = None) -> tuple[pa.Table, list[Path]]:
        """Index rows (merged index + pending segments), filtered to `keys`; call under lock."""
        filters = None if keys is None else [("key", "in", keys)]
        segments = sorted(self.segments_dir.glob("*.parquet"))
        parts = []
        for path in ([self.index_path] if self.index_path.exists() else []) + segments:
            parts.append(pq.read_table(path, schema=INDEX_SCHEMA, filters=filters))
        if not parts:
            return INDEX_SCHEMA.empty_table(), segments
        return pa.concat_tables(parts), segments

    def index_frame(self) -> pd.DataFrame:
        """Every indexed tensor, one row each (pending segments included)."""
        with self._locked(exclusive=False):
            return self._read_rows()[0].to_pandas()

    def lookup(self, keys: Iterable[str]) -> dict[str, CacheEntry]:
        """The entries of `keys` that the cache holds (a key whose shard is gone is a miss)."""
        wanted = sorted(set(keys))
        if not wanted:
            return {}
        with self._locked(exclusive=False):
            table = self._read_rows(wanted)[0]
        columns = [table.column(c).to_pylist() for c in INDEX_SCHEMA.names]
        groups: dict[tuple[str, str], dict[str, TensorInfo]] = {}
        for key, shard, name, shape, dtype, begin, end in zip(*columns, strict=True):
            groups.setdefault((key, shard), {})[name] = TensorInfo(dtype, tuple(shape), begin, end)
        paths: dict[str, Path | None] = {}
        found: dict[str, CacheEntry] = {}
        # The same key may sit in two shards (two writers raced): take the first that exists.
        for (key, shard), tensors in sorted(groups.items()):
            if key in found:
                continue
            if shard not in paths:
                path = self.shards_dir / shard
                paths[shard] = path if path.is_file() else None
            if (path := paths[shard]) is not None:
                found[key] = CacheEntry(key, shard, path, tensors)
        return found

    def read(self, entry: CacheEntry) -> dict[str, torch.Tensor]:
        """The tensors of one entry (memory-mapped)."""
        with safe_open(str(entry.path), framework="pt") as f:
            return {name: f.get_tensor(f"{entry.key}/{name}") for name in entry.tensors}

    def writer(self, shard_entries: int = 64, max_shard_bytes: int = 1 << 30) -> CacheWriter:
        """A context manager adding entries; memory holds at most one shard's worth of them."""
        return CacheWriter(self, shard_entries, max_shard_bytes)

    def _remove_stale_tmp(self) -> list[Path]:
        host = socket.gethostname()
        removed = []
        for directory in (self.root, self.shards_dir, self.segments_dir):
            for tmp in directory.glob(".tmp@*"):
                _, tmp_host, pid, _ = [*tmp.name.split("@"), "", "", ""][:4]
                if tmp_host == host and pid.isdigit() and not pid_alive(int(pid)):
                    tmp.unlink(missing_ok=True)
                    removed.append(tmp)
        return removed

    def merge_index(self, prune_missing: bool = False) -> None:
        """Fold pending segments into index.parquet (atomically, under the exclusive lock)."""
        with self._locked(exclusive=True):
            table, segments = self._read_rows()
            if not segments and not prune_missing:
                return
            frame = table.to_pandas().drop_duplicates(["key", "shard", "name"])
            if prune_missing:
                present = {p.name for p in self.shards_dir.glob(f"*{SHARD_SUFFIX}")}
                frame = frame[frame["shard"].isin(present)]
            frame = frame.sort_values(["key", "shard", "name"])
            _write_index(pa.Table.from_pandas(frame, schema=INDEX_SCHEMA, preserve_index=False),
                         self.index_path)
            # Only the segments read above: one a writer adds meanwhile waits for the next merge.
            for segment in segments:
                segment.unlink(missing_ok=True)

    def gc(self, grace_s: float = 3600.0) -> list[Path]:
        """Remove temporary files of dead writers, shards no index row refers to (older than
        `grace_s`: a live writer renames its shard just before writing its segment), and index
        rows of missing shards. Returns the files removed."""
        removed = self._remove_stale_tmp()
        with self._locked(exclusive=True):
            referenced = set(self._read_rows()[0].column("shard").to_pylist())
            now = time.time()
            for shard in self.shards_dir.glob(f"*{SHARD_SUFFIX}"):
                if shard.name not in referenced and now - shard.stat().st_mtime > grace_s:
                    shard.unlink(missing_ok=True)
                    removed.append(shard)
        self.merge_index(prune_missing=True)
        return removed


class CacheWriter:
    """Buffers entries and flushes a shard every `shard_entries` entries (or `max_shard_bytes`).

    `buffered`, `peak_buffered`, `flushes` and `entries_written` show that memory is bounded
    by one shard, whatever the dataset's size. Leaving the `with` block normally flushes the
    rest; leaving it by an exception drops the unflushed entries (a re-run encodes them).
    """

    def __init__(self, cache: LatentCache, shard_entries: int, max_shard_bytes: int) -> None:
        if shard_entries < 1:
            raise ValueError("shard_entries must be at least 1")
        self.cache = cache
        self.shard_entries = shard_entries
        self.max_shard_bytes = max_shard_bytes
        self._buffer: dict[str, dict[str, torch.Tensor]] = {}
        self._bytes = 0
        self.peak_buffered = 0
        self.flushes = 0
        self.entries_written = 0

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def __enter__(self) -> CacheWriter:
        self.cache._remove_stale_tmp()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.flush()
        else:
            self._buffer.clear()
        self.cache.merge_index()

    def add(self, key: str, tensors: Mapping[str, torch.Tensor]) -> None:
        if not key or "/" in key:
            raise ValueError(f"invalid cache key {key!r}")
        if not tensors or any(not name or "/" in name for name in tensors):
            raise ValueError(f"entry {key}: tensor names must be non-empty, without '/'")
        if key in self._buffer:
            return
        self._buffer[key] = {name: _prepare(t) for name, t in tensors.items()}
        self._bytes += sum(t.nbytes for t in self._buffer[key].values())
        self.peak_buffered = max(self.peak_buffered, len(self._buffer))
        if len(self._buffer) >= self.shard_entries or self._bytes >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        cache = self.cache
        flat = {f"{key}/{name}": t for key, ts in self._buffer.items() for name, t in ts.items()}
        tmp = _tmp_name(cache.shards_dir)
        try:
            digest, info = _write_safetensors(
                tmp, flat, {"format": CACHE_FORMAT, "entries": str(len(self._buffer))})
            shard = digest + SHARD_SUFFIX
            os.replace(tmp, cache.shards_dir / shard)
        finally:
            tmp.unlink(missing_ok=True)
        _fsync(cache.shards_dir)  # the rename is durable before any index row names the shard
        rows = []
        for full, t in info.items():
            key, name = full.split("/", 1)
            rows.append({"key": key, "shard": shard, "name": name, "shape": list(t.shape),
                         "dtype": t.dtype, "begin": t.begin, "end": t.end})
        _write_index(pa.Table.from_pylist(rows, schema=INDEX_SCHEMA),
                     cache.segments_dir / f"{digest}.parquet")
        self.flushes += 1
        self.entries_written += len(self._buffer)
        self._buffer.clear()
        self._bytes = 0


# --- export ----------------------------------------------------------------------------------

def export(cache: LatentCache, rows: pd.DataFrame, out_dir: Path) -> pd.DataFrame:
    """Write the encoded dataset of `rows` (columns clip_id, key, any extras) into `out_dir`.

    manifest.parquet holds, per clip sorted by clip_id: clip_id, key, shard (relative path),
    tensors (names, "," joined), per tensor `<name>_shape`, `<name>_dtype`, `<name>_begin`,
    `<name>_end` (byte offsets within the shard), then the extra columns. Same rows and cache
    content, same bytes. Returns that table.
    """
    missing_cols = {"clip_id", "key"} - set(rows.columns)
    if missing_cols:
        raise ValueError(f"rows lack columns {sorted(missing_cols)}")
    if rows["clip_id"].duplicated().any():
        raise ValueError("rows have duplicate clip_ids")
    rows = rows.sort_values("clip_id", kind="stable").reset_index(drop=True)
    entries = cache.lookup(rows["key"])
    absent = rows.loc[~rows["key"].isin(list(entries)), "clip_id"].tolist()
    if absent:
        raise KeyError(f"{len(absent)} clips are not in the cache {cache.root}, e.g. {absent[:3]}")
    names = sorted({name for entry in entries.values() for name in entry.tensors})
    odd = [k for k, e in entries.items() if sorted(e.tensors) != names]
    if odd:
        raise ValueError(f"entries differ in their tensors (expected {names}), e.g. {odd[:3]}")

    latents = out_dir / LATENTS_DIR
    latents.mkdir(parents=True, exist_ok=True)
    needed = {entry.shard: entry.path for entry in entries.values()}
    for stale in latents.glob(f"*{SHARD_SUFFIX}"):
        if stale.name not in needed:
            stale.unlink()
    for shard, src in sorted(needed.items()):
        if not (latents / shard).exists():  # content-named: an existing file is the same bytes
            link_or_copy(src, latents / shard)

    table: dict[str, Any] = {
        "clip_id": rows["clip_id"].astype(str),
        "key": rows["key"].astype(str),
        "shard": [f"{LATENTS_DIR}/{entries[k].shard}" for k in rows["key"]],
        "tensors": [",".join(names)] * len(rows),
    }
    for name in names:
        infos = [entries[k].tensors[name] for k in rows["key"]]
        table[f"{name}_shape"] = [list(i.shape) for i in infos]
        table[f"{name}_dtype"] = [i.dtype for i in infos]
        table[f"{name}_begin"] = pd.array([i.begin for i in infos], dtype="int64")
        table[f"{name}_end"] = pd.array([i.end for i in infos], dtype="int64")
    frame = pd.DataFrame(table)
    extras = [c for c in rows.columns if c not in frame.columns]
    frame = pd.concat([frame, rows[extras]], axis=1)
    write_table(frame, out_dir / EXPORT_INDEX)
    return frame
