"""Running a click command line the way a user does, inside a test: exit code, stdout and stderr."""

from __future__ import annotations

import pytest

from goraplan.cli_support import run_cli


def run_command(group, args, capsys) -> tuple[int, str, str]:
    """Run ``group`` with ``args`` through the CLIs' own error handling (one sentence, exit code 2)."""
    with pytest.raises(SystemExit) as exc:
        run_cli(group, [str(a) for a in args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err
