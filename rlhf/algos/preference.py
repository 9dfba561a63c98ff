"""Direct preference losses: DPO (and conservative DPO), IPO, KTO, SimPO and ORPO, as pure functions.

Shapes: B examples. Paired losses take B (chosen, rejected) pairs; KTO takes B unpaired examples.
Every sequence arrives as its summed response log-probability, sum_t log pi(y_t | x, y_<t) over
the counted response tokens (B,), plus, where a loss normalizes by length, its number of counted
tokens (B,), each >= 1 (the stage sums per-token log-probs under its response mask and counts the
mask). Reference log-probs come the same way, summed over the same tokens; SimPO and ORPO take none.

Each function returns (loss, stats): the loss is a scalar, the mean over the B examples of the
per-example losses. stats is a NamedTuple of detached (B,) tensors, one entry per example, so a
stage can add them to on-device sums (rlhf.training.rank_sums.RankSums) and divide by the global count;
`.mean()` gives this batch's value. Float64 inputs give float64 outputs.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

# The losses by name (which take no reference, which take unpaired rows): in rlhf.algos.variants, torch-free for the config.
from rlhf.algos.variants import PREFERENCE_LOSSES as PREFERENCE_LOSSES
from rlhf.algos.variants import REFERENCE_FREE_LOSSES as REFERENCE_FREE_LOSSES
from rlhf.algos.variants import UNPAIRED_LOSSES as UNPAIRED_LOSSES
from rlhf.algos.variants import PreferenceLoss as PreferenceLoss


class PairStats(NamedTuple):
    """Per-pair metrics of a paired loss, each detached (B,).

    losses: each pair's loss (their mean is the returned loss). chosen_rewards, rejected_rewards:
    the loss's implicit reward of each side (each function says which). chosen_logps,
    rejected_logps: the summed policy log-probs as given. accuracy: 1.0 where chosen_rewards >
    rejected_rewards strictly, else 0.0. margin: chosen_rewards - rejected_rewards.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    accuracy: torch.Tensor
    margin: torch.Tensor


class ORPOStats(NamedTuple):
    """PairStats' fields for ORPO (rewards = log odds), plus its two terms per pair, each detached (B,).

    sft_losses: the chosen response's mean per-token NLL; odds_ratio_losses: L_OR, before lambda.
    losses = sft_losses + lam * odds_ratio_losses.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    accuracy: torch.Tensor
    margin: torch.Tensor
    sft_losses: torch.Tensor
    odds_ratio_losses: torch.Tensor


class KTOStats(NamedTuple):
    """Per-example metrics of KTO, detached.

    losses (B,): each example's weighted loss. rewards (B,): beta * (logps - ref_logps).
    logps (B,): the summed policy log-probs as given. desirable (B,) bool: the labels.
    reference_point (): z0, the clamped batch KL estimate the rewards were compared with.
    Chosen/rejected means are sums over desirable / undesirable rows divided by their counts; with
    no pairs there is no per-pair accuracy (TRL logs the difference of the two means as a margin).
    """

    losses: torch.Tensor
    rewards: torch.Tensor
    logps: torch.Tensor
    desirable: torch.Tensor
    reference_point: torch.Tensor


def _pair_stats(
    losses: torch.Tensor,
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
) -> PairStats:
    """Detached PairStats from per-pair tensors."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return PairStats(
        losses=losses.detach(),
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        chosen_logps=chosen_logps.detach(),
        rejected_logps=rejected_logps.detach(),
        accuracy=(chosen_rewards > rejected_rewards).to(chosen_rewards.dtype),
        margin=chosen_rewards - rejected_rewards,
    )


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")


