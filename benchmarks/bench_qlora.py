"""QLoRA: a GoRA plan built on the 4-bit (bitsandbytes NF4) load of SmolLM2-135M, beside the plan built on its
float32 load from the same batches; then a few training steps through PEFT on the 4-bit base.

The 4-bit weights cannot require grad, so their G comes from hooks (goraplan.hooked_gradients). The two
plans differ because the models differ (NF4 rounds every weight of the linear layers): the comparison says
how much of the float32 plan survives quantization, and the NF4 round trip in float32 arithmetic checks that
the 4-bit layers compute what their dequantized weights say (the same loss, so no kernel error).

Needs bitsandbytes (not a dependency; its CPU path runs 4-bit layers):
    pip install bitsandbytes==0.50.2
    python benchmarks/bench_qlora.py [--steps 8] [--batch-size 4] [--length 64] [--train-steps 4]
Writes benchmarks/results/qlora.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from benchmarks.common import RESULTS, stamp


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (no ties expected in importance scores)."""
    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        out = [0] * len(values)
        for position, index in enumerate(order):
            out[index] = position
        return out

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb, strict=True)) / (n * (n * n - 1))


def relative_differences(first, second, key) -> list[float]:
    """||X2 - X1|| / ||X1|| for every module where the two plans chose the same rank."""
    out = []
    for m1, m2 in zip(first.manifest.modules, second.manifest.modules, strict=True):
        if m1.rank == m2.rank:
            x1, x2 = key(first, m1.name), key(second, m1.name)
            out.append(float((x2 - x1).norm() / x1.norm()))
    return out


def b_comparison(first, second) -> dict:
    """Where the ranks agree: the cosine of the two B and the norm ratio ||B2|| / ||B1||; over all modules, the
    cosine of the two initial updates s * B @ A (defined whatever the ranks)."""
    cosine, ratio, update = [], [], []
    for m1, m2 in zip(first.manifest.modules, second.manifest.modules, strict=True):
        if m1.rank == m2.rank:
            b1, b2 = first.lora_b(m1.name).flatten(), second.lora_b(m1.name).flatten()
            cosine.append(float(torch.nn.functional.cosine_similarity(b1, b2, dim=0)))
            ratio.append(float(b2.norm() / b1.norm()))
        d1 = m1.scaling * first.lora_b(m1.name) @ first.lora_a(m1.name)
        d2 = m2.scaling * second.lora_b(m2.name) @ second.lora_a(m2.name)
        update.append(float(torch.nn.functional.cosine_similarity(d1.flatten(), d2.flatten(), dim=0)))
    return {"cosine_B_same_rank": summary(cosine), "norm_ratio_B_same_rank": summary(ratio),
            "cosine_initial_update_all": summary(update)}


def summary(values: list[float]) -> dict:
    return {"modules": len(values), "mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def nf4_round_trip_loss(model, batches) -> float:
    """The float32 model with every linear weight but the LM head replaced by its NF4 round trip."""
    import bitsandbytes.functional as bnbf

    with torch.no_grad():
        for name, layer in model.named_modules():
            if isinstance(layer, torch.nn.Linear) and not name.endswith("lm_head"):
                packed, state = bnbf.quantize_4bit(layer.weight.data, quant_type="nf4", blocksize=64)
                layer.weight.copy_(bnbf.dequantize_4bit(packed, state))
        return sum(float(model(**b).loss) for b in batches) / len(batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=4)
    args = parser.parse_args()

    import bitsandbytes
    import transformers

    from gorafit.apply import apply_plan
    from goraplan import data
    from goraplan.build import build_plan
    from goraplan.models import load_model, resolve_model_path
    from goraplan.settings import PlanSettings

    dense, tokenizer = load_model("smollm2-135m")
    started = time.perf_counter()
    quantized = transformers.AutoModelForCausalLM.from_pretrained(
        resolve_model_path("smollm2-135m"), device_map="cpu", dtype=torch.float32,
        quantization_config=transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                            bnb_4bit_compute_dtype=torch.float32))
    quantized.config.pad_token_id = dense.config.pad_token_id
    load_4bit_s = time.perf_counter() - started
    layer = quantized.model.layers[0].self_attn.q_proj

    ds, _ = data.prepare("sarcasm-lm", tokenizer, "causal-lm", max_length=args.length,
                         limit=args.steps * args.batch_size)
    batches = data.make_batches(ds, data.collator_for(tokenizer, "causal-lm"), args.batch_size, args.steps)
    settings = PlanSettings(steps=args.steps, batch_size=args.batch_size, max_length=args.length)
    plans, seconds = {}, {}
    for name, model in (("float32", dense), ("nf4", quantized)):
        started = time.perf_counter()
        plans[name] = build_plan(model, batches, settings, model_name="smollm2-135m")
        seconds[name] = time.perf_counter() - started
    full, four = plans["float32"], plans["nf4"]
    ranks_full = [m.rank for m in full.manifest.modules]
    ranks_four = [m.rank for m in four.manifest.modules]

    peft_model = apply_plan(quantized, four)
    peft_layer = peft_model.get_base_model().model.layers[0].self_attn.q_proj
    starts_at_plan = all(torch.equal(peft_model.get_base_model().get_submodule(m.name).lora_B["default"].weight,
                                     four.lora_b(m.name)) for m in four.manifest.modules)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    peft_model.train()
    losses = []
    for batch in batches[: args.train_steps]:
        loss = peft_model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))

    result = {
        **stamp(sys.argv),
        "bitsandbytes": bitsandbytes.__version__,
        "model": "smollm2-135m",
        "quantization": "bitsandbytes nf4, blocksize 64, float32 compute; every linear layer but lm_head",
        "layer_type": f"{type(layer).__module__}.{type(layer).__name__} (weight {layer.weight.dtype})",
        "peft_layer_type": f"{type(peft_layer).__module__}.{type(peft_layer).__name__}",
        "calibration": {"data": "sarcasm-lm", "steps": args.steps, "batch_size": args.batch_size,
                        "max_length": args.length},
        "load_4bit_s": load_4bit_s,
        "plan_s": seconds,
        "mean_calibration_loss": {"float32": full.manifest.calibration.mean_loss,
                                  "nf4": four.manifest.calibration.mean_loss,
                                  "float32_with_nf4_round_trip_weights": nf4_round_trip_loss(dense, batches)},
        "modules": len(ranks_full),
        "same_rank": sum(a == b for a, b in zip(ranks_full, ranks_four, strict=True)),
        "rank_within_1": sum(abs(a - b) <= 1 for a, b in zip(ranks_full, ranks_four, strict=True)),
        "spearman_importance": spearman([m.importance for m in full.manifest.modules],
                                        [m.importance for m in four.manifest.modules]),
        "relative_difference_B_same_rank": summary(relative_differences(full, four, lambda p, n: p.lora_b(n))),
        "relative_difference_A_same_rank": summary(relative_differences(full, four, lambda p, n: p.lora_a(n))),
        **b_comparison(full, four),
        "ranks": {"float32": ranks_full, "nf4": ranks_four},
        "peft_on_4bit": {"starts_at_plan": starts_at_plan, "train_losses": losses},
    }
    out = RESULTS / "qlora.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k not in ("ranks",)}, indent=1))


if __name__ == "__main__":
    main()
