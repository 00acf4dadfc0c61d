"""Finding the inputs of an ingest: folders, manifests (CSV/JSONL) and CogVideo folders.

Every candidate becomes a `SourceItem`; an item whose path escapes the root it was listed
under (`../`, an absolute path elsewhere, a symlink out) carries `escape` and is rejected by
ingest without being read. Remote URLs (any installed fsspec protocol) cannot escape a local
root and are read through fsspec, but only those whose scheme is in `ingest.allowed_schemes`
(plain paths count as `file`): a source argument with another scheme is a `SourceError`, a
manifest entry with one is an item refused as `unsupported_scheme` (never read).

Hostile text is bounded and made safe here: a manifest that is not UTF-8, not CSV/JSON, or
has a line over `MAX_MANIFEST_LINE` characters is a `SourceError` naming the line; a caption
longer than `max_caption_chars` keeps its first `max_caption_chars` characters and the item
says so (`caption_truncated`, `caption_note`); a sidecar is never read beyond that, and one
that is not UTF-8 is decoded with U+FFFD replacement characters, noted the same way.
Symlinked directories are never walked into, so a symlink loop cannot make the walk endless.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlsplit

import fsspec

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".ndjson")
COGVIDEO_FILES = ("prompts.txt", "videos.txt")
# A manifest line (JSONL) or field (CSV) longer than this is refused: reading it would cost
# memory in proportion to whatever the file holds.
MAX_MANIFEST_LINE = 1 << 20
DEFAULT_MAX_CAPTION_CHARS = 10000
# "scheme://..." (RFC 3986 scheme); fsspec chains ("simplecache::s3://...") have one per link.
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")
_CHAIN_LINK = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)(?:://.*)?", re.DOTALL)


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
    refusal: str = "path_escape"  # the reason code of a refused item (escape set)
    caption_truncated: bool = False
    caption_note: str | None = None  # how the caption was altered (truncated, not UTF-8)
    # Which of several byte-identical inputs is kept: the lowest rank. Listed sources rank by
    # line; in folders the original is taken to be the shallowest, shortest name, since
    # copies are usually named after it ("clip copy.mp4", "clip (1).mp4", "dup/clip.mp4").
    rank: tuple = ()


@dataclass
class Discovery:
    items: list[SourceItem] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)  # non-video files in folders, by path
    sources: list[dict] = field(default_factory=list)  # one entry per source: uri, kind, items


def schemes(uri: str) -> list[str]:
    """The URI schemes a source or entry would be read through, lowercase: ["file"] for a
    plain path (also one with a colon in its name, or a "C:" drive letter), one per link for
    an fsspec chain ("simplecache::s3://b/k" -> ["simplecache", "s3"])."""
    if "::" in uri:
        links = uri.split("::")
        matches = [_CHAIN_LINK.fullmatch(link) for link in links]
        if all(matches) and any("://" in link for link in links):
            return [m.group(1).lower() for m in matches if m]
    match = _URL.match(uri)
    return [match.group(1).lower()] if match else ["file"]


def refused_scheme(uri: str, allowed: list[str] | tuple[str, ...]) -> str | None:
    """The first scheme of `uri` not in `allowed`, or None when it may be read."""
    return next((s for s in schemes(uri) if s not in allowed), None)


def _is_remote(uri: str) -> bool:
    return schemes(uri) != ["file"]


def safe_text(text: str) -> str:
    """`text` as valid UTF-8, what parquet, JSON and MLflow need: the undecodable bytes of a
    Linux file name (surrogate escapes) become "\\xNN", any other lone surrogate "\\udNNN"."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def _limit_caption(text: str | None, max_chars: int, more: bool = False
                   ) -> tuple[str | None, bool, list[str]]:
    """(caption cut to max_chars or None, whether it was cut, notes). `more`: the text was
    already cut while reading."""
    if text is None:
        return None, False, []
    text = safe_text(text).strip()
    if not text:
        return None, False, []
    if len(text) <= max_chars and not more:
        return text, False, []
    size = "more than" if more else f"{len(text)} >"
    cut = text[:max_chars].rstrip()
    return cut, True, [f"truncated to the first {max_chars} characters ({size} "
                       f"ingest.limits.max_caption_chars)"]


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
    try:
        if "\0" in entry:
            raise ValueError("embedded NUL character")
        listed = _local_path(entry)
        candidate = listed if listed.is_absolute() else base / listed
        real = Path(os.path.realpath(candidate))
    except (OSError, ValueError, RuntimeError) as exc:  # "~nobody/x", NUL bytes, ...
        return entry, entry, f"path {safe_text(entry)!r} cannot be resolved: {exc}"
    if not _within(real, root):
        kind = "symlink" if _within(Path(os.path.abspath(candidate)), root) else "path"
        return str(candidate), entry, f"{kind} {entry!r} resolves outside the source root {root}"
    return str(real), real.relative_to(root).as_posix(), None


