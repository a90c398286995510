"""Serving end-to-end test: plan -> a few training steps -> export (native, legacy) -> vLLM offline -> vLLM server.

Run through ``scripts/serve_test.sh``, which builds the serving environment (``.venv-serve``, vLLM on
CPU) exactly as ASSETS.md describes and then runs this file with the project's own Python:

    scripts/serve_test.sh [--work out/serve-test] [--train-steps 4] [--requests 6]

Stages, each timed (wall seconds, written to ``WORK/serve_test.json``):

1. train: ``goraplan build`` on SmolLM2-135M and the sarcasm headlines, then ``gorafit run`` for a few
   steps. When those commands are not installed, the same kind of adapter (heterogeneous ranks,
   rsLoRA) is trained a few steps with PEFT directly, and the report says so.
2. export: ``gorafit export --format peft`` natively, with ``--vllm-legacy``, and compressed to
   rank 8 (``--max-rank 8``); the serve command the native export prints must use the smallest
   ``--max-lora-rank`` and ``--lora-target-modules`` with the adapter's own modules.
3. vLLM offline: ``gorafit verify --engine vllm`` for each export: greedy tokens identical to
   HF+PEFT and log-probs within 1e-4 (float32); for the compressed export the reference is the
   trained adapter compressed the same way, and the log-prob change against the uncompressed one is
   reported.
4. vLLM server: the command the export printed, run on 127.0.0.1 with the legacy adapter added to its
   ``--lora-modules``, a bounded number of completion requests (greedy, token ids and log-probs
   returned) compared with HF+PEFT, then the server is stopped.

Exit code 0 when every check passes, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
PROMPTS = [
    "The capital of France is",
    "Scientists discover that cats",
    "Local man wins award for",
]


def log(message: str) -> None:
    print(f"[serve-test {time.strftime('%H:%M:%S')}] {message}", flush=True)


def command(name: str) -> list[str]:
    """The project's console script `name` (beside this Python), else ``python -m <package>``."""
    script = BIN / name
    return [str(script)] if script.exists() else [sys.executable, "-m", name]


