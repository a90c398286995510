"""Property: whatever is done to a plan file, `load_plan` gives back the identical plan or raises the project's
own error (a GoraError, one sentence), never another exception; a plan that loads can be shown safely."""

from __future__ import annotations

import hashlib
import json
import re
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import goraplan
from goraplan import report
from goraplan.errors import GoraError
from tests.tiny import random_batches, tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore")
SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
WORK = Path(tempfile.mkdtemp(prefix="gora-property-"))


@pytest.fixture(scope="module")
def valid():
    plan = goraplan.build_plan(tiny_llama(), random_batches(2), goraplan.PlanSettings(steps=2, rank=4))
    path = plan.save(WORK / "valid.gora")
    return goraplan.load_plan(path), path.read_bytes()


def split(data: bytes) -> tuple[dict, bytes]:
    size = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + size]), data[8 + size:]


def join(header: dict, body: bytes) -> bytes:
    text = json.dumps(header, allow_nan=True).encode("utf-8", "surrogatepass")
    return struct.pack("<Q", len(text)) + text + body


def with_manifest(data: bytes, manifest_text: str) -> bytes:
    """The file with another manifest, its checksum recomputed (what a forger would do)."""
    header, body = split(data)
    header["__metadata__"]["gora.manifest"] = manifest_text
    header["__metadata__"]["gora.manifest_sha256"] = hashlib.sha256(
        manifest_text.encode("utf-8", "surrogatepass")).hexdigest()
    return join(header, body)


def load_or_refuse(data: bytes, name: str):
    path = WORK / name
    path.write_bytes(data)
    try:
        return goraplan.load_plan(path)
    except GoraError as exc:
        message = str(exc)
        assert message and "\n" not in message and not CONTROL.search(message), repr(message)
        return None


def identical(a, b) -> bool:
    return a.manifest == b.manifest and a.tensors.keys() == b.tensors.keys() and all(
        torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def shown_safely(plan, other) -> None:
    lines = (report.summary_lines(plan) + report.type_table_lines(plan) + report.module_table_lines(plan)
             + report.diff_lines(plan, other) + report.diff_lines(other, plan))
    assert not any(CONTROL.search(line) for line in lines)


# ------------------------------------------------------------------------------------------ raw bytes
byte_edits = st.lists(st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 10**9), st.integers(1, 255)),
    st.tuples(st.just("cut"), st.integers(0, 10**9), st.integers(1, 64)),
    st.tuples(st.just("insert"), st.integers(0, 10**9), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("truncate"), st.integers(0, 10**9), st.just(0)),
), min_size=1, max_size=4)


@SETTINGS
@given(edits=byte_edits)
def test_byte_edits_give_the_same_plan_or_one_sentence(valid, edits):
    plan, data = valid
    broken = bytearray(data)
    for kind, pos, arg in edits:
        pos %= max(len(broken), 1)
        if kind == "flip" and broken:
            broken[pos] ^= arg
        elif kind == "cut":
            del broken[pos:pos + arg]
        elif kind == "insert":
            broken[pos:pos] = arg
        elif kind == "truncate":
            del broken[pos:]
    loaded = load_or_refuse(bytes(broken), "bytes.gora")
    assert loaded is None or identical(loaded, plan)


# ------------------------------------------------------------------------------------------ manifest values
hostile_text = st.lists(st.characters(codec="utf-8", exclude_categories=["Cs"]).map(str) | st.sampled_from(
    ["\x1b[2J", "\n", "\r", "\u202e", "\x00", "$\\frac", "{", "'"]), max_size=6).map("".join)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([0, 1, -1, 2**32, 2**63])
    | st.floats(allow_nan=True, allow_infinity=True) | hostile_text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile_text, inner, max_size=3),
    max_leaves=6,
)


def paths_of(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from paths_of(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from paths_of(v, (*prefix, i))


@SETTINGS
@given(data=st.data())
def test_manifest_edits_with_recomputed_checksums_load_consistently_or_refuse(valid, data):
    plan, raw = valid
    manifest = json.loads(plan.manifest.model_dump_json())
    paths = [p for p in paths_of(manifest) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        route = data.draw(st.sampled_from(paths))
        parent = manifest
        try:
            for key in route[:-1]:
                parent = parent[key]
            action = data.draw(st.sampled_from(["set", "delete", "add"]))
            if action == "set":
                parent[route[-1]] = data.draw(json_values)
            elif action == "delete" and isinstance(parent, dict):
                del parent[route[-1]]
            elif isinstance(parent, dict):
                parent[data.draw(hostile_text)] = data.draw(json_values)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier edit removed or replaced this path
    text = json.dumps(manifest, allow_nan=True)
    loaded = load_or_refuse(with_manifest(raw, text), "manifest.gora")
    if loaded is not None:
        shown_safely(loaded, plan)
        assert loaded.tensors.keys() == plan.tensors.keys()


@SETTINGS
@given(text=st.one_of(json_values.map(lambda v: json.dumps(v, allow_nan=True)), hostile_text))
def test_any_manifest_text_is_refused_in_one_sentence(valid, text):
    _, raw = valid
    assert load_or_refuse(with_manifest(raw, text), "text.gora") is None


# ------------------------------------------------------------------------------------------ tensor bytes
@SETTINGS
@given(data=st.data())
def test_tensor_values_with_recomputed_checksums_load_finite_or_refuse(valid, data):
    plan, raw = valid
    manifest = json.loads(plan.manifest.model_dump_json())
    tensors = {k: v.clone() for k, v in plan.tensors.items()}
    name = data.draw(st.sampled_from(sorted(tensors)))
    flat = tensors[name].view(-1).view(torch.int32)
    for _ in range(data.draw(st.integers(1, 4))):
        flat[data.draw(st.integers(0, flat.numel() - 1))] = data.draw(st.integers(-2**31, 2**31 - 1))
    manifest["checksums"][name] = hashlib.sha256(tensors[name].numpy().tobytes()).hexdigest()
    header, body = split(raw)
    begin, end = header[name]["data_offsets"]
    body = body[:begin] + tensors[name].numpy().tobytes() + body[end:]
    loaded = load_or_refuse(with_manifest(join(header, body), json.dumps(manifest)), "tensor.gora")
    if loaded is not None:
        assert all(bool(torch.isfinite(t).all()) for t in loaded.tensors.values())
        assert torch.equal(loaded.tensors[name], tensors[name])


# ------------------------------------------------------------------------------------------ safetensors header
@SETTINGS
@given(data=st.data())
def test_header_edits_give_the_same_plan_or_one_sentence(valid, data):
    plan, raw = valid
    header, body = split(raw)
    paths = [p for p in paths_of(header) if p]
    route = data.draw(st.sampled_from(paths))
    parent = header
    for key in route[:-1]:
        parent = parent[key]
    if data.draw(st.booleans()) and isinstance(parent, dict):
        del parent[route[-1]]
    else:
        parent[route[-1]] = data.draw(json_values)
    loaded = load_or_refuse(join(header, body), "header.gora")
    assert loaded is None or identical(loaded, plan)
