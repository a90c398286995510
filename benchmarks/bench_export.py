"""Export formats and vLLM serving, measured on SmolLM2-135M with a GoRA-shaped adapter.

1. Each export format (peft, peft --vllm-legacy, merged float32, merged bfloat16, onnx) runs in its own
   subprocess; the parent reads that child's peak resident memory (``ru_maxrss`` from ``os.wait4``)
   and wall time. A child that only imports the libraries gives the floor to compare with.
2. vLLM (CPU) generation throughput with the adapter and without it, side by side in one engine
   (interleaved, after a warm-up), and the base model in an engine started without LoRA support.

Results: ``benchmarks/results/export.json`` and ``export.md``, stamped with the command, versions,
date and machine.

    .venv/bin/python benchmarks/bench_export.py [--vllm-python .venv-serve/bin/python] [--skip-vllm]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from goraplan.provenance import library_versions

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
FORMATS = {
    "import-only": {},
    "peft": {"format": "peft"},
    "peft-legacy": {"format": "peft", "vllm_legacy": True},
    "merged-float32": {"format": "merged", "dtype": "float32"},
    "merged-bfloat16": {"format": "merged", "dtype": "bfloat16"},
    "onnx": {"format": "onnx"},
}
RANKS = [4, 8, 12, 16, 24, 32]  # cycled over the modules: heterogeneous, as GoRA plans them


# ---------------------------------------------------------------------------------------------------
# Child: one export in a fresh process


def child(name: str, adapter: str, out: str) -> None:
    import torch  # noqa: F401  (the floor: what every export imports)

    from gorafit import export

    spec = FORMATS[name]
    started = time.perf_counter()
    if spec.get("format") == "peft":
        export.export_peft(adapter, out, vllm_legacy=spec.get("vllm_legacy", False))
    elif spec.get("format") == "merged":
        export.export_merged(adapter, out, dtype=spec["dtype"])
    elif spec.get("format") == "onnx":
        export.export_onnx(adapter, out)
    seconds = time.perf_counter() - started
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file()) if Path(out).exists() else 0
    print(json.dumps({"export_s": seconds, "output_bytes": size, "vm_hwm_mib": vm_hwm_mib()}))


def vm_hwm_mib() -> float | None:
    """This process's own peak RSS (VmHWM): counts only memory touched since exec, unlike ru_maxrss."""
    try:
        line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith("VmHWM"))
        return int(line.split()[1]) / 1024
    except (OSError, StopIteration):
        return None


def prepare(model: str, folder: str, existing: str | None = None) -> None:
    """Child: resolve the base model and make the adapter, so the parent stays small (see `measure`)."""
    from gorafit.saved_adapter import module_ranks, read_adapter
    from goraplan.models import resolve_model_path

    base_path = resolve_model_path(model)
    adapter = Path(existing) if existing else make_adapter(base_path, Path(folder))
    config, tensors, _ = read_adapter(adapter)
    ranks = module_ranks(config, tensors)
    print(json.dumps({"base_path": base_path, "adapter": str(adapter), "modules": len(ranks),
                      "min_rank": min(ranks.values()), "max_rank": max(ranks.values()),
                      "bytes": (adapter / "adapter_model.safetensors").stat().st_size}))


def measure(name: str, adapter: Path, out: Path) -> dict:
    """Run one child export and read its own peak RSS with os.wait4 (not the sum over children).

    Linux carries the parent's RSS at fork time into the child's ru_maxrss (exec records the old
    address space's high-water mark), so the parent must stay small: it never imports torch before
    the exports are measured. The child's own VmHWM is recorded beside it as a cross-check.
    """
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, __file__, "--child", name, "--adapter", str(adapter), "--out", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    stdout = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"export {name} failed (exit {proc.returncode}); run it alone: "
                         f"{sys.executable} {__file__} --child {name} --adapter {adapter} --out {out}")
    row = {"format": name, "process_wall_s": wall, "peak_rss_mib": usage.ru_maxrss / 1024}  # ru_maxrss: KiB on Linux
    row.update(json.loads(stdout.strip().splitlines()[-1]))
    return row


# ---------------------------------------------------------------------------------------------------
# The adapter


def make_adapter(base_path: str, folder: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    names = [n for n, _ in model.named_modules() if n.split(".")[-1] in targets]
    config = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=targets, init_lora_weights=True,
                        task_type="CAUSAL_LM", rank_pattern={re.escape(n): RANKS[i % len(RANKS)] for i, n in enumerate(names)})
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.002)
    peft_model.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------
