"""What a GoRA adapter costs to serve with vLLM, next to the LoRA it replaces and the merged model.

vLLM pads every adapter to the server's ``--max-lora-rank`` and, by default, wraps every module it can
(also ones the adapter never touches). This benchmark measures, side by side in one run:

- adapters: plain LoRA r=8 and GoRA plans with r_max 8, 16 and 32 (same parameter budget, r0 = 8),
  each served at the smallest ``--max-lora-rank`` that holds it;
- one adapter per server, and 4 adapters per server (requests round-robin, ``max_loras = 4``);
- vLLM's default LoRA wrappers, and wrappers limited to the adapter's modules (``lora_target_modules``);
- the floor: the merged model (the GoRA r_max 32 adapter merged into the base) in an engine without LoRA.

Every engine is its own process (vLLM's offline engine, in-process core, greedy, ``enforce_eager``),
on CPU pinned to one core (``--core``, ``taskset``). The engines of one serving setup (the floor and one
per adapter) are started together and stay up; then, in each of ``--rounds`` rounds, every engine
generates 8 prompts x ``--new-tokens`` tokens once, in an order rotated each round. The table gives the
median tokens/s over rounds, the spread over rounds (the noise of a shared machine), and the median
ratio to the floor's tokens/s in the same round. "LoRA buffers" is what vLLM allocates for LoRA
weights: the bytes of every ``lora_*`` tensor of its LoRA wrappers, read from the live engine.

Adapters are planned on SmolLM2-135M (``smollm2-135m``) with the sarcasm headlines and trained a few
steps (throughput does not depend on the weights); they are built once under ``--work`` and reused.

    .venv/bin/python benchmarks/bench_serve.py [--vllm-python .venv-serve/bin/python] [--rounds 3]
        [--core N] [--timed-nice N] [--device cpu|cuda --dtype bfloat16] [--quick]

Results: ``benchmarks/results/serve.json`` and ``serve.md`` (``serve-cuda.*`` with ``--device cuda``).
The worker half of this file (``--worker``) runs under the serving environment's Python and imports
only the standard library and vLLM.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
MODEL = "smollm2-135m"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]
GORA_MAX_RANKS = (8, 16, 32)
N_PROMPTS, PROMPT_TOKENS = 8, 32


# ---------------------------------------------------------------------------------------------------
# Worker: one configuration in one process (serving environment; stdlib + vLLM only)


def _lora_buffers(model) -> dict:
    """Bytes of the LoRA weight buffers vLLM allocated, and how many modules it wrapped."""
    import torch
    from vllm.lora.layers import BaseLayerWithLoRA

    seen, total, wrapped, names = set(), 0, 0, set()
    for name, module in model.named_modules():
        if not isinstance(module, BaseLayerWithLoRA):
            continue
        wrapped += 1
        names.add(name.split(".")[-1])
        for attr, value in vars(module).items():
            if "lora" not in attr:
                continue
            for tensor in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(tensor, torch.Tensor) and tensor.data_ptr() not in seen:
                    seen.add(tensor.data_ptr())
                    total += tensor.numel() * tensor.element_size()
    return {"bytes": total, "wrapped_modules": wrapped, "wrapped_kinds": sorted(names)}


def worker(request_file: str) -> None:
    """Start one engine, warm it up, then answer the parent's commands on stdin, one JSON line each.

    ``run``: one timed generation of every prompt; ``done``: the LoRA buffers, then exit. vLLM's own
    output goes to stderr, so stdout carries only these lines.
    """
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    request = json.loads(Path(request_file).read_text())
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    adapters = request["adapters"]
    kwargs = {"model": request["model"], "dtype": request.get("dtype", "float32"), "enforce_eager": True,
              "max_model_len": 256, "seed": 0, "max_num_seqs": len(request["prompts"])}
    if request.get("gpu_memory_utilization"):  # several engines share one GPU
        kwargs["gpu_memory_utilization"] = request["gpu_memory_utilization"]
    if adapters:
        kwargs.update(enable_lora=True, max_lora_rank=request["max_lora_rank"], max_loras=len(adapters))
        if request.get("lora_target_modules"):
            kwargs["lora_target_modules"] = request["lora_target_modules"]
    started = time.perf_counter()
    llm = LLM(**kwargs)
    loras = [LoRARequest(f"adapter{i + 1}", i + 1, path) for i, path in enumerate(adapters)]
    per_prompt = [loras[i % len(loras)] for i in range(len(request["prompts"]))] if loras else None
    prompts = [{"prompt_token_ids": ids} for ids in request["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=request["new_tokens"], ignore_eos=True)
    warm_up = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    llm.generate(prompts, warm_up, lora_request=per_prompt, use_tqdm=False)  # loads the adapters
    print(json.dumps({"ready": True, "startup_s": time.perf_counter() - started, "vllm_version": vllm.__version__}),
          file=replies)
    for command in sys.stdin:
        if command.strip() == "run":
            begin = time.perf_counter()
            outputs = llm.generate(prompts, params, lora_request=per_prompt, use_tqdm=False)
            seconds = time.perf_counter() - begin
            tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
            print(json.dumps({"seconds": seconds, "tokens": tokens, "tokens_per_s": tokens / seconds}), file=replies)
        elif command.strip() == "done":
            # in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0): apply_model reaches the model directly
            buffers = llm.apply_model(_lora_buffers)[0] if adapters else {"bytes": 0, "wrapped_modules": 0,
                                                                           "wrapped_kinds": []}
            print(json.dumps(buffers), file=replies)
            return


# ---------------------------------------------------------------------------------------------------
# Adapters (project environment)


def _run(cmd: list[str], **kwargs) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kwargs)


def _tool(name: str) -> list[str]:
    script = Path(sys.executable).with_name(name)
    return [str(script)] if script.exists() else [sys.executable, "-m", name]


def build_gora(work: Path, max_rank: int, train_steps: int) -> Path:
    """Plan (r0 = 8, r_max = `max_rank`), train a few steps, export for PEFT/vLLM; returns the export folder."""
    out = work / f"gora{max_rank}"
    if (out / "export" / "adapter_config.json").is_file():
        return out / "export"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    _run(_tool("goraplan") + ["build", "--model", MODEL, "--data", "sarcasm-lm", "--steps", "4", "--batch-size", "2",
                              "--max-length", "48", "--rank", "8", "--max-rank", str(max_rank),
                              "-o", str(out / "plan.gora")])
    _run(_tool("gorafit") + ["run", str(out / "plan.gora"), "-o", str(out / "run"), "--max-steps", str(train_steps),
                             "--batch-size", "2", "--max-train-samples", "64", "--eval-fraction", "0",
                             "--report-to", "none", "--disable-tqdm", "--save-steps", str(train_steps)])
    _run(_tool("gorafit") + ["export", str(out / "run"), "--format", "peft", "-o", str(out / "export")])
    return out / "export"


def build_lora(work: Path, rank: int = 8) -> Path:
    """Plain LoRA r=`rank` (alpha 16) on the same modules, with random non-zero B, saved by PEFT."""
    out = work / f"lora{rank}"
    if (out / "adapter_config.json").is_file():
        return out
    import torch
    from peft import LoraConfig, get_peft_model

    from goraplan.models import load_model, resolve_model_path

    model, _ = load_model(MODEL, "causal-lm", device="cpu")
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=16, target_modules=TARGETS,
                                                  task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    peft_model.save_pretrained(out)
    config = json.loads((out / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = resolve_model_path(MODEL)
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def build_merged(work: Path, run: Path) -> Path:
    out = work / "merged"
    if not (out / "config.json").is_file():
        shutil.rmtree(out, ignore_errors=True)
        _run(_tool("gorafit") + ["export", str(run), "--format", "merged", "-o", str(out)])
    return out


def copies(adapter: Path, n: int, work: Path) -> list[str]:
    """`n` folders holding the same adapter: vLLM loads each as its own adapter."""
    paths = []
    for i in range(n):
        target = work / "copies" / f"{adapter.parent.name if adapter.name == 'export' else adapter.name}-{i + 1}"
        if not target.is_dir():
            shutil.copytree(adapter, target)
        paths.append(str(target.resolve()))
    return paths


def prompts() -> list[list[int]]:
    """8 prompts of 32 tokens cut from the sarcasm headlines (real text)."""
    from transformers import AutoTokenizer

    from benchmarks.common import packed_batches
    from goraplan.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MODEL))
    batch = packed_batches(tokenizer, "sarcasm-lm", 1, N_PROMPTS, PROMPT_TOKENS)[0]
    return batch["input_ids"].tolist()


# ---------------------------------------------------------------------------------------------------
# The run: one batch of live engines per serving setup, timed in interleaved rounds


def max_rank_of(adapter: Path) -> int:
    from gorafit.saved_adapter import module_ranks, read_adapter

    config, tensors, _ = read_adapter(adapter)
    return max(module_ranks(config, tensors).values())


def build_adapters(work: Path, train_steps: int, quick: bool) -> tuple[dict[str, Path], Path]:
    adapters = {"LoRA r=8": build_lora(work)}
    for r_max in (32,) if quick else GORA_MAX_RANKS:
        adapters[f"GoRA r_max {r_max}"] = build_gora(work, r_max, train_steps)
    merged = build_merged(work, adapters["GoRA r_max 32"].parent / "run")
    return adapters, merged


def setups(adapters: dict[str, Path], merged: Path, work: Path, quick: bool) -> list[dict]:
    """Serving setups (adapters per server x wrappers); each holds the floor and one engine per adapter."""
    from gorafit.vllm_serving import smallest_max_lora_rank
    from goraplan.models import resolve_model_path

    base = resolve_model_path(MODEL)
    out = []
    for n in (1, 4):
        for wrappers in ("default", "limited"):
            if quick and (n, wrappers) != (1, "default"):
                continue
            engines = [{"adapter": "merged model (floor)", "model": str(merged), "adapters": [], "max_lora_rank": None,
                        "lora_target_modules": None}]
            for name, path in adapters.items():
                engines.append({"adapter": name, "model": base, "adapters": copies(path, n, work),
                                "max_lora_rank": smallest_max_lora_rank(max_rank_of(path)),
                                "lora_target_modules": TARGETS if wrappers == "limited" else None})
            out.append({"adapters_per_server": n, "wrappers": wrappers, "engines": engines})
    return out


class Engine:
    """One configuration's worker process: started at once, then told to `run` (timed) and `finish`."""

    def __init__(self, config: dict, args, prompt_ids: list[list[int]], log: Path, engines: int):
        self.config = config
        self.args = args
        request = {key: config[key] for key in ("model", "adapters", "max_lora_rank", "lora_target_modules")}
        request.update(prompts=prompt_ids, new_tokens=args.new_tokens, dtype=args.dtype)
        if args.device == "cuda":
            request["gpu_memory_utilization"] = round(0.8 / engines, 3)
        self.request_file = log.with_suffix(".request.json")
        self.request_file.write_text(json.dumps(request))
        env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                   VLLM_ENABLE_V1_MULTIPROCESSING="0")
        prefix: list[str] = []
        if args.device == "cpu":
            env["VLLM_CPU_OMP_THREADS_BIND"] = str(args.core)
            prefix = ["taskset", "-c", str(args.core)]
        self.log = open(log, "w")  # noqa: SIM115 (closed in finish)
        self.proc = subprocess.Popen(prefix + [args.vllm_python, __file__, "--worker", str(self.request_file)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env=env, start_new_session=True)
        self.rounds: list[dict] = []
        self.ready: dict = {}

    def _ask(self, command: str | None) -> dict:
        if command:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise SystemExit(f"{self.config['adapter']} engine exited with code {self.proc.returncode}; "
                             f"see {self.log.name}")
        return json.loads(line)

    def wait_ready(self) -> None:
        self.ready = self._ask(None)

    def run(self) -> dict:
        """One timed generation, at `--timed-nice` for its duration when given (the engine's process group)."""
        if self.args.timed_nice is not None:
            os.setpriority(os.PRIO_PGRP, self.proc.pid, self.args.timed_nice)
        try:
            result = self._ask("run")
        finally:
            if self.args.timed_nice is not None:
                os.setpriority(os.PRIO_PGRP, self.proc.pid, os.getpriority(os.PRIO_PROCESS, 0))
        self.rounds.append(result)
        return result

    def finish(self) -> dict:
        buffers = self._ask("done")
        self.proc.wait(timeout=120)
        self.log.close()
        return buffers


def run_setup(setup: dict, args, prompt_ids: list[list[int]], logs: Path) -> list[dict]:
    """Start every engine of one setup, then `rounds` rounds: each engine generates once, order rotated."""
    tag = f"{setup['adapters_per_server']}x-{setup['wrappers']}"
    engines = [Engine(c, args, prompt_ids, logs / f"{tag}-{i}.log", len(setup["engines"]))
               for i, c in enumerate(setup["engines"])]
    try:
        for engine in engines:
            engine.wait_ready()
        for round_ in range(args.rounds):
            shift = round_ % len(engines)
            for engine in engines[shift:] + engines[:shift]:
                result = engine.run()
                print(f"[{tag} round {round_ + 1}/{args.rounds}] {engine.config['adapter']}: "
                      f"{result['tokens_per_s']:.1f} tokens/s", flush=True)
        rows = []
        floor_rounds = [r["tokens_per_s"] for r in engines[0].rounds]
        for engine in engines:
            buffers = engine.finish()
            per_round = [r["tokens_per_s"] for r in engine.rounds]
            ratios = [x / f for x, f in zip(per_round, floor_rounds)]
            median = statistics.median(per_round)
            rows.append({
                "setup": tag, "adapters_per_server": setup["adapters_per_server"] if engine.config["adapters"] else 0,
                "wrappers": setup["wrappers"] if engine.config["adapters"] else "-",
                "adapter": engine.config["adapter"], "max_lora_rank": engine.config["max_lora_rank"],
                "tokens_per_s": median, "tokens_per_s_rounds": per_round,
                "spread": (max(per_round) - min(per_round)) / median,
                "vs_floor": statistics.median(ratios), "vs_floor_rounds": ratios,
                "lora_buffer_bytes": buffers["bytes"], "wrapped_modules": buffers["wrapped_modules"],
                "wrapped_kinds": buffers["wrapped_kinds"], "startup_s": engine.ready["startup_s"],
                "vllm_version": engine.ready["vllm_version"],
            })
        return rows
    finally:
        for engine in engines:
            if engine.proc.poll() is None:
                os.killpg(engine.proc.pid, signal.SIGTERM)
                engine.proc.wait(timeout=60)


def write_markdown(path: Path, report: dict) -> None:
    stamp, rows = report["stamp"], report["results"]
    lines = [
        f"# Serving cost with vLLM ({report['device']}): LoRA r=8 vs GoRA r_max 8 / 16 / 32",
        "",
        f"- Command: `{stamp['command']}`",
        f"- Date: {stamp['date']}",
        f"- Machine: {stamp['machine']}; {report['pinning']}",
        f"- Versions: vllm {rows[0]['vllm_version']}, torch {stamp['versions']['torch']}, "
        f"peft {stamp['versions']['peft']}",
        f"- Workload: SmolLM2-135M {report['dtype']}, {N_PROMPTS} prompts of {PROMPT_TOKENS} tokens (sarcasm "
        f"headlines), {report['new_tokens']} new tokens each, greedy, enforce_eager, in-process engine "
        f"(VLLM_ENABLE_V1_MULTIPROCESSING=0). One batch of live engines per serving setup (each engine its own "
        f"process, the merged model's among them); {report['rounds']} rounds, every engine generating once per "
        f"round, order rotated each round.",
        f"- Whole run: {report['wall_s'] / 60:.1f} min.",
        "",
        "## Adapters (r0 = 8: equal parameter budget)",
        "",
        "| adapter | ranks | served at `--max-lora-rank` | trainable parameters |",
        "|---|---|---:|---:|",
    ]
    for name, info in report["adapters"].items():
        lines.append(f"| {name} | {info['min_rank']}..{info['max_rank']} | {info['bucket']} | {info['parameters']:,} |")
    lines += [
        "",
        "## Throughput and LoRA memory",
        "",
        "tokens/s: median over rounds. spread: (max - min) / median over rounds, the noise of this machine. vs floor: "
        "median over rounds of tokens/s divided by the merged model's in the same round and setup (interleaved, so "
        "load that changes between rounds cancels out). 4 adapters: 4 copies, requests round-robin, `max_loras 4`. "
        f"limited: `--lora-target-modules {' '.join(TARGETS)}` (the adapters' own modules). LoRA buffers: bytes of "
        "vLLM's `lora_*` tensors in its LoRA wrappers, read from the live engine.",
        "",
        "| setup | adapter | `--max-lora-rank` | modules wrapped | tokens/s | spread | vs floor | LoRA buffers (MiB) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setup']} | {r['adapter']} | {r['max_lora_rank'] or '-'} | {r['wrapped_modules']} | "
            f"{r['tokens_per_s']:.1f} | {100 * r['spread']:.0f}% | {r['vs_floor']:.2f} | "
            f"{r['lora_buffer_bytes'] / 2**20:.1f} |")
    lines += ["", "Per-round tokens/s (vs floor):", ""]
    lines += [f"- {r['setup']}, {r['adapter']}: " + ", ".join(
        f"{x:.1f} ({v:.2f})" for x, v in zip(r["tokens_per_s_rounds"], r["vs_floor_rounds"])) for r in rows]
    path.write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------------
# Compression's price in quality: one trained adapter, held-out loss before and after


def held_out(adapter: Path | None, examples: int) -> dict:
    """Mean completion-token loss and first-token accuracy on the sarcasm headlines' test split (base if no adapter)."""
    import torch

    from gorafit.saved_adapter import load_adapted_model
    from goraplan import data as data_mod
    from goraplan.models import load_model

    if adapter is None:
        model, tokenizer = load_model(MODEL, "causal-lm", device="cpu")
    else:
        model, tokenizer, _ = load_adapted_model(adapter, MODEL, torch.float32)
    model.eval()
    ds, _ = data_mod.prepare("sarcasm-lm", tokenizer, "causal-lm", split="test", max_length=96, limit=examples)
    batches = data_mod.make_batches(ds, data_mod.collator_for(tokenizer, "causal-lm"), 16, examples // 16)
    loss_sum, tokens, right = 0.0, 0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            targets = batch["labels"][:, 1:]
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            mask = targets != -100
            picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
            loss_sum -= float(picked[mask].sum())
            tokens += int(mask.sum())
            first = mask.int().argmax(dim=1)  # each example's first completion token (" yes" / " no")
            rows = torch.arange(len(first))
            right += int((logp[rows, first].argmax(-1) == targets[rows, first]).sum())
    n = len(batches) * 16
    return {"loss": loss_sum / tokens, "first_token_accuracy": right / n, "examples": n}


def write_compression_markdown(path: Path, report: dict) -> None:
    rows = report["rows"]
    lines = ["# Compression at export: held-out loss of one trained GoRA adapter", "",
             f"- Command: `{report['stamp']['command']}`", f"- Date: {report['stamp']['date']}",
             f"- Adapter: `goraplan build --model {MODEL} --data sarcasm-lm --rank 8 --max-rank 32 --steps 16`, then "
             f"`gorafit run` {report['train_steps']} steps of 8 examples (gorafit's defaults otherwise); exported with "
             "`gorafit export --format peft [--max-rank R]`.",
             f"- Held-out: the first {rows['base model (no adapter)']['examples']} examples of sarcasm-lm's test split "
             "(headline prompt, completion ' yes' / ' no'); loss is the mean over completion tokens, accuracy is the "
             "first completion token's argmax. One adapter, one seed: a first data point, not a quality benchmark.",
             f"- Whole run: {report['wall_s'] / 60:.1f} min.",
             "", "| adapter | served at `--max-lora-rank` | modules compressed | update norm kept | dropped (relative "
             "error) | held-out loss | first-token accuracy |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        kept = row.get("norm_kept_total")
        shown = (f"{100 * kept:.3f}% | {100 * math.sqrt(max(1 - kept**2, 0.0)):.2f}%" if kept is not None
                 else "- | -")
        lines.append(f"| {name} | {row.get('max_lora_rank') or '-'} | {row.get('modules_compressed') or '-'} | "
                     f"{shown} | {row['loss']:.4f} | {100 * row['first_token_accuracy']:.1f}% |")
    path.write_text("\n".join(lines) + "\n")


def compression_point(args) -> int:
    """Plan GoRA (r0 8, r_max 32), train it, export it uncompressed and compressed to 16 and 8, compare held-out loss."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import stamp

    started = time.perf_counter()
    work = Path(args.work) / "compression"
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "run" / "run.json").is_file():
        _run(_tool("goraplan") + ["build", "--model", MODEL, "--data", "sarcasm-lm", "--steps", "16", "--batch-size",
                                  "4", "--max-length", "96", "--rank", "8", "--max-rank", "32", "--overwrite",
                                  "-o", str(work / "plan.gora")])
        _run(_tool("gorafit") + ["run", str(work / "plan.gora"), "-o", str(work / "run"), "--overwrite",
                                 "--max-steps", str(args.train_steps), "--batch-size", "8",
                                 "--max-train-samples", str(8 * args.train_steps), "--eval-fraction", "0",
                                 "--report-to", "none", "--disable-tqdm", "--save-steps", str(args.train_steps)])
    rows = {"base model (no adapter)": {**held_out(None, args.eval_examples), "max_rank": None}}
    for max_rank in (None, 16, 8):
        out = work / f"export-{max_rank or 'full'}"
        _run(_tool("gorafit") + ["export", str(work / "run"), "--format", "peft", "-o", str(out), "--overwrite"]
             + (["--max-rank", str(max_rank)] if max_rank else []))
        record = json.loads((out / "gora_export.json").read_text())
        kept = (record.get("compression") or {}).get("norm_kept_total")
        name = f"GoRA r_max 32, compressed to {max_rank}" if max_rank else "GoRA r_max 32, uncompressed"
        rows[name] = {**held_out(out, args.eval_examples), "max_rank": max_rank, "norm_kept_total": kept,
                      "modules_compressed": (record.get("compression") or {}).get("modules_compressed"),
                      "max_lora_rank": record.get("max_lora_rank")}
        print(f"{name}: {rows[name]}", flush=True)
    report = {"stamp": stamp([Path(sys.executable).name, *sys.argv]), "train_steps": args.train_steps,
              "rows": rows, "wall_s": time.perf_counter() - started}
    (RESULTS / "serve-compression.json").write_text(json.dumps(report, indent=2))
    write_compression_markdown(RESULTS / "serve-compression.md", report)
    print(f"Wrote {RESULTS / 'serve-compression'}.json and .md in {report['wall_s'] / 60:.1f} min")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", metavar="REQUEST", help=argparse.SUPPRESS)
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-serve" / "bin" / "python"))
    parser.add_argument("--work", default=str(ROOT / "out" / "bench-serve"), help="Adapters are built here once.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=2)
    parser.add_argument("--dtype", default="float32", help="Engine dtype (bfloat16 on a GPU is the usual choice).")
    parser.add_argument("--core", type=int, default=(os.cpu_count() or 1) - 1, help="CPU core to pin to (cpu).")
    parser.add_argument("--timed-nice", type=int, default=None,
                        help="Niceness of an engine while it is timed (the rest of the run keeps this process's).")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--quick", action="store_true", help="LoRA r=8 and GoRA r_max 32, one setup: a smoke test.")
    parser.add_argument("--out", default=None, help="Result name under benchmarks/results (default serve / serve-cuda).")
    parser.add_argument("--compression", action="store_true",
                        help="Instead: held-out loss of one trained GoRA r_max 32 adapter, uncompressed and "
                        "compressed at export to 16 and 8 (serve-compression.*; --train-steps sets its training).")
    parser.add_argument("--eval-examples", type=int, default=480, help="--compression: held-out examples.")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return 0
    if args.compression:
        return compression_point(args)

    sys.path.insert(0, str(ROOT))
    from benchmarks.common import stamp
    from gorafit.saved_adapter import module_ranks, read_adapter
    from gorafit.vllm_serving import smallest_max_lora_rank

    started = time.perf_counter()
    work = Path(args.work)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    adapters, merged = build_adapters(work, args.train_steps, args.quick)
    info = {}
    for name, path in adapters.items():
        config, tensors, _ = read_adapter(path)
        ranks = module_ranks(config, tensors).values()
        info[name] = {"path": str(path), "min_rank": min(ranks), "max_rank": max(ranks),
                      "bucket": smallest_max_lora_rank(max(ranks)),
                      "parameters": sum(t.numel() for k, t in tensors.items() if "lora_" in k)}
    prompt_ids = prompts()
    rows = []
    for setup in setups(adapters, merged, work, args.quick):
        rows += run_setup(setup, args, prompt_ids, logs)
    report = {
        "stamp": stamp([Path(sys.executable).name, *sys.argv]),
        "device": args.device,
        "pinning": f"every engine pinned to core {args.core} (taskset, VLLM_CPU_OMP_THREADS_BIND)"
        + (f", timed generations at nice {args.timed_nice}" if args.timed_nice is not None else "")
        if args.device == "cpu" else "one GPU",
        "rounds": args.rounds, "new_tokens": args.new_tokens, "dtype": args.dtype,
        "adapters": info, "results": rows,
    }
    report["wall_s"] = time.perf_counter() - started
    name = args.out or ("serve" if args.device == "cpu" else f"serve-{args.device}") + ("-quick" if args.quick else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(report, indent=2))
    write_markdown(RESULTS / f"{name}.md", report)
    print(f"Wrote {RESULTS / name}.json and .md in {report['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":  # the vLLM engine spawns processes: everything runs under this guard
    sys.exit(main())
