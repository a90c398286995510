"""A huggingface_hub cache filled by hand, laid out exactly as ``hf_hub_download`` stores a download.

``<cache>/models--OWNER--NAME/blobs/<etag>`` holds each file once, ``snapshots/<commit>/<file>`` links to
it, and ``refs/<branch>`` names the commit. With ``HF_HUB_OFFLINE=1``, huggingface_hub (and transformers
through it) then serves ``OWNER/NAME`` from this folder as if it had been fetched before.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def fill_hub_cache(cache: Path, repo_id: str, files: dict[str, Path], *, branch: str | None = "main",
                   commit: str | None = None) -> str:
    """Put `files` (name in the repo -> local file) into `cache` as one commit of `repo_id`; return the commit."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    digests = {name: hashlib.sha256(Path(src).read_bytes()).hexdigest() for name, src in files.items()}
    commit = commit or hashlib.sha1("".join(f"{n}:{d}" for n, d in sorted(digests.items())).encode()).hexdigest()
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for name, src in files.items():
        blob = repo / "blobs" / digests[name]
        blob.write_bytes(Path(src).read_bytes())
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if branch is not None:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / branch).write_text(commit)
    return commit


def folder_files(folder: Path) -> dict[str, Path]:
    """Every file under `folder`, by its path relative to it (a saved model or a plan card)."""
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def offline_hub(monkeypatch, cache: Path) -> Path:
    """Point huggingface_hub (and transformers through it) at `cache`, offline; return the cache folder.

    huggingface_hub reads ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` once, at import, into its ``constants``;
    the environment is set too, for any subprocess.
    """
    import huggingface_hub.constants

    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache
