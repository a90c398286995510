"""The plan card folder: what it holds, its model card metadata, its guards, and the card of a Hub plan."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard

import goraplan
from goraplan.card import CARD_FILES, write_card
from goraplan.cli import cli
from goraplan.errors import GoraError
from tests.cli_runner import run_command
from tests.hub_cache import fill_hub_cache, folder_files, offline_hub
from tests.tiny import random_batches, tiny_llama


def run(args, capsys):
    return run_command(cli, args, capsys)


def make_plan(folder, **kwargs):
    plan = goraplan.build_plan(tiny_llama(), random_batches(2), goraplan.PlanSettings(steps=2, rank=4), **kwargs)
    return plan.save(folder / "plan.gora")


@pytest.fixture(scope="module")
def hub_plan(tmp_path_factory):
    """A plan built on a Hub model at a known commit, calibrated on a Hub data set."""
    return make_plan(tmp_path_factory.mktemp("plan"), model_name="HuggingFaceTB/SmolLM2-135M",
                     model_revision="a" * 40, data_source="team-b/reviews", data_split="train")


def test_card_folder_holds_plan_card_picture_and_provenance(hub_plan, tmp_path):
    out = write_card(hub_plan, tmp_path / "card", repo_id="team-a/sarcasm-plan", revision="v1")
    files = folder_files(out)
    assert sorted(files) == sorted(CARD_FILES)
    assert files["plan.gora"].read_bytes() == hub_plan.read_bytes()
    assert files["ranks.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    plan = goraplan.load_plan(hub_plan)

    card = ModelCard.load(files["README.md"])
    data = card.data.to_dict()
    assert data["base_model"] == "HuggingFaceTB/SmolLM2-135M" and data["base_model_revision"] == "a" * 40
    assert data["library_name"] == "goraplan" and data["datasets"] == ["team-b/reviews"]
    assert {"gora", "lora", "peft", "causal-lm"} <= set(data["tags"])
    assert data["gora"]["plan_sha256"] == plan.sha256
    assert data["gora"]["calibration_token_fingerprint"] == plan.manifest.calibration.token_fingerprint
    for command in ("gorafit run team-a/sarcasm-plan@v1 -o runs/sarcasm-plan",
                    "gorafit export runs/sarcasm-plan --format peft -o out/sarcasm-plan-adapter",
                    "--model HuggingFaceTB/SmolLM2-135M --revision " + "a" * 40 + " --enable-lora --max-lora-rank",
                    "goraplan build --model HuggingFaceTB/SmolLM2-135M --revision " + "a" * 40
                    + " --ranks-from team-a/sarcasm-plan@v1 --data YOUR_DATA"):
        assert command in card.text, command
    assert plan.sha256 in card.text and "![rank per layer](ranks.png)" in card.text

    provenance = json.loads(files["provenance.json"].read_text())
    man = plan.manifest
    assert provenance["plan_sha256"] == plan.sha256 and provenance["tool_version"] == man.tool_version
    assert provenance["settings"] == json.loads(man.settings.model_dump_json())
    assert provenance["calibration"]["token_fingerprint"] == man.calibration.token_fingerprint
    assert provenance["calibration"]["source"] == "team-b/reviews"
    assert provenance["budget"]["allocated"] == man.totals.allocated
    assert provenance["base_model"]["revision"] == "a" * 40


def test_local_model_and_data_are_not_claimed_as_hub_ids(tmp_path):
    plan = make_plan(tmp_path, model_name=str(tmp_path / "my-model"), data_source=str(tmp_path / "data.jsonl"))
    (tmp_path / "data.jsonl").write_text("{}\n")
    data = ModelCard.load(write_card(plan, tmp_path / "card") / "README.md").data.to_dict()
    assert "base_model" not in data and "datasets" not in data
    assert data["gora"]["base_model"] == str(tmp_path / "my-model")
    text = (tmp_path / "card" / "README.md").read_text()
    assert "gorafit run OWNER/NAME --model YOUR_COPY_OF_THE_BASE_MODEL -o runs/NAME" in text


def test_strings_from_the_plan_are_written_inert(tmp_path):
    plan = make_plan(tmp_path, model_name="evil\x1b[2J\nmodel", data_source="data\u202etxt.jsonl")
    text = (write_card(plan, tmp_path / "card") / "README.md").read_text()
    assert "\x1b" not in text and "\u202e" not in text
    assert "evil\\x1b[2J\\nmodel" in text and "data\\u202etxt.jsonl" in text


def test_card_never_half_written_nor_over_its_input(hub_plan, tmp_path):
    out = tmp_path / "card"
    write_card(hub_plan, out)
    with pytest.raises(GoraError, match="already exists: pass --overwrite"):
        write_card(hub_plan, out)
    write_card(hub_plan, out, overwrite=True, repo_id="team-a/x")
    assert "gorafit run team-a/x" in (out / "README.md").read_text()
    with pytest.raises(GoraError, match="contains the input"):
        write_card(out / "plan.gora", out, overwrite=True)
    with pytest.raises(GoraError, match="lies inside the input folder|is an input"):
        write_card(hub_plan, hub_plan, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["card"]  # no partial folders left


def test_card_of_a_hub_plan_on_the_command_line(hub_plan, tmp_path, monkeypatch, capsys):
    cache = offline_hub(monkeypatch, tmp_path / "hf-cache")
    fill_hub_cache(cache, "team-a/sarcasm-plan", {"plan.gora": hub_plan})
    code, out, err = run(["card", "team-a/sarcasm-plan", "-o", tmp_path / "card", "--repo", "team-a/sarcasm-plan"],
                         capsys)
    assert code == 0, err
    assert out.splitlines() == [f"wrote {tmp_path / 'card'}: plan.gora, README.md, ranks.png, provenance.json",
                                "publish it: goraplan push team-a/sarcasm-plan team-a/sarcasm-plan"]
    assert (tmp_path / "card" / "plan.gora").read_bytes() == hub_plan.read_bytes()
    code, _, err = run(["card", "team-a/other", "-o", tmp_path / "card2"], capsys)
    assert code == 2 and "not in the huggingface_hub cache" in err and not (tmp_path / "card2").exists()
