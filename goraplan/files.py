"""Writing outputs: never half a file, never over an input, readable by whom the umask says.

Every file and folder that goraplan and gorafit write goes through here:

- **Atomic.** Content goes to a temporary name beside the target (``.<name>.<host>-<pid>-<random>.partial``)
  and is renamed onto the target only once complete; a rename inside one folder is atomic, so an
  interruption leaves the old output or none, never half of one. Leftovers of a killed process
  (SIGKILL runs no cleanup) are swept the next time the same target is written.
- **Never over an input.** `check_not_input` refuses an output that is an input, contains one or lies inside
  an input folder, after resolving symlinks (and hard links, for files that exist).
- **Permissions follow the umask**, as for any file ``open()`` creates: ``mkstemp``/``mkdtemp`` would make
  them 0600/0700, unreadable to the service account that serves an export.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from goraplan.errors import GoraError

PARTIAL_SUFFIX = ".partial"
REPLACED_SUFFIX = ".replaced"  # an old output moved aside while its replacement is renamed in
PathLike = str | os.PathLike


def current_umask() -> int:
    """The process's umask (reading it means setting it; it is set straight back).

    >>> old = os.umask(0o027); current_umask() == 0o027; _ = os.umask(old)
    True
    """
    mask = os.umask(0)
    os.umask(mask)
    return mask


def honour_umask(path: PathLike) -> None:
    """Give `path`, and everything under it if it is a folder, the permissions the umask gives a new file or
    folder: some writers (safetensors' ``save_file``, hence ``save_pretrained``) create files 0600 whatever it is.

    >>> d = Path(tempfile.mkdtemp()); f = d / "w.safetensors"; _ = f.write_text(""); f.chmod(0o600)
    >>> old = os.umask(0o022); honour_umask(d); _ = os.umask(old); oct(f.stat().st_mode & 0o777)
    '0o644'
    """
    path = Path(path)
    mask = current_umask()
    for entry in [path, *(path.rglob("*") if path.is_dir() else [])]:
        if not entry.is_symlink():
            entry.chmod((0o777 if entry.is_dir() else 0o666) & ~mask)


def file_sha256(path: PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks.

    >>> p = Path(tempfile.mkdtemp()) / "x"; _ = p.write_bytes(b"abc"); file_sha256(p)[:16]
    'ba7816bf8f01cfea'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------ outputs vs inputs
def check_not_input(output: PathLike, inputs: Iterable[PathLike | None]) -> None:
    """Refuse an output that is an input, contains an input, or lies inside an input folder.

    Paths are compared after resolving symlinks; an existing output that is a hard link to an input
    counts as that input. ``None`` entries are skipped (optional inputs).

    >>> d = Path(tempfile.mkdtemp()); (d / "model").mkdir(); _ = (d / "data.jsonl").write_text("{}")
    >>> check_not_input(d / "plan.gora", [d / "data.jsonl", d / "model"])      # fine
    >>> check_not_input(d / "data.jsonl", [d / "data.jsonl"])                  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    goraplan.errors.GoraError: output .../data.jsonl is an input (.../data.jsonl): choose another output path.
    >>> check_not_input(d / "model" / "plan.gora", [d / "model"])              # doctest: +ELLIPSIS
    Traceback (most recent call last):
    goraplan.errors.GoraError: output .../model/plan.gora lies inside the input folder .../model: ...
    >>> check_not_input(d, [d / "data.jsonl"])                                 # doctest: +ELLIPSIS
    Traceback (most recent call last):
    goraplan.errors.GoraError: output ... contains the input .../data.jsonl: replacing it would delete ...
    """
    out = _resolved(output)
    for given in inputs:
        if given is None:
            continue
        source = _resolved(given)
        if out == source or _same_file(out, source):
            raise GoraError(f"output {output} is an input ({given}): choose another output path.")
        if source in out.parents:
            raise GoraError(f"output {output} lies inside the input folder {given}: choose an output path "
                            "outside it.")
        if out in source.parents:
            raise GoraError(f"output {output} contains the input {given}: replacing it would delete that input; "
                            "choose another output path.")


def check_can_write(output: PathLike, *, overwrite: bool = False, inputs: Iterable[PathLike | None] = (),
                    kind: Literal["file", "folder"] = "file", make_parents: bool = False,
                    overwrite_flag: str = "--overwrite") -> Path:
    """Everything that can be known before the work starts about writing `output`; one sentence if it cannot be.

    Checks, in order: not an input (`check_not_input`); the right kind (a file path that is a folder, or the
    reverse); that an existing output may be replaced (`overwrite`); that its folder exists (or, with
    `make_parents`, can be created) and is writable. Returns the output as a ``Path``.

    >>> d = Path(tempfile.mkdtemp()); _ = (d / "old.gora").write_text("x")
    >>> check_can_write(d / "new.gora").name
    'new.gora'
    >>> check_can_write(d / "old.gora")                                        # doctest: +ELLIPSIS
    Traceback (most recent call last):
    goraplan.errors.GoraError: output .../old.gora already exists: pass --overwrite to replace it, or choose ...
    >>> check_can_write(d / "old.gora", overwrite=True).name
    'old.gora'
    """
    path = Path(output).expanduser()
    check_not_input(path, inputs)
    exists = path.exists() or path.is_symlink()
    if kind == "file" and path.is_dir():
        raise GoraError(f"output {output} is a folder; give a file name such as {path / 'plan.gora'}.")
    if kind == "folder" and exists and not path.is_dir():
        raise GoraError(f"output {output} is a file, not a folder: remove it or choose another output path.")
    if exists and not overwrite:
        raise GoraError(f"output {output} already exists: pass {overwrite_flag} to replace it, "
                        "or choose another output path.")
    folder = path.parent
    if not make_parents and not folder.is_dir():
        raise GoraError(f"output folder {folder} does not exist; create it first or choose another output path.")
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise GoraError(f"cannot create output {output}: {folder} is a file, not a folder.")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise GoraError(f"output folder {folder} is not writable; choose another output path.")
    return path


# ------------------------------------------------------------------------------------------ atomic writes
@contextmanager
def atomic_file(target: PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it onto `target` only if the block succeeds.

    The temporary file exists (empty); the target gets the umask's permissions whatever the writer did,
    and a symlink at `target` is replaced, never written through.

    >>> d = Path(tempfile.mkdtemp())
    >>> with atomic_file(d / "a.txt") as tmp:
    ...     _ = tmp.write_text("done")
    >>> (d / "a.txt").read_text(), sorted(p.name for p in d.iterdir())
    ('done', ['a.txt'])
    """
    target = Path(target).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_partials(target)
    with _writable(target):
        fd, name = tempfile.mkstemp(prefix=_partial_prefix(target), suffix=PARTIAL_SUFFIX, dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    mode = 0o666 & ~current_umask()
    try:
        yield tmp
        tmp.chmod(mode)  # after the block: some writers (safetensors) create the file anew, private
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(target: PathLike, *, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `target`; rename it to `target` only if the block succeeds.

    If `target` already exists: with ``replace=True`` the old one is moved aside, the new one renamed in,
    then the old one deleted (no moment without a complete `target`); without it, an existing non-empty
    folder is kept (another process finished the same job first, as in the model cache).

    >>> d = Path(tempfile.mkdtemp())
    >>> with atomic_dir(d / "out") as tmp:
    ...     _ = (tmp / "config.json").write_text("{}")
    >>> sorted(p.name for p in (d / "out").iterdir()), sorted(p.name for p in d.iterdir())
    (['config.json'], ['out'])
    """
    target = Path(target).expanduser()
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_partials(target)
    with _writable(target):
        tmp = Path(tempfile.mkdtemp(prefix=_partial_prefix(target), suffix=PARTIAL_SUFFIX, dir=target.parent))
    old: Path | None = None
    try:
        tmp.chmod(0o777 & ~current_umask())
        yield tmp
        if replace and (target.exists() or target.is_symlink()):
            old = Path(tempfile.mkdtemp(prefix=_partial_prefix(target), suffix=REPLACED_SUFFIX, dir=target.parent))
            os.replace(target, old / "replaced")
        try:
            os.replace(tmp, target)
        except OSError:
            if old is not None:  # put the old output back rather than lose it
                os.replace(old / "replaced", target)
            if replace or not target.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_dir(out: PathLike, *, overwrite: bool, inputs: Iterable[PathLike | None] = (),
               overwrite_flag: str = "--overwrite") -> Iterator[Path]:
    """`check_can_write` for a folder output, then `atomic_dir` that replaces it: the export pattern.

    >>> d = Path(tempfile.mkdtemp()); (d / "run").mkdir()
    >>> with staged_dir(d / "export", overwrite=False, inputs=[d / "run"]) as tmp:
    ...     _ = (tmp / "adapter_model.safetensors").write_bytes(b"")
    >>> with staged_dir(d / "run" / "export", overwrite=True, inputs=[d / "run"]) as tmp:  # doctest: +ELLIPSIS
    ...     pass
    Traceback (most recent call last):
    goraplan.errors.GoraError: output .../run/export lies inside the input folder .../run: ...
    """
    path = check_can_write(out, overwrite=overwrite, inputs=inputs, kind="folder", make_parents=True,
                           overwrite_flag=overwrite_flag)
    with atomic_dir(path, replace=True) as tmp:
        yield tmp


def write_bytes_atomic(path: PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically; return the path."""
    path = Path(path).expanduser()
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_text_atomic(path: PathLike, text: str) -> Path:
    """Write UTF-8 `text` to `path` atomically; return the path.

    >>> p = write_text_atomic(Path(tempfile.mkdtemp()) / "note.txt", "hi\\n"); p.read_text()
    'hi\\n'
    """
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: PathLike, data: Any, *, indent: int | None = 2) -> Path:
    """Write `data` as strict JSON atomically: non-finite floats become ``null`` (bare NaN is not JSON).

    >>> p = write_json_atomic(Path(tempfile.mkdtemp()) / "run.json", {"loss": float("nan"), "step": 3})
    >>> json.loads(p.read_text())
    {'loss': None, 'step': 3}
    """
    return write_text_atomic(path, json_dumps(data, indent=indent) + "\n")


def json_dumps(data: Any, *, indent: int | None = None) -> str:
    """``json.dumps`` that never writes bare NaN/Infinity (they become ``null``); other objects via ``str``.

    >>> json_dumps({"a": [1.5, float("inf")], "p": Path("x")})
    '{"a": [1.5, null], "p": "x"}'
    """
    return json.dumps(json_ready(data), indent=indent, allow_nan=False, default=str)


def json_ready(value: Any) -> Any:
    """`value` with every non-finite float (at any depth of dicts, lists and tuples) replaced by ``None``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_ready(v) for v in value]
    return value


def sweep_partials(target: PathLike) -> list[Path]:
    """Clean up after processes of this host that died while writing `target` (SIGKILL runs no cleanup).

    Their temporary copies are deleted; an old output that was moved aside to be replaced is put back if
    nothing took its place. Work of a live process, or of another host (a shared file system), is left alone.
    """
    target = Path(target)
    done = []
    try:
        candidates = list(target.parent.glob(f".{_glob_escape(target.name)}.*"))
    except OSError:
        return done
    for path in candidates:
        stem, dot, suffix = path.name[len(target.name) + 2:].rpartition(".")
        owner = stem.split("-")
        if not dot or f".{suffix}" not in (PARTIAL_SUFFIX, REPLACED_SUFFIX) or len(owner) != 3:
            continue
        host, pid, _ = owner
        if host != _HOST or not pid.isdigit() or _alive(int(pid)):
            continue
        if f".{suffix}" == REPLACED_SUFFIX and not (target.exists() or target.is_symlink()):
            os.replace(path / "replaced", target)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        done.append(path)
    return done


# ------------------------------------------------------------------------------------------ internals
_HOST = socket.gethostname().replace(".", "_").replace("-", "_") or "host"


def _partial_prefix(target: Path) -> str:
    # mkstemp appends random letters and digits (never "-" or "."), then the suffix: host-pid-random.
    return f".{target.name}.{_HOST}-{os.getpid()}-"


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _writable(target: Path) -> Iterator[None]:
    """One sentence instead of a traceback when the output's folder refuses new files."""
    try:
        yield
    except PermissionError:
        raise GoraError(f"cannot write {target}: its folder {target.parent} is not writable; "
                        "choose another output path.") from None
    except OSError as exc:
        raise GoraError(f"cannot write {target} ({exc.strerror or exc}); choose another output path.") from None


def _resolved(path: PathLike) -> Path:
    return Path(os.path.abspath(Path(path).expanduser())).resolve()


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False
