"""PPO math for RLHF: masked statistics, KL-penalized rewards, GAE and the clipped losses.

Shapes: B rollouts (rows) by R response columns. `mask` is (B, R), bool or 0/1, True at real
response tokens. It is usually a prefix of each row, but every function here is right for any
pattern, holes included. Entries at masked positions may hold any finite garbage: they are
replaced with torch.where before any arithmetic, so they never reach an output, a returned scalar
or a gradient, and outputs at masked positions are 0.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# The KL estimators by name: in rlhf.algos.variants, torch-free for the config.
from rlhf.algos.variants import KL_ESTIMATORS as KL_ESTIMATORS
from rlhf.algos.variants import KLEstimator as KLEstimator


def masked_where(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x with 0 at masked positions, mask as bool broadcast to x's shape)."""
    mask = mask.bool().expand_as(x)
    # where, not x * mask: garbage never enters the arithmetic, so no inf * 0 and no gradient leak.
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device)), mask


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over valid entries: sum(x at mask) / count.

    x and mask share a shape (mask may broadcast to x). dim None reduces everything to a scalar;
    an int reduces that dimension only. The count is clamped to >= 1: an all-masked slice gives 0.
    """
    x, mask = masked_where(x, mask)
    if dim is None:
        return x.sum() / mask.sum().clamp(min=1)
    return x.sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Population variance (divide by count) of x over all valid entries; a scalar."""
    # Zero the padding before x - mean: a huge finite pad would square to inf, and inf * 0 is a NaN gradient.
    x, mask = masked_where(x, mask)
    mean = masked_mean(x, mask)
    return masked_mean((x - mean) ** 2, mask)


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    *,
    shift_mean: bool = True,
    eps: float = 1e-8,
    mean: float | torch.Tensor | None = None,
    var: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """(x - mean) / sqrt(var + eps) at valid positions, 0 at padding; same shape as x.

    mean, var: statistics to use instead of x's own over mask, e.g. from masked_moments with an
    all-reduce across ranks so every rank whitens alike. shift_mean=False adds the mean back: the
    spread is normalized but the sign of the average is kept.
    """
    x = masked_where(x, mask)[0]  # padding must not reach x - mean, which can overflow
    if mean is None:
        mean = masked_mean(x, mask)
    if var is None:
        var = masked_var(x, mask)
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device)
    var = torch.as_tensor(var, dtype=x.dtype, device=x.device)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return masked_where(out, mask)[0]


def masked_sums(x: torch.Tensor, mask: torch.Tensor, shift: float = 0.0) -> torch.Tensor:
    """(3,) float64 [sum of x - shift, sum of (x - shift)^2, count] over valid entries; add these across ranks.

    shift: one number every rank uses, best near the mean (masked_moments takes it from a first
    all-reduce), so the squares carry the spread rather than the offset and keep its digits.
    """
    x, mask = masked_where(x.double(), mask)
    d = masked_where(x - shift, mask)[0]
    return torch.stack([d.sum(), (d * d).sum(), mask.sum().double()])


def moments_from_sums(sums: torch.Tensor, shift: float = 0.0) -> tuple[float, float]:
    """(mean, population variance) from masked_sums(x, mask, shift) output, possibly summed over ranks.

    The variance is E[(x - shift)^2] - E[x - shift]^2: exact when shift is near the mean, but a
    shift far from it cancels the spread away (shift 0 at an offset of 1e8 gives 0), hence
    masked_moments. The count is clamped to >= 1 and the variance to >= 0.
    """
    total, total_sq, count = (float(v) for v in sums.tolist())
    count = max(count, 1.0)
    d = total / count
    return shift + d, max(total_sq / count - d * d, 0.0)


def masked_moments(
    x: torch.Tensor, mask: torch.Tensor, all_reduce: Callable[[torch.Tensor], object] | None = None
) -> tuple[float, float]:
    """(mean, population variance) of x over the valid entries of every rank, in float64.

    all_reduce: sums a tensor in place across ranks (torch.distributed.all_reduce); None for one
    process. Two all-reduces: the first gives the mean, the second the squared deviations from it.
    A sum cannot merge per-rank (mean, M2) pairs, but it adds sums taken about a shared shift exactly.
    """
    mean, var = 0.0, 0.0
    for _ in range(2):
        sums = masked_sums(x, mask, shift=mean)
        if all_reduce is not None:
            all_reduce(sums)
        mean, var = moments_from_sums(sums, shift=mean)
    return mean, var


