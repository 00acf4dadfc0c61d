"""Credentials never recorded: one place that knows what a secret inside a URI looks like.

vidops reads credentials from the environment (MLFLOW_TRACKING_USERNAME/PASSWORD, AWS_*,
KFP_TOKEN), which on a cluster comes from Kubernetes Secrets (config `kubernetes.secrets`).
A URI may still carry one inline: a password in its user info (`postgresql://u:PW@db/x`), a
token as its user name (`https://TOKEN@host/...`), or a signed query (`?X-Amz-Signature=`,
`sig=`, `token=`, ...). Such a URI is *used* as given, but wherever vidops *records* a value
(stage.json, manifests and rejected rows, MLflow params and tags, run-summary.json, lineage,
log lines and error messages) it records `redact_uri(value)`: the secret parts replaced by
`***`, everything else unchanged, deterministically, so records made from the same source
still join (lineage joins on `source_uri`).

What hands the configuration or the sources to other processes as data (a KFP pipeline's
parameters, compiled or submitted; a training job's config file) cannot redact them, so it
refuses them instead (`inline_credentials`, `refuse_inline_credentials`).

Standard library only: `vidops.config` imports this module.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote

MASK = "***"

# Query (and fragment) parameters whose value is a credential, compared case-insensitively:
# presigned S3 and GCS URLs, Azure SAS, CloudFront, OAuth, and the usual API-key spellings.
SENSITIVE_PARAMS = frozenset({
    "x-amz-signature", "x-amz-credential", "x-amz-security-token",
    "x-goog-signature", "x-goog-credential", "signature", "sig",
    "awsaccesskeyid", "token", "access_token", "id_token", "refresh_token", "password",
    "passwd", "pwd", "secret", "client_secret", "key", "api_key", "apikey", "api-key",
})
# ... and any parameter whose name contains one of these.
_SENSITIVE_PARTS = ("token", "secret", "password", "passwd", "signature", "credential",
                    "apikey", "api_key", "api-key", "private")
# Schemes where a user name alone is usually a token (`https://ghp_xxx@github.com/...`).
_TOKEN_USER_SCHEMES = frozenset({"http", "https", "webdav", "webdavs", "dav", "davs", "ws",
                                 "wss"})

_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
# `name=value` in free text: at the start or after a delimiter, never inside a path
# (`/data/key=2024/` is a folder name, not a credential).
_PARAM = re.compile(r"(?<![^\s?&;,(\[{'\"])(?P<name>[A-Za-z0-9_.\-]+)="
                    r"(?P<value>[^&#\s'\"<>`,;)\]}]+)")


def _sensitive(name: str) -> bool:
    name = unquote(name).strip().lower()
    return name in SENSITIVE_PARAMS or any(part in name for part in _SENSITIVE_PARTS)


def _redact_params(text: str) -> tuple[str, list[str]]:
    """`name=value` pairs with a sensitive name get `name=***`; the names found."""
    found: list[str] = []

    def mask(match: re.Match[str]) -> str:
        if not _sensitive(match["name"]) or match["value"] == MASK:
            return match[0]
        found.append(unquote(match["name"]))
        return f"{match['name']}={MASK}"

    return _PARAM.sub(mask, text), found


def _redact_query(query: str) -> tuple[str, list[str]]:
    """A query string (or fragment) with the values of sensitive parameters masked."""
    found: list[str] = []
    parts = []
    for part in query.split("&"):
        name, sep, value = part.partition("=")
        if sep and value and value != MASK and _sensitive(name):
            found.append(unquote(name))
            part = f"{name}={MASK}"
        parts.append(part)
    return "&".join(parts), found


def _split_userinfo(netloc: str) -> tuple[str | None, str]:
    if "@" not in netloc:
        return None, netloc
    userinfo, host = netloc.rsplit("@", 1)
    return userinfo, host


def _inspect(uri: str) -> tuple[str, list[str]]:
    """(the redacted URI, what was secret in it)."""
    if "://" not in uri:
        return uri, []
    scheme, rest = uri.split("://", 1)
    # The authority ends at the first of / ? #; what follows is path, query, fragment.
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    problems: list[str] = []
    userinfo, host = _split_userinfo(netloc)
    if userinfo is not None:
        user, sep, password = userinfo.partition(":")
        if sep and password and password != MASK:
            netloc = f"{user}:{MASK}@{host}"
            problems.append("a password in its user info")
        elif not sep and user and user != MASK and scheme.lower() in _TOKEN_USER_SCHEMES:
            netloc = f"{MASK}@{host}"
            problems.append("a token as its user name")
    path, qmark, query = tail.partition("?")
    if qmark:
        query, hashmark, fragment = query.partition("#")
        query, names = _redact_query(query)
        fragment, more = _redact_query(fragment)
        problems += [f"the query parameter {n!r}" for n in names + more]
        tail = f"{path}?{query}{hashmark}{fragment}"
    elif "#" in tail:
        head, _, fragment = tail.partition("#")
        fragment, names = _redact_query(fragment)
        problems += [f"the fragment parameter {n!r}" for n in names]
        tail = f"{head}#{fragment}"
    return f"{scheme}://{netloc}{tail}", problems


def redact_uri(uri: str) -> str:
    """`uri` with its credentials replaced by `***` (a password in the user info, a lone
    user name of http(s)/webdav, the values of sensitive query parameters); other strings,
    and URIs without credentials, come back unchanged."""
    if not isinstance(uri, str):
        return uri
    return _inspect(uri)[0]


def inline_credentials(uri: str) -> list[str]:
    """What in `uri` is a credential (empty when nothing is)."""
    if not isinstance(uri, str) or "://" not in uri:
        return []
    return _inspect(uri)[1]


def redact_text(text: str) -> str:
    """Every URI inside free text (an error message, a log line) redacted, and any
    `name=value` with a sensitive name outside a URI masked too."""
    if not isinstance(text, str) or ("@" not in text and "=" not in text):
        return text  # the same object: redact_frame tells unchanged cells by identity
    pieces, last = [], 0
    for match in _URI.finditer(text):
        pieces += [_redact_params(text[last:match.start()])[0], redact_uri(match[0])]
        last = match.end()
    out = "".join([*pieces, _redact_params(text[last:])[0]])
    return text if out == text else out


def redact_obj(value: Any) -> Any:
    """JSON-like data with every string in it redacted (keys are left as they are)."""
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, dict):
        return {k: redact_obj(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact_obj(v) for v in value)
    return value


def redact_frame(frame: Any) -> Any:
    """A pandas DataFrame with every string cell redacted (a copy where anything changed;
    column dtypes kept). Cells without `@` or `=` are not even parsed."""
    changed = None
    for column in frame.columns:
        series = frame[column]
        if series.dtype.kind != "O" and str(series.dtype) != "string":
            continue
        values = series.tolist()
        redacted = [redact_text(v) if isinstance(v, str) else v for v in values]
        if any(new is not old for new, old in zip(redacted, values, strict=True)):
            if changed is None:
                changed = frame.copy()
            changed[column] = type(series)(redacted, index=series.index, dtype=series.dtype,
                                           name=series.name)
    return frame if changed is None else changed


def redact_config(config: dict[str, Any]) -> dict[str, Any]:
    """A configuration (`Config.to_dict()`) fit to record: every URI-valued setting
    (tracking.uri, dvc.remote, model paths and hub ids, ...) redacted."""
    return redact_obj(config)


def credential_settings(data: Any, prefix: str = "") -> list[str]:
    """`key: what` for every string setting (dotted key) that carries credentials inline."""
    found: list[str] = []
    if isinstance(data, dict):
        for key, value in data.items():
            found += credential_settings(value, f"{prefix}{key}.")
    elif isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            found += credential_settings(value, f"{prefix}{i}.")
    elif isinstance(data, str):
        for uri in _URI.findall(data):
            what = inline_credentials(uri)
            if what:
                found.append(f"{prefix[:-1]} ({', '.join(what)})")
    return found


def refuse_inline_credentials(config: dict[str, Any], sources: Iterable[str] = (),
                              where: str = "a pipeline") -> None:
    """Raise ConfigError when the configuration or the source URIs handed to `where` carry
    credentials inline: they would become data of the run (its parameters, its spec)."""
    problems = credential_settings(config)
    for i, source in enumerate(sources):
        what = inline_credentials(str(source))
        if what:
            problems.append(f"source {i + 1} {redact_uri(str(source))} ({', '.join(what)})")
    if problems:
        from vidops.config import ConfigError

        raise ConfigError(
            f"credentials inline in {'; '.join(problems)}: {where} would carry them as "
            "parameters. Give credentials through the environment instead (on a cluster, "
            "Kubernetes Secrets: config kubernetes.secrets): MLFLOW_TRACKING_URI without a "
            "password plus MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD; AWS_ACCESS_KEY_ID/"
            "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) for s3:// sources and remotes, "
            "not presigned URLs")


# Credentials a process may be given as files (Docker/Kubernetes secret files): NAME_FILE
# names a file whose content becomes NAME, unless NAME itself is set.
SECRET_FILE_ENVS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                    "MLFLOW_TRACKING_TOKEN", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                    "AWS_SESSION_TOKEN", "KFP_TOKEN")


def secrets_from_files(environ: Any = None) -> list[str]:
    """Read `NAME_FILE` into `NAME` for the credentials above; returns the names set."""
    import os

    environ = os.environ if environ is None else environ
    loaded = []
    for name in SECRET_FILE_ENVS:
        path = environ.get(f"{name}_FILE")
        if path and not environ.get(name):
            try:
                with open(path, encoding="utf-8") as handle:
                    environ[name] = handle.read().strip()
            except OSError as exc:
                from vidops.config import ConfigError

                raise ConfigError(f"{name}_FILE: cannot read {path}: {exc.strerror}") from None
            loaded.append(name)
    return loaded
