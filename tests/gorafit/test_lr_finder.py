"""gorafit.lr_finder: the range test picks the known best lr, power iteration finds the known curvature."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from gorafit.lr_finder import (
    EDGE,
    MIN_PROBE_STEPS,
    NO_LEARNING_SEEN,
    QUARTER_DECADE,
    TOO_FEW_STEPS,
    find_lr,
    format_lr_search,
    hessian_top_eigenvalue,
    probe_steps_for_budget,
    read_lr_search,
    save_lr_search,
    search_training_data,
)
from gorafit.optim import LR_DEFAULT


def _rotation(n: int, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q


def test_power_iteration_finds_the_largest_eigenvalue_of_a_rotated_quadratic():
    eigenvalues = torch.tensor([7.0, 3.0, 1.0, 0.5, 0.1], dtype=torch.float64)
    q = _rotation(5)
    hessian = q @ torch.diag(eigenvalues) @ q.T
    w = torch.randn(5, dtype=torch.float64, requires_grad=True)
    value, history = hessian_top_eigenvalue(lambda: 0.5 * w @ hessian @ w, [w], iterations=200, tolerance=1e-10)
    assert value == pytest.approx(7.0, rel=1e-6)
    assert len(history) > 1  # it iterated, it did not guess


def test_multipliers_give_the_curvature_the_scaled_steps_see():
    # loss = 0.5 * (a^2 + 2 b^2): with b's lr at 16x, M^1/2 H M^1/2 = diag(1, 32)
    a = torch.ones(1, dtype=torch.float64, requires_grad=True)
    b = torch.ones(1, dtype=torch.float64, requires_grad=True)
    loss = lambda: 0.5 * (a**2 + 2 * b**2).sum()  # noqa: E731
    plain, _ = hessian_top_eigenvalue(loss, [a, b], iterations=100, tolerance=1e-12)
    scaled, _ = hessian_top_eigenvalue(loss, [a, b], multipliers=[1.0, 16.0], iterations=100, tolerance=1e-12)
    assert plain == pytest.approx(2.0, rel=1e-6)
    assert scaled == pytest.approx(32.0, rel=1e-6)


class _Scalar(nn.Module):
    """One weight w, loss (w - 1)^2 on every batch: one SGD step at lr from w = 0 lands on 2 lr."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return ((self.w - 1) ** 2).sum() * x.mean()


def _scalar_loss(model, batch):
    return model(batch["x"])


def test_range_test_picks_the_known_best_lr_and_puts_the_weights_back():
    model = _Scalar()
    batches = [{"x": torch.ones(2)}]
    search = find_lr(model, lambda lr: torch.optim.SGD(model.parameters(), lr=lr), batches, batches,
                     max_grad_norm=None, loss_fn=_scalar_loss)
    # after one step the loss is (2 lr - 1)^2: best at lr 0.5; the candidates are quarter-decades apart
    assert 0.5 / QUARTER_DECADE < search.chosen < 0.5 * QUARTER_DECADE
    losses = {c.lr: c.held_out_loss for c in search.candidates}
    assert all(losses[search.chosen] <= v for v in losses.values())
    assert model.w.item() == 0.0  # every candidate started from the same weights, and so does the real run
    assert search.start_loss == pytest.approx(1.0)
    lrs = [c.lr for c in search.candidates]
    assert lrs == sorted(lrs) and min(lrs) <= 1e-3 < max(lrs)


def test_a_diverging_candidate_is_recorded_and_never_chosen():
    model = _Scalar()
    batches = [{"x": torch.ones(2)}] * 3

    def loss_fn(m, batch):  # overshooting w = 1 by 10% blows the loss up: lr 0.56 and above diverge
        return _scalar_loss(m, batch) * (math.inf if m.w.abs().item() > 1.1 else 1.0)

    search = find_lr(model, lambda lr: torch.optim.SGD(model.parameters(), lr=lr), batches, batches[:1],
                     max_grad_norm=None, loss_fn=loss_fn, start=0.1)
    assert any(c.diverged for c in search.candidates)
    assert not next(c for c in search.candidates if c.lr == search.chosen).diverged
    assert model.w.item() == 0.0


