"""The build's progress: a bar on a terminal, a line every few percent in a log, nothing under TQDM_DISABLE."""

from __future__ import annotations

import io

import pytest

from goraplan.cli import cli
from goraplan.progress import LineProgress, progress
from tests.cli_runner import run_command


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_one_line_every_five_percent_and_no_carriage_returns(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    log = io.StringIO()
    bar = progress(64, "gradient steps", stream=log)
    assert isinstance(bar, LineProgress)
    for step in range(64):
        bar.advance(1, loss=f"{step:.4f}")
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert len(lines) == 20  # at 5%, 10%, ... of 64 steps: steps 4, 7, 10, 13, 16, 20, ..., 64
    assert lines[0].startswith("gradient steps: 4/64 (6%)") and lines[-1].startswith("gradient steps: 64/64 (100%)")
    assert lines[-1].endswith("loss=63.0000")
    done = [int(line.split(":")[1].split("/")[0]) for line in lines]
    assert done == sorted(set(done))


def test_a_terminal_gets_tqdm_and_tqdm_disable_silences_both(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    screen = Terminal()
    bar = progress(10, "gradient steps", stream=screen)
    bar.advance(5, loss="1.0")
    bar.close()
    assert "\r" in screen.getvalue() and "5/10" in screen.getvalue()
    monkeypatch.setenv("TQDM_DISABLE", "1")
    for stream in (io.StringIO(), Terminal()):
        bar = progress(10, "gradient steps", stream=stream)
        bar.advance(10)
        bar.close()
        assert stream.getvalue() == ""
    monkeypatch.delenv("TQDM_DISABLE")
    quiet = io.StringIO()
    progress(10, "x", stream=quiet, enabled=False).advance(10)
    assert quiet.getvalue() == ""


def build(args, capsys):
    return run_command(cli, args, capsys)


@pytest.fixture()
def build_args(tiny_model_dir, tiny_text_data):
    return ["build", "--model", tiny_model_dir, "--data", tiny_text_data, "--steps", 4, "--batch-size", 2,
            "--rank", 4, "--max-length", 32]


def test_build_logs_lines_and_honours_tqdm_disable(build_args, tmp_path, capsys, cli_env, monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    code, _, err = build([*build_args, "-o", tmp_path / "a.gora"], capsys)
    assert code == 0, err
    assert "gradient steps: 4/4 (100%)" in err and "\r" not in err, err
    monkeypatch.setenv("TQDM_DISABLE", "1")
    code, _, err = build([*build_args, "-o", tmp_path / "b.gora"], capsys)
    assert code == 0, err
    assert "gradient steps" not in err and "\r" not in err
