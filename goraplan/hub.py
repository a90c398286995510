"""Plans and base models on the Hugging Face Hub, always through huggingface_hub and its cache.

A plan source that is not a local file and reads ``OWNER/NAME[@REVISION]`` is the ``plan.gora`` of that
Hub model repository: `resolve_plan_source` fetches it with ``hf_hub_download``, which keeps it in
huggingface_hub's cache, so the same argument works offline (``HF_HUB_OFFLINE=1``) once fetched.
A base model may carry its revision the same way: ``--model OWNER/NAME@REVISION``.
`push_plan` publishes a plan card folder (see `goraplan.card`) with ``HfApi``.
"""

from __future__ import annotations

import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from goraplan.errors import GoraError, first_line

__all__ = ["PLAN_FILENAME", "RepoRef", "parse_repo_ref", "resolve_plan_source", "split_model_revision", "push_plan"]

PLAN_FILENAME = "plan.gora"
# OWNER/NAME as the Hub spells repository ids, then an optional @REVISION (branch, tag or commit).
_REPO_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*)(?:@(?P<revision>[^\s@]+))?$")


@dataclass(frozen=True)
class RepoRef:
    """A Hub model repository, optionally at one revision."""

    repo_id: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo_id + (f"@{self.revision}" if self.revision else "")


def parse_repo_ref(text: str | os.PathLike) -> RepoRef | None:
    """``OWNER/NAME[@REVISION]`` -> `RepoRef`; anything else (a path, a file name ending in .gora) -> None.

    >>> parse_repo_ref("team-a/sarcasm-plan@v1")
    RepoRef(repo_id='team-a/sarcasm-plan', revision='v1')
    >>> parse_repo_ref("plans/a.gora"), parse_repo_ref("./team-a/plan"), parse_repo_ref("a/b/c")
    (None, None, None)
    """
    text = os.fspath(text)
    match = _REPO_REF.match(text)
    if match is None or match["repo"].endswith((".gora", ".", "..")) or ".." in match["repo"]:
        return None
    return RepoRef(match["repo"], match["revision"])


def resolve_plan_source(source: str | os.PathLike) -> Path:
    """The local file a plan argument names: itself when it exists here, else ``plan.gora`` of a Hub repo.

    Anything that is neither an existing path nor ``OWNER/NAME[@REVISION]`` comes back unchanged, so the
    caller's own "does not exist" message speaks about it.

    >>> resolve_plan_source("team-a/sarcasm-plan@v1")  # doctest: +SKIP
    PosixPath('~/.cache/huggingface/hub/models--team-a--sarcasm-plan/snapshots/<commit>/plan.gora')
    """
    path = Path(source).expanduser()
    if path.exists():
        return path
    ref = parse_repo_ref(source)
    if ref is None:
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(ref.repo_id, PLAN_FILENAME, revision=ref.revision, repo_type="model"))
    except Exception as exc:  # huggingface_hub's errors for offline, missing repo, revision or file, HTTP
        raise GoraError(hub_error_sentence(exc, ref, PLAN_FILENAME, local=str(source))) from None


def split_model_revision(name: str, revision: str | None = None) -> tuple[str, str | None]:
    """``OWNER/NAME@REVISION`` -> ``(OWNER/NAME, REVISION)``; a separate `revision` must not disagree.

    A local folder whose name contains ``@`` stays a folder.

    >>> split_model_revision("HuggingFaceTB/SmolLM2-135M@v1.0")
    ('HuggingFaceTB/SmolLM2-135M', 'v1.0')
    >>> split_model_revision("HuggingFaceTB/SmolLM2-135M", "main")
    ('HuggingFaceTB/SmolLM2-135M', 'main')
    """
    if "@" not in name or Path(name).expanduser().exists():
        return name, revision
    ref = parse_repo_ref(name)
    if ref is None:
        raise GoraError(f"model {name!r} has an @ but is not OWNER/NAME@REVISION: give a Hub id with a revision "
                        "(e.g. HuggingFaceTB/SmolLM2-135M@main) or an existing folder.")
    if revision is not None and revision != ref.revision:
        raise GoraError(f"model {name!r} names revision {ref.revision} but --revision says {revision}: give one of them.")
    return ref.repo_id, ref.revision