def _mean_logps(logps: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B,) summed log-probs / (B,) token counts -> (B,) mean per-token log-prob."""
    return logps / lengths.to(logps.dtype)


def dpo_loss(
    *,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_ref_logps: torch.Tensor,
    rejected_ref_logps: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, PairStats]:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290, eq. 7), or conservative DPO when label_smoothing > 0.

    All inputs (B,) summed log-probs of the whole response (not averaged). With implicit rewards
    r = beta * (logps - ref_logps) and z = r_chosen - r_rejected:
        loss = (1 - eps) * -log sigmoid(z) + eps * -log sigmoid(-z),  eps = label_smoothing,
    averaged over pairs. eps = 0 is the paper's loss. eps > 0 is cDPO (Mitchell 2023, "A note on
    DPO with noisy preferences and relationship to IPO"): each label is taken to be flipped with
    probability eps, so the loss is the expected DPO loss and no longer drives z to infinity. TRL's
    label_smoothing is the same formula. eps must be in [0, 0.5).
    stats: rewards r (DPO's implicit rewards), accuracy r_chosen > r_rejected, margin z.
    """
    _check_beta(beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_rewards = beta * (chosen_logps - chosen_ref_logps)
    rejected_rewards = beta * (rejected_logps - rejected_ref_logps)
    z = chosen_rewards - rejected_rewards
    # logsigmoid stays finite for any z, where log(sigmoid(z)) underflows to -inf below about -100.
    losses = -(1.0 - label_smoothing) * F.logsigmoid(z)
    if label_smoothing > 0:
        losses = losses - label_smoothing * F.logsigmoid(-z)
    stats = _pair_stats(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)
    return losses.mean(), stats


def ipo_loss(
    *,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_ref_logps: torch.Tensor,
    rejected_ref_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, PairStats]:
    """IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17): (h - 1 / (2 beta))^2, averaged over pairs.

    h = (mean logp_chosen - mean ref_chosen) - (mean logp_rejected - mean ref_rejected), each log-prob
    averaged over its response's tokens (summed log-probs (B,) divided by lengths (B,); the
    reference is divided by the same count). beta is the paper's regularization tau: the loss pulls
    h to 1 / (2 tau) and no further, unlike DPO's, which rewards any larger h.
    Length averaging: the paper's equation is written with sequence probabilities pi(y|x); its
    authors told TRL that the log-likelihoods are to be averaged per token (HF blog "pref-tuning",
    TRL PR #1265), so tau means the same for short and long answers. We follow the authors; earlier
    TRL and torchtune's IPOLoss (torchtune issue #1291) summed.
    stats: rewards beta * (mean logp - mean ref), so margin = beta * h and accuracy = h > 0.
    """
    _check_beta(beta)
    chosen_ratio = _mean_logps(chosen_logps, chosen_lengths) - _mean_logps(chosen_ref_logps, chosen_lengths)
    rejected_ratio = _mean_logps(rejected_logps, rejected_lengths) - _mean_logps(rejected_ref_logps, rejected_lengths)
    h = chosen_ratio - rejected_ratio
    losses = (h - 1.0 / (2.0 * beta)) ** 2
    stats = _pair_stats(losses, beta * chosen_ratio, beta * rejected_ratio, chosen_logps, rejected_logps)
    return losses.mean(), stats


def kto_reference_point(*, kl_logps: torch.Tensor, kl_ref_logps: torch.Tensor) -> torch.Tensor:
    """KTO's z0: max(0, mean(kl_logps - kl_ref_logps)), detached; a scalar.

    kl_logps, kl_ref_logps: (M,) summed log-probs under the policy and the reference of mismatched
    pairs (x'_i, y'_j): each prompt of the batch with the completion of another example (TRL and the
    authors' HALOs shift completions by one). The mean is the paper's biased estimate of
    KL(pi(y'|x') || pi_ref(y'|x')); it is not backpropagated through (paper, section 4). For one
    estimate over all ranks, all-gather the (M,) vectors first and pass the concatenation.
    """
    with torch.no_grad():
        return (kl_logps - kl_ref_logps).mean().clamp(min=0).detach()


def kto_loss(
    *,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl_logps: torch.Tensor,
    kl_ref_logps: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, KTOStats]:
    """KTO (Ethayarajh et al. 2024, arXiv:2402.01306, eq. 8) on B unpaired examples.

    logps, ref_logps: (B,) summed log-probs of each (prompt, completion); desirable: (B,) bool, the
    label (True = desirable). kl_logps, kl_ref_logps: (M,) the mismatched pairs of
    kto_reference_point, which gives z0. With r = logps - ref_logps:
        desirable:    lambda_D * (1 - sigmoid(beta * (r - z0)))
        undesirable:  lambda_U * (1 - sigmoid(beta * (z0 - r)))
    i.e. lambda_y - v(x, y) of the paper, averaged over all B examples (the paper's expectation
    over the data; TRL and HALOs take the same mean). A batch may hold one label only.
    lambda_D = desirable_weight, lambda_U = undesirable_weight, both 1 by default as in the paper,
    which recommends lambda_D * n_D / (lambda_U * n_U) in [1, 3/2] (its current version; TRL's docs
    say 1:1 to 4:3), n_D and n_U the numbers of desirable and undesirable examples: with 1 desirable
    to 10 undesirable, lambda_U = 1 and lambda_D in [10, 15]. The paper's default beta is 0.1.
    stats: see KTOStats; rewards are beta * r, as TRL logs them.
    """
    _check_beta(beta)
    z0 = kto_reference_point(kl_logps=kl_logps, kl_ref_logps=kl_ref_logps).to(logps.dtype)
    ratio = logps - ref_logps
    desirable = desirable.bool()
    # 1 - sigmoid(u) = sigmoid(-u), which keeps its precision when sigmoid(u) is close to 1.
    losses = torch.where(
        desirable,
        desirable_weight * torch.sigmoid(-beta * (ratio - z0)),
        undesirable_weight * torch.sigmoid(-beta * (z0 - ratio)),
    )
    stats = KTOStats(
        losses=losses.detach(),
        rewards=(beta * ratio).detach(),
        logps=logps.detach(),
        desirable=desirable,
        reference_point=z0,
    )
    return losses.mean(), stats


def simpo_loss(
    *,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    beta: float,
    gamma: float,
) -> tuple[torch.Tensor, PairStats]:
    """SimPO (Meng et al. 2024, arXiv:2405.14734, eq. 6): no reference model.

    Reward r = (beta / |y|) * log pi(y|x), the mean per-token log-prob scaled by beta (summed
    log-probs (B,) divided by lengths (B,)); loss = -log sigmoid(r_chosen - r_rejected - gamma),
    averaged over pairs. gamma is the target reward margin in reward units, as in the paper's
    equation and its hyperparameter table (beta 2.0-2.5, gamma 0.3-1.6; e.g. Llama-3-Instruct 2.5
    and 1.4). The authors' code and README take gamma / beta instead (`gamma_beta_ratio`, e.g. 0.55
    for that same run): pass gamma = beta * ratio. TRL's `simpo_gamma` is gamma, as here. The
    authors' code can add an SFT term; it is not part of eq. 6 and not here.
    stats: rewards r, accuracy r_chosen > r_rejected, margin r_chosen - r_rejected (without gamma).
    """
    _check_beta(beta)
    chosen_rewards = beta * _mean_logps(chosen_logps, chosen_lengths)
    rejected_rewards = beta * _mean_logps(rejected_logps, rejected_lengths)
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    stats = _pair_stats(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps)
    return losses.mean(), stats


def _log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(a)) for a < 0, accurate at both ends (Maechler 2012, "Accurately computing log(1 - exp(-|a|))").

    Near 0, 1 - exp(a) cancels: use log(-expm1(a)). Far below, exp(a) is tiny: use log1p(-exp(a)).
    Each branch only ever sees inputs on its own side of the cut, so the branch torch.where drops
    cannot put an inf or nan into the gradient.
    """
    cut = torch.full_like(a, -math.log(2.0))
    near = a > cut
    near_zero = torch.log(-torch.expm1(torch.where(near, a, cut)))
    far = torch.log1p(-torch.exp(torch.where(near, cut, a)))
    return torch.where(near, near_zero, far)


def log_odds(mean_logps: torch.Tensor) -> torch.Tensor:
    """(B,) mean per-token log-probs a -> (B,) log(P / (1 - P)) with P = exp(a), i.e. a - log(1 - exp(a)).

    a must be <= 0. a == 0 (P = 1, odds infinite) is clamped to the largest negative float, which
    gives a large finite value and no gradient instead of inf - inf = nan downstream.
    """
    a = mean_logps.clamp(max=-torch.finfo(mean_logps.dtype).tiny)
    return a - _log1mexp(a)


def orpo_loss(
    *,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    lam: float,
) -> tuple[torch.Tensor, ORPOStats]:
    """ORPO (Hong et al. 2024, arXiv:2403.07691, eqs. 3-7): L_SFT + lam * L_OR, no reference model.

    The paper defines log P(y|x) as the mean per-token log-prob (summed log-probs (B,) divided by
    lengths (B,)), so P = exp(mean) and odds(y) = P / (1 - P). Per pair:
        L_SFT = -mean log-prob of the chosen response (its per-token NLL averaged over its tokens),
        L_OR = -log sigmoid(log odds(chosen) - log odds(rejected)),
    and the loss is the mean over pairs of L_SFT + lam * L_OR: lam (the paper's lambda) weighs the
    odds-ratio term, not the SFT term. The paper has no single default: it used 0.25 (Phi-2), 0.2
    (Llama-2 7B) and 0.1 (Mistral 7B); TRL defaults to 0.1. Log odds are
    computed as a - log(1 - exp(a)) with the expm1 / log1p split (see log_odds), never as
    log(P / (1 - P)), which overflows or cancels when P is near 1.
    Peers (TRL's ORPOTrainer, the authors' code) take L_SFT as the token mean over the whole batch's
    chosen tokens, which weighs long answers more; we follow the paper's per-sequence mean.
    stats: rewards = log odds of each response (the quantity L_OR compares), so margin = the log
    odds ratio and accuracy = mean log-prob of chosen > that of rejected. TRL logs
    lam * mean log-prob as the reward instead; the accuracy is the same (log odds increase with P).
    """
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    chosen_mean = _mean_logps(chosen_logps, chosen_lengths)
    rejected_mean = _mean_logps(rejected_logps, rejected_lengths)
    chosen_odds, rejected_odds = log_odds(chosen_mean), log_odds(rejected_mean)
    sft = -chosen_mean
    odds_ratio = -F.logsigmoid(chosen_odds - rejected_odds)
    losses = sft + lam * odds_ratio
    pair = _pair_stats(losses, chosen_odds, rejected_odds, chosen_logps, rejected_logps)
    stats = ORPOStats(**pair._asdict(), sft_losses=sft.detach(), odds_ratio_losses=odds_ratio.detach())
    return losses.mean(), stats
