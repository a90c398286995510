"""A plan holds across float32, bfloat16 and float16 loads of one checkpoint, and still refuses another."""

from __future__ import annotations

import pytest
import torch

from goraplan.build import build_plan
from goraplan.cli import cli
from goraplan.cli_support import run_cli
from goraplan.fingerprint import compare_weight, weight_digests
from goraplan.match import ModelMismatchError, check_model_matches
from goraplan.plan import Plan
from goraplan.settings import PlanSettings
from tests.tiny import random_batches, tiny_llama


@pytest.fixture(scope="module")
def fp32_plan() -> Plan:
    return build_plan(tiny_llama(), random_batches(2), PlanSettings(rank=4, steps=2))


def loaded(dtype: torch.dtype, shift: float = 0.0) -> torch.nn.Module:
    """The tiny checkpoint loaded in `dtype` (round to nearest, as from_pretrained does), optionally changed."""
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] += shift
    return model.to(dtype)


def test_digests_of_a_weight_and_its_roundings():
    w = torch.randn(8, 16)
    d = weight_digests(w)
    assert set(d.rounded) == {"bfloat16", "float16"}
    assert weight_digests(w.to(torch.bfloat16)).exact == d.rounded["bfloat16"]
    assert weight_digests(w.to(torch.bfloat16)).rounded == {}  # nothing is coarser than bfloat16 here
    assert compare_weight(w.to(torch.float16), d, "float32") == "same"
    assert compare_weight(w, weight_digests(w.to(torch.bfloat16)), "bfloat16") == "same"
    assert compare_weight(w.to(torch.float16), weight_digests(w.to(torch.bfloat16)), "bfloat16") == "unknown"
    w2 = w.clone()
    w2[3, 3] += 0.05
    assert compare_weight(w2.to(torch.bfloat16), d, "float32") == "differs"
    assert compare_weight(w2, d, "float32") == "differs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_a_float32_plan_matches_every_load_of_its_checkpoint(fp32_plan, dtype):
    note = check_model_matches(fp32_plan, loaded(dtype))
    if dtype == torch.float32:
        assert note is None
    else:
        name = str(dtype).removeprefix("torch.")
        assert note == f"the plan was built on a float32 load and the model is loaded in {name}: compared at {name} precision"


def test_a_bfloat16_plan_matches_the_float32_load():
    plan = build_plan(tiny_llama().to(torch.bfloat16), random_batches(2), PlanSettings(rank=4, steps=2))
    assert plan.manifest.base_model.dtype == "bfloat16"
    assert "bfloat16 precision" in check_model_matches(plan, loaded(torch.float32))
    with pytest.raises(ModelMismatchError, match="loaded in float16 but the plan was built on a bfloat16 load"):
        check_model_matches(plan, loaded(torch.float16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_another_checkpoint_is_still_refused(fp32_plan, dtype):
    message = "the weight of model.layers.1.self_attn.v_proj differs from the one the plan was built on"
    if dtype == torch.bfloat16:
        message += r" \(.*\) \(planned on a float32 load, loaded in bfloat16: not the same weights at bfloat16 precision"
    with pytest.raises(ModelMismatchError, match=message):
        check_model_matches(fp32_plan, loaded(dtype, shift=0.05))


def test_an_older_plan_names_the_dtype(fp32_plan):
    """Plans written before rounded digests: same weights in bfloat16 cannot be confirmed; say it is the dtype."""
    old = fp32_plan.manifest.model_copy(update={
        "modules": [m.model_copy(update={"weight_sha256_rounded": {}}) for m in fp32_plan.manifest.modules]})
    old_plan = Plan(old, fp32_plan.tensors)
    assert check_model_matches(old_plan, loaded(torch.float32)) is None
    with pytest.raises(ModelMismatchError, match=r"loaded in bfloat16 but the plan was built on a float32 load .*dtype "
                                                 r"may be the only difference\): load the model in float32 \(--dtype float32\)"):
        check_model_matches(old_plan, loaded(torch.bfloat16))


def test_validate_dtype_bfloat16(tiny_model_dir, tiny_text_data, tmp_path, capsys, cli_env):
    def run(args):
        with pytest.raises(SystemExit) as exc:
            run_cli(cli, [str(a) for a in args])
        return exc.value.code, *capsys.readouterr()

    code, _, err = run(["build", "--model", tiny_model_dir, "--data", tiny_text_data, "--steps", 2, "--batch-size", 2,
                        "--rank", 4, "--max-length", 32, "-o", tmp_path / "p.gora"])
    assert code == 0, err
    code, out, err = run(["validate", tmp_path / "p.gora", "--model", tiny_model_dir, "--dtype", "bfloat16"])
    assert code == 0, err
    assert "matches the plan (shapes and weight fingerprint; the plan was built on a float32 load and the model is " \
           "loaded in bfloat16: compared at bfloat16 precision)" in out


@pytest.mark.slow
def test_smollm2_float32_plan_validates_in_bfloat16(tmp_path, capsys):
    from goraplan.data import collator_for, make_batches, prepare
    from goraplan.models import load_model

    model, tok = load_model("smollm2-135m")
    ds, _ = prepare("quotes", tok, "causal-lm", max_length=32, limit=1)
    plan = build_plan(model, make_batches(ds, collator_for(tok, "causal-lm"), 1, 1),
                      PlanSettings(steps=1, batch_size=1, max_length=32), model_name="smollm2-135m")
    plan.save(tmp_path / "p.gora")
    with pytest.raises(SystemExit) as exc:
        run_cli(cli, ["validate", str(tmp_path / "p.gora"), "--model", "smollm2-135m", "--dtype", "bfloat16"])
    out, err = capsys.readouterr()
    assert exc.value.code == 0, err
    assert "compared at bfloat16 precision" in out