def hub_error_sentence(exc: BaseException, ref: RepoRef, filename: str, *, local: str | None = None,
                       instead: str = "give a local file") -> str:
    """One sentence for a huggingface_hub failure: what was asked for, what went wrong, what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{local} is not a local file, and " if local else ""
    wanted = f"{filename} of the Hub model repository {ref}"
    if isinstance(exc, GatedRepoError):
        return f"{where}{ref.repo_id} is a gated repository: accept its terms on the Hub and log in (hf auth login)."
    if isinstance(exc, RepositoryNotFoundError):
        return (f"{where}the Hub has no model repository {ref.repo_id} (or it is private): check the name, "
                "or log in with hf auth login.")
    if isinstance(exc, RevisionNotFoundError):
        return f"{where}the Hub repository {ref.repo_id} has no revision {ref.revision}: check the branch, tag or commit."
    if isinstance(exc, RemoteEntryNotFoundError):
        return f"{where}the Hub repository {ref} has no {filename}: check the repository name and revision."
    if isinstance(exc, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
        if constants.is_offline_mode():
            return (f"{where}{wanted} is not in the huggingface_hub cache ({constants.HF_HUB_CACHE}) and "
                    f"HF_HUB_OFFLINE is set: fetch it once with network access, or {instead}.")
        return (f"{where}{wanted} could not be fetched (no connection to the Hub) and is not cached: "
                f"check the network, or {instead}.")
    if isinstance(exc, HfHubHTTPError):
        return f"{where}the Hub refused {wanted} ({first_line(exc)}): check the name, revision and your login."
    return f"{where}{wanted} could not be fetched ({type(exc).__name__}: {first_line(exc)}): {instead}."


def push_plan(
    plan_source: str | os.PathLike,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    api=None,
) -> object:
    """Publish a plan with its plan card to the Hub model repository `repo_id`; return the ``CommitInfo``.

    The folder uploaded is exactly what ``goraplan card`` writes. `api` is an ``HfApi`` (default: a new one,
    with the login of ``hf auth login`` or ``HF_TOKEN``). A `revision` branch is created when missing.

    >>> push_plan("plan.gora", "team-a/sarcasm-plan", revision="v1")  # doctest: +SKIP
    """
    from goraplan.card import write_card

    ref = parse_repo_ref(repo_id)
    if ref is None or ref.revision is not None:
        raise GoraError(f"{repo_id!r} is not a Hub repository id: give OWNER/NAME (the branch goes in --revision).")
    with tempfile.TemporaryDirectory(prefix="goraplan-card-") as tmp:
        folder = write_card(plan_source, Path(tmp) / "card", repo_id=repo_id, revision=revision)
        if api is None:
            from huggingface_hub import HfApi

            api = HfApi()
        target = RepoRef(repo_id, revision)
        try:
            api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
            if revision is not None:
                api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
            return api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                                     commit_message=f"GoRA plan {_plan_sha(folder)[:12]} (goraplan push)")
        except GoraError:
            raise
        except Exception as exc:  # no network, no login, no write access
            raise GoraError(_push_error_sentence(exc, target)) from None


def _push_error_sentence(exc: BaseException, target: RepoRef) -> str:
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled) or constants.is_offline_mode():
        return f"cannot push to {target}: HF_HUB_OFFLINE is set; unset it on a machine that reaches the Hub."
    if isinstance(exc, LocalTokenNotFoundError):
        return f"cannot push to {target}: not logged in; run hf auth login or set HF_TOKEN."
    if isinstance(exc, HfHubHTTPError):
        return f"the Hub refused the push to {target} ({first_line(exc)}): check your login and write access."
    return (f"cannot push to {target} ({type(exc).__name__}: {first_line(exc)}): check the network and your "
            "login (hf auth login).")


def _plan_sha(folder: Path) -> str:
    from goraplan.files import file_sha256

    return file_sha256(folder / PLAN_FILENAME)
