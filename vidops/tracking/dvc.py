"""Dataset versions with DVC: a real repo in the workdir, pushed to a real remote.

Stage outputs are uploaded with `dvc add --to-remote`, which hashes a directory wherever it
lies (inside the workdir or not), uploads its objects to the remote and writes a `.dvc`
pointer into the workdir's repo, without a second local copy in a DVC cache. The md5 of that
pointer is the dataset's version: the content address of the data on the remote.
"""

from __future__ import annotations

import configparser
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
        return f"{self.remote.rstrip('/')}/files/md5/{self.md5[:2]}/{self.md5[2:]}"

    def to_dict(self) -> dict:
        return asdict(self)


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
    _dvc(workdir, "add", "--quiet", "--to-remote", "--remote", REMOTE_NAME,
         "--out", str(pointer.relative_to(workdir.root)), str(Path(directory).resolve()))
    dvc_file = pointer.with_name(pointer.name + ".dvc")
    out = yaml.safe_load(dvc_file.read_text())["outs"][0]
    return DatasetVersion(
        md5=out["md5"], nfiles=int(out.get("nfiles", 0)), size=int(out.get("size", 0)),
        remote=url, dvc_file=str(dvc_file.relative_to(workdir.root)),
    )
