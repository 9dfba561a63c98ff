"""PPO math checked against straightforward float64 loops over rows and tokens, plus exact cases."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf.algos.critic_free import aggregate_token_losses
from rlhf.algos.ppo import (
    KL_ESTIMATORS,
    adaptive_beta,
    clipped_surrogate,
    entropy_from_logits,
    explained_variance,
    gae,
    kl_per_token,
    logprobs_from_logits,
    masked_mean,
    masked_moments,
    masked_sums,
    masked_var,
    masked_whiten,
    moments_from_sums,
    penalized_rewards,
    shape_scores,
    value_loss,
)
from tests.masks import PATTERNS, random_mask

B, R, V = 5, 7, 6
SEEDS = range(3)
DTYPES = [torch.float64, torch.float32]


# ---------------------------------------------------------------- inputs and tolerances


def make_mask(gen: torch.Generator, pattern: str, rows: int = B, cols: int = R) -> torch.Tensor:
    return random_mask(gen, pattern, rows=rows, cols=cols)


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Standard normal tensor of the given shape and dtype."""
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def garbled(x: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x with every masked entry replaced by large finite garbage."""
    noise = (randn(gen, *x.shape) * 1e6).to(x.dtype)
    return torch.where(mask.bool(), x, noise)


def close(actual, expected, dtype: torch.dtype) -> None:
    """assert_close against float64 reference values, with a tolerance set by the input dtype."""
    expected = torch.as_tensor(expected, dtype=torch.float64)
    if dtype == torch.float64:
        tol = dict(rtol=1e-12, atol=1e-12)
    else:
        tol = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.as_tensor(actual).double(), expected, **tol)


def rows(x: torch.Tensor) -> list:
    """Tensor as nested Python floats (float64) for the loop references."""
    return x.double().tolist()


# ---------------------------------------------------------------- float64 loop references


def ref_mean(x: list, mask: list) -> float:
    """Mean of x over valid entries of a 2-D mask (0 when none)."""
    vals = [x[b][t] for b in range(len(x)) for t in range(len(x[b])) if mask[b][t]]
    return sum(vals) / max(len(vals), 1)


def ref_var(x: list, mask: list) -> float:
    """Population variance of x over valid entries."""
    mean = ref_mean(x, mask)
    vals = [x[b][t] for b in range(len(x)) for t in range(len(x[b])) if mask[b][t]]
    return sum((v - mean) ** 2 for v in vals) / max(len(vals), 1)


def ref_whiten(x: list, mask: list, shift_mean: bool, eps: float) -> list:
    """(x - mean) / sqrt(var + eps) at valid entries (+ mean if not shift_mean), 0 elsewhere."""
    mean, var = ref_mean(x, mask), ref_var(x, mask)
    out = []
    for b in range(len(x)):
        row = []
        for t in range(len(x[b])):
            if mask[b][t]:
                v = (x[b][t] - mean) / math.sqrt(var + eps)
                row.append(v if shift_mean else v + mean)
            else:
                row.append(0.0)
        out.append(row)
    return out


def ref_log_softmax(logits: list, temperature: float) -> list:
    """log softmax(logits / temperature) of one vocabulary row."""
    z = [v / temperature for v in logits]
    top = max(z)
    lse = top + math.log(sum(math.exp(v - top) for v in z))
    return [v - lse for v in z]


def ref_kl(d: float, estimator: str) -> float:
    """One of Schulman's estimators of KL for a log-ratio d = logp - ref_logp."""
    return {"k1": d, "k2": d * d / 2, "k3": math.exp(-d) - 1 + d}[estimator]


def ref_shape(scores, has_eos, mean, std, normalize, clip, no_eos_score) -> list:
    """Normalize, then clip, then the fixed score for rows without EOS, row by row."""
    out = []
    for s, eos in zip(scores, has_eos):
        if normalize:
            s = (s - mean) / std
        if clip is not None:
            s = min(max(s, -clip), clip)
        if no_eos_score is not None and not eos:
            s = no_eos_score
        out.append(s)
    return out


def ref_penalized(logp, ref_logp, scores, mask, beta, estimator) -> tuple[list, list]:
    """(-beta * kl per valid token + score at the row's last valid token, kl), 0 at padding."""
    rewards, kls = [], []
    for b in range(len(mask)):
        last = max(t for t in range(len(mask[b])) if mask[b][t])
        rrow, krow = [], []
        for t in range(len(mask[b])):
            if mask[b][t]:
                kl = ref_kl(logp[b][t] - ref_logp[b][t], estimator)
                rrow.append(-beta * kl + (scores[b] if t == last else 0.0))
                krow.append(kl)
            else:
                rrow.append(0.0)
                krow.append(0.0)
        rewards.append(rrow)
        kls.append(krow)
    return rewards, kls


def ref_gae(rewards, values, mask, gamma, lam) -> tuple[list, list]:
    """GAE over each row's valid tokens only, walking backwards; 0 at padding."""
    advs, rets = [], []
    for b in range(len(mask)):
        adv, ret = [0.0] * len(mask[b]), [0.0] * len(mask[b])
        steps = [t for t in range(len(mask[b])) if mask[b][t]]
        next_value, next_adv = 0.0, 0.0
        for t in reversed(steps):
            delta = rewards[b][t] + gamma * next_value - values[b][t]
            next_adv = delta + gamma * lam * next_adv
            next_value = values[b][t]
            adv[t], ret[t] = next_adv, next_adv + values[b][t]
        advs.append(adv)
        rets.append(ret)
    return advs, rets


def ref_policy(logp, old_logp, adv, mask, clip) -> dict[str, float]:
    """Clipped surrogate loss and its stats, token by token."""
    losses, clipped_flags, kls, ratios = [], [], [], []
    for b in range(len(mask)):
        for t in range(len(mask[b])):
            if not mask[b][t]:
                continue
            ratio = math.exp(logp[b][t] - old_logp[b][t])
            unclipped = -adv[b][t] * ratio
            clipped = -adv[b][t] * min(max(ratio, 1 - clip), 1 + clip)
            losses.append(max(unclipped, clipped))
            clipped_flags.append(1.0 if clipped > unclipped else 0.0)
            kls.append(ratio - 1 - math.log(ratio))
            ratios.append(ratio)
    n = len(losses)
    return {
        "loss": sum(losses) / n,
        "clipfrac": sum(clipped_flags) / n,
        "approx_kl": sum(kls) / n,
        "ratio_mean": sum(ratios) / n,
    }


def ref_value(values, old_values, returns, mask, clip) -> dict[str, float]:
    """Clipped (or plain, clip=None) value loss and clip fraction, token by token."""
    losses, flags = [], []
    for b in range(len(mask)):
        for t in range(len(mask[b])):
            if not mask[b][t]:
                continue
            error = (values[b][t] - returns[b][t]) ** 2
            if clip is None:
                losses.append(error)
                flags.append(0.0)
                continue
            step = min(max(values[b][t] - old_values[b][t], -clip), clip)
            clipped_error = (old_values[b][t] + step - returns[b][t]) ** 2
            losses.append(max(error, clipped_error))
            flags.append(1.0 if clipped_error > error else 0.0)
    return {"loss": 0.5 * sum(losses) / len(losses), "clipfrac": sum(flags) / len(flags)}


# ---------------------------------------------------------------- masked statistics


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_masked_mean_and_var_match_loops(seed, dtype, pattern):
    gen = torch.Generator().manual_seed(seed)
    mask = make_mask(gen, pattern)
    x = randn(gen, B, R, dtype=dtype) * 3 + 1
    xs, ms = rows(x), mask.tolist()

    close(masked_mean(x, mask), ref_mean(xs, ms), dtype)
    close(masked_var(x, mask), ref_var(xs, ms), dtype)
    per_row = [ref_mean([xs[b]], [ms[b]]) for b in range(B)]
    close(masked_mean(x, mask, dim=1), per_row, dtype)
    columns = [[[xs[b][t]] for b in range(B)] for t in range(R)]
    column_masks = [[[ms[b][t]] for b in range(B)] for t in range(R)]
    per_column = [ref_mean(c, m) for c, m in zip(columns, column_masks)]
    close(masked_mean(x, mask, dim=0), per_column, dtype)
    # A 0/1 float mask means the same as the bool one.
    close(masked_mean(x, mask.to(dtype)), ref_mean(xs, ms), dtype)

    dirty = garbled(x, mask, gen)
    assert torch.equal(masked_mean(dirty, mask), masked_mean(x, mask))
    assert torch.equal(masked_mean(dirty, mask, dim=1), masked_mean(x, mask, dim=1))
    assert torch.equal(masked_var(dirty, mask), masked_var(x, mask))


def test_masked_mean_of_an_all_masked_row_is_zero():
    x = torch.tensor([[1.0, 2.0], [5e6, -3e6]])
    mask = torch.tensor([[True, False], [False, False]])
    assert masked_mean(x, mask, dim=1).tolist() == [1.0, 0.0]


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_masked_whiten_matches_loop(seed, dtype, pattern, shift_mean):
    gen = torch.Generator().manual_seed(seed)
    mask = make_mask(gen, pattern)
    x = randn(gen, B, R, dtype=dtype) * 2.5 + 4
    out = masked_whiten(x, mask, shift_mean=shift_mean)
    close(out, ref_whiten(rows(x), mask.tolist(), shift_mean, 1e-8), dtype)

    valid = out[mask].double()
    expected_mean = 0.0 if shift_mean else x[mask].double().mean().item()
    assert valid.mean().item() == pytest.approx(expected_mean, abs=1e-5)
    assert valid.var(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert torch.all(out[~mask] == 0)
    assert torch.equal(masked_whiten(garbled(x, mask, gen), mask, shift_mean=shift_mean), out)


def near_the_limit(x: torch.Tensor, mask: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """x with every masked entry replaced by +-(close to the largest finite value of x's dtype)."""
    sign = torch.where(torch.rand(x.shape, generator=gen) < 0.5, -1.0, 1.0).to(x.dtype)
    return torch.where(mask, x, sign * torch.finfo(x.dtype).max * 0.9)


def grad_of(fn, *inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(fn(*inputs) detached, the gradients of its value with respect to each input)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward()
    return out.detach(), [t.grad for t in leaves]


def statistics_of_valid(x: torch.Tensor, mask: torch.Tensor, w: torch.Tensor, shift_mean: bool):
    """The three statistics on x[mask] only, straightforwardly (used in float64 as the reference)."""
    def var(v):
        return ((v - v.mean()) ** 2).mean()

    def whiten(v):
        out = (v[mask] - v[mask].mean()) / torch.sqrt(var(v[mask]) + 1e-8)
        return (out * w[mask]).sum() + (0 if shift_mean else (v[mask].mean() * w[mask]).sum())

    return {
        "var": lambda v: var(v[mask]),
        "whiten": whiten,
        "explained": lambda v, r: 1 - var((r - v)[mask]) / var(r[mask]),
    }


@pytest.mark.parametrize("shift_mean", [True, False])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_padding_near_the_float_limit_changes_no_value_and_no_gradient(seed, dtype, pattern, shift_mean):
    gen = torch.Generator().manual_seed(seed)
    mask = make_mask(gen, pattern)
    x, w = randn(gen, B, R, dtype=dtype) * 2 + 3, randn(gen, B, R, dtype=dtype)
    returns = randn(gen, B, R, dtype=dtype) * 2
    ours = {
        "var": lambda v: masked_var(v, mask),
        "whiten": lambda v: (masked_whiten(v, mask, shift_mean=shift_mean) * w).sum(),
        "explained": lambda v, r: explained_variance(v, r, mask),
    }
    ref = statistics_of_valid(x.double(), mask, w.double(), shift_mean)
    for name, args in (("var", (x,)), ("whiten", (x,)), ("explained", (returns + randn(gen, B, R, dtype=dtype), returns))):
        dirty = [near_the_limit(a, mask, gen) for a in args]
        value, grads = grad_of(ours[name], *dirty)
        clean_value, clean_grads = grad_of(ours[name], *(torch.where(mask, a, 0) for a in args))
        # The padding changes nothing, bit for bit, and its gradient is exactly 0.
        assert torch.equal(value, clean_value), name
        for g, clean in zip(grads, clean_grads):
            assert torch.isfinite(g).all() and torch.all(g[~mask] == 0), name
            assert torch.equal(g, clean), name
        ref_value, ref_grads = grad_of(ref[name], *(a.double() for a in args))
        close(value, ref_value, dtype)
        for g, r in zip(grads, ref_grads):
            close(g, r, dtype)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_masked_sums_across_two_ranks_whiten_like_the_concatenation(seed, dtype, pattern):
    gen = torch.Generator().manual_seed(seed)
    mask_a, mask_b = make_mask(gen, pattern), make_mask(gen, pattern, rows=3)
    x_a, x_b = randn(gen, B, R, dtype=dtype) + 2, randn(gen, 3, R, dtype=dtype) * 4 - 1

    sums_a = masked_sums(x_a, mask_a)
    assert sums_a.dtype == torch.float64
    xs, ms = rows(x_a), mask_a.tolist()
    vals = [xs[b][t] for b in range(B) for t in range(R) if ms[b][t]]
    close(sums_a, [sum(vals), sum(v * v for v in vals), len(vals)], torch.float64)
    assert torch.equal(masked_sums(garbled(x_a, mask_a, gen), mask_a), sums_a)

    # What an all-reduce would produce: the sum over ranks.
    mean, var = moments_from_sums(sums_a + masked_sums(x_b, mask_b))
    both, both_mask = torch.cat([x_a, x_b]), torch.cat([mask_a, mask_b])
    assert mean == pytest.approx(ref_mean(rows(both), both_mask.tolist()), rel=1e-12, abs=1e-12)
    assert var == pytest.approx(ref_var(rows(both), both_mask.tolist()), rel=1e-10, abs=1e-12)
    for shift_mean in (True, False):
        whole = masked_whiten(both, both_mask, shift_mean=shift_mean)
        split = torch.cat([
            masked_whiten(x_a, mask_a, shift_mean=shift_mean, mean=mean, var=var),
            masked_whiten(x_b, mask_b, shift_mean=shift_mean, mean=mean, var=var),
        ])
        close(split, whole.double(), dtype)


@pytest.mark.parametrize("offset", [0.0, 1e6, 1e8])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_moments_far_from_zero_are_exact_across_ranks(seed, dtype, pattern, offset):
    gen = torch.Generator().manual_seed(seed)
    mask_a, mask_b = make_mask(gen, pattern), make_mask(gen, pattern, rows=3)
    x_a, x_b = randn(gen, B, R) + offset, randn(gen, 3, R) * 4 + offset + 1.5
    x_a, x_b = garbled(x_a.to(dtype), mask_a, gen), garbled(x_b.to(dtype), mask_b, gen)
    both, both_mask = torch.cat([x_a, x_b]), torch.cat([mask_a, mask_b])
    valid = both[both_mask].double().tolist()  # the values as the inputs hold them, in float64
    ref_m = math.fsum(valid) / len(valid)
    ref_v = math.fsum((v - ref_m) ** 2 for v in valid) / len(valid)

    # masked_moments' two all-reduces, done by hand: every rank's sums about one shared shift.
    shift, _ = moments_from_sums(masked_sums(x_a, mask_a) + masked_sums(x_b, mask_b))
    mean, var = moments_from_sums(masked_sums(x_a, mask_a, shift) + masked_sums(x_b, mask_b, shift), shift)
    assert mean == pytest.approx(ref_m, rel=1e-15, abs=1e-12)
    assert var == pytest.approx(ref_v, rel=1e-10)
    assert masked_moments(both, both_mask) == pytest.approx((ref_m, ref_v), rel=1e-10)
    if dtype == torch.float64:
        # The whitened values, to 1e-6: E[x^2] - E[x]^2 was off by 3e-2 at 1e6 and gave var 0 at 1e8.
        expected = ref_whiten(rows(both), both_mask.tolist(), True, 1e-8)
        split = [masked_whiten(x, m, mean=mean, var=var) for x, m in ((x_a, mask_a), (x_b, mask_b))]
        torch.testing.assert_close(torch.cat(split), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_moments_from_sums_of_nothing_are_zero():
    empty = masked_sums(torch.ones(2, 3), torch.zeros(2, 3, dtype=torch.bool))
    assert empty.tolist() == [0.0, 0.0, 0.0]
    assert moments_from_sums(empty) == (0.0, 0.0)


# ---------------------------------------------------------------- log-probs, entropy, KL


@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_logprobs_and_entropy_match_loops(seed, dtype, temperature):
    gen = torch.Generator().manual_seed(seed)
    logits = randn(gen, B, R, V, dtype=dtype) * 3
    tokens = torch.randint(0, V, (B, R), generator=gen)
    logp = logprobs_from_logits(logits, tokens, temperature=temperature)
    entropy = entropy_from_logits(logits, temperature=temperature)
    assert logp.shape == entropy.shape == (B, R)
    assert logp.dtype == entropy.dtype == dtype

    lg, tk = rows(logits), tokens.tolist()
    expected_logp, expected_entropy = [], []
    for b in range(B):
        logp_row, entropy_row = [], []
        for t in range(R):
            log_probs = ref_log_softmax(lg[b][t], temperature)
            logp_row.append(log_probs[tk[b][t]])
            entropy_row.append(-sum(math.exp(lp) * lp for lp in log_probs))
        expected_logp.append(logp_row)
        expected_entropy.append(entropy_row)
    close(logp, expected_logp, dtype)
    close(entropy, expected_entropy, dtype)

    # Querying every vocabulary token gives a distribution per position.
    every = torch.stack([
        logprobs_from_logits(logits, torch.full((B, R), v), temperature=temperature)
        for v in range(V)
    ])
    close(every.exp().sum(0), torch.ones(B, R, dtype=torch.float64), dtype)


def test_bf16_logits_are_scored_in_float32():
    gen = torch.Generator().manual_seed(0)
    logits = (randn(gen, 2, 3, 50) * 4).to(torch.bfloat16)
    tokens = torch.randint(0, 50, (2, 3), generator=gen)
    logp = logprobs_from_logits(logits, tokens, temperature=0.9)
    entropy = entropy_from_logits(logits, temperature=0.9)
    assert logp.dtype == entropy.dtype == torch.float32
    # Float32 accuracy: a softmax done in bf16 would be off by ~1e-2.
    exact = torch.log_softmax(logits.double() / 0.9, dim=-1)
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        logp.double(), exact.gather(-1, tokens.unsqueeze(-1)).squeeze(-1), **tol
    )
    torch.testing.assert_close(entropy.double(), -(exact.exp() * exact).sum(-1), **tol)


def test_entropy_of_uniform_and_of_masked_vocabulary():
    flat = torch.zeros(1, 2, 8)
    close(entropy_from_logits(flat), [[math.log(8)] * 2], torch.float32)
    # -inf logits are impossible tokens: they add nothing, and never 0 * -inf = nan.
    half = torch.tensor([[[0.0, 0.0, -math.inf, -math.inf]]])
    close(entropy_from_logits(half), [[math.log(2)]], torch.float32)


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_kl_estimators_match_formulas(seed, dtype, pattern, estimator):
    gen = torch.Generator().manual_seed(seed)
    mask = make_mask(gen, pattern)
    logp, ref_logp = randn(gen, B, R, dtype=dtype) - 2, randn(gen, B, R, dtype=dtype) - 2
    kl = kl_per_token(logp, ref_logp, mask, estimator=estimator)
    lp, rp, ms = rows(logp), rows(ref_logp), mask.tolist()
    expected = [
        [ref_kl(lp[b][t] - rp[b][t], estimator) if ms[b][t] else 0.0 for t in range(R)]
        for b in range(B)
    ]
    close(kl, expected, dtype)
    if estimator in ("k2", "k3"):
        assert torch.all(kl >= 0)
    assert torch.all(kl[~mask] == 0)
    assert torch.all(kl_per_token(logp, logp, mask, estimator=estimator) == 0)
    dirty = kl_per_token(garbled(logp, mask, gen), garbled(ref_logp, mask, gen), mask, estimator=estimator)
    assert torch.equal(dirty, kl)


def test_k1_can_be_negative_and_unknown_estimators_are_rejected():
    logp, ref_logp = torch.tensor([[-2.0, -1.0]]), torch.tensor([[-1.0, -1.0]])
    mask = torch.tensor([[True, True]])
    assert kl_per_token(logp, ref_logp, mask, estimator="k1").tolist() == [[-1.0, 0.0]]
    with pytest.raises(ValueError, match="k4"):
        kl_per_token(logp, ref_logp, mask, estimator="k4")


# ---------------------------------------------------------------- rewards and GAE


@pytest.mark.parametrize(
    "options",
    [
        dict(normalize=True, mean=0.5, std=2.0, clip=None, no_eos_score=None),
        dict(normalize=True, mean=-1.0, std=0.5, clip=1.5, no_eos_score=-3.0),
        dict(normalize=False, clip=0.8, no_eos_score=None),
        dict(normalize=False, clip=None, no_eos_score=-1.0),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_shape_scores_matches_loop(seed, dtype, options):
    gen = torch.Generator().manual_seed(seed)
    scores = randn(gen, 12, dtype=dtype) * 2
    has_eos = torch.rand(12, generator=gen) < 0.6
    options = {"mean": 0.0, "std": 1.0, **options}
    shaped = shape_scores(scores, has_eos, **options)
    close(shaped, ref_shape(scores.double().tolist(), has_eos.tolist(), **options), dtype)


def test_shape_scores_order_is_normalize_clip_then_no_eos():
    scores = torch.tensor([10.0, 10.0, -0.5])
    has_eos = torch.tensor([True, False, True])
    shaped = shape_scores(scores, has_eos, mean=2.0, std=4.0, clip=1.5, no_eos_score=-7.0)
    # (10 - 2) / 4 = 2 -> clipped to 1.5; the fixed score is not clipped; (-0.5 - 2) / 4 = -0.625.
    assert shaped.tolist() == [1.5, -7.0, -0.625]


@pytest.mark.parametrize("estimator", KL_ESTIMATORS)
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_penalized_rewards_match_loop(seed, dtype, pattern, estimator):
    gen = torch.Generator().manual_seed(seed)
    mask = make_mask(gen, pattern)
    logp, ref_logp = randn(gen, B, R, dtype=dtype) - 1, randn(gen, B, R, dtype=dtype) - 1
    scores = randn(gen, B, dtype=dtype)
    rewards, kl = penalized_rewards(logp, ref_logp, scores, mask, beta=0.05, kl_estimator=estimator)
    expected_rewards, expected_kl = ref_penalized(
        rows(logp), rows(ref_logp), scores.double().tolist(), mask.tolist(), 0.05, estimator
    )
    close(rewards, expected_rewards, dtype)
    close(kl, expected_kl, dtype)
    assert torch.all(rewards[~mask] == 0)

    dirty_logp, dirty_ref = garbled(logp, mask, gen), garbled(ref_logp, mask, gen)
    dirty = penalized_rewards(dirty_logp, dirty_ref, scores, mask, beta=0.05, kl_estimator=estimator)
    assert torch.equal(dirty[0], rewards) and torch.equal(dirty[1], kl)


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 0.9), (0.9, 1.0), (1.0, 0.0)])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_gae_matches_loop_over_valid_tokens(seed, dtype, pattern, gamma, lam):
    gen = torch.Generator().manual_seed(seed)
    mask = make_mask(gen, pattern)
    rewards, values = randn(gen, B, R, dtype=dtype), randn(gen, B, R, dtype=dtype)
    advantages, returns = gae(rewards, values, mask, gamma=gamma, lam=lam)
    expected_adv, expected_ret = ref_gae(rows(rewards), rows(values), mask.tolist(), gamma, lam)
    close(advantages, expected_adv, dtype)
    close(returns, expected_ret, dtype)
    assert torch.all(advantages[~mask] == 0) and torch.all(returns[~mask] == 0)

    dirty = gae(garbled(rewards, mask, gen), garbled(values, mask, gen), mask, gamma=gamma, lam=lam)
    assert torch.equal(dirty[0], advantages) and torch.equal(dirty[1], returns)


def test_gae_skips_a_hole_by_hand():
    # Valid at columns 0 and 2; column 1 is a hole holding garbage.
    rewards = torch.tensor([[1.0, 1e6, 2.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, -1e6, 3.0]], dtype=torch.float64)
    mask = torch.tensor([[True, False, True]])
    advantages, returns = gae(rewards, values, mask, gamma=0.5, lam=0.5)
    # t=2: delta = 2 + 0 - 3 = -1, A = -1. t=0: delta = 1 + 0.5 * 3 - 0.5 = 2, A = 2 + 0.25 * -1.
    assert advantages.tolist() == [[1.75, 0.0, -1.0]]
    assert returns.tolist() == [[2.25, 0.0, 2.0]]


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_undiscounted_returns_without_kl_equal_the_final_score(seed, dtype, pattern):
    gen = torch.Generator().manual_seed(seed)
    mask = make_mask(gen, pattern)
    logp, ref_logp = randn(gen, B, R, dtype=dtype), randn(gen, B, R, dtype=dtype)
    has_eos = torch.rand(B, generator=gen) < 0.5
    raw = randn(gen, B, dtype=dtype) * 3
    scores = shape_scores(raw, has_eos, mean=0.2, std=1.5, clip=2.0, no_eos_score=-1.0)
    rewards, _ = penalized_rewards(logp, ref_logp, scores, mask, beta=0.0)
    values = randn(gen, B, R, dtype=dtype) * 5
    _, returns = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    final = scores.unsqueeze(1).expand(B, R)
    close(returns[mask], final[mask].double(), dtype)


# ---------------------------------------------------------------- losses


def policy_loss(logp, old_logp, advantages, mask, *, clip):
    """The actor's loss as `rlhf ppo` computes it by default (ppo.ratio=token, ppo.loss_aggregation
    token_mean for gae): clipped_surrogate's per-token losses through aggregate_token_losses."""
    token_losses, stats = clipped_surrogate(logp, old_logp, advantages, mask, clip=clip)
    return aggregate_token_losses(token_losses, mask, mode="token_mean", horizon=mask.shape[1]), stats


@pytest.mark.parametrize("clip", [0.1, 0.2])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_policy_loss_matches_loop(seed, dtype, pattern, clip):
    gen = torch.Generator().manual_seed(seed)
    mask = make_mask(gen, pattern)
    old_logp = randn(gen, B, R, dtype=dtype) - 2
    logp = old_logp + randn(gen, B, R, dtype=dtype) * 0.3  # ratios on both sides of the clip range
    advantages = randn(gen, B, R, dtype=dtype)
    loss, stats = policy_loss(logp, old_logp, advantages, mask, clip=clip)
    expected = ref_policy(rows(logp), rows(old_logp), rows(advantages), mask.tolist(), clip)
    close(loss, expected["loss"], dtype)
    for name in ("clipfrac", "approx_kl", "ratio_mean"):
        close(stats[name], expected[name], dtype)
        assert not stats[name].requires_grad
    assert 0 < expected["clipfrac"] < 1  # the case exercises both branches

    dirty_loss, dirty_stats = policy_loss(
        garbled(logp, mask, gen), garbled(old_logp, mask, gen), garbled(advantages, mask, gen),
        mask, clip=clip,
    )
    assert torch.equal(dirty_loss, loss)
    assert all(torch.equal(dirty_stats[k], stats[k]) for k in stats)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("seed", SEEDS)
def test_policy_loss_inside_the_clip_range_is_the_plain_surrogate(seed, pattern):
    gen = torch.Generator().manual_seed(seed)
    mask = make_mask(gen, pattern)
    old_logp = randn(gen, B, R) - 2
    logp = old_logp + (torch.rand(B, R, generator=gen, dtype=torch.float64) - 0.5) * 0.3
    advantages = randn(gen, B, R)
    loss, stats = policy_loss(logp, old_logp, advantages, mask, clip=0.2)
    ratio = torch.exp(logp - old_logp)
    assert torch.all((ratio[mask] > 0.8) & (ratio[mask] < 1.2))
    assert torch.equal(loss, -masked_mean(advantages * ratio, mask))
    assert stats["clipfrac"].item() == 0.0


def test_policy_loss_with_active_clipping_by_hand():
    ratios = torch.tensor([[1.5, 0.5, 0.5, 1.1, 7.0]], dtype=torch.float64)
    advantages = torch.tensor([[1.0, 1.0, -1.0, 2.0, 1e6]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, True, False]])
    old_logp = torch.full_like(ratios, -1.0)
    logp = old_logp + ratios.log()
    loss, stats = policy_loss(logp, old_logp, advantages, mask, clip=0.2)
    # Per token max(-A r, -A clip(r)): max(-1.5, -1.2) = -1.2 (clipped), max(-0.5, -0.8) = -0.5,
    # max(0.5, 0.8) = 0.8 (clipped), max(-2.2, -2.2) = -2.2 (tie: not counted as clipped).
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 0.8 - 2.2) / 4, abs=1e-12)
    assert stats["clipfrac"].item() == 0.5
    assert stats["ratio_mean"].item() == pytest.approx((1.5 + 0.5 + 0.5 + 1.1) / 4, abs=1e-12)
    kl = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 0.5, 1.1)) / 4
    assert stats["approx_kl"].item() == pytest.approx(kl, abs=1e-12)