def has_subcommand(tool: str, sub: str) -> bool:
    try:
        return subprocess.run(command(tool) + [sub, "--help"], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def run(cmd: list[str], ok_code: int = 0, **kwargs) -> subprocess.CompletedProcess:
    log("$ " + " ".join(cmd))
    proc = subprocess.run(cmd, text=True, **kwargs)
    if proc.returncode not in (0, ok_code):
        raise SystemExit(f"command failed with exit code {proc.returncode}: {' '.join(cmd)}")
    return proc


# ---------------------------------------------------------------------------------------------------
# 1. A trained adapter


def train_with_cli(work: Path, steps: int) -> Path:
    plan = work / "plan.gora"
    run(command("goraplan") + ["build", "--model", "smollm2-135m", "--data", "sarcasm-lm", "--steps", "4",
                               "--batch-size", "2", "--max-length", "48", "--rank", "8", "-o", str(plan)])
    run(command("gorafit") + ["run", str(plan), "-o", str(work / "run"), "--overwrite", "--max-steps", str(steps),
                              "--batch-size", "2", "--max-train-samples", "64", "--eval-fraction", "0",
                              "--lr", "1e-3", "--lr-ratio", "1", "--report-to", "none", "--disable-tqdm",
                              "--save-steps", str(steps)])
    return work / "run"


def train_with_peft(work: Path, steps: int) -> Path:
    """Fallback: the same kind of adapter, trained a few AdamW steps with PEFT directly."""
    import torch
    from peft import LoraConfig, get_peft_model

    from goraplan.models import load_model

    torch.manual_seed(0)
    model, tokenizer = load_model("smollm2-135m", "causal-lm", device="cpu")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    names = [n for n, _ in model.named_modules() if n.split(".")[-1] in targets]
    ranks = [4, 8, 12, 16, 24, 32]
    config = LoraConfig(r=8, lora_alpha=16, use_rslora=True, target_modules=targets, init_lora_weights=True,
                        task_type="CAUSAL_LM", rank_pattern={re.escape(n): ranks[i % len(ranks)] for i, n in enumerate(names)})
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.01)
    texts = ["area man finally finishes reading terms and conditions", "scientists confirm coffee is a food group",
             "local council approves new bike lanes downtown", "report: nation's dogs still very good"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    peft_model.train()
    for _ in range(steps):
        loss = peft_model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.eval()
    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    peft_model.save_pretrained(run_dir / "adapter")
    (run_dir / "run.json").write_text(json.dumps({"plan_sha256": None, "settings": {
        "note": "fallback: trained with PEFT directly (goraplan build / gorafit run not available)",
        "max_steps": steps, "learning_rate": 1e-3}}))
    return run_dir


# ---------------------------------------------------------------------------------------------------
# 4. The OpenAI-compatible server


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http_json(url: str, payload: dict | None = None, timeout: float = 120) -> dict:
    data = json.dumps(payload).encode() if payload is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def serve_and_query(serve_python: str, printed: str, more_adapters: dict[str, Path], prompts: list[str],
                    requests: int, new_tokens: int, work: Path) -> dict:
    """Run the serve command an export printed (its own python swapped for `serve_python`, `more_adapters`
    added to its --lora-modules, a local port and float32), send `requests` completions, stop it."""
    port = free_port()
    cmd = shlex.split(printed)
    if cmd[:3] != ["python", "-m", "vllm.entrypoints.openai.api_server"] or "--lora-modules" not in cmd:
        raise RuntimeError(f"unexpected serve command: {printed}")
    cmd[0] = serve_python
    at = cmd.index("--lora-modules") + 2
    cmd[at:at] = [f"{name}={path}" for name, path in more_adapters.items()]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "256",
            "--enforce-eager"]
    served_names = [spec.split("=", 1)[0] for spec in cmd[cmd.index("--lora-modules") + 1:at + len(more_adapters)]]
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1")
    log("$ " + " ".join(cmd))
    server_log = open(work / "server.log", "w")  # noqa: SIM115 (closed below)
    started = time.perf_counter()
    server = subprocess.Popen(cmd, stdout=server_log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    result: dict = {"port": port, "command": " ".join(cmd)}
    try:
        deadline = time.monotonic() + 600
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"server exited with code {server.returncode}; see {work / 'server.log'}")
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError("server not healthy after 600 s") from None
                time.sleep(2)
        result["startup_s"] = time.perf_counter() - started
        models = [m["id"] for m in http_json(f"http://127.0.0.1:{port}/v1/models")["data"]]
        result["models"] = models
        answers = []
        begin = time.perf_counter()
        for i in range(requests):  # bounded: `requests` completions in all, round robin over adapters and prompts
            name = served_names[i % len(served_names)]
            prompt = prompts[(i // len(served_names)) % len(prompts)]
            reply = http_json(f"http://127.0.0.1:{port}/v1/completions", {
                "model": name, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0.0, "logprobs": 1,
                "ignore_eos": True, "return_tokens_as_token_ids": True})
            choice = reply["choices"][0]
            tokens = [int(t.split(":", 1)[1]) for t in choice["logprobs"]["tokens"]]
            answers.append({"model": name, "prompt": prompt, "text": choice["text"], "tokens": tokens,
                            "logprobs": choice["logprobs"]["token_logprobs"]})
        result["requests_s"] = time.perf_counter() - begin
        result["answers"] = answers
    finally:
        begin = time.perf_counter()
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)  # the server and the engine processes it started
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()
        server_log.close()
        result["shutdown_s"] = time.perf_counter() - begin
    return result


def reference_for(answers: list[dict], run_dir: Path, base: str) -> tuple[float, float]:
    """Compare the server's answers with HF+PEFT.

    Returns the largest |logprob diff| to HF+PEFT, and the largest change the adapter makes to those
    log-probs (base model vs adapter, in HF): a check that cannot tell the two apart proves nothing.
    """
    import torch

    from gorafit.saved_adapter import load_adapted_model
    from gorafit.verify import greedy_tokens, score_tokens

    model, tokenizer, _ = load_adapted_model(run_dir / "adapter", base, torch.float32)

    def logits_fn(ids):
        with torch.no_grad():
            return model(input_ids=ids).logits.float()

    worst = effect = 0.0
    for answer in answers:
        ids = list(tokenizer(answer["prompt"])["input_ids"])
        expected, _ = greedy_tokens(model, ids, len(answer["tokens"]))
        answer["tokens_equal"] = expected == answer["tokens"]
        scored = score_tokens(logits_fn, ids, answer["tokens"])
        answer["max_abs_logprob_diff"] = max(abs(a - b) for a, b in zip(scored, answer["logprobs"]))
        worst = max(worst, answer["max_abs_logprob_diff"])
        with model.disable_adapter():
            base_scored = score_tokens(logits_fn, ids, answer["tokens"])
        effect = max(effect, max(abs(a - b) for a, b in zip(scored, base_scored)))
    return worst, effect


# ---------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default=str(ROOT / "out" / "serve-test"), help="Working folder (replaced).")
    parser.add_argument("--serve-python", default=str(ROOT / ".venv-serve" / "bin" / "python"))
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--requests", type=int, default=6, help="Completion requests sent to the server in all.")
    parser.add_argument("--new-tokens", type=int, default=12)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--setup-seconds", type=float, default=None, help="(from serve_test.sh) venv setup time.")
    args = parser.parse_args()

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    times: dict[str, float] = {}
    if args.setup_seconds is not None:
        times["setup_serving_env"] = args.setup_seconds
    report: dict = {"times_s": times, "checks": {}}
    total = time.perf_counter()

    # ---- 1. plan + train
    begin = time.perf_counter()
    if has_subcommand("goraplan", "build") and has_subcommand("gorafit", "run"):
        report["trained_with"] = "goraplan build + gorafit run"
        run_dir = train_with_cli(work, args.train_steps)
    else:
        report["trained_with"] = "peft directly (goraplan build / gorafit run not installed)"
        log("goraplan build / gorafit run not available: training the adapter with PEFT directly")
        run_dir = train_with_peft(work, args.train_steps)
    times["plan_and_train"] = time.perf_counter() - begin

    # ---- 2. export native, legacy and compressed; the printed serve command
    from gorafit.saved_adapter import module_ranks, read_adapter
    from gorafit.vllm_serving import lora_target_modules, smallest_max_lora_rank
    from goraplan.models import resolve_model_path

    exports = {"gora": work / "gora", "gora-legacy": work / "gora-legacy", "gora-r8": work / "gora-r8"}
    flags = {"gora": [], "gora-legacy": ["--vllm-legacy"], "gora-r8": ["--max-rank", "8"]}
    printed: dict[str, str] = {}
    for name, out in exports.items():
        begin = time.perf_counter()
        proc = run(command("gorafit") + ["export", str(run_dir), "--format", "peft", "-o", str(out), *flags[name]],
                   capture_output=True)
        print(proc.stdout, end="", flush=True)
        lines = proc.stdout.splitlines()
        printed[name] = lines[lines.index("Serve it with vLLM:") + 1].strip()
        times[f"export_{name}"] = time.perf_counter() - begin
    config, tensors, _ = read_adapter(exports["gora"])
    base = config.get("base_model_name_or_path") or "smollm2-135m"
    base_path = resolve_model_path(base)
    ranks = module_ranks(config, tensors)
    max_rank, max_lora_rank = max(ranks.values()), smallest_max_lora_rank(max(ranks.values()))
    report.update(base=base, base_path=base_path, max_rank=max_rank, max_lora_rank=max_lora_rank,
                  serve_command=printed["gora"])
    expected = (f"--max-lora-rank {max_lora_rank} --lora-target-modules {' '.join(lora_target_modules(ranks))} "
                f"--lora-modules gora=")
    report["checks"]["serve_command"] = {"ok": expected in printed["gora"], "expected": expected,
                                         "printed": printed["gora"]}
    ok = report["checks"]["serve_command"]["ok"]
    log(f"printed serve command uses {expected!r}: {ok}")
    compression = json.loads((exports["gora-r8"] / "gora_export.json").read_text())["compression"]
    report["compression_r8"] = {k: compression[k] for k in ("max_rank", "modules", "modules_compressed",
                                                            "norm_kept_total")}

    # ---- 3. vLLM offline engine vs HF+PEFT
    for name, out in exports.items():
        begin = time.perf_counter()
        cmd = command("gorafit") + ["verify", str(out), "--engine", "vllm", "--python", args.serve_python,
                                    "--max-new-tokens", str(args.new_tokens), "--tolerance", str(args.tolerance),
                                    "--json", *sum((["--prompt", p] for p in PROMPTS), [])]
        proc = run(cmd, capture_output=True, ok_code=1)
        times[f"vllm_offline_{name}"] = time.perf_counter() - begin
        verdict = json.loads(proc.stdout)
        report["checks"][f"offline_{name}"] = {
            "ok": verdict["ok"], "tokens_equal": verdict["tokens_equal"],
            "max_abs_logprob_diff": verdict["max_abs_logprob_diff"], "seconds": verdict["seconds"],
            "compression_change": verdict.get("compression_change")}
        log(f"offline {name}: tokens equal {verdict['tokens_equal']}, max |logprob diff| "
            f"{verdict['max_abs_logprob_diff']:.3g}" + (
                f"; compressed: {100 * compression['norm_kept_total']:.2f}% of the update norm kept, log-probs "
                f"change by up to {verdict['compression_change']['max_abs_logprob_change']:.3g} against the "
                f"uncompressed adapter" if verdict.get("compression_change") else ""))
        ok &= verdict["ok"]

    # ---- 4. the OpenAI-compatible server
    begin = time.perf_counter()
    served = serve_and_query(args.serve_python, printed["gora"], {"gora-legacy": exports["gora-legacy"]}, PROMPTS,
                             args.requests, args.new_tokens, work)
    times["server_total"] = time.perf_counter() - begin
    times.update({f"server_{k}": v for k, v in served.items() if k.endswith("_s")})
    worst, effect = reference_for(served["answers"], run_dir, base)
    server_ok = ({"gora", "gora-legacy"} <= set(served["models"]) and all(a["tokens_equal"] for a in served["answers"])
                 and worst <= args.tolerance and effect > 10 * args.tolerance)
    report["checks"]["server"] = {"ok": server_ok, "models": served["models"], "requests": len(served["answers"]),
                                  "max_abs_logprob_diff": worst, "adapter_effect_max_abs_logprob": effect,
                                  "tokens_equal": all(a["tokens_equal"] for a in served["answers"])}
    report["server_answers"] = served["answers"]
    log(f"server: {len(served['answers'])} requests, tokens equal {report['checks']['server']['tokens_equal']}, "
        f"max |logprob diff| {worst:.3g} (the adapter itself moves log-probs by up to {effect:.3g})")
    ok &= server_ok

    times["total"] = time.perf_counter() - total
    report["ok"] = bool(ok)
    (work / "serve_test.json").write_text(json.dumps(report, indent=2))
    log("wall times (s): " + ", ".join(f"{k} {v:.1f}" for k, v in times.items()))
    log(f"{'PASS' if ok else 'FAIL'}; report in {work / 'serve_test.json'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
