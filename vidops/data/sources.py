"""Finding the inputs of an ingest: folders, manifests (CSV/JSONL) and CogVideo folders.

Every candidate becomes a `SourceItem`; an item whose path escapes the root it was listed
under (`../`, an absolute path elsewhere, a symlink out) carries `escape` and is rejected by
ingest without being read. Remote URLs (any installed fsspec protocol) cannot escape a local
root and are read through fsspec.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import fsspec

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")
COGVIDEO_FILES = ("prompts.txt", "videos.txt")


class SourceError(ValueError):
    """A source given on the command line cannot be used at all (bad usage, exit 2)."""


@dataclass(frozen=True)
class SourceItem:
    uri: str  # what ingest reads: a local absolute path or an fsspec URL
    name: str  # the path as listed, relative to its source root when it has one
    source: str  # the source (folder, manifest, CogVideo folder) it came from
    caption: str | None = None
    caption_origin: str = "none"  # sidecar | manifest | prompts.txt | none
    license: str | None = None
    escape: str | None = None  # why the path is refused; set => never read
    # Which of several byte-identical inputs is kept: the lowest rank. Listed sources rank by
    # line; in folders the original is taken to be the shallowest, shortest name, since
    # copies are usually named after it ("clip copy.mp4", "clip (1).mp4", "dup/clip.mp4").
    rank: tuple = ()


@dataclass
class Discovery:
    items: list[SourceItem] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # non-video files in folders, by path
    sources: list[dict] = field(default_factory=list)  # one entry per source: uri, kind, items


def _is_remote(uri: str) -> bool:
    scheme = urlsplit(uri).scheme
    return len(scheme) > 1 and scheme != "file"  # "C:" style drive letters are not schemes


def _local_path(uri: str) -> Path:
    if uri.startswith("file://"):
        return Path(unquote(urlsplit(uri).path))
    return Path(uri).expanduser()


def _within(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _resolve_listed(entry: str, base: Path, root: Path) -> tuple[str, str, str | None]:
    """A path listed in a manifest or videos.txt -> (uri to read, name, escape reason or None).

    The name is the path relative to the root, however it was spelled (file:// URI,
    absolute path inside the root, ./relative)."""
    if _is_remote(entry):
        return entry, entry, None
    listed = _local_path(entry)
    candidate = listed if listed.is_absolute() else base / listed
    real = Path(os.path.realpath(candidate))
    if not _within(real, root):
        kind = "symlink" if _within(Path(os.path.abspath(candidate)), root) else "path"
        return str(candidate), entry, f"{kind} {entry!r} resolves outside the source root {root}"
    return str(real), real.relative_to(root).as_posix(), None


def _sidecar_caption(video: Path) -> str | None:
    sidecar = video.with_suffix(".txt")
    if sidecar.is_file():
        text = sidecar.read_text(encoding="utf-8", errors="replace").strip()
        return text or None
    return None


def _folder(root: Path, extensions: set[str], default_license: str | None, out: Discovery) -> int:
    real_root = Path(os.path.realpath(root))
    videos: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        # A symlinked directory is not walked into (it could lead anywhere); say so.
        out.ignored.extend(str(Path(dirpath) / d) + "/" for d in dirnames
                           if os.path.islink(Path(dirpath) / d))
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            if path.suffix.lower() in extensions:
                videos.append(path)
            elif not (path.suffix.lower() == ".txt" and any(
                path.with_suffix(ext).exists() or path.with_suffix(ext.upper()).exists()
                for ext in extensions
            )):
                out.ignored.append(str(path))
    for path in sorted(videos, key=lambda p: p.relative_to(root).as_posix()):
        name = path.relative_to(root).as_posix()
        real = Path(os.path.realpath(path))
        if not _within(real, real_root):
            out.items.append(SourceItem(str(path), name, str(root), license=default_license,
                                        escape=f"symlink {name!r} resolves outside {real_root}"))
            continue
        caption = _sidecar_caption(path)
        out.items.append(SourceItem(str(real), name, str(root), caption,
                                    "sidecar" if caption else "none", default_license,
                                    rank=(len(out.sources), name.count("/"), len(name), name)))
    return len(videos)


def _read_manifest_rows(uri: str) -> list[dict]:
    suffix = Path(urlsplit(uri).path).suffix.lower()
    with fsspec.open(uri, "r", encoding="utf-8") as handle:
        if suffix == ".csv":
            rows = list(csv.DictReader(handle))
        else:
            rows = []
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise SourceError(f"{uri} line {lineno}: not JSON ({exc.msg})") from exc
                if not isinstance(row, dict):
                    raise SourceError(f"{uri} line {lineno}: expected an object")
                rows.append(row)
    for i, row in enumerate(rows, 1):
        if not str(row.get("uri") or "").strip():
            raise SourceError(f"{uri} row {i}: no 'uri' (a manifest needs a uri column)")
    return rows


def _manifest(uri: str, default_license: str | None, out: Discovery) -> int:
    rows = _read_manifest_rows(uri)
    remote_manifest = _is_remote(uri)
    root = None if remote_manifest else Path(os.path.realpath(_local_path(uri))).parent
    for lineno, row in enumerate(rows):
        entry = str(row["uri"]).strip()
        caption = str(row.get("caption") or "").strip() or None
        license_ = str(row.get("license") or "").strip() or default_license
        if remote_manifest:
            base = uri.rsplit("/", 1)[0]
            target = entry if _is_remote(entry) else f"{base}/{entry.lstrip('/')}"
            name = entry
            escape = "'..' in a remote manifest entry" if ".." in Path(entry).parts else None
        else:
            target, name, escape = _resolve_listed(entry, root, root)
        origin = "manifest"
        if caption is None and escape is None and not _is_remote(target):
            caption = _sidecar_caption(Path(target))
            origin = "sidecar"
        out.items.append(SourceItem(target, name, uri, caption, origin if caption else "none",
                                    license_, escape, rank=(len(out.sources), lineno)))
    return len(rows)


def _cogvideo(root: Path, default_license: str | None, out: Discovery) -> int:
    prompts = (root / "prompts.txt").read_text(encoding="utf-8").splitlines()
    videos = (root / "videos.txt").read_text(encoding="utf-8").splitlines()
    # Trailing blank lines are common; blank lines inside would shift the alignment.
    while prompts and not prompts[-1].strip():
        prompts.pop()
    while videos and not videos[-1].strip():
        videos.pop()
    if len(prompts) != len(videos):
        raise SourceError(f"{root}: prompts.txt has {len(prompts)} lines but videos.txt has "
                          f"{len(videos)}; they must be line-aligned")
    real_root = Path(os.path.realpath(root))
    for lineno, (prompt, entry) in enumerate(zip(prompts, videos, strict=True), 1):
        entry = entry.strip()
        if not entry:
            raise SourceError(f"{root}/videos.txt line {lineno} is empty")
        target, name, escape = _resolve_listed(entry, real_root, real_root)
        caption = prompt.strip() or None
        out.items.append(SourceItem(target, name, str(root), caption,
                                    "prompts.txt" if caption else "none", default_license,
                                    escape, rank=(len(out.sources), lineno)))
    return len(videos)


def discover(
    sources: list[str], extensions: list[str], default_license: str | None = None
) -> Discovery:
    """Expand source URIs into items, in a stable order (sources as given, then by path)."""
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    out = Discovery()
    for source in sources:
        if _is_remote(source):
            suffix = Path(urlsplit(source).path).suffix.lower()
            if suffix in MANIFEST_SUFFIXES:
                count, kind = _manifest(source, default_license, out), "manifest"
            else:
                fs, path = fsspec.core.url_to_fs(source)
                if not fs.exists(path):
                    raise SourceError(f"source not found: {source}")
                kind = "folder" if fs.isdir(path) else "file"
                files = sorted(fs.find(path)) if kind == "folder" else [path]
                count = 0
                for found in files:
                    if Path(found).suffix.lower() in exts or kind == "file":
                        count += 1
                        out.items.append(SourceItem(fs.unstrip_protocol(found), found, source,
                                                    license=default_license,
                                                    rank=(len(out.sources), found)))
                    else:
                        out.ignored.append(fs.unstrip_protocol(found))
            out.sources.append({"uri": source, "kind": kind, "items": count})
            continue

        path = _local_path(source)
        if not path.exists():
            raise SourceError(f"source not found: {source}")
        if path.is_dir() and all((path / f).is_file() for f in COGVIDEO_FILES):
            kind, count = "cogvideo", _cogvideo(path, default_license, out)
        elif path.is_dir():
            kind, count = "folder", _folder(path, exts, default_license, out)
        elif path.suffix.lower() in MANIFEST_SUFFIXES:
            kind, count = "manifest", _manifest(str(path.resolve()), default_license, out)
        else:
            kind, count = "file", 1
            caption = _sidecar_caption(path)
            out.items.append(SourceItem(str(path.resolve()), path.name, str(path), caption,
                                        "sidecar" if caption else "none", default_license,
                                        rank=(len(out.sources),)))
        out.sources.append({"uri": str(path), "kind": kind, "items": count})
    return out
