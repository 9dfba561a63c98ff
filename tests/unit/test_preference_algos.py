"""Preference losses checked against straightforward float64 loops over examples and tokens, plus exact cases.

Inputs start as per-token log-probs (B, T) under a response mask with random prefixes or holes, as
the stage will see them; the functions receive the masked sums and counts, the loops read the valid
tokens one by one.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from rlhf.algos.preference import (
    PREFERENCE_LOSSES,
    REFERENCE_FREE_LOSSES,
    UNPAIRED_LOSSES,
    dpo_loss,
    ipo_loss,
    kto_loss,
    kto_reference_point,
    log_odds,
    orpo_loss,
    simpo_loss,
)
from tests.masks import PATTERNS, random_mask

B, T = 6, 9
SEEDS = range(4)
DTYPES = [torch.float64, torch.float32]


# ---------------------------------------------------------------- inputs and tolerances


def make_mask(gen: torch.Generator, pattern: str, rows: int = B, cols: int = T) -> torch.Tensor:
    return random_mask(gen, pattern, rows=rows, cols=cols)


class Side:
    """One side of a batch (chosen, rejected, or the unpaired examples): per-token log-probs of the
    policy and of the reference under one mask, padding filled with large garbage."""

    def __init__(self, gen: torch.Generator, pattern: str, dtype: torch.dtype, rows: int = B) -> None:
        self.mask = make_mask(gen, pattern, rows=rows)
        # Log-probs of sampled tokens: negative, mostly between -3 and 0.
        self.tokens = -3.0 * torch.rand(rows, T, generator=gen, dtype=torch.float64)
        self.ref_tokens = self.tokens + 0.3 * torch.randn(rows, T, generator=gen, dtype=torch.float64)
        self.ref_tokens = self.ref_tokens.clamp(max=-1e-3)
        garbage = 1e6 * torch.randn(rows, T, generator=gen, dtype=torch.float64)
        self.tokens = torch.where(self.mask, self.tokens, garbage)
        self.ref_tokens = torch.where(self.mask, self.ref_tokens, garbage)
        self.dtype = dtype

    def sums(self, ref: bool = False) -> torch.Tensor:
        """(rows,) log-probs summed over the mask, in the test dtype: what the stage passes."""
        x = self.ref_tokens if ref else self.tokens
        return torch.where(self.mask, x, torch.zeros(())).sum(1).to(self.dtype)

    def lengths(self) -> torch.Tensor:
        return self.mask.sum(1)

    def valid(self, b: int, ref: bool = False) -> list[float]:
        """Row b's valid token log-probs as Python floats."""
        x = (self.ref_tokens if ref else self.tokens)[b].tolist()
        return [v for v, m in zip(x, self.mask[b].tolist()) if m]


def close(actual, expected, dtype: torch.dtype) -> None:
    """assert_close against float64 reference values, with a tolerance set by the input dtype."""
    expected = torch.as_tensor(expected, dtype=torch.float64)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(torch.as_tensor(actual).double(), expected, **tol)


# ---------------------------------------------------------------- float64 loop references


