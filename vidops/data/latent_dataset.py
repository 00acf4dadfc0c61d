"""The torch Dataset every training stage reads: an encode export (see `latent_cache.export`).

Shards are opened lazily with `safetensors.safe_open` (memory-mapped: a sample costs the pages
it touches, nothing is loaded up front), per process: the handle cache is dropped when the
dataset is pickled or used from a forked DataLoader worker, so workers never share handles.

Distributed training: wrap it in `torch.utils.data.DistributedSampler` (equal, padded shares
per rank, reshuffled per epoch with `set_epoch`). `shard(rank, world_size)` gives disjoint
strided subsets that together cover the dataset exactly once (evaluation, precomputation).
"""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import Dataset, Subset

from vidops.data.latent_cache import DTYPE_CODES, EMPTY_CAPTION, EXPORT_INDEX, read_header
from vidops.data.manifest import read_table


class LatentDatasetError(ValueError):
    """An export that does not match its index: a missing shard or a mismatched tensor."""


class LatentDataset(Dataset[dict[str, Any]]):
    """Items: {"latents", "prompt_embeds", "prompt_mask", ...} (every tensor the export holds),
    plus "clip_id" and "caption" when `return_meta`. Random access by index."""

    def __init__(self, data_dir: Path, *, return_meta: bool = False, validate: bool = True,
                 max_open_shards: int = 128) -> None:
        self.data_dir = Path(data_dir)
        self.return_meta = return_meta
        self.max_open_shards = max_open_shards
        index_path = self.data_dir / EXPORT_INDEX
        if not index_path.is_file():
            raise FileNotFoundError(f"{index_path} not found: not an encoded dataset")
        frame = read_table(index_path)
        self.clip_ids: list[str] = frame["clip_id"].astype(str).tolist()
        self.captions: list[str] = (frame["caption"].fillna("").astype(str).tolist()
                                    if "caption" in frame else [""] * len(frame))
        self.tensor_names: list[str] = (str(frame["tensors"].iloc[0]).split(",")
                                        if len(frame) else [])
        self._keys: list[str] = frame["key"].astype(str).tolist()
        # Shard paths as small ints: per-row strings would cost memory on large datasets.
        shard_names = sorted(set(frame["shard"].astype(str)))
        self._shard_paths = [self.data_dir / name for name in shard_names]
        code = {name: i for i, name in enumerate(shard_names)}
        self._shard_of: list[int] = [code[s] for s in frame["shard"].astype(str)]
        if validate:
            self._validate(frame)
        self._handles: OrderedDict[int, Any] = OrderedDict()
        self._pid = os.getpid()

    def _validate(self, frame: pd.DataFrame) -> None:
        columns = {name: [frame[f"{name}_{c}"].tolist() for c in ("dtype", "shape", "begin", "end")]
                   for name in self.tensor_names}
        rows_by_shard: dict[int, list[int]] = {}
        for row, shard in enumerate(self._shard_of):
            rows_by_shard.setdefault(shard, []).append(row)
        for shard, rows in rows_by_shard.items():
            path = self._shard_paths[shard]
            if not path.is_file():
                raise LatentDatasetError(
                    f"latent shard {path} is missing (listed in {self.data_dir / EXPORT_INDEX})")
            start, header = read_header(path)
            for row in rows:
                for name in self.tensor_names:
                    tensor = f"{self._keys[row]}/{name}"
                    found = header.get(tensor)
                    if found is None:
                        raise LatentDatasetError(f"{path} has no tensor {tensor} "
                                                 f"(clip {self.clip_ids[row]})")
                    dtype, shape, begin, end = (column[row] for column in columns[name])
                    want = (DTYPE_CODES.get(dtype), [int(x) for x in shape],
                            [int(begin) - start, int(end) - start])
                    have = (found["dtype"], found["shape"], found["data_offsets"])
                    if want != have:
                        raise LatentDatasetError(
                            f"{path}: tensor {tensor} (clip {self.clip_ids[row]}) is "
                            f"dtype/shape/offsets {have}, the index says {want}")

    def __len__(self) -> int:
        return len(self.clip_ids)

    def _handle(self, shard: int) -> Any:
        if os.getpid() != self._pid:  # a forked worker: its parent's handles are not its own
            self._handles = OrderedDict()
            self._pid = os.getpid()
        handle = self._handles.get(shard)
        if handle is None:
            handle = safe_open(str(self._shard_paths[shard]), framework="pt")
            self._handles[shard] = handle
            # Returned tensors keep their mapping alive, so closing a handle is always safe.
            while len(self._handles) > self.max_open_shards:
                self._handles.popitem(last=False)
        else:
            self._handles.move_to_end(shard)
        return handle

    def __getitem__(self, index: int) -> dict[str, Any]:
        row = range(len(self))[index]  # negative indices, and IndexError past the end
        handle = self._handle(self._shard_of[row])
        key = self._keys[row]
        item: dict[str, Any] = {name: handle.get_tensor(f"{key}/{name}")
                                for name in self.tensor_names}
        if self.return_meta:
            item["clip_id"] = self.clip_ids[row]
            item["caption"] = self.captions[row]
        return item

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"] = OrderedDict()  # safe_open handles do not pickle (spawn workers)
        return state

    def empty_caption(self) -> dict[str, torch.Tensor]:
        """The empty caption's embedding, for classifier-free guidance."""
        path = self.data_dir / EMPTY_CAPTION
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: the export has no empty caption")
        return load_file(str(path))

    def shard(self, rank: int, world_size: int) -> Subset[dict[str, Any]]:
        """Rows rank, rank + world_size, ...: disjoint across ranks, all rows covered once."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        return Subset(self, range(rank, len(self), world_size))


def held_out_ids(clip_ids: list[str], fraction: float) -> list[str]:
    """The clips kept out of training for evaluation: those whose id hashes below `fraction`.
    A clip's fate depends on its own id only, so it stays held out as the dataset grows."""
    if fraction <= 0:
        return []
    return sorted(c for c in clip_ids
                  if int(hashlib.sha256(c.encode()).hexdigest()[:12], 16) < fraction * 16 ** 12)


def training_subset(dataset: LatentDataset, held_out: list[str]) -> Dataset[dict[str, Any]]:
    """`dataset` without the held-out clips."""
    if not held_out:
        return dataset
    skip = set(held_out)
    return Subset(dataset, [i for i, c in enumerate(dataset.clip_ids) if c not in skip])