def _scaled_logits(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """logits / temperature in at least float32 (bf16/fp16 are upcast, float64 is kept)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits if temperature == 1.0 else logits / temperature


def logprobs_from_logits(
    logits: torch.Tensor, tokens: torch.Tensor, *, temperature: float = 1.0
) -> torch.Tensor:
    """(B, R, V) logits, (B, R) long tokens -> (B, R) log_softmax(logits / temperature) at tokens.

    Float32 for bf16/fp16/float32 logits, float64 for float64 logits. Uses z[token] - logsumexp(z),
    which never materializes a (B, R, V) log-softmax besides the upcast copy.
    """
    z = _scaled_logits(logits, temperature)
    picked = z.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(z, dim=-1)


def entropy_from_logits(logits: torch.Tensor, *, temperature: float = 1.0) -> torch.Tensor:
    """(B, R, V) logits -> (B, R) entropy -sum_v p log p of p = softmax(logits / temperature).

    Same dtype rule as logprobs_from_logits. Vocabulary entries with p == 0 (e.g. -inf logits)
    contribute 0 rather than 0 * -inf.
    """
    logp = F.log_softmax(_scaled_logits(logits, temperature), dim=-1)
    p = logp.exp()
    plogp = torch.where(p > 0, p * logp, torch.zeros((), dtype=p.dtype, device=p.device))
    return -plogp.sum(-1)


def kl_per_token(
    logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, *, estimator: KLEstimator = "k1"
) -> torch.Tensor:
    """(B, R) per-token estimates of KL(pi || pi_ref) for tokens sampled from pi; 0 at padding.

    logp, ref_logp: (B, R) log-probabilities of the sampled tokens under the policy and the
    reference. With d = logp - ref_logp (Schulman's estimators): k1 = d (unbiased, can be < 0),
    k2 = d^2 / 2 (>= 0, biased), k3 = exp(-d) - 1 + d (>= 0, unbiased). Unknown estimator: ValueError.
    """
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown KL estimator {estimator!r}; expected one of {KL_ESTIMATORS}")
    d, mask = masked_where(logp - ref_logp, mask)
    if estimator == "k1":
        kl = d
    elif estimator == "k2":
        kl = 0.5 * d * d
    else:
        kl = torch.expm1(-d) + d  # expm1 keeps small d accurate
    return masked_where(kl, mask)[0]


def shape_scores(
    scores: torch.Tensor,
    has_eos: torch.Tensor,
    *,
    mean: float = 0.0,
    std: float = 1.0,
    normalize: bool = True,
    clip: float | None = None,
    no_eos_score: float | None = None,
) -> torch.Tensor:
    """(B,) raw reward-model scores, (B,) bool has_eos -> (B,) scores used as the PPO reward.

    Applied in order: (s - mean) / std when normalize; clamp to [-clip, clip] when clip is set;
    then rows that never emitted EOS get exactly no_eos_score when it is set (not clipped).
    """
    shaped = scores
    if normalize:
        shaped = (shaped - mean) / std
    if clip is not None:
        shaped = shaped.clamp(-clip, clip)
    if no_eos_score is not None:
        fixed = torch.full_like(shaped, no_eos_score)
        shaped = torch.where(has_eos.bool(), shaped, fixed)
    return shaped


def _last_valid(mask: torch.Tensor) -> torch.Tensor:
    """(B, R) mask -> (B, R) bool, True only at each row's last valid column."""
    mask = mask.bool()
    positions = torch.arange(mask.shape[1], device=mask.device)
    # The largest position among a row's valid ones is its last valid column.
    last = torch.where(mask, positions, -1).amax(dim=1, keepdim=True)  # (B, 1)
    return mask & (positions == last)


def penalized_rewards(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    kl_estimator: KLEstimator = "k1",
) -> tuple[torch.Tensor, torch.Tensor]:
    """InstructGPT per-token reward: -beta * KL at every valid token, plus the score at the last.

    logp, ref_logp: (B, R) sampled-token log-probs under policy and reference; scores: (B,)
    shaped sequence scores; mask: (B, R), each row with >= 1 valid token. Returns
    (rewards (B, R), kl (B, R) from kl_per_token), both 0 at padding.
    """
    kl = kl_per_token(logp, ref_logp, mask, estimator=kl_estimator)
    zero = torch.zeros((), dtype=kl.dtype, device=kl.device)
    score_at = torch.where(_last_valid(mask), scores.to(kl.dtype).unsqueeze(1), zero)
    rewards = masked_where(score_at - beta * kl, mask)[0]
    return rewards, kl


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float,
    lam: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation along each row's valid tokens.

    rewards, values: (B, R); mask: (B, R). Masked positions are not steps: the value after a valid
    token is that of the row's next valid token (0 after the last). With V_next so defined:
    delta_t = r_t + gamma * V_next - V_t and A_t = delta_t + gamma * lam * A_next.
    Returns (advantages (B, R), returns = advantages + values (B, R)), both 0 at padding. Pass
    detached rewards and values: the outputs are regression and policy targets.
    """
    rewards, mask = masked_where(rewards, mask)
    values = masked_where(values, mask)[0]
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    columns = []
    for t in reversed(range(rewards.shape[1])):
        valid = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        adv = delta + gamma * lam * next_adv
        # A masked column leaves the carried (V_next, A_next) untouched, so it is skipped entirely.
        next_value = torch.where(valid, values[:, t], next_value)
        next_adv = torch.where(valid, adv, next_adv)
        columns.append(adv)
    advantages = masked_where(torch.stack(columns[::-1], dim=1), mask)[0]
    returns = masked_where(advantages + values, mask)[0]
    return advantages, returns


def clipped_surrogate(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float,
    clip_high: float | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate per token: (B, R) max(-A * ratio, -A * clamp(ratio, 1 - clip, 1 + clip_high)).

    clip_high None = clip (symmetric); a larger one is DAPO's clip-higher (Yu et al. 2025).

    logp: (B, R) current log-probs of the sampled tokens (carries the gradient); old_logp: (B, R)
    log-probs at rollout time; advantages: (B, R); mask: (B, R); ratio = exp(logp - old_logp).
    The per-token losses are 0 at padding; how they become one scalar is the caller's choice
    (rlhf.algos.critic_free.aggregate_token_losses, per ppo.loss_aggregation). stats (detached scalars, means over valid tokens):
    clipfrac = fraction where the clipped term is strictly larger; approx_kl = mean of
    ratio - 1 - log ratio, the k3 estimate of KL(old || new); ratio_mean = mean ratio.
    """
    # Zero the log-ratio before exp so masked garbage cannot overflow into inf (and nan gradients).
    log_ratio, mask = masked_where(logp - old_logp, mask)
    adv = masked_where(advantages, mask)[0]
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip, 1.0 + (clip if clip_high is None else clip_high))
    token_losses = masked_where(torch.maximum(unclipped, clipped), mask)[0]
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), mask),
            "approx_kl": masked_mean(torch.expm1(log_ratio) - log_ratio, mask),
            "ratio_mean": masked_mean(ratio, mask),
        }
    return token_losses, {k: v.detach() for k, v in stats.items()}


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip: float | None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped value loss, averaged over valid tokens.

    values: (B, R) current predictions (carry the gradient); old_values: (B, R) predictions at
    rollout time; returns: (B, R) targets; mask: (B, R). clipped = old_values +
    clamp(values - old_values, -clip, clip); loss = 0.5 * masked_mean(max((values - returns)^2,
    (clipped - returns)^2)), a scalar. clip=None: plain 0.5 * masked MSE. stats (detached
    scalars): clipfrac = fraction of valid tokens where the clipped error is strictly larger (0
    without clipping).
    """
    values, mask = masked_where(values, mask)
    old_values = masked_where(old_values, mask)[0]
    returns = masked_where(returns, mask)[0]
    error = (values - returns) ** 2
    if clip is None:
        no_clip = torch.zeros((), dtype=values.dtype, device=values.device)
        return 0.5 * masked_mean(error, mask), {"clipfrac": no_clip}
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    clipped_error = (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(error, clipped_error), mask)
    clipfrac = masked_mean((clipped_error > error).to(values.dtype), mask).detach()
    return loss, {"clipfrac": clipfrac}


def adaptive_beta(
    beta: float, kl: float | torch.Tensor, *, target: float, horizon: float, n_steps: int
) -> float:
    """Ziegler et al. (2019) proportional KL controller; returns the next beta.

    kl: the measured KL (per sequence, same units as target); n_steps: samples since the last
    update. e = clip(kl / target - 1, -0.2, 0.2) bounds the step:
    beta * (1 + e * n_steps / horizon).
    """
    error = min(max(float(kl) / target - 1.0, -0.2), 0.2)
    return beta * (1.0 + error * n_steps / horizon)


def explained_variance(
    values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """1 - var(returns - values) / var(returns) over valid tokens (population variances); scalar.

    1 = values predict returns perfectly, 0 = no better than their mean, < 0 = worse. When
    var(returns) == 0 there is nothing to explain and the result is 0 (not nan or +-inf), so
    logged curves stay finite.
    """
    # Mask both before subtracting: pads of opposite sign near the float limit would give inf.
    returns, mask = masked_where(returns, mask)
    values = masked_where(values, mask)[0]
    var_returns = masked_var(returns, mask)
    var_residual = masked_var(returns - values, mask)
    zero = torch.zeros((), dtype=var_returns.dtype, device=var_returns.device)
    safe = torch.where(var_returns > 0, var_returns, torch.ones_like(var_returns))
    return torch.where(var_returns > 0, 1.0 - var_residual / safe, zero)

