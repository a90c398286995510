"""`torchrun --nproc_per_node 2 -m goraplan build` (gloo, CPU), plain and with --fsdp, gives the plan one
process gives."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

import goraplan

pytestmark = pytest.mark.dist


@pytest.fixture(scope="module")
def build_args(tiny_model_dir, tiny_text_data):
    return ["build", "--model", str(tiny_model_dir), "--data", str(tiny_text_data), "--steps", "7",
            "--batch-size", "2", "--rank", "4", "--max-length", "32"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return {**os.environ, "OMP_NUM_THREADS": "1", "GORA_CACHE": str(tmp_path_factory.mktemp("cache")),
            "MALLOC_MMAP_THRESHOLD_": "65536"}


@pytest.fixture(scope="module")
def one(build_args, env, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "one.gora"
    single = subprocess.run([sys.executable, "-m", "goraplan", *build_args, "-o", str(out)],
                            env=env, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    return goraplan.load_plan(out)


def _torchrun(args, env, tmp_path, port):
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
    assert torchrun, "torchrun ships with torch"
    out = tmp_path / "two.gora"
    multi = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", str(port), "-m", "goraplan", *args,
                            "-o", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert multi.returncode == 0, multi.stderr[-2000:]
    return goraplan.load_plan(out)


def test_two_processes_match_one(one, build_args, env, tmp_path):
    two = _torchrun(build_args, env, tmp_path, 29561)
    assert one.ranks == two.ranks
    assert one.manifest.calibration.steps == two.manifest.calibration.steps == 7
    assert one.manifest.calibration.token_fingerprint == two.manifest.calibration.token_fingerprint
    assert one.manifest.calibration.tokens == two.manifest.calibration.tokens
    assert (two.manifest.calibration.processes, two.manifest.calibration.sharded) == (2, False)
    for name, t in one.tensors.items():
        torch.testing.assert_close(two.tensors[name], t, rtol=1e-5, atol=1e-5 * float(t.abs().max()))


def test_fsdp_two_processes_match_one(one, build_args, env, tmp_path):
    """The model loaded straight into shards (rank 0 reads the checkpoint): the same plan to 1e-6."""
    two = _torchrun([*build_args, "--fsdp"], env, tmp_path, 29562)
    assert one.ranks == two.ranks
    assert (two.manifest.calibration.processes, two.manifest.calibration.sharded) == (2, True)
    assert two.manifest.base_model == one.manifest.base_model  # same weights: the shards hash as the whole
    assert one.manifest.calibration.token_fingerprint == two.manifest.calibration.token_fingerprint
    for a, b in zip(one.manifest.modules, two.manifest.modules):
        assert b.importance == pytest.approx(a.importance, rel=1e-6, abs=0)
    for name, t in one.tensors.items():
        torch.testing.assert_close(two.tensors[name], t, rtol=1e-6, atol=1e-6 * float(t.abs().max()))


def test_fsdp_without_torchrun_says_how_to_launch(build_args, env, tmp_path):
    done = subprocess.run([sys.executable, "-m", "goraplan", *build_args, "--fsdp", "-o", str(tmp_path / "x.gora")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "torchrun --nproc_per_node N -m goraplan build --fsdp" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "x.gora").exists()
