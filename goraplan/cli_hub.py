"""`goraplan card` and `goraplan push`: thin click commands over goraplan.card and goraplan.hub."""

from __future__ import annotations

import click

from goraplan.untrusted import printable

__all__ = ["card_cmd", "push_cmd"]


@click.command("card")
@click.argument("plan_path", metavar="PLAN")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Folder to write (new).")
@click.option("--repo", "repo_id", default=None, metavar="OWNER/NAME",
              help="Hub repository the card's commands name (default: OWNER/NAME as a placeholder).")
@click.option("--revision", default=None, help="Branch the card's commands name (with --repo).")
@click.option("--overwrite", is_flag=True, help="Replace the folder if it exists.")
def card_cmd(plan_path: str, output: str, repo_id: str | None, revision: str | None, overwrite: bool) -> None:
    """Write a Hub-ready plan card folder: the plan, README.md, the rank picture, provenance.json.

    \b
    PLAN is a .gora file or a Hub repository OWNER/NAME[@REVISION].
    Example:
      goraplan card plan.gora -o card --repo team-a/sarcasm-plan
    """
    from goraplan.card import CARD_FILES, write_card

    out = write_card(plan_path, output, repo_id=repo_id, revision=revision, overwrite=overwrite)
    click.echo(f"wrote {printable(out)}: {', '.join(CARD_FILES)}")
    click.echo(f"publish it: goraplan push {printable(plan_path)} {repo_id or 'OWNER/NAME'}"
               + (f" --revision {revision}" if revision else ""))


@click.command("push")
@click.argument("plan_path", metavar="PLAN")
@click.argument("repo_id", metavar="OWNER/NAME")
@click.option("--revision", default=None, help="Branch to push to (created when missing); default: main.")
@click.option("--private", is_flag=True, help="Create the repository private (an existing one keeps its visibility).")
def push_cmd(plan_path: str, repo_id: str, revision: str | None, private: bool) -> None:
    """Upload a plan with its plan card (what `goraplan card` writes) to a Hub model repository.

    \b
    Needs a login (hf auth login, or HF_TOKEN). Example:
      goraplan push plan.gora team-a/sarcasm-plan --revision v1
    """
    from goraplan.hub import push_plan

    commit = push_plan(plan_path, repo_id, revision=revision, private=private)
    source = f"{repo_id}@{revision}" if revision else repo_id
    click.echo(f"pushed {printable(plan_path)} to {getattr(commit, 'commit_url', repo_id)}")
    click.echo(f"use it: gorafit run {source}")
