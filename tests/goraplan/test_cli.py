"""goraplan's command line: a working build/inspect/validate/diff/schema, and bad input answered with one
sentence, exit code 2 and no file left behind."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import save_file

from goraplan.cli import cli
from tests.cli_runner import run_command


def run(args, capsys):
    return run_command(cli, args, capsys)


@pytest.fixture()
def build_args(tiny_model_dir, tiny_text_data):
    return ["build", "--model", tiny_model_dir, "--data", tiny_text_data, "--steps", 4, "--batch-size", 2,
            "--rank", 4, "--max-length", 32]


@pytest.fixture()
def plan_file(build_args, tmp_path, capsys, cli_env):
    code, out, err = run([*build_args, "-o", tmp_path / "p.gora"], capsys)
    assert code == 0, err
    return tmp_path / "p.gora"


def test_build_inspect_validate_diff_schema(plan_file, build_args, tiny_model_dir, tmp_path, capsys):
    code, out, _ = run(["inspect", plan_file, "--plot", tmp_path / "ranks.png"], capsys)
    assert code == 0
    assert "self_attn.q_proj" in out and "budget" in out and (tmp_path / "ranks.png").stat().st_size > 1000
    code, out, _ = run(["inspect", plan_file, "--json"], capsys)
    manifest = json.loads(out)
    assert manifest["totals"]["allocated"] <= manifest["totals"]["budget"]
    code, out, _ = run(["validate", plan_file, "--model", tiny_model_dir], capsys)
    assert code == 0 and "matches the plan" in out
    code, _, err = run([*build_args, "--rank", 2, "--seed", 3, "-o", tmp_path / "q.gora"], capsys)
    assert code == 0, err
    code, out, _ = run(["diff", plan_file, tmp_path / "q.gora"], capsys)
    assert code == 0 and "setting rank: 4 vs 2" in out and "Spearman" in out
    code, _, err = run([*build_args, "--step-size", "auto", "--held-out-steps", 2, "-o", tmp_path / "a.gora"], capsys)
    assert code == 0, err
    code, out, _ = run(["inspect", tmp_path / "a.gora"], capsys)
    assert code == 0 and "(auto)" in out and "held-out batches" in out
    code, out, _ = run(["schema"], capsys)
    assert json.loads(out)["title"] == "Manifest"


BAD_BUILDS = [
    (["--model", "./no/such/model"], "does not exist"),
    (["--data", "no_such_file.jsonl"], "does not exist"),
    (["--target-modules", "query,value"], "match no linear layer"),
    (["--min-rank", 9, "--max-rank", 3], "min rank 9 is larger than max rank 3"),
    (["--rank", 0], "rank: Input should be greater than or equal to 1"),
    (["--steps", 500], r"only \d+ usable examples"),
    (["--step-size", "big"], "'big' is neither a number nor 'auto'"),
    (["--step-size", "auto", "--steps", 30, "--held-out-steps", 4], r"only \d+ usable examples"),
    (["-o", "missing-folder/p.gora"], "output folder missing-folder does not exist"),
]


@pytest.mark.parametrize("extra,message", BAD_BUILDS)
def test_bad_build_input_is_one_sentence_and_exit_2(extra, message, build_args, tmp_path, capsys, cli_env,
                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = [*build_args, "-o", "p.gora", *extra]
    code, _, err = run(args, capsys)
    assert code == 2
    last = err.strip().splitlines()[-1]  # progress bars may come before it
    assert last.startswith("Error: ") and "Traceback" not in err
    assert err.count("Error: ") == 1, err
    assert __import__("re").search(message, err), err
    assert not list(tmp_path.glob("*.gora")) and not list(tmp_path.glob(".*partial"))


def test_unknown_model_alias_lists_the_builtin_ones(build_args, tmp_path, capsys, cli_env):
    code, _, err = run([*build_args, "--model", "smollm9-135m", "-o", tmp_path / "p.gora"], capsys)
    assert code == 2 and "smollm2-135m" in err and "Traceback" not in err


def test_missing_columns_say_what_was_found(build_args, tmp_path, capsys, cli_env):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "a", "answer": "b"}\n' * 20)
    code, _, err = run([*build_args, "--data", bad, "-o", tmp_path / "p.gora"], capsys)
    assert code == 2 and "question" in err, err


def test_unwritable_output_folder(build_args, tmp_path, capsys, cli_env, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access  # root ignores permission bits, so ask the check itself to see a read-only folder
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p) == str(locked) else real_access(p, mode))
    code, _, err = run([*build_args, "-o", locked / "p.gora"], capsys)
    assert code == 2 and "not writable" in err


def test_broken_plans_are_refused_by_inspect(plan_file, tmp_path, capsys):
    data = plan_file.read_bytes()
    cases = {"truncated.gora": data[: len(data) // 2], "flipped.gora": data[:-9] + bytes([data[-9] ^ 1]) + data[-8:]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        code, _, err = run(["inspect", tmp_path / name], capsys)
        assert code == 2 and "Traceback" not in err and err.startswith("Error: ") and err.count("\n") == 1, err
    save_file({"w": __import__("torch").zeros(1)}, str(tmp_path / "w.safetensors"))
    code, _, err = run(["validate", tmp_path / "w.safetensors"], capsys)
    assert code == 2 and "not a GoRA plan" in err


def test_validate_rejects_another_model(plan_file, tmp_path, capsys):
    from tests.tiny import make_tokenizer, tiny_llama

    other = tiny_llama(vocab_size=len(make_tokenizer()))
    import torch

    with torch.no_grad():
        other.model.layers[1].self_attn.v_proj.weight.add_(0.01)
    other.save_pretrained(tmp_path / "other")
    make_tokenizer().save_pretrained(tmp_path / "other")
    code, _, err = run(["validate", plan_file, "--model", tmp_path / "other"], capsys)
    assert code == 2 and "model.layers.1.self_attn.v_proj" in err


def test_killed_build_leaves_no_plan(build_args, tmp_path):
    args = [str(a) for a in build_args] + ["--steps", "20000", "--batch-size", "1", "-o", str(tmp_path / "p.gora")]
    data = tmp_path / "many.jsonl"
    data.write_text('{"text": "the cat sat on the mat"}\n' * 20000)
    args[args.index("--data") + 1] = str(data)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "goraplan", *args], stderr=subprocess.PIPE, env=env, text=True)
    deadline = time.time() + 120
    seen = ""
    while "gradient steps" not in seen and time.time() < deadline:
        seen += proc.stderr.read(1)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc.send_signal(sig)
        proc.wait(timeout=60)
    assert not any(p.name.endswith((".gora", ".partial")) for p in tmp_path.iterdir())