def test_on_a_tiny_lora_model_the_search_is_kept_and_shown(tmp_path):
    pytest.importorskip("matplotlib")
    from peft import LoraConfig, get_peft_model

    from goraplan.data import PaddingCollator
    from tests.tiny import make_tokenizer, sentences, tiny_llama

    tok = make_tokenizer()
    model = get_peft_model(tiny_llama(vocab_size=len(tok)),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    rows = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids}
            for ids in tok(sentences(64))["input_ids"]]
    search = search_training_data(
        model, rows, PaddingCollator(tok, "causal-lm"),
        lambda lr: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr),
        batch_size=8, train_steps=200, seed=0)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.requires_grad)
    assert len(search.candidates) >= 3
    assert search.chosen in [c.lr for c in search.candidates] or (search.rule, search.chosen) == (NO_LEARNING_SEEN,
                                                                                                   LR_DEFAULT)
    assert search.probe_batch_size == 2 and search.held_out_batches == 1 and search.extra["train_steps"] == 200
    assert search.steps_per_candidate >= MIN_PROBE_STEPS
    assert search.extra["settle_steps"] == search.steps_per_candidate  # as many settling steps as each short run
    assert 2.0 < search.extra["step_overhead"] < 2.0 + 3.8  # an adapter pays a share of the optimizer's cost
    save_lr_search(tmp_path / "lr_search.json", search, plot_path=tmp_path / "lr_search.png", title="tiny")
    again = read_lr_search(tmp_path / "lr_search.json")
    assert again.chosen == search.chosen and [c.lr for c in again.candidates] == [c.lr for c in search.candidates]
    assert (tmp_path / "lr_search.png").read_bytes()[:4] == b"\x89PNG"
    text = format_lr_search(again)
    assert f"{search.chosen:.3g}" in text and ("<- chosen" in text or "the default" in text)
    assert f"settled at lr 0 on {search.steps_per_candidate} other training batches" in text
    assert read_lr_search(tmp_path / "elsewhere.json") is None


def test_the_probe_budget_shrinks_with_the_run():
    assert probe_steps_for_budget(400, 32, 8, 32) > probe_steps_for_budget(94, 32, 8, 32) >= 1
    assert probe_steps_for_budget(5, 8, 8, 8) == 1


@pytest.mark.parametrize("train_steps, batch, probe", [(94, 32, 8), (200, 8, 2), (1000, 16, 4)])
def test_the_search_fits_its_share_once_each_step_pays_its_overhead(train_steps, batch, probe):
    from gorafit.lr_finder import STEP_OVERHEAD, probe_batches

    settle, train, held = probe_batches(10_000, lambda ix: {"ix": torch.tensor(ix)}, batch, train_steps, seed=0)
    steps = len(train)
    assert steps > 1  # above the one-step floor (test_the_probe_budget_shrinks_with_the_run), so the budget binds
    # 7 short runs and the settling run, each of `steps` steps; 8 held-out passes
    search = 8 * steps * 3 * (probe + STEP_OVERHEAD) + 8 * batch
    training = train_steps * 3 * (batch + STEP_OVERHEAD)
    assert search <= 0.10 * training
    # one more step each would overrun it: the budget is used, not wasted (but for one held-out pass: the sizing
    # counts the settling run as a candidate, and it is scored on nothing)
    assert search + 8 * 3 * (probe + STEP_OVERHEAD) + batch > 0.10 * training


def test_one_probe_step_per_candidate_is_not_trusted_and_the_default_is_kept(tmp_path):
    from peft import LoraConfig, get_peft_model

    from goraplan.data import PaddingCollator
    from tests.tiny import make_tokenizer, sentences, tiny_llama

    tok = make_tokenizer()
    model = get_peft_model(tiny_llama(vocab_size=len(tok)), LoraConfig(r=4, target_modules=["q_proj"]))
    rows = [{"input_ids": ids, "attention_mask": [1] * len(ids), "labels": ids}
            for ids in tok(sentences(64))["input_ids"]]
    search = search_training_data(
        model, rows, PaddingCollator(tok, "causal-lm"),
        lambda lr: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr),
        batch_size=8, train_steps=40, seed=0, fallback=2e-4)
    assert search.steps_per_candidate == 1 < MIN_PROBE_STEPS
    # no candidate is run (its cost would buy nothing), the default is kept, and the record says why
    assert (search.rule, search.chosen, search.candidates) == (TOO_FEW_STEPS, 2e-4, [])
    assert math.isfinite(search.start_loss) and search.extra["settle_steps"] == 1
    save_lr_search(tmp_path / "lr_search.json", search, plot_path=tmp_path / "lr_search.png")
    again = read_lr_search(tmp_path / "lr_search.json")
    assert (again.chosen, again.candidates) == (2e-4, []) and (tmp_path / "lr_search.png").is_file()
    assert "too few probe steps" in format_lr_search(again) and "chosen: 0.0002, the default" in format_lr_search(again)


