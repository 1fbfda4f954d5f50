"""bench.diffusion.masking at its edges: reproducibility from the caller's generator (and never
the global RNG), dtypes, the reveal probability and the inverse-CDF draw of the ancestral step,
range checks and their messages.  Written against mutation-testing survivors; no training."""

import pytest
import torch

from bench.diffusion import MaskingSchedule, make_masking_partition, sample_t
from bench.diffusion.masking import ancestral_step, mask_tokens, masking_edges, md4_nelbo, mc_mean_stderr, sample_masked


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def untouched_global_rng(fn):
    """fn() run twice from equally seeded generators: equal results, the global RNG not consumed."""
    state = torch.get_rng_state()
    a, b = fn(seeded(3)), fn(seeded(3))
    assert torch.equal(torch.get_rng_state(), state), "drew from the global RNG instead of the generator"
    return a, b


@pytest.mark.parametrize("antithetic", [True, False])
def test_sample_t_draws_float64_from_the_callers_generator(antithetic):
    a, b = untouched_global_rng(lambda g: sample_t(64, 0.2, 0.6, generator=g, antithetic=antithetic))
    assert torch.equal(a, b) and a.dtype == torch.float64 and 0.2 <= a.min() and a.max() < 0.6
    assert not torch.equal(a, sample_t(64, 0.2, 0.6, generator=seeded(4), antithetic=antithetic))


def test_sample_t_is_exactly_the_offset_grid_in_float64():
    u0 = torch.rand(1, dtype=torch.float64, generator=seeded(7))
    expected = 0.2 + (0.6 - 0.2) * torch.remainder(u0 + torch.arange(5, dtype=torch.float64) / 5, 1.0)
    assert torch.equal(sample_t(5, 0.2, 0.6, generator=seeded(7)), expected)
    iid = 0.2 + (0.6 - 0.2) * torch.rand(5, dtype=torch.float64, generator=seeded(7))
    assert torch.equal(sample_t(5, 0.2, 0.6, generator=seeded(7), antithetic=False), iid)


def test_antithetic_t_is_one_offset_then_evenly_spaced_upwards():
    t = sample_t(8, 0.0, 1.0, generator=seeded(0))              # antithetic is the default
    steps = torch.remainder(t[1:] - t[:-1], 1.0)
    assert steps.tolist() == pytest.approx([1 / 8] * 7)          # u_i = (u_0 + i/n) mod 1, in that order
    plain = sample_t(8, 0.0, 1.0, generator=seeded(0), antithetic=False)
    assert not torch.allclose(torch.remainder(plain[1:] - plain[:-1], 1.0), torch.full((7,), 1 / 8, dtype=torch.float64))


@pytest.mark.parametrize("lo,hi", [(0.5, 0.5), (0.0, 1.5), (-0.1, 0.5), (0.7, 0.3)])
def test_sample_t_refuses_an_empty_or_outside_range(lo, hi):
    with pytest.raises(ValueError, match=rf"need 0 <= lo < hi <= 1, got lo={lo}, hi={hi}"):
        sample_t(4, lo, hi)


def test_a_partition_samples_with_its_generator_and_its_antithetic_setting():
    p = make_masking_partition(3, gamma=0.05)
    a, b = untouched_global_rng(lambda g: p.sample_training_t(1, 32, g))
    assert torch.equal(a, b) and torch.equal(a, sample_t(32, *p.training_range(1), generator=seeded(3)))
    iid = make_masking_partition(3, gamma=0.05, antithetic=False)
    assert torch.equal(iid.sample_training_t(1, 32, seeded(3)),
                       sample_t(32, *p.training_range(1), generator=seeded(3), antithetic=False))


def test_ancestral_step_reveals_with_probability_alpha_gain_over_masked_mass():
    s = MaskingSchedule()
    mask = 5
    z = torch.full((200, 500), mask)
    z[:, :100] = 1                                               # already revealed: must stay
    probs = torch.full((200, 500, 5), 0.2)
    out = ancestral_step(z, probs, 0.5, 0.25, s, mask, seeded(0))   # (α(s) − α(t)) / (1 − α(t)) = 0.25 / 0.5
    assert (out[:, :100] == 1).all()
    revealed = (out[:, 100:] != mask).double().mean()
    assert float(revealed) == pytest.approx(0.5, abs=0.01)
    assert (out[out != mask] < 5).all()
    final = ancestral_step(z, probs, 0.25, 0.0, s, mask, seeded(0))   # to t = 0: every masked token revealed
    assert (final != mask).all()


def test_ancestral_step_draws_by_inverse_cdf_and_stays_in_the_vocabulary():
    s, mask, V = MaskingSchedule(), 9, 4
    z = torch.full((50, 400), mask)
    last = torch.zeros(50, 400, V)
    last[..., V - 1] = 1                                         # all mass on the last token
    assert (ancestral_step(z, last, 0.5, 0.0, s, mask, seeded(0)) == V - 1).all()
    short = torch.full((50, 400, V), 0.2)                        # sums to 0.8 (fp rounding at scale): u > 0.8 → last token
    tokens = ancestral_step(z, short, 0.5, 0.0, s, mask, seeded(0))
    assert tokens.max() == V - 1 and tokens.min() == 0
    skewed = torch.tensor([0.7, 0.1, 0.1, 0.1]).expand(50, 400, V)
    counts = torch.bincount(ancestral_step(z, skewed, 0.5, 0.0, s, mask, seeded(1)).flatten(), minlength=V).double()
    assert (counts / counts.sum()).tolist() == pytest.approx([0.7, 0.1, 0.1, 0.1], abs=0.01)
    a, b = untouched_global_rng(lambda g: ancestral_step(z, skewed, 0.5, 0.2, s, mask, g))
    assert torch.equal(a, b)


