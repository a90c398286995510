"""gorafit.compress: truncated-SVD rank lowering is exact where it should be, optimal, and PEFT reads it back."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from gorafit.cli_export import export_cmd
from gorafit.compress import compress_adapter, truncate_lora, update_singular_values
from gorafit.saved_adapter import module_ranks, module_scalings, read_adapter
from gorafit.verify import verify
from goraplan.errors import GoraError
from tests.tiny import make_tokenizer, tiny_llama

TARGETS = ["q_proj", "v_proj", "down_proj"]
RANKS = [2, 5, 8, 3, 12, 6]


def _adapter(out: Path, use_rslora: bool, alpha_pattern: bool, model=None) -> PeftModel:
    """A trained-looking adapter on a tiny Llama: heterogeneous ranks, non-zero B, optionally per-module alphas."""
    model = model if model is not None else tiny_llama()
    names = [n for n, _ in model.named_modules() if n.split(".")[-1] in TARGETS]
    config = LoraConfig(
        r=4, lora_alpha=8, use_rslora=use_rslora, target_modules=TARGETS, task_type="CAUSAL_LM",
        rank_pattern={re.escape(n): RANKS[i % len(RANKS)] for i, n in enumerate(names)},
        alpha_pattern={"down_proj": 24} if alpha_pattern else {},
    )
    peft_model = get_peft_model(model, config)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
    peft_model.save_pretrained(out)
    return peft_model


def _updates(config, tensors) -> dict[str, torch.Tensor]:
    """Dense ``s * B @ A`` per module, float64, computed independently of gorafit.compress."""
    ranks = module_ranks(config, tensors)
    scalings = module_scalings(config, ranks)
    out = {}
    for module in ranks:
        a = tensors[f"base_model.model.{module}.lora_A.weight"].double()
        b = tensors[f"base_model.model.{module}.lora_B.weight"].double()
        out[module] = scalings[module] * b @ a
    return out


def _best_rank(update: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(update, full_matrices=False)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


def test_rank_r_adapter_compressed_to_r_is_unchanged(tmp_path):
    _adapter(tmp_path / "a", use_rslora=True, alpha_pattern=True)
    config, tensors, _ = read_adapter(tmp_path / "a")
    new_config, new_tensors, report = compress_adapter(config, tensors, max(RANKS))
    assert new_config == config
    assert new_tensors.keys() == tensors.keys()
    assert all(torch.equal(new_tensors[k], tensors[k]) for k in tensors)
    assert not report.compressed and report.kept == 1.0
    assert "nothing compressed" in report.summary()


def test_refactoring_at_the_same_rank_keeps_the_update():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(6, 40, generator=g), torch.randn(30, 6, generator=g)
    new_a, new_b, sigma = truncate_lora(a, b, 8 / 6**0.5, 6, 8 / 6**0.5)
    torch.testing.assert_close(new_b.double() @ new_a.double(), b.double() @ a.double(), atol=1e-6, rtol=1e-6)
    assert sigma.numel() == 6


@pytest.mark.parametrize("rank", [1, 3, 7])
def test_error_equals_the_discarded_singular_values(rank):
    g = torch.Generator().manual_seed(rank)
    a, b = torch.randn(9, 50, generator=g, dtype=torch.float64), torch.randn(35, 9, generator=g, dtype=torch.float64)
    scaling, new_scaling = 16 / 9**0.5, 16 / rank**0.5
    new_a, new_b, sigma = truncate_lora(a, b, scaling, rank, new_scaling)
    update, approx = scaling * b @ a, new_scaling * new_b @ new_a
    assert new_a.shape == (rank, 50) and new_b.shape == (35, rank)
    reference = torch.linalg.svdvals(update)
    torch.testing.assert_close(sigma, reference[:9], rtol=1e-9, atol=1e-9)
    discarded = reference[rank:].square().sum().sqrt()
    torch.testing.assert_close(torch.linalg.matrix_norm(update - approx), discarded, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(approx, _best_rank(update, rank), rtol=1e-9, atol=1e-9)  # Eckart-Young's optimum


def test_singular_values_of_a_product():
    assert update_singular_values(torch.eye(2, 3), torch.tensor([[3.0, 0.0], [0.0, 1.0]]), -2.0).tolist() == [6.0, 2.0]


@pytest.mark.parametrize("use_rslora,alpha_pattern", [(True, True), (False, False)])
def test_compressed_adapter_loads_in_peft_as_the_truncated_update(tmp_path, use_rslora, alpha_pattern):
    _adapter(tmp_path / "a", use_rslora, alpha_pattern)
    config, tensors, metadata = read_adapter(tmp_path / "a")
    max_rank = 5
    new_config, new_tensors, report = compress_adapter(config, tensors, max_rank)

    # The report: per module and in total, from the singular values of each update.
    before = _updates(config, tensors)
    assert {m.module for m in report.compressed} == {m for m, r in module_ranks(config, tensors).items() if r > max_rank}
    for m in report.modules:
        sigma = torch.linalg.svdvals(before[m.module])
        assert m.norm == pytest.approx(float(sigma.square().sum().sqrt()), rel=1e-9)
        assert m.error == pytest.approx(float(sigma[min(m.rank, max_rank):].square().sum().sqrt()), rel=1e-6, abs=1e-9)
    total = sum(float(u.square().sum()) for u in before.values())
    kept = sum(float(_best_rank(u, max_rank).square().sum()) for u in before.values())
    assert report.kept == pytest.approx((kept / total) ** 0.5, rel=1e-9)
    assert report.relative_error == pytest.approx(((total - kept) / total) ** 0.5, rel=1e-6)
    assert report.kept**2 + report.relative_error**2 == pytest.approx(1.0, rel=1e-9)
    assert 0 < report.kept < 1 and "to rank 5" in report.summary()

    # PEFT reads the new config and tensors back: every rank fits, every module's update is its truncation.
    out = tmp_path / "compressed"
    out.mkdir()
    (out / "adapter_config.json").write_text(json.dumps(new_config))
    save_file(new_tensors, out / "adapter_model.safetensors", metadata=metadata)
    model = PeftModel.from_pretrained(tiny_llama(), out).eval()
    after = {}
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            after[name.removeprefix("base_model.model.")] = module.get_delta_weight("default").double()
            assert module.r["default"] == min(module_ranks(config, tensors)[name.removeprefix("base_model.model.")],
                                              max_rank)
    assert after.keys() == before.keys()
    for m, update in before.items():
        torch.testing.assert_close(after[m], _best_rank(update, max_rank), rtol=1e-5, atol=1e-6)
    assert max(module_ranks(new_config, new_tensors).values()) == max_rank


def test_bad_max_rank_and_dora_are_refused(tmp_path):
    _adapter(tmp_path / "a", use_rslora=True, alpha_pattern=False)
    config, tensors, _ = read_adapter(tmp_path / "a")
    with pytest.raises(GoraError, match="--max-rank must be a positive integer"):
        compress_adapter(config, tensors, 0)
    with pytest.raises(GoraError, match="DoRA adapter cannot be compressed"):
        compress_adapter(dict(config, use_dora=True), tensors, 4)
    with pytest.raises(GoraError, match="at least 1"):
        truncate_lora(torch.ones(2, 3), torch.ones(3, 2), 1.0, 0, 1.0)


# ---------------------------------------------------------------------------------------------------
# gorafit export --max-rank and gorafit verify


def test_export_max_rank_reports_what_it_kept_and_verify_states_the_change(tmp_path, capsys):
    base = tmp_path / "base"
    tokenizer = make_tokenizer()
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    _adapter(tmp_path / "adapter", use_rslora=True, alpha_pattern=True,
             model=AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32))

    out = tmp_path / "r5"
    result = CliRunner().invoke(export_cmd, [str(tmp_path / "adapter"), "--format", "peft", "--max-rank", "5",
                                             "-o", str(out)])
    assert result.exit_code == 0, result.output
    ranks = module_ranks(*read_adapter(tmp_path / "adapter")[:2])
    compressed = sorted(m for m, r in ranks.items() if r > 5)
    assert f"Compressed {len(compressed)} of {len(ranks)} modules to rank 5 by truncated SVD" in result.output
    assert all(f"  {m}: rank " in result.output for m in compressed)  # every compressed module, never silent
    assert "--max-lora-rank 8 --lora-target-modules down_proj q_proj v_proj" in result.output
    record = json.loads((out / "gora_export.json").read_text())
    assert record["compression"]["max_rank"] == 5 and 0 < record["compression"]["norm_kept_total"] < 1
    assert max(module_ranks(*read_adapter(out)[:2]).values()) == 5
    assert "Compressed at export (`--max-rank 5`)" in (out / "README.md").read_text()

    report = verify(out, prompts=["the cat sat on the", "a big red car"], max_new_tokens=6)
    assert report.ok and report.max_abs_logprob_diff < 1e-5, report.summary()  # exact against the compressed reference
    change = report.compression_change
    assert change is not None and change["max_rank"] == 5 and change["max_abs_logprob_change"] > 1e-4
    assert "Compressed to rank 5 at export" in report.summary() and "change by up to" in report.summary()

    result = CliRunner().invoke(export_cmd, [str(tmp_path / "adapter"), "--format", "merged", "--max-rank", "5",
                                             "-o", str(tmp_path / "m")])
    assert result.exit_code != 0 and "--max-rank applies to --format peft only" in str(result.exception)