def ref_logsigmoid(x: float) -> float:
    """log(1 / (1 + e^-x)) without overflow on either side."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def ref_sigmoid(x: float) -> float:
    return math.exp(ref_logsigmoid(x))


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def ref_pair_metrics(losses, chosen_rewards, rejected_rewards) -> dict[str, list[float]]:
    return {
        "losses": losses,
        "chosen_rewards": chosen_rewards,
        "rejected_rewards": rejected_rewards,
        "accuracy": [1.0 if c > r else 0.0 for c, r in zip(chosen_rewards, rejected_rewards)],
        "margin": [c - r for c, r in zip(chosen_rewards, rejected_rewards)],
    }


def ref_dpo(chosen: Side, rejected: Side, beta: float, eps: float) -> dict:
    losses, rc, rr = [], [], []
    for b in range(B):
        chosen_reward = beta * (sum(chosen.valid(b)) - sum(chosen.valid(b, ref=True)))
        rejected_reward = beta * (sum(rejected.valid(b)) - sum(rejected.valid(b, ref=True)))
        z = chosen_reward - rejected_reward
        losses.append(-(1 - eps) * ref_logsigmoid(z) - eps * ref_logsigmoid(-z))
        rc.append(chosen_reward)
        rr.append(rejected_reward)
    return ref_pair_metrics(losses, rc, rr)


def ref_ipo(chosen: Side, rejected: Side, beta: float) -> dict:
    losses, rc, rr = [], [], []
    for b in range(B):
        chosen_ratio = mean(chosen.valid(b)) - mean(chosen.valid(b, ref=True))
        rejected_ratio = mean(rejected.valid(b)) - mean(rejected.valid(b, ref=True))
        losses.append((chosen_ratio - rejected_ratio - 1 / (2 * beta)) ** 2)
        rc.append(beta * chosen_ratio)
        rr.append(beta * rejected_ratio)
    return ref_pair_metrics(losses, rc, rr)


def ref_simpo(chosen: Side, rejected: Side, beta: float, gamma: float) -> dict:
    losses, rc, rr = [], [], []
    for b in range(B):
        chosen_reward = beta * mean(chosen.valid(b))
        rejected_reward = beta * mean(rejected.valid(b))
        losses.append(-ref_logsigmoid(chosen_reward - rejected_reward - gamma))
        rc.append(chosen_reward)
        rr.append(rejected_reward)
    return ref_pair_metrics(losses, rc, rr)


def ref_log_odds(mean_logp: float) -> float:
    """log(P / (1 - P)) of P = exp(mean log-prob), written plainly."""
    p = math.exp(mean_logp)
    return math.log(p / (1 - p))


def ref_orpo(chosen: Side, rejected: Side, lam: float) -> dict:
    losses, sft, odds_ratio, rc, rr = [], [], [], [], []
    for b in range(B):
        nll = -mean(chosen.valid(b))
        chosen_odds, rejected_odds = ref_log_odds(mean(chosen.valid(b))), ref_log_odds(mean(rejected.valid(b)))
        l_or = -ref_logsigmoid(chosen_odds - rejected_odds)
        losses.append(nll + lam * l_or)
        sft.append(nll)
        odds_ratio.append(l_or)
        rc.append(chosen_odds)
        rr.append(rejected_odds)
    return {**ref_pair_metrics(losses, rc, rr), "sft_losses": sft, "odds_ratio_losses": odds_ratio}


def ref_kto(side: Side, labels: list[bool], kl: Side, beta: float, w_d: float, w_u: float) -> dict:
    kl_terms = [sum(kl.valid(j)) - sum(kl.valid(j, ref=True)) for j in range(kl.mask.shape[0])]
    z0 = max(0.0, sum(kl_terms) / len(kl_terms))
    losses, rewards = [], []
    for b in range(len(labels)):
        r = sum(side.valid(b)) - sum(side.valid(b, ref=True))
        if labels[b]:
            losses.append(w_d * (1 - ref_sigmoid(beta * (r - z0))))
        else:
            losses.append(w_u * (1 - ref_sigmoid(beta * (z0 - r))))
        rewards.append(beta * r)
    return {"losses": losses, "rewards": rewards, "reference_point": z0}


def check(loss, stats, expected: dict, dtype: torch.dtype) -> None:
    """The loss is the mean of the expected per-example losses; every named stat matches its loop."""
    close(loss, mean(expected["losses"]), dtype)
    for name, values in expected.items():
        close(getattr(stats, name), values, dtype)
    for value in stats:
        assert not value.requires_grad


def with_grad(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_(True) for t in tensors]


# ---------------------------------------------------------------- DPO and conservative DPO


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_dpo_matches_loop(seed, dtype, pattern, label_smoothing):
    gen = torch.Generator().manual_seed(seed)
    chosen, rejected = Side(gen, pattern, dtype), Side(gen, pattern, dtype)
    beta = [0.1, 0.5, 0.05, 1.0][seed]
    loss, stats = dpo_loss(
        chosen_logps=chosen.sums(), rejected_logps=rejected.sums(),
        chosen_ref_logps=chosen.sums(ref=True), rejected_ref_logps=rejected.sums(ref=True),
        beta=beta, label_smoothing=label_smoothing,
    )
    check(loss, stats, ref_dpo(chosen, rejected, beta, label_smoothing), dtype)
    close(stats.chosen_logps, chosen.sums().double(), dtype)
    close(stats.rejected_logps, rejected.sums().double(), dtype)
    assert loss.dtype == dtype and loss.shape == ()


def test_dpo_exact_cases():
    zero = torch.zeros(3, dtype=torch.float64)
    # Policy equal to the reference: zero margin, loss log 2 whatever beta and label smoothing.
    for eps in (0.0, 0.2):
        loss, stats = dpo_loss(chosen_logps=zero - 5, rejected_logps=zero - 7, chosen_ref_logps=zero - 5,
                               rejected_ref_logps=zero - 7, beta=0.1, label_smoothing=eps)
        assert loss.item() == pytest.approx(math.log(2), abs=1e-15)
        assert stats.accuracy.tolist() == [0.0, 0.0, 0.0]  # a tie is not a win
    # Log-ratio margin 10 at beta 0.1: z = 1, loss log(1 + e^-1); smoothed: 0.8 * that + 0.2 * log(1 + e).
    one = torch.ones(1, dtype=torch.float64)
    args = dict(chosen_logps=-one, rejected_logps=-11 * one, chosen_ref_logps=-one, rejected_ref_logps=-one, beta=0.1)
    loss, stats = dpo_loss(**args)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1)), rel=1e-14)
    assert stats.chosen_rewards.item() == 0.0 and stats.rejected_rewards.item() == pytest.approx(-1.0)
    assert stats.margin.item() == pytest.approx(1.0) and stats.accuracy.item() == 1.0
    smoothed, _ = dpo_loss(**args, label_smoothing=0.2)
    expected = 0.8 * math.log1p(math.exp(-1)) + 0.2 * math.log1p(math.exp(1))
    assert smoothed.item() == pytest.approx(expected, rel=1e-14)
    # Huge margins stay finite.
    far, _ = dpo_loss(chosen_logps=-one, rejected_logps=-1e6 * one, chosen_ref_logps=-one, rejected_ref_logps=-one,
                      beta=1.0, label_smoothing=0.1)
    assert torch.isfinite(far) and far.item() == pytest.approx(0.1 * (1e6 - 1), rel=1e-12)


def test_dpo_label_smoothing_zero_is_plain_dpo_and_bad_values_are_refused():
    gen = torch.Generator().manual_seed(7)
    logps = [torch.randn(B, generator=gen, dtype=torch.float64) - 10 for _ in range(4)]
    names = ("chosen_logps", "rejected_logps", "chosen_ref_logps", "rejected_ref_logps")
    kwargs = dict(zip(names, logps))
    plain, plain_stats = dpo_loss(**kwargs, beta=0.3)
    smoothed, smoothed_stats = dpo_loss(**kwargs, beta=0.3, label_smoothing=0.0)
    assert torch.equal(plain, smoothed) and torch.equal(plain_stats.losses, smoothed_stats.losses)
    for eps in (-0.1, 0.5, 1.0):
        with pytest.raises(ValueError, match="label_smoothing"):
            dpo_loss(**kwargs, beta=0.3, label_smoothing=eps)
    with pytest.raises(ValueError, match="beta"):
        dpo_loss(**kwargs, beta=0.0)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_gradient_raises_chosen_and_lowers_rejected(label_smoothing):
    gen = torch.Generator().manual_seed(3)
    chosen, rejected = with_grad(torch.randn(B, generator=gen, dtype=torch.float64) - 20,
                                 torch.randn(B, generator=gen, dtype=torch.float64) - 20)
    ref_c, ref_r = (torch.randn(B, generator=gen, dtype=torch.float64) - 20 for _ in range(2))
    loss, stats = dpo_loss(chosen_logps=chosen, rejected_logps=rejected, chosen_ref_logps=ref_c,
                           rejected_ref_logps=ref_r, beta=0.05, label_smoothing=label_smoothing)
    loss.backward()
    # Smoothed, the loss is smallest at z = log((1 - eps) / eps) (1.39 for 0.2), so the sign holds below it.
    assert torch.all(stats.margin.abs() < 1.0)
    assert torch.all(chosen.grad < 0) and torch.all(rejected.grad > 0)
    torch.testing.assert_close(chosen.grad, -rejected.grad)


# ---------------------------------------------------------------- IPO


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_ipo_matches_loop(seed, dtype, pattern):
    gen = torch.Generator().manual_seed(seed)
    chosen, rejected = Side(gen, pattern, dtype), Side(gen, pattern, dtype)
    beta = [0.1, 0.5, 0.05, 1.0][seed]
    loss, stats = ipo_loss(
        chosen_logps=chosen.sums(), rejected_logps=rejected.sums(),
        chosen_ref_logps=chosen.sums(ref=True), rejected_ref_logps=rejected.sums(ref=True),
        chosen_lengths=chosen.lengths(), rejected_lengths=rejected.lengths(), beta=beta,
    )
    check(loss, stats, ref_ipo(chosen, rejected, beta), dtype)
    assert loss.dtype == dtype


def test_ipo_is_zero_with_zero_gradient_at_its_target_and_uses_length_averages():
    beta = 0.25  # target h = 1 / (2 beta) = 2
    # Chosen: 4 tokens, log-ratio sum 6, mean 1.5; rejected: 2 tokens, sum -1, mean -0.5; h = 2.
    chosen, rejected = with_grad(torch.tensor([-4.0], dtype=torch.float64), torch.tensor([-3.0], dtype=torch.float64))
    kwargs = dict(chosen_ref_logps=torch.tensor([-10.0], dtype=torch.float64),
                  rejected_ref_logps=torch.tensor([-2.0], dtype=torch.float64),
                  chosen_lengths=torch.tensor([4]), rejected_lengths=torch.tensor([2]), beta=beta)
    loss, stats = ipo_loss(chosen_logps=chosen, rejected_logps=rejected, **kwargs)
    assert loss.item() == pytest.approx(0.0, abs=1e-24)
    assert stats.margin.item() == pytest.approx(beta * 2.0)
    loss.backward()
    assert chosen.grad.abs().item() < 1e-15 and rejected.grad.abs().item() < 1e-15
    # Summed log-ratios would give h = 6 - (-1) = 7; averaged, h = 2. One unit past the target costs 1.
    loss, _ = ipo_loss(chosen_logps=chosen.detach() + 4.0, rejected_logps=rejected.detach(), **kwargs)
    assert loss.item() == pytest.approx(1.0, rel=1e-14)
    # Below the target, raising chosen lowers the loss; past it, raising chosen raises it.
    for shift, sign in ((-3.0, -1.0), (3.0, 1.0)):
        c = with_grad(chosen.detach() + shift)[0]
        ipo_loss(chosen_logps=c, rejected_logps=rejected.detach(), **kwargs)[0].backward()
        assert torch.sign(c.grad).item() == sign


# ---------------------------------------------------------------- KTO


@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.0, 1.33), (0.75, 1.0)])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_kto_matches_loop(seed, dtype, pattern, weights):
    gen = torch.Generator().manual_seed(seed)
    side, kl = Side(gen, pattern, dtype), Side(gen, pattern, dtype, rows=B + 2)
    if seed % 2:
        # Shift the mismatched pairs' policy log-probs up so z0 is positive (the clamp inactive).
        kl.tokens = torch.where(kl.mask, kl.tokens + 0.4, kl.tokens)
    labels = (torch.rand(B, generator=gen) < 0.5).tolist()
    beta = [0.1, 0.5, 0.05, 1.0][seed]
    loss, stats = kto_loss(
        logps=side.sums(), ref_logps=side.sums(ref=True), desirable=torch.tensor(labels),
        kl_logps=kl.sums(), kl_ref_logps=kl.sums(ref=True), beta=beta,
        desirable_weight=weights[0], undesirable_weight=weights[1],
    )
    expected = ref_kto(side, labels, kl, beta, *weights)
    check(loss, stats, expected, dtype)
    assert stats.desirable.tolist() == labels
    close(stats.logps, side.sums().double(), dtype)
    if seed % 2:
        assert stats.reference_point.item() > 0


@pytest.mark.parametrize("label", [True, False])
def test_kto_single_label_batches(label):
    gen = torch.Generator().manual_seed(11)
    side, kl = Side(gen, "prefix", torch.float64), Side(gen, "holes", torch.float64)
    labels = [label] * B
    loss, stats = kto_loss(logps=side.sums(), ref_logps=side.sums(ref=True), desirable=torch.tensor(labels),
                           kl_logps=kl.sums(), kl_ref_logps=kl.sums(ref=True), beta=0.2,
                           desirable_weight=1.0, undesirable_weight=1.5)
    check(loss, stats, ref_kto(side, labels, kl, 0.2, 1.0, 1.5), torch.float64)
    # Undesirable losses are weighted by lambda_U, so each lies in (0, 1.5).
    assert torch.all(stats.losses < (1.0 if label else 1.5)) and torch.all(stats.losses > 0)


def test_kto_exact_cases_and_reference_point():
    one = torch.ones(2, dtype=torch.float64)
    # KL estimate below zero is clamped: z0 = 0.
    z0 = kto_reference_point(kl_logps=-3 * one, kl_ref_logps=-2 * one)
    assert z0.item() == 0.0
    assert kto_reference_point(kl_logps=torch.tensor([-1.0, -3.0]), kl_ref_logps=torch.tensor([-2.0, -1.0])).item() == 0.0
    assert kto_reference_point(kl_logps=torch.tensor([-1.0, -2.0]), kl_ref_logps=torch.tensor([-2.0, -2.0])).item() == 0.5
    # Reward exactly at the reference point: each loss is lambda / 2.
    logps, ref = torch.tensor([-3.0, -3.0], dtype=torch.float64), torch.tensor([-4.0, -4.0], dtype=torch.float64)
    loss, stats = kto_loss(logps=logps, ref_logps=ref, desirable=torch.tensor([True, False]),
                           kl_logps=torch.tensor([-1.0]), kl_ref_logps=torch.tensor([-2.0]), beta=0.3,
                           desirable_weight=2.0, undesirable_weight=3.0)
    assert stats.reference_point.item() == 1.0
    assert stats.losses.tolist() == [1.0, 1.5] and loss.item() == 1.25
    assert stats.rewards.tolist() == pytest.approx([0.3, 0.3])


def test_kto_gradient_signs_and_no_gradient_through_the_reference_point():
    gen = torch.Generator().manual_seed(5)
    logps, kl_logps = with_grad(torch.randn(B, generator=gen, dtype=torch.float64) - 10,
                                torch.randn(B, generator=gen, dtype=torch.float64) - 10)
    desirable = torch.tensor([True, False] * (B // 2))
    loss, _ = kto_loss(logps=logps, ref_logps=logps.detach() - 0.5, desirable=desirable, kl_logps=kl_logps,
                       kl_ref_logps=kl_logps.detach() - 0.5, beta=0.1)
    loss.backward()
    assert torch.all(logps.grad[desirable] < 0) and torch.all(logps.grad[~desirable] > 0)
    assert kl_logps.grad is None  # z0 is detached: the mismatched pairs get no gradient


# ---------------------------------------------------------------- SimPO


@pytest.mark.parametrize("gamma", [0.0, 0.5, 1.4])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_simpo_matches_loop(seed, dtype, pattern, gamma):
    gen = torch.Generator().manual_seed(seed)
    chosen, rejected = Side(gen, pattern, dtype), Side(gen, pattern, dtype)
    beta = [2.0, 2.5, 10.0, 1.0][seed]
    loss, stats = simpo_loss(chosen_logps=chosen.sums(), rejected_logps=rejected.sums(),
                             chosen_lengths=chosen.lengths(), rejected_lengths=rejected.lengths(),
                             beta=beta, gamma=gamma)
    check(loss, stats, ref_simpo(chosen, rejected, beta, gamma), dtype)


def test_simpo_exact_cases_and_gradient():
    # Same mean log-prob -2 (-6 over 3 tokens, -12 over 6): the rewards tie although the sums differ.
    c, r = with_grad(torch.tensor([-6.0], dtype=torch.float64), torch.tensor([-12.0], dtype=torch.float64))
    kwargs = dict(chosen_lengths=torch.tensor([3]), rejected_lengths=torch.tensor([6]), beta=2.0)
    loss, stats = simpo_loss(chosen_logps=c, rejected_logps=r, gamma=0.0, **kwargs)
    assert loss.item() == pytest.approx(math.log(2), rel=1e-15)
    assert stats.chosen_rewards.item() == -4.0 and stats.rejected_rewards.item() == -4.0
    assert stats.margin.item() == 0.0 and stats.accuracy.item() == 0.0
    # The margin gamma is in reward units: a tie costs log(1 + e^gamma).
    loss, stats = simpo_loss(chosen_logps=c, rejected_logps=r, gamma=0.7, **kwargs)
    assert loss.item() == pytest.approx(math.log1p(math.exp(0.7)), rel=1e-14)
    loss.backward()
    assert c.grad.item() < 0


def test_reference_free_losses_take_no_reference():
    for fn in (simpo_loss, orpo_loss):
        assert not [p for p in inspect.signature(fn).parameters if "ref" in p]
    for fn in (dpo_loss, ipo_loss, kto_loss):
        assert [p for p in inspect.signature(fn).parameters if "ref" in p]
    assert set(REFERENCE_FREE_LOSSES) == {"simpo", "orpo"} and set(UNPAIRED_LOSSES) == {"kto"}
    assert set(PREFERENCE_LOSSES) == {"dpo", "ipo", "kto", "simpo", "orpo"}


# ---------------------------------------------------------------- ORPO


@pytest.mark.parametrize("lam", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_orpo_matches_loop(seed, dtype, pattern, lam):
    gen = torch.Generator().manual_seed(seed)
    chosen, rejected = Side(gen, pattern, dtype), Side(gen, pattern, dtype)
    loss, stats = orpo_loss(chosen_logps=chosen.sums(), rejected_logps=rejected.sums(),
                            chosen_lengths=chosen.lengths(), rejected_lengths=rejected.lengths(), lam=lam)
    check(loss, stats, ref_orpo(chosen, rejected, lam), dtype)


def test_orpo_exact_cases():
    # Chosen mean log-prob log(1/2): odds 1; rejected log(1/5): odds 1/4. L_OR = -log sigmoid(log 4) = log(5/4).
    c = torch.tensor([3 * math.log(0.5)], dtype=torch.float64)
    r = torch.tensor([2 * math.log(0.2)], dtype=torch.float64)
    loss, stats = orpo_loss(chosen_logps=c, rejected_logps=r, chosen_lengths=torch.tensor([3]),
                            rejected_lengths=torch.tensor([2]), lam=0.1)
    assert stats.chosen_rewards.item() == pytest.approx(0.0, abs=1e-15)
    assert stats.rejected_rewards.item() == pytest.approx(math.log(0.25), rel=1e-14)
    assert stats.odds_ratio_losses.item() == pytest.approx(math.log(1.25), rel=1e-14)
    assert stats.sft_losses.item() == pytest.approx(math.log(2), rel=1e-14)
    assert loss.item() == pytest.approx(math.log(2) + 0.1 * math.log(1.25), rel=1e-14)
    # Equal responses: L_OR = log 2, only the SFT term differs from lam * log 2.
    loss, _ = orpo_loss(chosen_logps=c, rejected_logps=c, chosen_lengths=torch.tensor([3]),
                        rejected_lengths=torch.tensor([3]), lam=1.0)
    assert loss.item() == pytest.approx(math.log(2) + math.log(2), rel=1e-14)


@pytest.mark.parametrize("dtype", DTYPES)
def test_log_odds_is_stable_at_both_ends(dtype):
    a = torch.tensor([-1e-12, -1e-6, -0.3, -math.log(2), -0.9, -30.0, -200.0], dtype=torch.float64)
    # log(1 - e^a) through the math module's expm1, one formula on both sides of the cut.
    expected = [v - math.log(-math.expm1(v)) for v in a.tolist()]
    close(log_odds(a), expected, torch.float64)
    # P = 1 exactly (mean log-prob 0): large but finite, and the losses stay finite with finite gradients.
    x = with_grad(torch.tensor([0.0, -1.0], dtype=dtype))[0]
    out = log_odds(x)
    assert torch.all(torch.isfinite(out))
    loss, _ = orpo_loss(chosen_logps=x[:1] * 4, rejected_logps=x[1:] * 4, chosen_lengths=torch.tensor([4]),
                        rejected_lengths=torch.tensor([4]), lam=0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.all(torch.isfinite(x.grad))
    # Near zero, float32 inputs keep the log odds the float64 formula gives.
    small = torch.tensor([-1e-4, -1e-2], dtype=dtype)
    close(log_odds(small), [v - math.log(-math.expm1(v)) for v in small.double().tolist()], dtype)


def test_orpo_gradient_signs():
    gen = torch.Generator().manual_seed(9)
    c, r = with_grad(-torch.rand(B, generator=gen, dtype=torch.float64) * 20 - 0.1,
                     -torch.rand(B, generator=gen, dtype=torch.float64) * 20 - 0.1)
    lengths = torch.randint(1, 10, (B,), generator=gen)
    orpo_loss(chosen_logps=c, rejected_logps=r, chosen_lengths=lengths, rejected_lengths=lengths, lam=0.5)[0].backward()
    assert torch.all(c.grad < 0) and torch.all(r.grad > 0)


# ---------------------------------------------------------------- analytic gradients


def test_gradients_match_finite_differences():
    gen = torch.Generator().manual_seed(13)

    def logps(n: int = 4) -> torch.Tensor:
        return (-torch.rand(n, generator=gen, dtype=torch.float64) * 8 - 0.05).requires_grad_(True)

    c, r, cr, rr = logps(), logps(), logps(), logps()
    lc, lr = torch.randint(1, 6, (4,), generator=gen), torch.randint(1, 6, (4,), generator=gen)
    labels = torch.tensor([True, False, False, True])
    # Constants, not inputs: z0 is detached, so a finite difference through it would not match (by design).
    kl, kl_ref = torch.tensor([-3.0, -1.0], dtype=torch.float64), torch.tensor([-4.0, -1.5], dtype=torch.float64)
    checks = [
        lambda c, r, cr, rr: dpo_loss(chosen_logps=c, rejected_logps=r, chosen_ref_logps=cr, rejected_ref_logps=rr,
                                      beta=0.4, label_smoothing=0.15)[0],
        lambda c, r, cr, rr: ipo_loss(chosen_logps=c, rejected_logps=r, chosen_ref_logps=cr, rejected_ref_logps=rr,
                                      chosen_lengths=lc, rejected_lengths=lr, beta=0.3)[0],
        lambda c, r, cr, rr: kto_loss(logps=c, ref_logps=cr, desirable=labels, kl_logps=kl,
                                      kl_ref_logps=kl_ref, beta=0.5, undesirable_weight=1.3)[0],
        lambda c, r, cr, rr: simpo_loss(chosen_logps=c, rejected_logps=r, chosen_lengths=lc, rejected_lengths=lr,
                                        beta=2.0, gamma=0.6)[0],
        lambda c, r, cr, rr: orpo_loss(chosen_logps=c, rejected_logps=r, chosen_lengths=lc, rejected_lengths=lr,
                                       lam=0.2)[0],
    ]
    for fn in checks:
        assert torch.autograd.gradcheck(fn, (c, r, cr, rr))
