"""Run greedy generation jobs on vLLM's offline engine; executed by an interpreter that has vLLM.

Standalone on purpose: the serving environment need not have goraplan or gorafit installed, so this
file imports only the standard library and vLLM. gorafit writes a JSON request, runs

    PYTHON path/to/_vllm_runner.py request.json result.json

and reads the JSON result. Request::

    {"model": "/path/to/base", "dtype": "float32", "max_model_len": 256, "max_lora_rank": 16,
     "lora_target_modules": ["q_proj", "v_proj"] | null, "max_num_seqs": 16,
     "jobs": [{"name": "adapter", "adapter": "/path/to/adapter" | null, "prompts": [[1, 2, 3], ...],
               "max_tokens": 16, "logprobs": true, "repeat": 1}]}

Result: ``{"vllm_version", "startup_s", "jobs": {name: {"tokens": [[...]], "logprobs": [[...]],
"seconds": [...], "generated_tokens": n}}}``. One engine serves every job (a LoRA request per job
with an adapter). Greedy (temperature 0) and ``ignore_eos``, so every job generates exactly
``max_tokens`` tokens per prompt; log-probs are the raw model log-probs of the chosen tokens.
"""

import json
import os
import sys
import time
from pathlib import Path


def _run(request: dict) -> dict:
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(request.get("kv_cache_gib", 1)))
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    model = request["model"]
    jobs = request["jobs"]
    use_lora = any(job.get("adapter") for job in jobs)
    has_tokenizer = any((Path(model) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    kwargs = {
        "model": model,
        "dtype": request.get("dtype", "float32"),
        "enforce_eager": True,
        "max_model_len": int(request.get("max_model_len", 256)),
        "seed": int(request.get("seed", 0)),
        "skip_tokenizer_init": not has_tokenizer,
    }
    if request.get("max_num_seqs"):
        kwargs["max_num_seqs"] = int(request["max_num_seqs"])
    if use_lora:
        kwargs.update(enable_lora=True, max_lora_rank=int(request["max_lora_rank"]), max_loras=1)
        if request.get("lora_target_modules"):  # the server's --lora-target-modules
            kwargs["lora_target_modules"] = [str(name) for name in request["lora_target_modules"]]
    started = time.perf_counter()
    llm = LLM(**kwargs)
    startup = time.perf_counter() - started

    results = {}
    adapter_ids: dict = {}
    for job in jobs:
        lora = None
        if job.get("adapter"):
            path = str(job["adapter"])
            adapter_ids.setdefault(path, len(adapter_ids) + 1)
            lora = LoRARequest(f"adapter{adapter_ids[path]}", adapter_ids[path], path)
        params = SamplingParams(temperature=0.0, max_tokens=int(job["max_tokens"]), ignore_eos=True,
                                logprobs=1 if job.get("logprobs", True) else None,
                                detokenize=has_tokenizer)
        prompts = [{"prompt_token_ids": [int(t) for t in ids]} for ids in job["prompts"]]
        seconds, tokens, logprobs, generated = [], [], [], 0
        for _ in range(int(job.get("repeat", 1))):
            begin = time.perf_counter()
            outputs = llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
            seconds.append(time.perf_counter() - begin)
            tokens, logprobs = [], []
            for output in outputs:
                completion = output.outputs[0]
                ids = list(completion.token_ids)
                tokens.append(ids)
                generated += len(ids)
                if completion.logprobs is not None:
                    logprobs.append([float(step[token].logprob) for step, token in zip(completion.logprobs, ids)])
        results[job["name"]] = {"tokens": tokens, "logprobs": logprobs, "seconds": seconds,
                                "generated_tokens": generated}
    return {"vllm_version": vllm.__version__, "startup_s": startup, "jobs": results}


def main(argv: list) -> int:
    if len(argv) != 3:
        print("usage: python _vllm_runner.py REQUEST.json RESULT.json", file=sys.stderr)
        return 2
    request = json.loads(Path(argv[1]).read_text())
    try:
        result = _run(request)
    except Exception as exc:  # reported to the caller in the result file as well as on stderr
        Path(argv[2]).write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        raise
    Path(argv[2]).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":  # the engine spawns processes: everything runs under this guard
    sys.exit(main(sys.argv))
