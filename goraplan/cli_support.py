"""What both command lines share: one place that turns library errors into one sentence and exit code 2.

Set ``GORA_DEBUG=1`` to see the full traceback instead.
"""

from __future__ import annotations

import os
import sys

import click

from goraplan.errors import GoraError
from goraplan.untrusted import printable


def run_cli(group: click.Group, args: list[str] | None = None) -> None:
    """Run a click group; a `GoraError` becomes ``Error: <sentence>`` on stderr and exit code 2."""
    try:
        # Without standalone mode click returns ctx.exit(n)'s code instead of exiting with it.
        code = group.main(args=args, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:  # usage errors, bad parameters: click's own exit codes (2)
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except GoraError as exc:
        if os.environ.get("GORA_DEBUG"):
            raise
        click.echo(f"Error: {printable(exc)}", err=True)  # it may quote a file: no control character acts
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
