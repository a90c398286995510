"""The .gora artifact: round trip, plain safetensors readability, strict loading, schema file."""

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import goraplan
from goraplan.errors import GoraError, PlanFormatError
from goraplan.plan import SCHEMA_VERSION, manifest_json_schema
from tests.tiny import random_batches, tiny_llama

ROOT = __import__("pathlib").Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def plan():
    return goraplan.build_plan(tiny_llama(), random_batches(4), goraplan.PlanSettings(steps=4, rank=4))


def test_round_trip_gives_identical_tensors_and_manifest(plan, tmp_path):
    path = plan.save(tmp_path / "p.gora")
    loaded = goraplan.load_plan(path)
    assert loaded.manifest == plan.manifest
    assert loaded.tensors.keys() == plan.tensors.keys()
    assert all(torch.equal(loaded.tensors[k], plan.tensors[k]) for k in plan.tensors)
    assert loaded.sha256 == plan.sha256 and len(plan.sha256) == 64


def test_plain_safetensors_reader_opens_it(plan, tmp_path):
    path = plan.save(tmp_path / "p.gora")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        assert meta["gora.format"] == "gora-plan"
        assert meta["gora.schema_version"] == str(SCHEMA_VERSION)
        manifest = json.loads(meta["gora.manifest"])
        name = manifest["modules"][0]["name"]
        a = f.get_tensor(f"{name}.lora_A")
        assert a.dtype == torch.float32 and list(a.shape) == [manifest["modules"][0]["rank"], 32]
    assert set(manifest) >= {"schema_version", "base_model", "settings", "modules", "totals"}
    assert manifest["base_model"]["fingerprint"].startswith("sha256:")
    assert set(manifest["modules"][0]) >= {"name", "shape", "rank", "importance", "share", "params"}
    assert set(manifest["totals"]) >= {"budget", "allocated", "lora_equivalent"}


def test_every_flipped_byte_is_caught(plan, tmp_path):
    path = plan.save(tmp_path / "p.gora")
    data = path.read_bytes()
    header_len = struct.unpack("<Q", data[:8])[0]
    # positions in the length prefix, the JSON header (manifest included) and the tensor data
    positions = [3, 8 + header_len // 3, 8 + header_len // 2, 8 + header_len - 40]
    positions += [8 + header_len + k * (len(data) - 8 - header_len) // 7 for k in range(7)]
    for pos in positions:
        broken = bytearray(data)
        broken[pos] ^= 0x10
        bad = tmp_path / f"flip{pos}.gora"
        bad.write_bytes(bytes(broken))
        with pytest.raises(PlanFormatError):
            goraplan.load_plan(bad)


def test_truncated_file_is_refused(plan, tmp_path):
    path = plan.save(tmp_path / "p.gora")
    cut = tmp_path / "cut.gora"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(PlanFormatError, match="truncated or corrupted"):
        goraplan.load_plan(cut)


def test_newer_schema_is_refused_with_upgrade_advice(plan, tmp_path):
    path = tmp_path / "new.gora"
    manifest = plan.manifest.model_dump_json()
    import hashlib

    save_file({k: v.contiguous() for k, v in plan.tensors.items()}, str(path), metadata={
        "gora.format": "gora-plan", "gora.schema_version": "99", "gora.manifest": manifest,
        "gora.manifest_sha256": hashlib.sha256(manifest.encode()).hexdigest()})
    with pytest.raises(PlanFormatError, match="schema v99, newer than this goraplan reads.*upgrade goraplan"):
        goraplan.load_plan(path)


def test_safetensors_file_that_is_not_a_plan(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(2, 2)}, str(path))
    with pytest.raises(PlanFormatError, match="not a GoRA plan"):
        goraplan.load_plan(path)


def test_missing_plan_and_bad_output_folders(plan, tmp_path):
    with pytest.raises(GoraError, match="does not exist"):
        goraplan.load_plan(tmp_path / "nope.gora")
    with pytest.raises(GoraError, match="output folder .* does not exist"):
        plan.save(tmp_path / "missing" / "p.gora")
    assert not list(tmp_path.glob("**/*.partial"))


def test_committed_json_schema_equals_the_code(plan):
    committed = json.loads((ROOT / "schemas" / f"gora-plan.v{SCHEMA_VERSION}.schema.json").read_text())
    assert committed == manifest_json_schema()
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(json.loads(plan.manifest.model_dump_json()), committed)


def test_rank_pattern_speaks_peft(plan):
    import re

    for key, rank in plan.rank_pattern.items():
        name = key.replace("\\", "")
        assert plan.ranks[name] == rank
        assert re.match(rf"(.*\.)?({key})$", "base_model.model." + name)
