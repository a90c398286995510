"""Plans that fit a vLLM serving bucket: `--serve-rank` caps r_max at an allowed --max-lora-rank, the budget holds."""

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from goraplan.allocate import SERVING_RANKS, allocate_ranks, lora_budget, padded_parameters, serving_rank
from goraplan.cli import cli
from goraplan.errors import GoraError
from goraplan.settings import PlanSettings, make_settings
from tests.cli_runner import run_command

SHAPES = [(576, 576), (192, 576), (576, 1536), (1536, 576)]


def test_serving_rank_is_the_smallest_allowed_value_that_holds():
    assert [serving_rank(r) for r in (1, 2, 8, 9, 16, 17, 24, 32, 33, 300, 320, 321, 512)] == \
        [1, 8, 8, 16, 16, 32, 32, 32, 64, 320, 320, 512, 512]
    assert serving_rank(513) is None
    assert padded_parameters({"a": 100, "b": 50}, 16) == 2400


def test_serve_rank_caps_the_default_max_rank_and_only_that():
    assert PlanSettings(rank=8, serve_rank=8).resolved().max_rank == 8
    assert PlanSettings(rank=8, serve_rank=64).resolved().max_rank == 16  # 2 * r0 already fits
    assert PlanSettings(rank=8, serve_rank=16, max_rank=12).resolved().max_rank == 12
    assert PlanSettings(rank=8).resolved().serve_rank is None


@pytest.mark.parametrize("values,message", [
    ({"serve_rank": 24}, "serve rank 24 is not a value of vLLM's --max-lora-rank: use one of 1, 8, 16, 32"),
    ({"serve_rank": 16, "max_rank": 32}, "max rank 32 is above serve rank 16"),
    ({"serve_rank": 8, "rank": 16}, r"rank 16 \(r0\) is above serve rank 8"),
])
def test_bad_serve_rank_is_one_sentence(values, message):
    with pytest.raises(GoraError, match=message):
        make_settings(**values)


@st.composite
def layer_sets(draw):
    n = draw(st.integers(1, 30))
    raw = [x**3 + 1e-6 for x in draw(st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=n, max_size=n))]
    shares = {f"m{i}": x / sum(raw) for i, x in enumerate(raw)}
    costs = {f"m{i}": sum(draw(st.sampled_from(SHAPES))) for i in range(n)}
    r0 = draw(st.sampled_from([1, 2, 4, 8, 16]))
    serve = draw(st.sampled_from([s for s in SERVING_RANKS if s >= r0 and s <= 128]))
    return shares, costs, r0, serve


@settings(max_examples=200, deadline=None)
@given(layer_sets())
def test_allocation_within_a_serving_bucket_respects_budget_and_bucket(case):
    shares, costs, r0, serve = case
    resolved = PlanSettings(rank=r0, serve_rank=serve).resolved()
    ranks = allocate_ranks(shares, costs, r0, resolved.min_rank, resolved.max_rank, "exact")
    assert max(ranks.values()) <= serve and serving_rank(max(ranks.values())) <= serve
    assert sum(ranks[n] * costs[n] for n in ranks) <= lora_budget(costs, r0)
    assert padded_parameters(costs, serve) >= sum(ranks[n] * costs[n] for n in ranks)


def _run(args, capsys):
    return run_command(cli, args, capsys)


def test_build_serve_rank_records_the_bucket_and_inspect_shows_it(tiny_model_dir, tiny_text_data, tmp_path, capsys,
                                                                  cli_env):
    build = ["build", "--model", tiny_model_dir, "--data", tiny_text_data, "--steps", 2, "--batch-size", 2,
             "--rank", 4, "--max-length", 32]
    code, _, err = _run([*build, "--serve-rank", 8, "-o", tmp_path / "p.gora"], capsys)
    assert code == 0, err
    code, out, _ = _run(["inspect", tmp_path / "p.gora", "--json"], capsys)
    manifest = json.loads(out)
    ranks = [m["rank"] for m in manifest["modules"]]
    assert manifest["settings"]["serve_rank"] == 8 and manifest["settings"]["max_rank"] == 8 and max(ranks) <= 8
    assert manifest["totals"]["allocated"] <= manifest["totals"]["budget"]
    code, out, _ = _run(["inspect", tmp_path / "p.gora"], capsys)
    padded = 8 * sum(sum(m["shape"]) for m in manifest["modules"])
    assert code == 0 and "vLLM --max-lora-rank 8 (set by --serve-rank)" in out and f"{padded:,} params" in out

    code, _, err = _run([*build, "--serve-rank", 12, "-o", tmp_path / "q.gora"], capsys)
    assert code == 2 and "serve rank 12 is not a value of vLLM's --max-lora-rank" in err
    assert not (tmp_path / "q.gora").exists()
    code, _, err = _run([*build, "--ranks-from", tmp_path / "p.gora", "--serve-rank", 8, "-o", tmp_path / "r.gora"],
                        capsys)
    assert code == 2 and "--ranks-from takes" in err and "--serve-rank from that plan" in err