def test_sample_masked_is_reproducible_long_and_uses_the_midpoint_block():
    p = make_masking_partition(3, gamma=0.05)
    asked = []

    def predict(z, t, block):
        asked.append((t, block))
        return torch.full((*z.shape, 4), 0.25)
    a, b = untouched_global_rng(lambda g: sample_masked(predict, 3, 7, 6, p, 4, torch.device("cpu"), g))
    assert torch.equal(a, b) and a.dtype == torch.long and a.shape == (3, 7) and (a < 4).all()
    # 6 steps on the grid 1, 5/6, …, 0: each block takes two, highest noise (block 0) first
    assert [blk for _, blk in asked[:6]] == [0, 0, 1, 1, 2, 2]
    assert [t for t, _ in asked[:6]] == torch.linspace(1.0, 0.0, 7, dtype=torch.float64).tolist()[:6]   # exactly, float64


def test_mask_tokens_uses_given_uniforms_and_the_schedule_per_sequence():
    x = torch.arange(6).view(2, 3)
    u = torch.tensor([[0.1, 0.5, 0.9], [0.1, 0.5, 0.9]], dtype=torch.float64)
    z, masked = mask_tokens(x, torch.tensor([0.6, 0.2], dtype=torch.float64), MaskingSchedule(), 99, u=u)
    assert masked.tolist() == [[True, True, False], [True, False, False]]   # masked where u < 1 − α(t) = t
    assert z.tolist() == [[99, 99, 2], [99, 4, 5]]
    a, b = untouched_global_rng(lambda g: mask_tokens(x, torch.tensor([0.5, 0.5]), MaskingSchedule(), 99, g)[0])
    assert torch.equal(a, b)


def test_schedules_edges_and_estimators_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match="unknown masking schedule 'poly-1'"):
        MaskingSchedule("poly-1")
    with pytest.raises(ValueError, match="unknown masking schedule 'polyx'"):
        MaskingSchedule("polyx")
    assert MaskingSchedule("poly0.5").alpha(0.25).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="num_blocks must be >= 1, got 0"):
        masking_edges(MaskingSchedule(), 0)
    with pytest.raises(ValueError, match=r"^masking partition 'explicit' needs boundaries \(diffusion.sigma_edges, read as t\)$"):
        masking_edges(MaskingSchedule(), 3, "explicit")
    with pytest.raises(ValueError, match="must start at 0 and end at 1"):
        masking_edges(MaskingSchedule(), 2, "explicit", [0.1, 0.5, 1.0])
    with pytest.raises(ValueError, match=r"give 2 interior values \(or 4 with 0 and 1\), got 1"):
        masking_edges(MaskingSchedule(), 3, "explicit", [0.5])
    assert masking_edges(MaskingSchedule(), 2, "explicit", [0, 0.3, 1]) == (0, 0.3, 1)
    assert masking_edges(MaskingSchedule(), 1) == (0.0, 1.0)
    with pytest.raises(ValueError, match=r"no partition 'uniform'; choose one of equiprobable, linear, explicit$"):
        masking_edges(MaskingSchedule(), 2, "uniform")
    with pytest.raises(ValueError, match="strictly increasing"):
        masking_edges(MaskingSchedule(), 2, "explicit", [1.0])
    p = make_masking_partition(2)
    assert (p.gamma, p.strategy, p.antithetic) == (0.0, "equiprobable", True)     # the defaults
    assert MaskingSchedule("cosine").alpha_inv(0.5).dtype == torch.float64
    for edges in [(0.0, 0.5, 0.5, 1.0), (0.0, 0.6, 0.5, 1.0)]:
        with pytest.raises(ValueError, match="t edges must increase strictly"):
            type(p)(p.schedule, edges)
    with pytest.raises(ValueError, match="overlap gamma must be >= 0, got -0.1"):
        type(p)(p.schedule, p.edges, gamma=-0.1)
    with pytest.raises(ValueError, match="t edges must increase strictly from 0 to 1"):
        type(p)(p.schedule, (0.0, 0.5, 0.9))
    with pytest.raises(IndexError, match="block 2 out of range for B=2"):
        p.interval(2)
    with pytest.raises(IndexError):
        p.interval(-1)
    with pytest.raises(ValueError, match="at least 2 draws"):
        mc_mean_stderr(torch.ones(3, 1))
    w = md4_nelbo(torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([0.5, 0.25]), MaskingSchedule())
    assert w.dtype == torch.float64 and w.tolist() == pytest.approx([2.0, 8.0])


def test_a_t_within_the_tie_tolerance_below_a_boundary_belongs_to_the_higher_noise_block():
    p = make_masking_partition(3)
    e = p.edges[1]
    assert p.block_of(e * (1 - 1e-9)) == 1 and p.block_of(e * (1 - 1e-8)) == 2