@pytest.mark.parametrize("clip", [None, 0.2])
@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_value_loss_matches_loop(seed, dtype, pattern, clip):
    gen = torch.Generator().manual_seed(seed)
    mask = make_mask(gen, pattern)
    old_values, returns = randn(gen, B, R, dtype=dtype), randn(gen, B, R, dtype=dtype)
    values = old_values + randn(gen, B, R, dtype=dtype) * 0.4
    loss, stats = value_loss(values, old_values, returns, mask, clip=clip)
    expected = ref_value(rows(values), rows(old_values), rows(returns), mask.tolist(), clip)
    close(loss, expected["loss"], dtype)
    close(stats["clipfrac"], expected["clipfrac"], dtype)
    assert not stats["clipfrac"].requires_grad
    if clip is not None:
        assert 0 < expected["clipfrac"] < 1

    dirty_loss, dirty_stats = value_loss(
        garbled(values, mask, gen), garbled(old_values, mask, gen), garbled(returns, mask, gen),
        mask, clip=clip,
    )
    assert torch.equal(dirty_loss, loss) and torch.equal(dirty_stats["clipfrac"], stats["clipfrac"])


@pytest.mark.parametrize("seed", SEEDS)
def test_value_loss_without_clip_is_half_the_masked_mse(seed):
    gen = torch.Generator().manual_seed(seed)
    mask = make_mask(gen, "holes")
    values, returns = randn(gen, B, R), randn(gen, B, R)
    far_old_values = values + 100.0  # would clip every token if clipping were on
    loss, stats = value_loss(values, far_old_values, returns, mask, clip=None)
    assert torch.equal(loss, 0.5 * masked_mean((values - returns) ** 2, mask))
    assert stats["clipfrac"].item() == 0.0
    clipped_loss, clipped_stats = value_loss(values, far_old_values, returns, mask, clip=0.2)
    assert clipped_stats["clipfrac"].item() > 0 and clipped_loss > loss


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("seed", SEEDS)
def test_loss_gradients_are_zero_at_masked_positions(seed, pattern):
    gen = torch.Generator().manual_seed(seed)
    mask = make_mask(gen, pattern)
    old_logp, advantages = randn(gen, B, R) - 2, randn(gen, B, R)
    # Huge garbage at masked positions: exp() of it would overflow without the guard.
    logp = garbled(old_logp + randn(gen, B, R) * 0.3, mask, gen).requires_grad_()
    loss, _ = policy_loss(logp, old_logp, advantages, mask, clip=0.2)
    loss.backward()
    assert torch.all(logp.grad[~mask] == 0)
    # At valid tokens: d/dlogp of -A r / n where the clip is inactive, 0 where it holds the ratio.
    n = int(mask.sum())
    lp, olp, adv, ms = rows(logp.detach()), rows(old_logp), rows(advantages), mask.tolist()
    expected = [[0.0] * R for _ in range(B)]
    for b in range(B):
        for t in range(R):
            if ms[b][t]:
                ratio = math.exp(lp[b][t] - olp[b][t])
                clipped = -adv[b][t] * min(max(ratio, 0.8), 1.2)
                if not clipped > -adv[b][t] * ratio:
                    expected[b][t] = -adv[b][t] * ratio / n
    close(logp.grad, expected, torch.float64)

    old_values, returns = randn(gen, B, R), randn(gen, B, R)
    for clip in (None, 0.2):
        values = garbled(old_values + randn(gen, B, R) * 0.4, mask, gen).requires_grad_()
        loss, _ = value_loss(values, old_values, returns, mask, clip=clip)
        loss.backward()
        assert torch.all(values.grad[~mask] == 0)
        assert torch.any(values.grad[mask] != 0)
        assert torch.isfinite(values.grad).all()


