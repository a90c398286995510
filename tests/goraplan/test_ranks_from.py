"""Ranks reused on new data: another plan's modules and ranks, this run's gradients, importance and B."""

from __future__ import annotations

import pytest
import torch

import goraplan
from goraplan.cli import cli
from goraplan.errors import GoraError
from goraplan.ranks_from import adopt_allocation, record_ranks_source, reusable_ranks
from goraplan.report import diff_lines, summary_lines
from tests.cli_runner import run_command
from tests.tiny import random_batches, tiny_llama


def run(args, capsys):
    return run_command(cli, args, capsys)


@pytest.fixture(scope="module")
def team_a(tmp_path_factory):
    """Team A's plan: r0=4 over all linear layers, on its data (seed 1)."""
    settings = goraplan.PlanSettings(steps=3, rank=4, max_rank=16, target_modules="all-linear")
    plan = goraplan.build_plan(tiny_llama(), random_batches(3, seed=1), settings)
    plan.save(tmp_path_factory.mktemp("a") / "a.gora")
    return plan


def test_ranks_kept_and_b_computed_on_the_new_data(team_a):
    model = tiny_llama()
    settings = adopt_allocation(goraplan.PlanSettings(steps=3, rank=8, alpha=32.0), team_a)
    assert (settings.rank, settings.target_modules, settings.alpha) == (4, "all-linear", 32.0)
    plan = goraplan.build_plan(model, random_batches(3, seed=2), settings, fixed_ranks=reusable_ranks(team_a, model))
    plan = record_ranks_source(plan, team_a, "team-a/sarcasm-plan@v1")

    assert plan.ranks == team_a.ranks
    assert plan.manifest.totals == team_a.manifest.totals
    allocated = goraplan.build_plan(tiny_llama(), random_batches(3, seed=2), settings)
    assert allocated.ranks != team_a.ranks  # the new data alone would have allocated otherwise
    for name in team_a.ranks:
        # A comes from the seed and the rank alone; B, from this run's gradients
        assert torch.equal(plan.lora_a(name), team_a.lora_a(name))
        assert not torch.allclose(plan.lora_b(name), team_a.lora_b(name))
    ours = {m.name: m.importance for m in plan.manifest.modules}
    theirs = {m.name: m.importance for m in team_a.manifest.modules}
    assert ours != theirs
    assert plan.manifest.calibration.token_fingerprint != team_a.manifest.calibration.token_fingerprint
    source = plan.manifest.ranks_from
    assert (source.source, source.plan_sha256) == ("team-a/sarcasm-plan@v1", team_a.sha256)
    assert source.token_fingerprint == team_a.manifest.calibration.token_fingerprint


def test_diff_and_inspect_say_where_the_ranks_came_from(team_a, tmp_path):
    model = tiny_llama()
    settings = adopt_allocation(goraplan.PlanSettings(steps=3), team_a)
    plan = goraplan.build_plan(model, random_batches(3, seed=2), settings, fixed_ranks=reusable_ranks(team_a, model))
    plan = record_ranks_source(plan, team_a, "a.gora")
    loaded = goraplan.load_plan(plan.save(tmp_path / "b.gora"))  # the record survives the file
    assert loaded.manifest.ranks_from == plan.manifest.ranks_from
    lines = diff_lines(team_a, loaded)
    assert "ranks: the second plan reuses the first plan's ranks (goraplan build --ranks-from)" in lines
    assert not any(line.startswith("ranks differ") for line in lines)
    spearman = next(line for line in lines if "Spearman" in line)
    top = next(line for line in lines if "top" in line)
    assert "over 14 shared modules" in spearman and "of the top 3 modules are the same" in top
    assert any(line.startswith(f"ranks from a.gora (sha256 {team_a.sha256[:16]}") for line in summary_lines(loaded))


def tiny_llama_like(**changes):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, eos_token_id=2, bos_token_id=2)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **changes}))


@pytest.mark.parametrize("changes, message", [
    ({"num_hidden_layers": 1}, r"this model has no module model\.layers\.1\.self_attn\.q_proj \(7 of its 14 modules "
                               r"are missing\)"),
    ({"num_hidden_layers": 3}, r"this model also has the target module model\.layers\.2\.self_attn\.q_proj, which "
                               r"that plan does not rank \(7 such modules\)"),
    ({"intermediate_size": 48}, r"module model\.layers\.0\.mlp\.gate_proj is 48x32 here but 64x32 in that plan"),
])
def test_other_modules_or_shapes_are_refused(team_a, changes, message):
    with pytest.raises(GoraError, match=r"^cannot reuse the ranks of a\.gora: " + message + "; ranks carry over only"):
        reusable_ranks(team_a, tiny_llama_like(**changes), "a.gora")


def test_build_ranks_from_on_the_command_line(tiny_model_dir, tiny_text_data, tmp_path, capsys, cli_env):
    common = ["--model", tiny_model_dir, "--steps", 2, "--batch-size", 2, "--max-length", 16]
    code, _, err = run(["build", *common, "--data", tiny_text_data, "--rank", 4, "-o", tmp_path / "a.gora"], capsys)
    assert code == 0, err
    other_data = tmp_path / "other.jsonl"
    other_data.write_text("".join(line + "\n" for line in reversed(tiny_text_data.read_text().splitlines())))
    code, out, err = run(["build", *common, "--data", other_data, "--ranks-from", tmp_path / "a.gora",
                          "-o", tmp_path / "b.gora"], capsys)
    assert code == 0, err
    a, b = goraplan.load_plan(tmp_path / "a.gora"), goraplan.load_plan(tmp_path / "b.gora")
    assert f"ranks and target modules from {tmp_path / 'a.gora'} (sha256 {a.sha256[:16]})" in out
    assert b.ranks == a.ranks and b.manifest.settings.rank == 4
    assert b.manifest.ranks_from.plan_sha256 == a.sha256
    assert any(not torch.equal(b.lora_b(n), a.lora_b(n)) for n in a.ranks)
    code, out, _ = run(["diff", tmp_path / "a.gora", tmp_path / "b.gora"], capsys)
    assert code == 0 and "the second plan reuses the first plan's ranks" in out and "Spearman" in out

    code, out, err = run(["build", *common, "--data", other_data, "--ranks-from", tmp_path / "a.gora", "--rank", 8,
                          "-o", tmp_path / "c.gora"], capsys)
    assert code == 2 and err == "Error: --ranks-from takes --rank from that plan: drop --rank.\n"
    code, out, err = run(["build", *common, "--data", other_data, "--ranks-from", tmp_path / "a.gora",
                          "-o", tmp_path / "a.gora", "--overwrite"], capsys)
    assert code == 2 and "is an input" in err and not (tmp_path / "c.gora").exists()
