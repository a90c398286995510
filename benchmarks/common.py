"""Shared pieces of the benchmarks: real packed batches, a stamp for result files, peak memory."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path

import torch

from goraplan.provenance import package_version

RESULTS = Path(__file__).resolve().parent / "results"


def packed_batches(tokenizer, source: str, n_batches: int, batch_size: int, length: int) -> list[dict]:
    """``n_batches`` batches of ``batch_size`` x ``length`` tokens cut from one real data set's text, end to end."""
    from goraplan.data import load_records

    ds = load_records(source, "train")
    column = "text" if "text" in ds.column_names else "prompt"
    need = n_batches * batch_size * length
    ids: list[int] = []
    for row in ds:
        ids.extend(tokenizer(row[column] + (row.get("completion") or ""))["input_ids"] + [tokenizer.eos_token_id])
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise SystemExit(f"{source} has only {len(ids)} tokens, {need} needed")
    blocks = torch.tensor(ids[:need]).view(n_batches, batch_size, length)
    return [{"input_ids": b, "attention_mask": torch.ones_like(b), "labels": b.clone()} for b in blocks]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def stamp(command: list[str]) -> dict:
    versions = {name: package_version(name) for name in ("torch", "transformers", "peft", "datasets", "goraplan")}
    return {
        "command": " ".join(command),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
    }


def run_json(args: list[str], timeout: int = 3600) -> dict:
    """Run one measurement in its own process (so its peak memory is its own) and read its JSON line."""
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
