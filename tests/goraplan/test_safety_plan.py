"""Hostile plans: crafted with recomputed checksums (so they pass the checksum test), each refused with one
sentence, or shown without letting their strings act on the terminal."""

from __future__ import annotations

import copy
import hashlib
import json
import math
import re
import struct

import pytest
import torch
from safetensors.torch import save_file

import goraplan
from goraplan.cli import cli
from goraplan.errors import GoraError
from tests.cli_runner import run_command
from tests.tiny import random_batches, tiny_llama


@pytest.fixture(scope="module")
def plan():
    return goraplan.build_plan(tiny_llama(), random_batches(4), goraplan.PlanSettings(steps=4, rank=4))


@pytest.fixture()
def parts(plan):
    """A valid plan as (manifest dict, tensors) to mutate; `craft` writes it back with fresh checksums."""
    return json.loads(plan.manifest.model_dump_json()), {k: v.clone() for k, v in plan.tensors.items()}


def old_style_sha256(t: torch.Tensor) -> str:
    """The checksum as plans have always been written: sha256 of the float32 cast's bytes."""
    return hashlib.sha256(t.to(torch.float32).contiguous().numpy().tobytes()).hexdigest()


def craft(path, manifest, tensors, *, header_version="1", checksums=True, raw_manifest=None):
    """Write a plan exactly as an attacker would: every checksum recomputed over what is written."""
    if checksums:
        manifest["checksums"] = {k: old_style_sha256(v) for k, v in tensors.items()}
    raw = raw_manifest if raw_manifest is not None else json.dumps(manifest)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={
        "gora.format": "gora-plan", "gora.schema_version": header_version, "gora.manifest": raw,
        "gora.manifest_sha256": hashlib.sha256(raw.encode()).hexdigest()})
    return path


def consistent(manifest):
    """Recompute the derived fields (params, scaling, totals) the way build does, after a mutation."""
    s = manifest["settings"]
    for m in manifest["modules"]:
        m["params"] = m["rank"] * sum(m["shape"])
        m["scaling"] = s["alpha"] / math.sqrt(m["rank"])
    budget = s["rank"] * sum(sum(m["shape"]) for m in manifest["modules"])
    allocated = sum(m["params"] for m in manifest["modules"])
    manifest["totals"] = {"budget": budget, "allocated": allocated, "lora_equivalent": budget,
                          "ratio": allocated / budget if budget else 0.0}
    return manifest


def refused(path, match=None):
    with pytest.raises(GoraError, match=match) as exc:
        goraplan.load_plan(path)
    return str(exc.value)


def cli_run(args, capsys):
    return run_command(cli, args, capsys)


def test_a_crafted_valid_plan_loads(parts, plan, tmp_path):
    manifest, tensors = parts
    loaded = goraplan.load_plan(craft(tmp_path / "ok.gora", consistent(manifest), tensors))
    assert loaded.manifest == plan.manifest  # the helpers reproduce a valid plan bit for bit


