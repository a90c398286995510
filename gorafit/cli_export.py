"""`gorafit export` and `gorafit verify`: thin click commands over gorafit.export and gorafit.verify.

Library errors are `GoraError`s; the `gorafit` group's wrapper (goraplan.cli_support.run_cli) turns
them into one sentence and exit code 2. `verify` exits 1 when the export does not match.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from gorafit.export import DTYPES, FORMATS, export_merged, export_onnx, export_peft
from gorafit.verify import ENGINES, verify
from goraplan.errors import GoraError
from goraplan.untrusted import printable

__all__ = ["export_cmd", "verify_cmd"]

_TRUST_HELP = "Run Python code shipped with the base model (its config's auto_map); off unless given, never asked."


@click.command("export")
@click.argument("run_or_adapter", metavar="RUN_OR_ADAPTER", type=click.Path(file_okay=True, dir_okay=True))
@click.option("--format", "format_", type=click.Choice(FORMATS), default="peft", show_default=True,
              help="peft: adapter folder for vLLM/PEFT; merged: base with the adapter merged in; onnx: merged, as ONNX.")
@click.option("-o", "--output", "output", required=True, type=click.Path(), help="Output folder (must not exist).")
@click.option("--vllm-legacy", is_flag=True,
              help="peft only: fold each module's scaling into lora_B for vLLM older than 0.32.")
@click.option("--max-rank", "max_rank", type=click.IntRange(min=1), default=None,
              help="peft only: replace each module whose rank exceeds R by the best rank-R approximation of its update "
              "(truncated SVD), so vLLM serves it at a smaller --max-lora-rank; prints how much of each update's norm "
              "is kept, and `gorafit verify` states the log-prob change.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
              help="merged/onnx: dtype of the written weights (merging itself is done in float32).")
@click.option("--base", "base", default=None,
              help="Base model (Hub id[@REVISION], folder or built-in name); default: the adapter's "
              "base_model_name_or_path, at the revision it records.")
@click.option("--trust-remote-code", is_flag=True, help=_TRUST_HELP)
@click.option("--overwrite", is_flag=True, help="Replace OUT if it is a previous export (nothing else is deleted).")
def export_cmd(run_or_adapter: str, format_: str, output: str, vllm_legacy: bool, max_rank: int | None, dtype: str,
               base: str | None, trust_remote_code: bool, overwrite: bool) -> None:
    """Export a trained adapter (a `gorafit run` folder or a PEFT adapter folder), or a plan's untrained
    starting adapter (a .gora file) for tools that take an adapter path.

    \b
    Examples:
      gorafit export plan.gora --format peft -o out/start-adapter
      gorafit export runs/sarcasm --format peft -o out/gora-adapter
      gorafit export runs/sarcasm --format peft --vllm-legacy -o out/gora-adapter-legacy
      gorafit export runs/sarcasm --format peft --max-rank 16 -o out/gora-adapter-r16
      gorafit export runs/sarcasm --format merged --dtype bfloat16 -o out/merged
      gorafit export runs/sarcasm --format onnx -o out/onnx
    """
    if Path(run_or_adapter).expanduser().is_file():
        _export_plan(run_or_adapter, format_, output, vllm_legacy, max_rank, dtype, base, trust_remote_code, overwrite)
        return
    if vllm_legacy and format_ != "peft":
        raise GoraError(f"--vllm-legacy applies to --format peft only (got --format {format_}): drop one of them.")
    if max_rank is not None and format_ != "peft":
        raise GoraError(f"--max-rank applies to --format peft only (got --format {format_}): export the adapter with "
                        f"--format peft --max-rank, or drop --max-rank.")
    if format_ == "peft":
        if dtype != "float32":
            raise GoraError("--dtype applies to --format merged and onnx; a peft export keeps the adapter's own dtype.")
        result = export_peft(run_or_adapter, output, vllm_legacy=vllm_legacy, overwrite=overwrite, max_rank=max_rank)
    elif format_ == "merged":
        result = export_merged(run_or_adapter, output, base=base, dtype=dtype, overwrite=overwrite,
                               trust_remote_code=trust_remote_code)
    else:
        result = export_onnx(run_or_adapter, output, base=base, dtype=dtype, overwrite=overwrite,
                             trust_remote_code=trust_remote_code)

    ranks = sorted(result.ranks.values())
    label = "peft, vLLM legacy" if result.vllm_legacy else result.format
    click.echo(f"Wrote {result.out} ({label}, {len(ranks)} modules, ranks {ranks[0]}..{ranks[-1]}) "
               f"in {result.seconds:.1f} s.")
    if result.compression is not None:
        click.echo(result.compression.summary())
        for m in sorted(result.compression.compressed, key=lambda m: m.kept):
            click.echo(f"  {printable(m.module)}: rank {m.rank} -> {m.new_rank}, {100 * m.kept:.3f}% of its update's "
                       f"norm kept, dropped {100 * m.relative_error:.2f}%")
    for problem in result.problems:
        click.echo(f"Warning: vLLM would refuse this adapter: {printable(problem)}", err=True)
    serve = result.serve_command(base)
    if serve:
        click.echo("Serve it with vLLM:")
        click.echo(f"  {printable(serve)}")
    click.echo(f"Check it: gorafit verify {result.out}"
               + (" --engine onnx" if result.format == "onnx" else "")
               + (f" --base {base}" if base else ""))


def _export_plan(plan_path: str, format_: str, output: str, vllm_legacy: bool, max_rank: int | None, dtype: str,
                 base: str | None, trust_remote_code: bool, overwrite: bool) -> None:
    """A plan file: its starting adapter, as a PEFT folder (nothing is trained yet, so nothing to merge)."""
    from gorafit.start_adapter import write_start_adapter
    from goraplan.plan import load_plan

    given = [flag for flag, on in (("--vllm-legacy", vllm_legacy), ("--max-rank", max_rank is not None),
                                   ("--dtype", dtype != "float32")) if on]
    if format_ != "peft" or given:
        what = f"--format {format_}" if format_ != "peft" else " and ".join(given)
        raise GoraError(f"{printable(plan_path)} is a plan: it exports as its untrained starting adapter with --format "
                        f"peft only ({what} needs a trained adapter): drop {what}, or train the plan with gorafit run.")
    plan = load_plan(plan_path)
    out = write_start_adapter(plan_path, output, overwrite=overwrite, base=base, trust_remote_code=trust_remote_code)
    ranks = sorted(m.rank for m in plan.manifest.modules)
    click.echo(f"Wrote {printable(out)} (peft, the untrained starting adapter of {printable(plan_path)}, {len(ranks)} "
               f"modules, ranks {ranks[0]}..{ranks[-1]}): load it with PeftModel.from_pretrained(base, "
               f"\"{printable(out)}\", is_trainable=True), or as the adapter path of another trainer.")


@click.command("verify")
@click.argument("export_dir", metavar="EXPORT", type=click.Path(exists=True, file_okay=False))
@click.option("--base", "base", default=None, help="Base model; default: the one recorded in the export.")
@click.option("--engine", type=click.Choice(ENGINES), default="peft", show_default=True,
              help="What runs the export: PEFT/transformers here, vLLM's offline engine, or onnxruntime.")
@click.option("--python", "python", default=None, type=click.Path(),
              help="vllm engine: the python of an environment with vLLM (default: this one, if it has vLLM).")
@click.option("--reference", default=None, type=click.Path(),
              help="The trained adapter or run folder to compare with; default: the one recorded in the export.")
@click.option("--prompt", "prompts", multiple=True, help="A prompt (repeatable); default: four built-in prompts.")
@click.option("--max-new-tokens", type=click.IntRange(1, 4096), default=16, show_default=True)
@click.option("--tolerance", type=click.FloatRange(min=0), default=1e-4, show_default=True,
              help="Largest |logprob difference| accepted (float32).")
@click.option("--trust-remote-code", is_flag=True, help=_TRUST_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON.")
def verify_cmd(export_dir: str, base: str | None, engine: str, python: str | None, reference: str | None,
               prompts: tuple[str, ...], max_new_tokens: int, tolerance: float, trust_remote_code: bool,
               as_json: bool) -> None:
    """Check an export against the trained adapter: greedy tokens equal, log-probs within --tolerance.

    Exits 1 on a mismatch.

    \b
    Examples:
      gorafit verify out/gora-adapter
      gorafit verify out/gora-adapter --engine vllm --python .venv-serve/bin/python
      gorafit verify out/onnx --engine onnx
    """
    report = verify(export_dir, base=base, engine=engine, reference=reference, prompts=list(prompts) or None,
                    max_new_tokens=max_new_tokens, tolerance=tolerance, python=python,
                    trust_remote_code=trust_remote_code)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(report.summary())
        click.echo(f"Largest |logprob difference|: {report.max_abs_logprob_diff:.3g}")
    if not report.ok:
        sys.exit(1)
