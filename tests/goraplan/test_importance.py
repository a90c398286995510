import pytest
import torch

from goraplan.importance import importance, normalise


def test_sensitivity_is_mean_abs_elementwise_product():
    w = torch.tensor([[1.0, -2.0], [3.0, 0.5]])
    g = torch.tensor([[0.5, 0.5], [-1.0, 2.0]])
    assert importance(w, g) == pytest.approx((0.5 + 1.0 + 3.0 + 1.0) / 4)


def test_nuclear_metrics_match_singular_values():
    w, g = torch.randn(6, 4), torch.randn(6, 4)
    assert importance(w, g, "grad-nuclear") == pytest.approx(float(torch.linalg.svdvals(g).sum()), rel=1e-5)
    assert importance(w, g, "union-nuclear") == pytest.approx(float(torch.linalg.svdvals(w * g).sum()), rel=1e-5)


def test_shape_mismatch_and_unknown_metric_are_errors():
    with pytest.raises(ValueError, match="differ in shape"):
        importance(torch.ones(2, 3), torch.ones(3, 2))
    with pytest.raises(ValueError, match="unknown importance metric 'fisher'"):
        importance(torch.ones(2, 2), torch.ones(2, 2), "fisher")


def test_normalise_sums_to_one_and_handles_zero_signal():
    shares = normalise({"a": 1.0, "b": 3.0})
    assert shares == {"a": 0.25, "b": 0.75}
    assert normalise({"a": 0.0, "b": 0.0}) == {"a": 0.5, "b": 0.5}
