"""Property tests: arbitrary text never crashes the manifest and sidecar parsers or the
configuration loader; it gives rows (a valid Config) or a clear SourceError (ConfigError)."""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vidops.config import Config, ConfigError, config_from_dict, load_config
from vidops.data.sources import SourceError, discover, safe_text

pytestmark = pytest.mark.reliability

# database=None: no .hypothesis/ folder in the checkout.
SETTINGS = settings(max_examples=50, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
MAX_CHARS = 40

# Text as hostile as hypothesis makes it: any code point, surrogates included.
anything = st.text(st.characters(codec=None), max_size=300)
cells = st.one_of(anything, st.sampled_from([
    "=HYPERLINK(\"http://x\",\"y\")", "+cmd|' /C calc'!A0", "@SUM(1)", "-1+1", "../../etc/passwd",
    "/etc/passwd", "gopher://h/x.mp4", "s3://b/k.mp4", "file:///etc/passwd", "~nobody/x.mp4",
    "a\x00b.mp4", ".", "", "a,b", '"', "\r\n", "\ufeff", "simplecache::http://x/y.mp4",
]))
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | anything,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(anything, children,
                                                                       max_size=4),
    max_leaves=12)


def _discover(path: Path):
    """discover() on one manifest: a Discovery or a SourceError, nothing else."""
    try:
        found = discover([str(path)], [".mp4"], max_caption_chars=MAX_CHARS)
    except SourceError as exc:
        assert str(exc)
        return None
    for item in found.items:
        assert item.caption is None or 0 < len(item.caption) <= MAX_CHARS
        assert item.caption_truncated == bool(item.caption_note and "truncated" in
                                              item.caption_note)
        for text in (item.name, item.caption or "", item.license or "", item.escape or ""):
            safe_text(text).encode("utf-8")
    return found


@SETTINGS
@given(text=anything)
def test_csv_manifest_any_text(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "list.csv"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        _discover(path)


@SETTINGS
@given(rows=st.lists(st.tuples(cells, cells, cells), max_size=8),
       header=st.sampled_from(["uri,caption,license", "caption,uri", "uri", "url,caption"]))
def test_csv_manifest_rows(rows: list[tuple[str, str, str]], header: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "list.csv"
        quoted = [",".join('"' + c.replace('"', '""') + '"' for c in row) for row in rows]
        path.write_text("\n".join([header, *quoted]) + "\n", encoding="utf-8",
                        errors="surrogatepass")
        found = _discover(path)
        if found is not None:
            assert len(found.items) == len(rows)


@SETTINGS
@given(text=anything)
def test_jsonl_manifest_any_text(text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "list.jsonl"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        _discover(path)


@SETTINGS
@given(rows=st.lists(st.dictionaries(st.sampled_from(["uri", "caption", "license", "x"]),
                                     st.one_of(cells, json_values), max_size=4), max_size=6))
def test_jsonl_manifest_rows(rows: list[dict]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "list.jsonl"
        lines = [json.dumps(row, ensure_ascii=True) for row in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        found = _discover(path)
        if found is not None:
            assert len(found.items) == len(rows)


@SETTINGS
@given(raw=st.binary(max_size=400))
def test_caption_sidecar_any_bytes(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "videos"
        folder.mkdir()
        (folder / "a.mp4").write_bytes(b"not read here")
        (folder / "a.txt").write_bytes(raw)
        (item,) = discover([str(folder)], [".mp4"], max_caption_chars=MAX_CHARS).items
        assert item.caption is None or 0 < len(item.caption) <= MAX_CHARS
        (item.caption or "").encode("utf-8")
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            assert "not UTF-8" in (item.caption_note or "")


# ------------------------------------------------------------------------------------------
# The configuration loader


DEFAULTS = load_config().to_dict()
KEYS = sorted(load_config().flat())
values = st.one_of(anything, st.sampled_from([
    "", "null", "true", "-1", "0", "1e309", "nan", "[1, 2", "{a: 1}", "${oc.env:HOME}",
    "${nope}", "${", "[file, s3]", "[]", "'quoted'", "99999999999999999999999",
]))


@SETTINGS
@given(key=st.sampled_from(KEYS), value=values)
def test_set_override_on_a_known_key(key: str, value: str) -> None:
    try:
        cfg = load_config("tiny", [f"{key}={value}"])
    except ConfigError as exc:
        assert key in str(exc) or key.split(".")[-1] in str(exc), str(exc)
        return
    assert isinstance(cfg, Config)


@SETTINGS
@given(item=anything)
def test_set_override_any_text(item: str) -> None:
    try:
        assert isinstance(load_config(None, [item]), Config)
    except ConfigError as exc:
        assert str(exc)


@SETTINGS
@given(path=st.lists(st.sampled_from([*{k.split(".")[0] for k in KEYS}, "x", "limits"]),
                     min_size=1, max_size=3),
       value=json_values)
def test_config_from_dict_with_any_value_somewhere(path: list[str], value: object) -> None:
    data = copy.deepcopy(DEFAULTS)
    node = data
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value
    try:
        assert isinstance(config_from_dict(data), Config)
    except ConfigError as exc:
        assert str(exc)


@SETTINGS
@given(data=json_values)
def test_config_from_dict_any_data(data: object) -> None:
    with pytest.raises(ConfigError):
        config_from_dict(data)