def test_a_start_loss_that_is_not_a_number_is_kept_as_inf_and_read_back(tmp_path):
    from gorafit.lr_finder import LrSearch

    search = LrSearch(chosen=LR_DEFAULT, candidates=[], start_loss=math.inf, steps_per_candidate=1,
                      probe_batch_size=2, held_out_batches=1, seconds=0.0, rule=TOO_FEW_STEPS)
    save_lr_search(tmp_path / "lr_search.json", search, plot_path=tmp_path / "lr_search.png")
    assert json.loads((tmp_path / "lr_search.json").read_text())["start_loss"] is None  # strict JSON
    assert read_lr_search(tmp_path / "lr_search.json").start_loss == math.inf
    assert (tmp_path / "lr_search.png").is_file()


def test_a_model_that_trains_every_weight_pays_for_its_optimizer_with_fewer_probe_steps():
    from gorafit.lr_finder import OPTIMIZER_OVERHEAD, STEP_OVERHEAD, probe_batches, step_overhead

    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 2))
    assert step_overhead(model) == pytest.approx(STEP_OVERHEAD + OPTIMIZER_OVERHEAD)  # full fine-tuning
    model[0].requires_grad_(False)
    share = 18 / 90  # the head's 18 of the model's 90 weights train
    assert step_overhead(model) == pytest.approx(STEP_OVERHEAD + OPTIMIZER_OVERHEAD * share)
    # NLG's sizes (200 steps of 8): an adapter's probe keeps 5 steps per candidate, full fine-tuning gets 4
    rows = lambda ix: {"ix": torch.tensor(ix)}  # noqa: E731
    adapter = probe_batches(10_000, rows, 8, 200, seed=0, step_overhead=STEP_OVERHEAD + OPTIMIZER_OVERHEAD * 0.007)
    full = probe_batches(10_000, rows, 8, 200, seed=0, step_overhead=STEP_OVERHEAD + OPTIMIZER_OVERHEAD)
    assert (len(adapter.train), len(full.train)) == (5, 4)


