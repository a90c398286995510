"""`torchrun --nproc_per_node 2 -m goraplan build` (gloo, CPU) gives the plan one process gives."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import goraplan

pytestmark = pytest.mark.dist


def test_two_processes_match_one(tiny_model_dir, tiny_text_data, tmp_path):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun ships with torch"
    args = ["build", "--model", str(tiny_model_dir), "--data", str(tiny_text_data), "--steps", "8",
            "--batch-size", "2", "--rank", "4", "--max-length", "32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GORA_CACHE": str(tmp_path / "cache")}
    single = subprocess.run([sys.executable, "-m", "goraplan", *args, "-o", str(tmp_path / "one.gora")],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    multi = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29561", "-m", "goraplan", *args,
                            "-o", str(tmp_path / "two.gora")], env=env, capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr[-2000:]
    one, two = goraplan.load_plan(tmp_path / "one.gora"), goraplan.load_plan(tmp_path / "two.gora")
    assert one.ranks == two.ranks
    assert one.manifest.calibration.steps == two.manifest.calibration.steps == 8
    assert one.manifest.calibration.token_fingerprint == two.manifest.calibration.token_fingerprint
    assert one.manifest.calibration.tokens == two.manifest.calibration.tokens
    for name, t in one.tensors.items():
        torch.testing.assert_close(two.tensors[name], t, rtol=1e-5, atol=1e-5 * float(t.abs().max()))