# ---------------------------------------------------------------- controller and diagnostics


@pytest.mark.parametrize("kl", [0.0, 2.0, 5.5, 6.0, 6.5, 9.0, 60.0])
def test_adaptive_beta_matches_the_proportional_controller(kl):
    target, horizon, n_steps, beta = 6.0, 10000, 512, 0.1
    error = min(max(kl / target - 1, -0.2), 0.2)
    expected = beta * (1 + error * n_steps / horizon)
    new_beta = adaptive_beta(beta, kl, target=target, horizon=horizon, n_steps=n_steps)
    assert new_beta == pytest.approx(expected, rel=1e-15)


def test_adaptive_beta_direction_cap_and_fixed_point():
    step = dict(target=6.0, horizon=1000, n_steps=100)
    assert adaptive_beta(0.1, 7.0, **step) > 0.1
    assert adaptive_beta(0.1, 5.0, **step) < 0.1
    assert adaptive_beta(0.1, 6.0, **step) == 0.1
    assert adaptive_beta(0.1, torch.tensor(6.0), **step) == 0.1
    # The error is capped at +-20%: 100/1000 * 0.2 = a 2% step whatever the overshoot.
    assert adaptive_beta(0.1, 600.0, **step) == pytest.approx(0.1 * 1.02, rel=1e-15)
    assert adaptive_beta(0.1, 0.0, **step) == pytest.approx(0.1 * 0.98, rel=1e-15)
    assert adaptive_beta(0.1, 600.0, **step) == adaptive_beta(0.1, 60.0, **step)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", SEEDS)
def test_explained_variance_matches_loop(seed, dtype, pattern):
    gen = torch.Generator().manual_seed(seed)
    mask = make_mask(gen, pattern)
    returns = randn(gen, B, R, dtype=dtype) * 2
    values = returns + randn(gen, B, R, dtype=dtype)
    ev = explained_variance(values, returns, mask)
    rt, vs, ms = rows(returns), rows(values), mask.tolist()
    residual = [[rt[b][t] - vs[b][t] for t in range(R)] for b in range(B)]
    close(ev, 1 - ref_var(residual, ms) / ref_var(rt, ms), dtype)
    assert torch.equal(
        explained_variance(garbled(values, mask, gen), garbled(returns, mask, gen), mask), ev
    )
    close(explained_variance(returns, returns, mask), 1.0, dtype)


def test_explained_variance_of_constant_returns_is_zero():
    mask = torch.tensor([[True, True, False]])
    returns = torch.tensor([[2.0, 2.0, 1e6]])
    ev = explained_variance(torch.tensor([[1.0, 3.0, 0.0]]), returns, mask)
    assert ev.item() == 0.0 and torch.isfinite(ev)