def _sidecar_caption(video: Path, max_chars: int = DEFAULT_MAX_CAPTION_CHARS
                    ) -> tuple[str | None, bool, list[str]]:
    """The caption in `<stem>.txt` beside a video: (text, truncated, notes). Reads at most
    enough bytes for max_chars characters; bytes that are not UTF-8 are replaced (noted)."""
    try:
        sidecar = video.with_suffix(".txt")
        if not sidecar.is_file():
            return None, False, []
        with open(sidecar, "rb") as handle:
            raw = handle.read(4 * max_chars + 4)  # UTF-8: at most 4 bytes a character
            more = bool(handle.read(1))
    except (OSError, ValueError) as exc:  # unreadable sidecar: no caption, say why
        return None, False, [f"sidecar not read: {exc}"]
    notes = []
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(raw, final=not more)
    except UnicodeDecodeError as exc:
        text = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(
            raw, final=not more)
        notes.append(f"sidecar is not UTF-8 ({exc.reason} at byte {exc.start}): undecodable "
                     "bytes replaced with U+FFFD")
    caption, truncated, cut = _limit_caption(text.lstrip("\ufeff"), max_chars, more)
    return caption, truncated, notes + cut


def _note(notes: list[str]) -> str | None:
    return "; ".join(notes) if notes else None


def _folder(root: Path, extensions: set[str], default_license: str | None, out: Discovery,
            max_chars: int = DEFAULT_MAX_CAPTION_CHARS) -> int:
    real_root = Path(os.path.realpath(root))
    videos: list[Path] = []

    def walk_error(exc: OSError) -> None:  # an unreadable subfolder is listed, not fatal
        out.ignored.append(safe_text(f"{exc.filename}/ (not readable: {exc.strerror})"))

    # followlinks=False: a symlinked directory (possibly a loop back up the tree) is never
    # walked into, so the walk always ends.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False, onerror=walk_error):
        dirnames.sort()
        # A symlinked directory is not walked into (it could lead anywhere); say so.
        out.ignored.extend(safe_text(str(Path(dirpath) / d)) + "/" for d in dirnames
                           if os.path.islink(Path(dirpath) / d))
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            if path.suffix.lower() in extensions:
                videos.append(path)
            elif not (path.suffix.lower() == ".txt" and any(
                path.with_suffix(ext).exists() or path.with_suffix(ext.upper()).exists()
                for ext in extensions
            )):
                out.ignored.append(safe_text(str(path)))
    for path in sorted(videos, key=lambda p: p.relative_to(root).as_posix()):
        name = path.relative_to(root).as_posix()
        # A dangling link or a loop of file links stays as it is: reading it fails, and
        # the item is rejected as unreadable with the system's words.
        real = Path(os.path.realpath(path))
        if not real.exists():
            real = path  # recorded and read as listed
        if not _within(Path(os.path.realpath(real)), real_root):
            out.items.append(SourceItem(str(path), name, str(root), license=default_license,
                                        escape=f"symlink {safe_text(name)!r} resolves outside "
                                        f"{real_root}"))
            continue
        caption, truncated, notes = _sidecar_caption(path, max_chars)
        out.items.append(SourceItem(str(real), name, str(root), caption,
                                    "sidecar" if caption else "none", default_license,
                                    rank=(len(out.sources), name.count("/"), len(name), name),
                                    caption_truncated=truncated, caption_note=_note(notes)))
    return len(videos)


def _text_lines(handle: io.TextIOBase, uri: str) -> list[str]:
    """Every line of a text manifest, each at most MAX_MANIFEST_LINE characters."""
    lines = []
    try:
        while line := handle.readline(MAX_MANIFEST_LINE + 1):
            if len(line) > MAX_MANIFEST_LINE and not line.endswith("\n"):
                raise SourceError(f"{uri} line {len(lines) + 1}: longer than "
                                  f"{MAX_MANIFEST_LINE} characters")
            lines.append(line)
    except UnicodeDecodeError as exc:
        raise SourceError(f"{uri} line {len(lines) + 1}: not UTF-8 ({exc.reason}); a manifest "
                          "must be UTF-8 text") from None
    return lines


def _read_manifest_rows(uri: str) -> list[dict]:
    suffix = Path(urlsplit(uri).path).suffix.lower()
    try:
        with fsspec.open(uri, "r", encoding="utf-8", newline="") as handle:
            lines = _text_lines(handle, uri)
    except (OSError, ValueError) as exc:
        if isinstance(exc, SourceError):
            raise
        raise SourceError(f"cannot read manifest {uri}: {exc}") from exc
    if suffix == ".csv":
        try:
            rows = list(csv.DictReader(lines))
        except csv.Error as exc:
            raise SourceError(f"{uri}: not CSV ({exc})") from None
    else:
        rows = []
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{uri} line {lineno}: not JSON ({exc.msg})") from exc
            except (ValueError, RecursionError) as exc:  # huge integers, deep nesting
                raise SourceError(f"{uri} line {lineno}: not usable JSON ({exc})") from None
            if not isinstance(row, dict):
                raise SourceError(f"{uri} line {lineno}: expected an object")
            rows.append(row)
    for i, row in enumerate(rows, 1):
        if not _field(row.get("uri")):
            raise SourceError(f"{uri} row {i}: no 'uri' (a manifest needs a uri column)")
    return rows