# ------------------------------------------------------------------------------------------ item 8: non-finite
@pytest.mark.parametrize("where", ["lora_A", "lora_B"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_tensor_values_are_refused(parts, tmp_path, where, value):
    manifest, tensors = parts
    name = next(k for k in tensors if k.endswith(where))
    tensors[name][0, 0] = value
    assert "NaN or infinite" in refused(craft(tmp_path / "bad.gora", manifest, tensors))


@pytest.mark.parametrize("field", ["settings.alpha", "modules.0.scaling", "modules.0.importance",
                                   "modules.0.share", "calibration.mean_loss", "totals.ratio"])
@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_non_finite_manifest_numbers_are_refused(parts, tmp_path, field, literal):
    manifest, tensors = parts
    marker = "__HOSTILE__"
    node = manifest
    *route, last = field.split(".")
    for key in route:
        node = node[int(key)] if key.isdigit() else node[key]
    node[last] = marker
    craft(tmp_path / "x.gora", manifest, tensors)  # fills the checksums
    raw = json.dumps(manifest).replace(f'"{marker}"', literal)
    path = craft(tmp_path / "bad.gora", manifest, tensors, checksums=False, raw_manifest=raw)
    refused(path)


# ------------------------------------------------------------------------------------------ item 9: derived fields
def test_rank_above_max_rank_is_refused(parts, tmp_path):
    manifest, tensors = parts
    top = max(m["rank"] for m in manifest["modules"])
    manifest["settings"]["max_rank"] = top - 1  # r0 = 4 stays within [min_rank, max_rank]
    assert refused(craft(tmp_path / "bad.gora", manifest, tensors), "rank")


def test_rank_above_the_matrix_size_is_refused(parts, tmp_path):
    manifest, tensors = parts
    m = manifest["modules"][0]
    out_f, in_f = m["shape"]
    m["rank"] = min(out_f, in_f) + 1
    manifest["settings"]["max_rank"] = 64
    tensors[f"{m['name']}.lora_A"] = torch.zeros(m["rank"], in_f)
    tensors[f"{m['name']}.lora_B"] = torch.zeros(out_f, m["rank"])
    assert "matrix" in refused(craft(tmp_path / "bad.gora", consistent(manifest), tensors))


@pytest.mark.parametrize("mutate", [
    lambda m: m["modules"][0].update(params=m["modules"][0]["params"] + 1),
    lambda m: m["modules"][0].update(scaling=m["modules"][0]["scaling"] * 2),
    lambda m: m["modules"][0].update(share=m["modules"][0]["share"] + 0.1),
    lambda m: m["modules"][0].update(importance=-1.0),
    lambda m: m["totals"].update(allocated=m["totals"]["allocated"] + 1),
    lambda m: m["totals"].update(budget=m["totals"]["budget"] * 2, lora_equivalent=m["totals"]["budget"] * 2),
    lambda m: m["totals"].update(ratio=0.5),
    lambda m: m["modules"].append(copy.deepcopy(m["modules"][0])),
], ids=["params", "scaling", "share", "importance", "allocated", "budget", "ratio", "duplicate-module"])
def test_derived_fields_that_disagree_are_refused(parts, tmp_path, mutate):
    manifest, tensors = parts
    mutate(manifest)
    refused(craft(tmp_path / "bad.gora", manifest, tensors), "inconsistent manifest|does not match its manifest")


def test_header_and_manifest_versions_must_agree(parts, tmp_path):
    manifest, tensors = parts
    assert "disagrees" in refused(craft(tmp_path / "bad.gora", manifest, tensors, header_version="0"))


def test_duplicate_json_keys_are_refused(parts, tmp_path):
    manifest, tensors = parts
    craft(tmp_path / "x.gora", manifest, tensors)
    raw = json.dumps(manifest)
    raw = raw[:-1] + ', "totals": ' + json.dumps(manifest["totals"]) + "}"  # same value, said twice
    assert "twice" in refused(craft(tmp_path / "bad.gora", manifest, tensors, checksums=False, raw_manifest=raw))


def test_duplicate_keys_in_the_safetensors_header_are_refused(parts, tmp_path):
    manifest, tensors = parts
    data = craft(tmp_path / "ok.gora", manifest, tensors).read_bytes()
    size = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + size])
    first = next(k for k in header if k != "__metadata__")
    text = json.dumps(header)
    text = text[:-1] + f", {json.dumps(first)}: {json.dumps(header[first])}" + "}"
    body = text.encode()
    (tmp_path / "bad.gora").write_bytes(struct.pack("<Q", len(body)) + body + data[8 + size:])
    refused(tmp_path / "bad.gora")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64, torch.int64])
def test_only_float32_tensors_are_accepted(parts, tmp_path, dtype):
    manifest, tensors = parts
    name = next(iter(tensors))
    tensors[name] = tensors[name].to(dtype)  # checksum of its float32 cast, as the old checksum was defined
    assert "float32" in refused(craft(tmp_path / "bad.gora", manifest, tensors))


def test_checksums_pin_the_stored_bytes(parts, tmp_path):
    """Two files whose tensors have the same float32 values but different stored bytes cannot both match."""
    manifest, tensors = parts
    name = next(iter(tensors))
    tensors[name] = tensors[name].to(torch.float64)  # same float32 cast, different bytes on disk
    refused(craft(tmp_path / "bad.gora", manifest, tensors))


