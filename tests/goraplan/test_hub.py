"""Plans and base models from the Hub, through a huggingface_hub cache filled beforehand and HF_HUB_OFFLINE=1.

No Hub is reachable from the test machines, so the cache is laid out by hand exactly as huggingface_hub
stores a download (tests/hub_cache.py); everything else, hf_hub_download and transformers' loading
included, is the real code path. The upload in `goraplan push` is the one step that needs a Hub: its
tests stop at the HfApi calls, with an HfApi whose network calls record their arguments instead.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, scan_cache_dir

import goraplan
from goraplan.cli import cli
from goraplan.cli_support import run_cli
from goraplan.errors import GoraError
from goraplan.hub import (
    PLAN_FILENAME,
    RepoRef,
    parse_repo_ref,
    push_plan,
    resolve_plan_source,
    split_model_revision,
)
from goraplan.models import hub_commit, load_model, plan_base_model
from tests.cli_runner import run_command
from tests.hub_cache import fill_hub_cache, folder_files, offline_hub
from tests.tiny import make_tokenizer, random_batches, tiny_llama


def run(args, capsys):
    return run_command(cli, args, capsys)


@pytest.fixture(scope="module")
def two_plans(tmp_path_factory):
    """Two different plans saved as files (different data, so different ranks or B)."""
    d = tmp_path_factory.mktemp("plans")
    settings = goraplan.PlanSettings(steps=2, rank=4)
    a = goraplan.build_plan(tiny_llama(), random_batches(2, seed=1), settings).save(d / "a.gora")
    b = goraplan.build_plan(tiny_llama(), random_batches(2, seed=2), settings).save(d / "b.gora")
    return a, b


@pytest.fixture()
def hub(monkeypatch, tmp_path):
    return offline_hub(monkeypatch, tmp_path / "hf-cache")


# ---------------------------------------------------------------------------------------------- references
@pytest.mark.parametrize("text, expected", [
    ("team-a/sarcasm-plan", RepoRef("team-a/sarcasm-plan")),
    ("team-a/sarcasm-plan@v1.0", RepoRef("team-a/sarcasm-plan", "v1.0")),
    ("HuggingFaceTB/SmolLM2-135M@" + "a" * 40, RepoRef("HuggingFaceTB/SmolLM2-135M", "a" * 40)),
    ("plan.gora", None), ("plans/a.gora", None), ("./team-a/plan", None), ("/abs/plan", None),
    ("a/b/c", None), ("team-a/plan@", None), ("team-a/plan@x@y", None), ("../plan", None),
])
def test_parse_repo_ref(text, expected):
    assert parse_repo_ref(text) == expected


def test_model_revision_from_name_or_option(tmp_path):
    assert split_model_revision("team-a/tiny@v1") == ("team-a/tiny", "v1")
    assert split_model_revision("team-a/tiny", "v1") == ("team-a/tiny", "v1")
    assert split_model_revision("team-a/tiny@v1", "v1") == ("team-a/tiny", "v1")
    with pytest.raises(GoraError, match="names revision v1 but --revision says v2"):
        split_model_revision("team-a/tiny@v1", "v2")
    folder = tmp_path / "models@2024"
    folder.mkdir()
    assert split_model_revision(str(folder)) == (str(folder), None)  # an existing folder keeps its @


# ---------------------------------------------------------------------------------------------- plans from the Hub
def test_plan_comes_from_the_hub_cache_offline(two_plans, hub):
    a, b = two_plans
    main = fill_hub_cache(hub, "team-a/sarcasm-plan", {PLAN_FILENAME: a})
    v1 = fill_hub_cache(hub, "team-a/sarcasm-plan", {PLAN_FILENAME: b}, branch="v1")
    # The layout is huggingface_hub's own: its cache scanner reads both commits and their branches.
    [repo] = scan_cache_dir(hub).repos
    assert repo.repo_id == "team-a/sarcasm-plan"
    assert {r.commit_hash: set(r.refs) for r in repo.revisions} == {main: {"main"}, v1: {"v1"}}

    resolved = resolve_plan_source("team-a/sarcasm-plan")
    assert resolved == hub / "models--team-a--sarcasm-plan" / "snapshots" / main / PLAN_FILENAME
    plan = goraplan.load_plan("team-a/sarcasm-plan")
    assert plan.sha256 == goraplan.load_plan(a).sha256
    assert goraplan.load_plan("team-a/sarcasm-plan@v1").sha256 == goraplan.load_plan(b).sha256
    assert goraplan.load_plan(f"team-a/sarcasm-plan@{main}").sha256 == plan.sha256


def test_a_local_file_wins_over_a_hub_id(two_plans, hub, tmp_path, monkeypatch):
    a, b = two_plans
    fill_hub_cache(hub, "team-a/sarcasm-plan", {PLAN_FILENAME: a})
    (tmp_path / "team-a").mkdir()
    shutil.copyfile(b, tmp_path / "team-a" / "sarcasm-plan")
    monkeypatch.chdir(tmp_path)
    assert goraplan.load_plan("team-a/sarcasm-plan").sha256 == goraplan.load_plan(b).sha256


@pytest.mark.parametrize("source, message", [
    ("team-a/no-such-plan", r"team-a/no-such-plan is not a local file, and plan.gora of the Hub model repository "
                            r"team-a/no-such-plan is not in the huggingface_hub cache .* HF_HUB_OFFLINE is set"),
    ("team-a/sarcasm-plan@v9", r"plan.gora of the Hub model repository team-a/sarcasm-plan@v9 is not in the "
                               r"huggingface_hub cache"),
    ("plans/missing.gora", r"plan file plans/missing.gora does not exist"),
])
def test_plan_not_cached_offline_is_one_sentence(two_plans, hub, capsys, source, message):
    fill_hub_cache(hub, "team-a/sarcasm-plan", {PLAN_FILENAME: two_plans[0]})
    for command in (["inspect", source], ["validate", source], ["diff", two_plans[0], source]):
        code, out, err = run(command, capsys)
        assert code == 2 and out == ""
        assert err.startswith("Error: ") and err.count("\n") == 1, err
        assert __import__("re").search(message, err), err


def test_cli_commands_take_hub_plans(two_plans, hub, capsys):
    a, b = two_plans
    fill_hub_cache(hub, "team-a/sarcasm-plan", {PLAN_FILENAME: a})
    fill_hub_cache(hub, "team-a/sarcasm-plan", {PLAN_FILENAME: b}, branch="v1")
    code, out, _ = run(["inspect", "team-a/sarcasm-plan", "--no-modules"], capsys)
    assert code == 0 and f"plan       {goraplan.load_plan(a).sha256}" in out
    code, out, _ = run(["validate", "team-a/sarcasm-plan@v1"], capsys)
    assert code == 0 and "team-a/sarcasm-plan@v1: valid plan" in out
    code, out, _ = run(["diff", "team-a/sarcasm-plan", "team-a/sarcasm-plan@v1"], capsys)
    assert code == 0 and "calibration data" in out and "Spearman" in out


# ---------------------------------------------------------------------------------------------- pinned models
@pytest.fixture()
def hub_model(hub, tmp_path):
    """team-a/tiny on the Hub cache: main and v1.0 are two commits with different weights."""
    tok = make_tokenizer()
    commits = {}
    for branch, seed in (("main", 0), ("v1.0", 1)):
        model = tiny_llama(vocab_size=len(tok))
        if seed:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed)))
        folder = tmp_path / f"tiny-{branch}"
        model.save_pretrained(folder)
        tok.save_pretrained(folder)
        commits[branch] = fill_hub_cache(hub, "team-a/tiny", folder_files(folder), branch=branch)
    return commits


def test_load_model_at_a_revision_loads_that_commit(hub_model, tmp_path):
    assert hub_commit("team-a/tiny") == hub_model["main"]
    assert hub_commit("team-a/tiny@v1.0") == hub_commit("team-a/tiny", "v1.0") == hub_model["v1.0"]
    main, _ = load_model("team-a/tiny", device="cpu")
    v1, _ = load_model("team-a/tiny@v1.0", device="cpu")
    by_commit, _ = load_model("team-a/tiny", revision=hub_model["v1.0"], device="cpu")
    local, _ = load_model(str(tmp_path / "tiny-v1.0"), device="cpu")
    weight = "model.layers.0.self_attn.q_proj.weight"
    state = {k: m.state_dict()[weight] for k, m in {"main": main, "v1": v1, "commit": by_commit, "local": local}.items()}
    assert not torch.equal(state["main"], state["v1"])
    assert torch.equal(state["v1"], state["local"]) and torch.equal(state["commit"], state["local"])


def test_revision_errors_are_one_sentence(hub_model, tiny_model_dir):
    with pytest.raises(GoraError, match=r"could not load model 'team-a/tiny@v9': config.json of the Hub model "
                                        r"repository team-a/tiny@v9 is not in the huggingface_hub cache"):
        load_model("team-a/tiny@v9")
    with pytest.raises(GoraError, match="--revision v1 applies to Hub models, but .* is a local folder"):
        load_model(str(tiny_model_dir), revision="v1")
    with pytest.raises(GoraError, match="applies to Hub models, but smollm2-135m is a built-in model"):
        hub_commit("smollm2-135m", "v1")


def test_build_records_the_commit_and_validate_pins_it(hub_model, tiny_text_data, tmp_path, capsys, cli_env):
    common = ["--data", tiny_text_data, "--steps", 2, "--batch-size", 2, "--rank", 4, "--max-length", 16]
    code, _, err = run(["build", "--model", "team-a/tiny@v1.0", *common, "-o", tmp_path / "a.gora"], capsys)
    assert code == 0, err
    code, _, err = run(["build", "--model", tmp_path / "tiny-v1.0", *common, "-o", tmp_path / "local.gora"], capsys)
    assert code == 0, err
    code, _, err = run(["build", "--model", "team-a/tiny", *common, "-o", tmp_path / "main.gora"], capsys)
    assert code == 0, err
    pinned, local, main = (goraplan.load_plan(tmp_path / f"{n}.gora").manifest.base_model for n in ("a", "local", "main"))
    assert (pinned.name_or_path, pinned.revision) == ("team-a/tiny", hub_model["v1.0"])
    assert pinned.fingerprint == local.fingerprint != main.fingerprint  # the weights of v1.0, not of main
    assert local.revision is None and main.revision == hub_model["main"]

    code, out, _ = run(["inspect", tmp_path / "a.gora", "--no-modules"], capsys)
    assert f"model      team-a/tiny at revision {hub_model['v1.0']} (LlamaForCausalLM, float32)" in out
    code, out, _ = run(["validate", tmp_path / "a.gora", "--model", "team-a/tiny", "--revision", "v1.0"], capsys)
    assert code == 0 and "matches the plan" in out
    code, _, err = run(["validate", tmp_path / "a.gora", "--model", "team-a/tiny"], capsys)  # main: other weights
    assert code == 2 and "fingerprint" in err


def test_plan_base_model_follows_the_plan_or_asks_for_model(tmp_path):
    assert plan_base_model("team-a/tiny", "abc") == ("team-a/tiny", "abc")
    assert plan_base_model("team-a/tiny", "abc", revision="v2") == ("team-a/tiny", "v2")
    assert plan_base_model("./tiny", None, model="team-b/tiny@v1") == ("team-b/tiny", "v1")
    with pytest.raises(GoraError, match=r"built on the local folder \./team-a-only/tiny, which does not exist here: "
                                        r"pass --model"):
        plan_base_model("./team-a-only/tiny", None)


# ---------------------------------------------------------------------------------------------- push
class RecordingApi(HfApi):
    """A real HfApi whose three network calls record their arguments (and the uploaded folder) instead."""

    def __init__(self, keep: Path):
        super().__init__(token=False)
        self.keep, self.calls = keep, []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_branch(self, repo_id, **kwargs):
        self.calls.append(("create_branch", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))
        shutil.copytree(kwargs["folder_path"], self.keep)
        return "commit-info"


def test_push_uploads_the_card_folder_with_these_arguments(two_plans, tmp_path, capsys):
    a, _ = two_plans
    api = RecordingApi(tmp_path / "uploaded")
    assert push_plan(a, "team-a/sarcasm-plan", revision="v1", private=True, api=api) == "commit-info"
    names = [c[0] for c in api.calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    assert api.calls[0][1:] == ("team-a/sarcasm-plan", {"repo_type": "model", "private": True, "exist_ok": True})
    assert api.calls[1][2] == {"branch": "v1", "repo_type": "model", "exist_ok": True}
    upload = api.calls[2][2]
    assert upload["revision"] == "v1" and upload["repo_type"] == "model"
    assert upload["commit_message"].startswith(f"GoRA plan {goraplan.load_plan(a).sha256[:12]}")

    # What was uploaded is exactly what `goraplan card` writes for the same repository and branch.
    code, _, err = run(["card", a, "-o", tmp_path / "card", "--repo", "team-a/sarcasm-plan", "--revision", "v1"],
                       capsys)
    assert code == 0, err
    uploaded, card = folder_files(tmp_path / "uploaded"), folder_files(tmp_path / "card")
    assert sorted(uploaded) == sorted(card) == sorted(["plan.gora", "README.md", "ranks.png", "provenance.json"])
    for name in ("plan.gora", "README.md", "provenance.json"):
        assert uploaded[name].read_bytes() == card[name].read_bytes(), name
    assert uploaded["plan.gora"].read_bytes() == Path(a).read_bytes()
    assert "gorafit run team-a/sarcasm-plan@v1" in uploaded["README.md"].read_text()


def test_push_without_a_hub_is_one_sentence(two_plans, monkeypatch, tmp_path, capsys):
    offline_hub(monkeypatch, tmp_path / "hf-cache")
    code, out, err = run(["push", two_plans[0], "team-a/sarcasm-plan"], capsys)  # a real HfApi, offline
    assert code == 2 and err.startswith("Error: cannot push to team-a/sarcasm-plan: HF_HUB_OFFLINE is set")
    assert err.count("\n") == 1
    code, _, err = run(["push", two_plans[0], "team-a/sarcasm-plan@v1"], capsys)
    assert code == 2 and "give OWNER/NAME (the branch goes in --revision)" in err


# ---------------------------------------------------------------------------------------------- gorafit run
def test_gorafit_run_trains_a_hub_plan_on_the_commit_it_records(hub_model, hub, tiny_text_data, tmp_path, capsys,
                                                                 cli_env):
    import json

    from gorafit.cli import cli as fit_cli

    code, _, err = run(["build", "--model", "team-a/tiny@v1.0", "--data", tiny_text_data, "--steps", 2,
                        "--batch-size", 2, "--rank", 4, "--max-length", 16, "-o", tmp_path / "plan.gora"], capsys)
    assert code == 0, err
    fill_hub_cache(hub, "team-a/sarcasm-plan", {PLAN_FILENAME: tmp_path / "plan.gora"}, branch="v1")

    def fit(*args):
        with pytest.raises(SystemExit) as exc:
            run_cli(fit_cli, [str(a) for a in ["run", "team-a/sarcasm-plan@v1", *args, "--max-steps", 1,
                                               "--batch-size", 2, "--disable-tqdm", "--report-to", "none"]])
        return exc.value.code, *capsys.readouterr()

    # main holds other weights: only the recorded commit passes the fingerprint check
    code, _, err = fit("-o", tmp_path / "run")
    assert code == 0, err
    settings = json.loads((tmp_path / "run" / "run.json").read_text())["settings"]
    assert (settings["model"], settings["revision"]) == ("team-a/tiny", hub_model["v1.0"])
    adapter_config = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert (adapter_config["base_model_name_or_path"], adapter_config["revision"]) == ("team-a/tiny", hub_model["v1.0"])
    code, _, err = fit("--revision", "main", "-o", tmp_path / "run-main")
    assert code == 2 and "fingerprint" in err.splitlines()[-1]

    # export and verify rebuild the trained model over the base at the adapter's commit, not at main
    from gorafit.saved_adapter import load_adapted_model

    weight = "model.embed_tokens.weight"  # not adapted: the base's own
    v1, _ = load_model("team-a/tiny@v1.0", device="cpu")
    main, _ = load_model("team-a/tiny@main", device="cpu")
    adapted, _, _ = load_adapted_model(tmp_path / "run")
    assert torch.equal(adapted.get_base_model().state_dict()[weight], v1.state_dict()[weight])
    adapted, _, _ = load_adapted_model(tmp_path / "run", base="team-a/tiny@main")
    assert torch.equal(adapted.get_base_model().state_dict()[weight], main.state_dict()[weight])


def test_gorafit_run_asks_for_model_when_the_plans_folder_is_missing(tiny_model_dir, tiny_text_data, tmp_path,
                                                                      capsys, cli_env):
    from gorafit.cli import cli as fit_cli

    folder = tmp_path / "team-a-model"
    shutil.copytree(tiny_model_dir, folder)
    code, _, err = run(["build", "--model", folder, "--data", tiny_text_data, "--steps", 2, "--batch-size", 2,
                        "--rank", 4, "--max-length", 16, "-o", tmp_path / "plan.gora"], capsys)
    assert code == 0, err
    shutil.rmtree(folder)  # team B's machine: the plan names a folder it lacks
    with pytest.raises(SystemExit) as exc:
        run_cli(fit_cli, ["run", str(tmp_path / "plan.gora"), "--max-steps", "1", "-o", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err == (f"Error: the plan was built on the local folder {folder}, which does not exist here: pass --model "
                   "with this machine's copy of that model (a folder or Hub id; the weight fingerprint check refuses "
                   "any other weights).\n")