# vLLM throughput


def vllm_throughput(python: str, base_path: str, adapter: Path, prompts: int, prompt_len: int, new_tokens: int,
                    rounds: int) -> dict:
    from gorafit.saved_adapter import read_adapter
    from gorafit.vllm_serving import run_vllm_jobs, smallest_max_lora_rank

    config, _, _ = read_adapter(adapter)
    max_rank = max([config["r"], *(config.get("rank_pattern") or {}).values()])
    import torch

    generator = torch.Generator().manual_seed(0)
    batch = torch.randint(100, 40000, (prompts, prompt_len), generator=generator).tolist()
    warm = [{"name": "warmup-base", "adapter": None, "prompts": batch[:2], "max_tokens": 8, "logprobs": False},
            {"name": "warmup-adapter", "adapter": str(adapter), "prompts": batch[:2], "max_tokens": 8, "logprobs": False}]
    jobs = list(warm)
    for i in range(rounds):  # interleaved, so drift in machine load hits both alike
        jobs.append({"name": f"base#{i}", "adapter": None, "prompts": batch, "max_tokens": new_tokens, "logprobs": False})
        jobs.append({"name": f"adapter#{i}", "adapter": str(adapter), "prompts": batch, "max_tokens": new_tokens,
                     "logprobs": False})
    common = {"model": base_path, "dtype": "float32", "max_model_len": prompt_len + new_tokens + 16,
              "max_num_seqs": prompts}
    lora = run_vllm_jobs(dict(common, max_lora_rank=smallest_max_lora_rank(max_rank), jobs=jobs), python, timeout=3600)
    plain_jobs = [dict(warm[0])] + [{"name": f"base#{i}", "adapter": None, "prompts": batch, "max_tokens": new_tokens,
                                     "logprobs": False} for i in range(rounds)]
    plain = run_vllm_jobs(dict(common, jobs=plain_jobs), python, timeout=3600)

    def rate(result: dict, prefix: str) -> dict:
        runs = [job for name, job in result["jobs"].items() if name.startswith(prefix + "#")]
        tokens = sum(job["generated_tokens"] for job in runs)
        seconds = sum(sum(job["seconds"]) for job in runs)
        per_round = [job["generated_tokens"] / sum(job["seconds"]) for job in runs]
        return {"tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
                "tokens_per_s_rounds": per_round}

    return {
        "vllm_version": lora["vllm_version"],
        "prompts": prompts, "prompt_tokens": prompt_len, "new_tokens": new_tokens, "rounds": rounds,
        "max_lora_rank": smallest_max_lora_rank(max_rank),
        "lora_engine_startup_s": lora["startup_s"], "plain_engine_startup_s": plain["startup_s"],
        "lora_engine_without_adapter": rate(lora, "base"),
        "lora_engine_with_adapter": rate(lora, "adapter"),
        "plain_engine_without_lora": rate(plain, "base"),
    }


# ---------------------------------------------------------------------------------------------------
# Stamp and write


def machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        mem = 0
    return {"platform": platform.platform(), "cpu": cpu, "logical_cpus": os.cpu_count(),
            "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "memory_gib": round(mem / 1024 / 1024, 1), "python": platform.python_version()}


def versions() -> dict:
    return library_versions(("goraplan", "torch", "transformers", "peft", "safetensors", "onnx", "onnxscript",
                             "onnxruntime"))


def write_markdown(result: dict, path: Path) -> None:
    lines = [
        "# Export formats and vLLM serving (SmolLM2-135M, GoRA-shaped adapter)",
        "",
        f"- Command: `{result['command']}`",
        f"- Date: {result['date']}",
        f"- Machine: {result['machine']['cpu']}, {result['machine']['usable_cpus']} usable of "
        f"{result['machine']['logical_cpus']} logical CPUs, {result['machine']['memory_gib']} GiB, "
        f"{result['machine']['platform']}",
        f"- Versions: {', '.join(f'{k} {v}' for k, v in result['versions'].items() if v)}"
        + (f", vllm {result['vllm']['vllm_version']}" if result.get("vllm") else ""),
        f"- Adapter: {result['adapter']['modules']} modules (q,k,v,o of 30 layers), ranks "
        f"{result['adapter']['min_rank']}..{result['adapter']['max_rank']}, rsLoRA, "
        f"{result['adapter']['bytes'] / 2**20:.1f} MiB",
        "",
        "## Export (one fresh process per format)",
        "",
        "| format | export time (s) | process wall (s) | peak RSS, ru_maxrss (MiB) | VmHWM (MiB) | output (MiB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["exports"]:
        lines.append(f"| {row['format']} | {row['export_s']:.2f} | {row['process_wall_s']:.1f} | "
                     f"{row['peak_rss_mib']:.0f} | {row['vm_hwm_mib'] or float('nan'):.0f} | "
                     f"{row['output_bytes'] / 2**20:.1f} |")
    lines += ["", "`import-only` is the floor: a process that imports torch, transformers, peft and gorafit and "
              "exports nothing. Merging loads the base in float32 whatever the output dtype.", ""]
    if result.get("vllm"):
        v = result["vllm"]
        lines += [
            "## vLLM generation throughput (CPU, float32, greedy, enforce_eager)",
            "",
            f"{v['prompts']} prompts of {v['prompt_tokens']} tokens, {v['new_tokens']} new tokens each, "
            f"{v['rounds']} interleaved rounds after a warm-up; max_lora_rank {v['max_lora_rank']}.",
            "",
            "| engine | requests | tokens/s | per round |",
            "|---|---|---:|---|",
        ]
        for label, key in (("LoRA engine", "lora_engine_without_adapter"), ("LoRA engine", "lora_engine_with_adapter"),
                           ("plain engine (no --enable-lora)", "plain_engine_without_lora")):
            row = v[key]
            what = "with the adapter" if "with_adapter" in key else "base model"
            lines.append(f"| {label} | {what} | {row['tokens_per_s']:.1f} | "
                         f"{', '.join(f'{x:.1f}' for x in row['tokens_per_s_rounds'])} |")
        ratio = v["lora_engine_with_adapter"]["tokens_per_s"] / v["lora_engine_without_adapter"]["tokens_per_s"]
        lines += ["", f"With the adapter: {ratio:.2f}x the base model's throughput in the same engine. "
                  f"Engine start-up: {v['lora_engine_startup_s']:.0f} s with LoRA, {v['plain_engine_startup_s']:.0f} s without.",
                  ""]
    elif result.get("vllm_skipped"):
        lines += ["## vLLM", "", f"Not measured: {result['vllm_skipped']}", ""]
    path.write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--prepare", help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help="An existing adapter to export (default: a GoRA-shaped one is made).")
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--vllm-python", default=str(ROOT / ".venv-serve" / "bin" / "python"))
    parser.add_argument("--skip-vllm", action="store_true")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--results", default=str(RESULTS / "export"), help="Path stem of the .json and .md results.")
    args = parser.parse_args()
    if args.child:
        child(args.child, args.adapter, args.out)
        return 0
    if args.prepare:
        prepare(args.prepare, args.out, args.adapter)
        return 0

    work = Path(tempfile.mkdtemp(prefix="bench-export-"))
    try:
        # The parent stays free of torch until the exports are measured (see `measure`).
        proc = subprocess.run([sys.executable, __file__, "--prepare", args.model, "--out", str(work / "adapter")]
                              + (["--adapter", args.adapter] if args.adapter else []),
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"preparing the adapter failed:\n{proc.stderr[-3000:]}")
        prepared = json.loads(proc.stdout.strip().splitlines()[-1])
        base_path, adapter = prepared.pop("base_path"), Path(prepared.pop("adapter"))
        result = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "machine": machine(), "versions": versions(), "model": args.model, "adapter": prepared,
            "exports": [],
        }
        for name in args.formats.split(","):
            print(f"export {name} ...", flush=True)
            row = measure(name, adapter, work / f"out-{name}")
            print(f"  {row}", flush=True)
            result["exports"].append(row)
            shutil.rmtree(work / f"out-{name}", ignore_errors=True)
        if args.skip_vllm:
            result["vllm_skipped"] = "--skip-vllm"
        elif not Path(args.vllm_python).exists():
            result["vllm_skipped"] = f"no Python with vLLM at {args.vllm_python} (scripts/serve_test.sh builds one)"
        else:
            print("vLLM throughput ...", flush=True)
            result["vllm"] = vllm_throughput(args.vllm_python, base_path, adapter, args.prompts, args.prompt_tokens,
                                             args.new_tokens, args.rounds)
        stem = Path(args.results)
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
        write_markdown(result, stem.with_suffix(".md"))
        print(stem.with_suffix(".md").read_text())
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