# ------------------------------------------------------------------------------------------ tracebacks -> one sentence
@pytest.mark.parametrize("raw", ["[1, 2]", '"plan"', "null", "3"])
def test_manifest_that_is_not_an_object(parts, tmp_path, raw, capsys):
    manifest, tensors = parts
    path = craft(tmp_path / "bad.gora", manifest, tensors, raw_manifest=raw)
    assert "not an object" in refused(path)
    code, out, err = cli_run(["inspect", path], capsys)
    assert code == 2 and err.startswith("Error: ") and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("version", [None, [1], "x", "1", True, 1.0, 2])
def test_schema_version_of_the_wrong_type(parts, tmp_path, version, capsys):
    manifest, tensors = parts
    manifest["schema_version"] = version
    path = craft(tmp_path / "bad.gora", manifest, tensors)
    refused(path)
    code, _, err = cli_run(["validate", path], capsys)
    assert code == 2 and err.startswith("Error: ") and err.count("\n") == 1


@pytest.mark.parametrize("command", ["inspect", "validate"])
def test_empty_modules_list(parts, tmp_path, command, capsys):
    manifest, _ = parts
    manifest["modules"] = []
    path = craft(tmp_path / "empty.gora", consistent(manifest), {})
    assert "no modules" in refused(path)
    code, _, err = cli_run([command, path], capsys)
    assert code == 2 and "no modules" in err and err.count("\n") == 1


@pytest.mark.parametrize("seed", [-1, 2**32, 2**64])
def test_seed_outside_32_bits_is_refused(parts, tmp_path, seed):
    manifest, tensors = parts
    manifest["settings"]["seed"] = seed
    refused(craft(tmp_path / "bad.gora", manifest, tensors), "seed")


def test_seq_cls_plan_with_one_class_is_refused(parts, tmp_path):
    manifest, tensors = parts
    manifest["task"] = manifest["settings"]["task"] = "seq-cls"
    manifest["labels"] = ["only"]
    assert "two distinct" in refused(craft(tmp_path / "bad.gora", manifest, tensors))


def test_auto_step_size_without_its_search_is_refused(parts, tmp_path, capsys):
    manifest, tensors = parts
    manifest["settings"]["step_size"] = "auto"  # inspect formatted gamma with :g and crashed
    path = craft(tmp_path / "bad.gora", manifest, tensors)
    refused(path)
    code, _, err = cli_run(["inspect", path], capsys)
    assert code == 2 and err.count("\n") == 1


# ------------------------------------------------------------------------------------------ item 7: control characters
FORGED = "\x1b[2J\x1b[H\nmodel    trusted (verified)\r\x07\u202e"
CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def hostile_plan(parts, tmp_path, name="evil.gora"):
    manifest, tensors = parts
    manifest["base_model"]["name_or_path"] = "org/model" + FORGED
    manifest["calibration"]["source"] = "data.jsonl" + FORGED
    manifest["calibration"]["split"] = "train" + FORGED
    old = manifest["modules"][0]["name"]
    new = old.replace("q_proj", "q_proj" + FORGED)
    manifest["modules"][0]["name"] = new
    for end in (".lora_A", ".lora_B"):
        tensors[new + end] = tensors.pop(old + end)
    return craft(tmp_path / name, manifest, tensors)


def assert_inert(text):
    assert not CONTROL.search(text), repr(text)
    assert not any(line.startswith("model    trusted") for line in text.splitlines())


def test_inspect_validate_diff_escape_strings_from_the_plan(parts, plan, tmp_path, capsys):
    path = hostile_plan(parts, tmp_path)
    other = plan.save(tmp_path / "plain.gora")
    for args in (["inspect", path], ["validate", path], ["diff", path, other], ["diff", other, path]):
        code, out, err = cli_run(args, capsys)
        assert code == 0, err
        assert_inert(out + err)
        assert "\\x1b[2J" in out or args[0] == "validate"  # escaped, still readable


def test_error_messages_escape_what_they_quote_from_the_plan(parts, tmp_path, capsys):
    manifest, tensors = parts
    manifest["surprise" + FORGED] = 1  # an unknown key: the error names it
    path = craft(tmp_path / "bad.gora", manifest, tensors)
    code, _, err = cli_run(["inspect", path], capsys)
    assert code == 2 and err.count("\n") == 1
    assert_inert(err)
