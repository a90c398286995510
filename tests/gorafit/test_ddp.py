"""Several processes: `torchrun --nproc_per_node 2 -m gorafit run` on CPU (gloo) trains as DDP and ends
with the adapter of one process at the same global batch; FSDP on CPU processes is refused, not faked."""

import importlib.util
import json
import subprocess
import sys

import pytest

import goraplan
from gorafit.adapter_check import check_saved_adapter
from tests.gorafit.test_train import (
    adapter_tensors,
    gorafit_command,
    make_run_inputs,
    max_difference,
    subprocess_env,
)

pytestmark = pytest.mark.dist

COMMON = ["--max-steps", 8, "--save-steps", 4, "--logging-steps", 1, "--eval-fraction", 0, "--lr", 2e-3,
          "--disable-tqdm", "--report-to", "none"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    # causal-lm examples of different lengths: the two processes pad differently and must still agree,
    # because the loss is averaged over the tokens of the global batch
    return make_run_inputs(tmp_path_factory.mktemp("ddp"), "causal-lm")


def torchrun(*args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "gorafit", *[str(a) for a in args]]


@pytest.fixture(scope="module")
def single_run(inputs, tmp_path_factory):
    """The reference: one process, batch 8."""
    one = tmp_path_factory.mktemp("single") / "run"
    done = subprocess.run(gorafit_command("run", inputs["plan"], "--batch-size", 8, "-o", one, *COMMON),
                          env=subprocess_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return one


def logged_losses(run) -> list[float]:
    return [e["loss"] for e in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in e]


def test_two_processes_match_one_with_the_same_global_batch(inputs, single_run, tmp_path):
    two = tmp_path / "two"
    both = subprocess.run(torchrun("run", inputs["plan"], "--batch-size", 4, "-o", two, *COMMON),
                          env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert both.returncode == 0, both.stderr[-3000:]

    record = json.loads((two / "run.json").read_text())
    assert record["parallelism"]["mode"] == "ddp" and record["world_size"] == 2
    assert record["total_train_batch_size"] == 8
    assert both.stdout.count("trained: 8 steps") == 1  # one report, from the main process

    difference = max_difference(adapter_tensors(single_run), adapter_tensors(two))
    print(f"DDP (2 x 4) vs one process (8): max |adapter difference| = {difference:.3g}")
    assert difference <= 1e-5
    assert logged_losses(single_run) == pytest.approx(logged_losses(two), rel=1e-5)
    assert len(logged_losses(two)) == 8


# accelerate sets DeepSpeed up only on accelerators; on CPU processes it falls back to one process each. For
# this check only, its backend choice is patched to gloo, which DeepSpeed's CPU accelerator speaks.
DEEPSPEED_ON_CPU = """
import os
from accelerate.state import PartialState
from accelerate.utils import DistributedType

_choose = PartialState._prepare_backend


def _gloo_on_cpu(self, cpu=False, sagemaker_dp=False, backend=None):
    chosen, kind = _choose(self, cpu, sagemaker_dp, backend)
    if chosen is None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return "gloo", DistributedType.MULTI_CPU
    return chosen, kind


PartialState._prepare_backend = _gloo_on_cpu
from gorafit.cli import main

main()
"""


@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed")
def test_deepspeed_zero3_keeps_the_lora_plus_groups_and_saves_the_whole_adapter(inputs, single_run, tmp_path):
    """ZeRO-3 partitions every weight (while loading, too): the fingerprint check, the optimizer groups and the
    saved adapter must all see whole tensors. Same global batch as the single process, same adapter."""
    launcher = tmp_path / "deepspeed_on_cpu.py"
    launcher.write_text(DEEPSPEED_ON_CPU)
    run = tmp_path / "zero3"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launcher),
               "run", str(inputs["plan"]), "--batch-size", "4", "-o", str(run), "--deepspeed", "zero3",
               *[str(a) for a in COMMON]]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run / "run.json").read_text())["parallelism"]["mode"] == "deepspeed-zero3"
    plan = goraplan.load_plan(inputs["plan"])
    check_saved_adapter(run / "adapter", plan)
    check_saved_adapter(run / "checkpoint-4", plan)
    difference = max_difference(adapter_tensors(single_run), adapter_tensors(run))
    print(f"DeepSpeed ZeRO-3 (2 x 4) vs one process (8): max |adapter difference| = {difference:.3g}")
    assert difference <= 1e-5  # lora_B at 16 x the lr survived DeepSpeed's optimizer wrapper


# The same for FSDP2, which accelerate sets up only where it sees GPUs: for this check the gloo CPU processes
# are presented to it as GPUs whose device is the CPU.
FSDP_ON_CPU = """
import os

import torch
from accelerate.state import PartialState
from accelerate.utils import DistributedType

os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"


def _gloo_as_gpus(self, cpu=False, sagemaker_dp=False, backend=None):
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("gloo")
    return "gloo", DistributedType.MULTI_GPU


PartialState._prepare_backend = _gloo_as_gpus
from gorafit.cli import main

main()
"""


def test_fsdp2_keeps_the_lora_plus_groups_and_saves_the_whole_adapter(inputs, single_run, tmp_path):
    launcher = tmp_path / "fsdp_on_cpu.py"
    launcher.write_text(FSDP_ON_CPU)
    run = tmp_path / "fsdp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(launcher),
               "run", str(inputs["plan"]), "--batch-size", "4", "-o", str(run), "--fsdp", *[str(a) for a in COMMON]]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    parallelism = json.loads((run / "run.json").read_text())["parallelism"]
    assert parallelism["mode"] == "fsdp2" and parallelism["fsdp_sharded_modules"] > 1
    plan = goraplan.load_plan(inputs["plan"])
    check_saved_adapter(run / "adapter", plan)
    check_saved_adapter(run / "checkpoint-4", plan)
    difference = max_difference(adapter_tensors(single_run), adapter_tensors(run))
    print(f"FSDP2 (2 x 4) vs one process (8): max |adapter difference| = {difference:.3g}")
    assert difference <= 1e-5


def test_fsdp_on_cpu_processes_is_refused_not_silently_ddp(inputs, tmp_path):
    both = subprocess.run(torchrun("run", inputs["plan"], "--batch-size", 4, "-o", tmp_path / "fsdp", "--fsdp",
                                   *COMMON), env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert both.returncode != 0
    # each worker says why in one sentence (torchrun then reports the failed workers in its own words)
    assert both.stderr.count("Error: --fsdp needs several processes on GPUs") == 2, both.stderr[-3000:]
    assert "2 processes on CPUs" in both.stderr
    assert not (tmp_path / "fsdp" / "run.json").exists()
