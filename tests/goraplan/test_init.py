"""The maths checks for the initialisation (docs/method.md §4; paper eqs. 11-13, Appendix A)."""

import math

import pytest
import torch

from goraplan.init import compress_gradient, gora_init, lora_scaling, random_lora_a, step_scale


def _projector(a: torch.Tensor) -> torch.Tensor:
    q, _ = torch.linalg.qr(a.T.double())
    return q @ q.T


def test_b_a_is_the_projected_gradient_and_least_squares_optimal():
    g = torch.randn(40, 64, dtype=torch.float64)
    a = random_lora_a(6, 64, torch.Generator().manual_seed(0))
    xi = 0.3
    b = compress_gradient(g, a, xi).double()
    torch.testing.assert_close(b @ a.double(), -xi * g @ _projector(a), rtol=1e-5, atol=1e-6)
    # the best X with X @ A ~= -xi G, from an independent solver: lstsq on A^T X^T = -xi G^T
    x_t = torch.linalg.lstsq(a.double().T, (-xi * g).T).solution
    torch.testing.assert_close(b, x_t.T, rtol=1e-5, atol=1e-6)
    # and nothing else of the form X @ A does better
    worse = (b + 1e-3 * torch.randn_like(b)) @ a.double()
    assert (worse + xi * g).norm() > (b @ a.double() + xi * g).norm()


@pytest.mark.parametrize("r,n", [(4, 64), (16, 256), (32, 128)])
def test_random_projection_keeps_sqrt_r_over_n_of_the_norm(r, n):
    gen = torch.Generator().manual_seed(r * n)
    ratios = []
    for _ in range(200):
        g = torch.randn(48, n, generator=gen, dtype=torch.float64)
        a = torch.randn(r, n, generator=gen, dtype=torch.float64)
        ratios.append(float((g @ _projector(a)).norm() / g.norm()))
    assert sum(ratios) / len(ratios) == pytest.approx(math.sqrt(r / n), rel=0.03)


@pytest.mark.parametrize("rank,alpha,gamma", [(4, 16, 0.05), (12, 8, 0.2), (32, 32, 0.01)])
def test_initial_adapter_is_one_gradient_step_in_norm(rank, alpha, gamma):
    gen = torch.Generator().manual_seed(rank)
    ratios = []
    for _ in range(50):
        g = torch.randn(96, 192, generator=gen)
        a, b = gora_init(g, rank, alpha, gamma, gen)
        delta = lora_scaling(alpha, rank) * b @ a
        ratios.append(float(delta.norm() / (gamma * g.norm())))
        # it points downhill: positive alignment with -G
        assert float((delta * -g).sum()) > 0
    assert sum(ratios) / len(ratios) == pytest.approx(1.0, rel=0.05)


def test_xi_scales_with_sqrt_n_over_alpha():
    assert step_scale(0.05, 576, 16) == pytest.approx(0.05 * 24 / 16)
    assert step_scale(0.1, 4 * 576, 16) == pytest.approx(4 * step_scale(0.05, 576, 16))
    assert step_scale(0.05, 576, 32) == pytest.approx(step_scale(0.05, 576, 16) / 2)
    # and B scales linearly with xi
    g = torch.randn(8, 16)
    a = random_lora_a(4, 16, torch.Generator().manual_seed(0))
    torch.testing.assert_close(compress_gradient(g, a, 2.0), 2 * compress_gradient(g, a, 1.0))


def test_a_is_peft_kaiming_uniform_and_seeded():
    a1 = random_lora_a(8, 100, torch.Generator().manual_seed(3))
    a2 = random_lora_a(8, 100, torch.Generator().manual_seed(3))
    assert torch.equal(a1, a2)
    assert a1.abs().max() <= 1 / math.sqrt(100)
    assert a1.abs().max() > 0.9 / math.sqrt(100)
    # PEFT's own init draws from the same distribution: kaiming_uniform_(a=sqrt(5))
    ref = torch.empty(8, 100)
    torch.nn.init.kaiming_uniform_(ref, a=math.sqrt(5))
    assert ref.abs().max() <= 1 / math.sqrt(100) + 1e-7