def _field(value: object) -> str:
    """A manifest cell as text: JSON values other than strings in their JSON spelling."""
    if value is None:
        return ""
    if not isinstance(value, str):
        try:
            value = json.dumps(value, ensure_ascii=False)
        except (ValueError, RecursionError):
            value = repr(value)
    return value.strip()


def _manifest(uri: str, default_license: str | None, out: Discovery,
              allowed: list[str] | tuple[str, ...] = ("file",),
              max_chars: int = DEFAULT_MAX_CAPTION_CHARS) -> int:
    rows = _read_manifest_rows(uri)
    remote_manifest = _is_remote(uri)
    root = None if remote_manifest else Path(os.path.realpath(_local_path(uri))).parent
    for lineno, row in enumerate(rows):
        entry = _field(row.get("uri"))
        caption, truncated, notes = _limit_caption(_field(row.get("caption")) or None,
                                                   max_chars)
        license_ = safe_text(_field(row.get("license"))) or default_license
        rank = (len(out.sources), lineno)
        scheme = refused_scheme(entry, allowed)
        if scheme is not None:
            out.items.append(SourceItem(
                entry, safe_text(entry), uri, caption, "manifest" if caption else "none",
                license_,
                escape=f"scheme {scheme!r} is not in ingest.allowed_schemes {list(allowed)}",
                refusal="unsupported_scheme", rank=rank, caption_truncated=truncated,
                caption_note=_note(notes)))
            continue
        if remote_manifest:
            base = uri.rsplit("/", 1)[0]
            target = entry if _is_remote(entry) else f"{base}/{entry.lstrip('/')}"
            name = entry
            escape = "'..' in a remote manifest entry" if ".." in Path(entry).parts else None
        else:
            assert root is not None
            target, name, escape = _resolve_listed(entry, root, root)
        origin = "manifest"
        if caption is None and escape is None and not _is_remote(target):
            caption, truncated, notes = _sidecar_caption(Path(target), max_chars)
            origin = "sidecar"
        out.items.append(SourceItem(target, name, uri, caption, origin if caption else "none",
                                    license_, escape, rank=rank, caption_truncated=truncated,
                                    caption_note=_note(notes)))
    return len(rows)


def _cogvideo(root: Path, default_license: str | None, out: Discovery,
              max_chars: int = DEFAULT_MAX_CAPTION_CHARS) -> int:
    try:
        prompts = (root / "prompts.txt").read_text(encoding="utf-8").splitlines()
        videos = (root / "videos.txt").read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise SourceError(f"{root}: prompts.txt and videos.txt must be UTF-8 ({exc})") from None
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
        caption, truncated, notes = _limit_caption(prompt, max_chars)
        out.items.append(SourceItem(target, name, str(root), caption,
                                    "prompts.txt" if caption else "none", default_license,
                                    escape, rank=(len(out.sources), lineno),
                                    caption_truncated=truncated, caption_note=_note(notes)))
    return len(videos)


def discover(
    sources: list[str], extensions: list[str], default_license: str | None = None, *,
    allowed_schemes: list[str] | tuple[str, ...] = ("file",),
    max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS,
) -> Discovery:
    """Expand source URIs into items, in a stable order (sources as given, then by path).

    A source whose scheme is not in `allowed_schemes` is a SourceError (nothing is read)."""
    exts = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
    allowed = tuple(allowed_schemes)
    out = Discovery()
    for source in sources:
        scheme = refused_scheme(source, allowed)
        if scheme is not None:
            raise SourceError(f"source {safe_text(source)!r}: scheme {scheme!r} is not in "
                              f"ingest.allowed_schemes {list(allowed)} (add it to read such "
                              "sources)")
        if _is_remote(source):
            suffix = Path(urlsplit(source).path).suffix.lower()
            if suffix in MANIFEST_SUFFIXES:
                count = _manifest(source, default_license, out, allowed, max_caption_chars)
                kind = "manifest"
            else:
                try:
                    fs, path = fsspec.core.url_to_fs(source)
                except (ValueError, ImportError) as exc:
                    raise SourceError(f"source {source}: {exc}") from exc
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
            raise SourceError(f"source not found: {safe_text(source)}")
        if path.is_dir() and all((path / f).is_file() for f in COGVIDEO_FILES):
            kind, count = "cogvideo", _cogvideo(path, default_license, out, max_caption_chars)
        elif path.is_dir():
            kind = "folder"
            count = _folder(path, exts, default_license, out, max_caption_chars)
        elif path.suffix.lower() in MANIFEST_SUFFIXES:
            kind = "manifest"
            count = _manifest(str(path.resolve()), default_license, out, allowed,
                              max_caption_chars)
        else:
            kind, count = "file", 1
            caption, truncated, notes = _sidecar_caption(path, max_caption_chars)
            out.items.append(SourceItem(str(path.resolve()), path.name, str(path), caption,
                                        "sidecar" if caption else "none", default_license,
                                        rank=(len(out.sources),), caption_truncated=truncated,
                                        caption_note=_note(notes)))
        out.sources.append({"uri": safe_text(str(path)), "kind": kind, "items": count})
    return out
