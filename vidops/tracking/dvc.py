"""Dataset versions with DVC: a real repo in the workdir, pushed to a real remote.

Stage outputs are uploaded with `dvc add --to-remote`, which hashes a directory wherever it
lies (inside the workdir or not), uploads its objects to the remote and writes a `.dvc`
pointer into the workdir's repo, without a second local copy in a DVC cache. The md5 of that
pointer is the dataset's version: the content address of the data on the remote.

`dvc add --to-remote` streams each file into a temporary `files/md5/.<random>.tmp` on the
remote while hashing it, copies that into place, and never deletes it (DVC issue #10783, open
in DVC 3.67): the remote would hold every dataset twice. On a local remote, what our own
upload left is removed afterwards (`_remove_upload_leftovers`); on a cloud remote, a
lifecycle rule on the `files/md5/.` prefix does the same (README, "Run on Kubernetes").
"""

from __future__ import annotations

import configparser
import hashlib
import json
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from vidops.tracking.redact import redact_text
from vidops.tracking.workdir import Workdir

REMOTE_NAME = "vidops"


class DvcError(RuntimeError):
    pass


@dataclass(frozen=True)
class DatasetVersion:
    md5: str  # DVC directory hash, e.g. "785dd70673354c4ef73f6caf70a7d62f.dir"
    nfiles: int
    size: int
    remote: str
    dvc_file: str  # the pointer file inside the workdir's DVC repo

    @property
    def object_uri(self) -> str:
        """Where the remote keeps this version's directory listing (its content address)."""
        return object_path(self.remote, self.md5)

    def to_dict(self) -> dict:
        return asdict(self)


def object_path(remote: str, md5: str) -> str:
    """Where a DVC 3 remote (a path or URL) keeps the object with this md5 (a file's, or a
    directory's listing, `<md5>.dir`): the remote's content addressing."""
    return f"{remote.rstrip('/')}/files/md5/{md5[:2]}/{md5[2:]}"


def _dvc(workdir: Workdir, *args: str) -> str:
    # The DVC of this interpreter's environment, so a component pod needs no `dvc` on PATH.
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=workdir.root, capture_output=True, text=True,
    )
    if proc.returncode != 0:
        # DVC names its remote (and the paths it read) in its errors: recorded redacted.
        raise DvcError(redact_text(f"dvc {' '.join(args)} failed: "
                                   f"{(proc.stderr or proc.stdout).strip()}"))
    return proc.stdout


def remote_url(workdir: Workdir, configured: str | None) -> str:
    return configured or str(workdir.dvc_remote)


def ensure_repo(workdir: Workdir, configured_remote: str | None) -> str:
    """Initialise the workdir's DVC repo (without git) and its default remote, idempotently."""
    url = remote_url(workdir, configured_remote)
    if not (workdir.root / ".dvc").is_dir():
        _dvc(workdir, "init", "--no-scm", "--force", "--quiet")
        _dvc(workdir, "config", "core.analytics", "false")
    if "://" not in url:
        Path(url).mkdir(parents=True, exist_ok=True)
    # Each dvc call costs about a second of start-up; skip the write when already configured.
    config = configparser.ConfigParser()
    config.read(workdir.root / ".dvc" / "config")
    section = f'remote "{REMOTE_NAME}"'
    if not (config.has_section(section) and config.get(section, "url", fallback=None) == url
            and config.get("core", "remote", fallback=None) == REMOTE_NAME):
        _dvc(workdir, "remote", "add", "--force", "--default", REMOTE_NAME, url)
    return url


def version_directory(
    workdir: Workdir, directory: Path, name: str, configured_remote: str | None
) -> DatasetVersion:
    """Hash `directory`, upload it to the remote and record it as dataset `name`."""
    url = ensure_repo(workdir, configured_remote)
    workdir.datasets.mkdir(parents=True, exist_ok=True)
    pointer = workdir.datasets / name
    leftovers_before = _upload_leftovers(url)
    _dvc(workdir, "add", "--quiet", "--to-remote", "--remote", REMOTE_NAME,
         "--out", str(pointer.relative_to(workdir.root)), str(Path(directory).resolve()))
    dvc_file = pointer.with_name(pointer.name + ".dvc")
    out = yaml.safe_load(dvc_file.read_text())["outs"][0]
    version = DatasetVersion(
        md5=out["md5"], nfiles=int(out.get("nfiles", 0)), size=int(out.get("size", 0)),
        remote=url, dvc_file=str(dvc_file.relative_to(workdir.root)),
    )
    _remove_upload_leftovers(version, _upload_leftovers(url) - leftovers_before)
    return version


def _upload_leftovers(url: str) -> set[Path]:
    """The temporary upload files now on a local remote (none known for a cloud one)."""
    if "://" in url:
        return set()
    return set((Path(url) / "files" / "md5").glob(".*.tmp"))


def _remove_upload_leftovers(version: DatasetVersion, new: set[Path]) -> None:
    """Delete those of the upload files that appeared during this upload which hold one of
    this version's objects, now in place under its own address. Another upload to the same
    remote (another workdir) may be between writing its temporary file and copying it: its
    file has other content (it is not one of our objects) or its object is not yet in place,
    and is left alone. Only an upload of the very same bytes at the very same moment could
    lose its temporary file before copying it; its `dvc add` then fails and a rerun (which
    finds the object in place) succeeds."""
    if not new:
        return
    listing = Path(object_path(version.remote, version.md5))
    ours = {entry["md5"] for entry in json.loads(listing.read_text())}
    for tmp in new:
        try:
            digest = _md5(tmp)
        except FileNotFoundError:
            continue
        if digest in ours and Path(object_path(version.remote, digest)).is_file():
            tmp.unlink(missing_ok=True)


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