def test_probe_batches_come_from_training_rows_and_keep_the_held_out_batch_apart():
    from gorafit.lr_finder import probe_batches
    from goraplan.errors import GoraError

    settle, train, held = probe_batches(3000, lambda ix: {"ix": torch.tensor(ix)}, 32, 94, seed=0)
    short_ix = torch.cat([b["ix"] for b in settle + train]).tolist()
    assert [len(b["ix"]) for b in settle + train] == [8] * (len(short_ix) // 8) and len(settle) == len(train) >= 1
    assert len(held) == 1 and len(held[0]["ix"]) == 32
    # three disjoint sets of rows: what settles the moments is never what a candidate trains on or is scored on
    assert not set(short_ix) & set(held[0]["ix"].tolist()) and len(set(short_ix)) == len(short_ix)
    with pytest.raises(GoraError, match="--lr auto needs at least"):
        probe_batches(20, lambda ix: {}, 32, 94, seed=0)


def test_gorafit_run_lr_auto_keeps_its_evidence_and_inspect_shows_it(tmp_path, capsys, cli_env):
    from gorafit.cli import cli
    from goraplan.cli_support import run_cli
    from tests.gorafit.test_train import make_run_inputs

    inputs = make_run_inputs(tmp_path / "in", "causal-lm", n=120)
    out = tmp_path / "run"

    def gorafit(*args):
        with pytest.raises(SystemExit) as exc:
            run_cli(cli, [str(a) for a in args])
        stdout, err = capsys.readouterr()
        return exc.value.code, stdout, err

    code, stdout, run_err = gorafit("run", inputs["plan"], "--lr", "auto", "--max-steps", 30, "--batch-size", 4,
                                    "-o", out, "--disable-tqdm", "--report-to", "none", "--eval-fraction", 0.1)
    assert code == 0, run_err
    record = json.loads((out / "run.json").read_text())
    search = json.loads((out / "lr_search.json").read_text())
    chosen = search["chosen"]
    assert record["learning_rate_search"]["chosen"] == chosen == record["settings"]["learning_rate"]
    assert record["training_arguments"]["learning_rate"] == chosen  # the Trainer trained at the chosen lr
    assert f"lr auto: {chosen:.3g}" in stdout and (out / "lr_search.png").is_file()
    code, stdout, err = gorafit("inspect", out)
    assert code == 0, err
    # 30 steps of 4 leave one probe step per candidate within 10 %: too few to trust, so no candidate runs, the
    # default is kept, and both commands say so
    assert record["learning_rate_search"]["too_few_steps"] and search["rule"] == TOO_FEW_STEPS
    assert chosen == LR_DEFAULT and search["candidates"] == []
    assert "Warning: --lr auto trained at the default lr" in run_err and "too short" in run_err
    assert f"chosen: {chosen:.3g}, the default" in stdout
    assert "too few probe steps" in stdout
    code, stdout, err = gorafit("inspect", tmp_path / "in")
    assert code == 2 and "holds no run" in err


def test_when_every_lr_hurts_the_walk_goes_down_to_one_that_helps():
    model = _Scalar()
    batches = [{"x": torch.ones(2)}]
    # from w = 0, one SGD step at lr lands on 2 lr: the loss (2 lr - 1)^2 is above the start (1) past lr 1;
    # starting the walk at 3 (everything near it hurts) must still end near the best lr 0.5
    search = find_lr(model, lambda lr: torch.optim.SGD(model.parameters(), lr=lr), batches, batches,
                     max_grad_norm=None, loss_fn=_scalar_loss, start=3.0)
    assert 0.5 / QUARTER_DECADE < search.chosen < 0.5 * QUARTER_DECADE
    assert search.chosen < 1.0 and min(c.lr for c in search.candidates) < 1.0


def test_a_flat_curve_keeps_the_start_instead_of_walking_to_either_end():
    model = _Scalar()
    batches = [{"x": torch.ones(2)}]
    flat = lambda m, b: _scalar_loss(m, b) * 0 + 1.0 + 1e-6 * m.w.sum()  # noqa: E731  (no lr changes it)
    search = find_lr(model, lambda lr: torch.optim.SGD(model.parameters(), lr=lr), batches, batches,
                     max_grad_norm=None, loss_fn=flat, max_candidates=7)
    assert len(search.candidates) <= 7 and search.chosen == LR_DEFAULT and search.rule == NO_LEARNING_SEEN
    assert search.extra["edge"] is None  # nothing hurt either


def test_without_learning_seen_the_search_keeps_the_default_and_records_the_edge():
    """A plateau (a new head: no short run lowers the held-out loss) with harm past lr 0.05: the data cannot
    choose, so the fallback is kept; the edge (the largest quarter-decade lr whose held-out loss stays within
    EDGE of the start's) is recorded."""
    model = _Scalar()
    batches = [{"x": torch.ones(2)}]

    def plateau(m, b):  # one Adam step from w = 0 lands on w = lr: flat (within noise) up to 0.05, then steep
        w = m.w.sum()
        return 1.0 - 1e-6 * w + 100 * torch.relu(w - 0.05)

    search = find_lr(model, lambda lr: torch.optim.Adam(model.parameters(), lr=lr), batches, batches,
                     max_grad_norm=None, loss_fn=plateau, max_candidates=7, fallback=2e-4)
    assert search.rule == NO_LEARNING_SEEN
    tried = {c.lr: c.held_out_loss for c in search.candidates}
    assert tried[0.1] > 1 + EDGE and tried[0.0562] > 1 + EDGE and tried[0.0316] <= 1 + EDGE
    assert search.chosen == 2e-4 and search.extra["edge"] == 0.0316 and model.w.item() == 0.0
    text = format_lr_search(search)
    assert "chosen: 0.0002, the default" in text and "stability edge: 0.0316" in text


@pytest.mark.parametrize("start", [1e-6, 1e-3, 3.0])
def test_the_walk_stops_at_its_candidate_budget(start):
    model = _Scalar()
    batches = [{"x": torch.ones(2)}]
    search = find_lr(model, lambda lr: torch.optim.SGD(model.parameters(), lr=lr), batches, batches,
                     max_grad_norm=None, loss_fn=_scalar_loss, start=start, max_candidates=5)
    assert len(search.candidates) <= 5
    if start == 1e-6:  # the loss falls by under 5% up to the walk's cap (3 half-decades): the default is kept
        assert len(search.candidates) == 3 and search.rule == NO_LEARNING_SEEN and search.chosen == LR_DEFAULT


def test_a_warmed_up_short_run_climbs_to_its_lr_over_its_steps():
    """With `warmup`, step t of k runs at lr * t / k, as a run's linear warm-up does; without it, at lr throughout.
    The loss (w - 1)^2 with SGD from w = 0: a step at rate h moves w by 2 h (1 - w)."""
    from gorafit.lr_finder import short_run

    batches = [{"x": torch.ones(2)}] * 2
    for warmup, rates in ((False, (0.1, 0.1)), (True, (0.05, 0.1))):
        model = _Scalar()
        sgd = lambda lr, m=model: torch.optim.SGD(m.parameters(), lr=lr)  # noqa: E731
        short_run(model, sgd, 0.1, batches, batches[:1], max_grad_norm=None, loss_fn=_scalar_loss, warmup=warmup)
        w = 0.0
        for h in rates:
            w += 2 * h * (1 - w)
        assert model.w.item() == pytest.approx(w)


class _Linear(nn.Module):
    """loss = w * sum(x): the gradient is the batch's sum, so batches of opposite signs are pure noise."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        return (self.w * x.sum()).sum()


def test_settled_moments_shrink_the_first_steps_on_noise_and_leave_the_weights_alone():
    from gorafit.lr_finder import settled_state, short_run

    model = _Linear()
    adam = lambda lr: torch.optim.Adam(model.parameters(), lr=lr)  # noqa: E731
    noise = [{"x": torch.ones(1)}, {"x": -torch.ones(1)}]
    state = settled_state(model, adam, noise, max_grad_norm=None, loss_fn=_scalar_loss)
    assert model.w.item() == 0.0  # lr 0: the moments moved, the weight did not
    one = [{"x": torch.ones(1)}]
    moved = []
    for start in (None, state, state):  # the state is copied, not used up: the same start twice
        with torch.no_grad():
            model.w.zero_()
        short_run(model, adam, 0.1, one, one, max_grad_norm=None, loss_fn=_scalar_loss, start_state=start)
        moved.append(-model.w.item())
    assert moved[0] == pytest.approx(0.1)  # a fresh Adam's first step: the full lr, whatever the gradient's size
    assert moved[1] == pytest.approx(moved[2]) and 0 < moved[1] < 0.5 * 0.1  # m averages +1, -1, +1: about 0.34 lr


def test_a_search_from_settled_moments_still_finds_the_best_lr_and_puts_everything_back():
    model = _Scalar()
    batches = [{"x": torch.ones(2)}] * 3
    adam = lambda lr: torch.optim.Adam(model.parameters(), lr=lr)  # noqa: E731
    plain = find_lr(model, adam, batches, batches[:1], max_grad_norm=None, loss_fn=_scalar_loss)
    settled = find_lr(model, adam, batches, batches[:1], max_grad_norm=None, loss_fn=_scalar_loss,
                      settle_batches=batches)
    assert model.w.item() == 0.0 and model.w.grad is None
    # a steady gradient: settled moments give the same sign steps of the full lr, so the same choice (w 0 -> 1 in 3
    # steps of lr: about 0.33)
    assert settled.chosen == plain.chosen and 0.33 / QUARTER_DECADE < settled.chosen < 0.33 * QUARTER_DECADE
