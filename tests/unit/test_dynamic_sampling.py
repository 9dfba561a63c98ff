"""DAPO's dynamic sampling: which groups are degenerate (against a float64 loop, on random scores full of
ties and near-ties), which drawn groups make the batch (against a plain loop), rounds of different widths
joined into one batch row for row, and its config keys, refused with one line naming the key."""

from __future__ import annotations

import random

import pytest
import torch

from rlhf.algos.dynamic_sampling import EQUAL_ATOL, choose_groups, degenerate_groups, group_rows
from rlhf.config import PPOConfig, load_config
from rlhf.errors import UserError
from rlhf.rollouts.dynamic_sampling import Drawn, choice_of, join_chosen
from rlhf.rollouts.generation import SampledLogprobs, ScoredRollout, pack_sequences
from rlhf.training.engine import Dist

PAD = 0


def tied_scores(gen: torch.Generator, groups: int, k: int, dtype: torch.dtype) -> torch.Tensor:
    """Scores from {0, 0.5, 1}, half the groups one value repeated; then some nudged by far less than EQUAL_ATOL
    (still equal) and a few by far more (no longer equal)."""
    base = torch.randint(0, 3, (groups, 1), generator=gen).expand(groups, k)
    mixed = torch.randint(0, 3, (groups, k), generator=gen)
    same = torch.rand(groups, 1, generator=gen) < 0.5
    scores = torch.where(same, base, mixed).flatten().double() / 2
    nudge = torch.randint(0, 12, (groups * k,), generator=gen)
    scores = scores + torch.where(nudge < 2, 1e-9, 0.0) + torch.where(nudge == 2, 1e-3, 0.0)
    return scores.to(dtype)


def reference_degenerate(scores: torch.Tensor, k: int) -> list[bool]:
    values = scores.double().tolist()
    groups = [values[g * k : (g + 1) * k] for g in range(len(values) // k)]
    return [max(g) - min(g) <= EQUAL_ATOL for g in groups]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("k", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_degenerate_groups_match_a_float64_loop(seed, k, dtype):
    gen = torch.Generator().manual_seed(seed)
    scores = tied_scores(gen, 40, k, dtype)
    got = degenerate_groups(scores, group_size=k)
    assert got.dtype == torch.bool and got.shape == (40,)
    expected = reference_degenerate(scores, k)
    assert got.tolist() == expected
    assert 0 < sum(expected) < 40  # both kinds present: the test can fail either way


def test_a_group_with_nan_is_not_degenerate_and_shapes_are_checked():
    scores = torch.tensor([1.0, 1.0, float("nan"), float("nan"), 2.0, 2.0])
    assert degenerate_groups(scores, group_size=2).tolist() == [True, False, True]
    at_tolerance = torch.tensor([0.0, EQUAL_ATOL, 0.0, 2 * EQUAL_ATOL], dtype=torch.float64)
    assert degenerate_groups(at_tolerance, group_size=2).tolist() == [True, False]
    with pytest.raises(ValueError, match="multiple of group_size"):
        degenerate_groups(torch.zeros(5), group_size=2)


def reference_choice(degenerate: list[bool], quota: int) -> tuple[list[int], int, int, int, int]:
    """The first `quota` informative groups, topped up with the first degenerate ones; the counts."""
    kept = [g for g, d in enumerate(degenerate) if not d][:quota]
    filler = [g for g, d in enumerate(degenerate) if d][: quota - len(kept)]
    dropped = sum(degenerate) - len(filler)
    surplus = sum(not d for d in degenerate) - len(kept)
    return sorted(kept + filler), len(kept), len(filler), dropped, surplus


@pytest.mark.parametrize("seed", range(20))
def test_choose_groups_matches_a_plain_loop(seed):
    rng = random.Random(seed)
    quota = rng.randint(1, 6)
    drawn = quota * rng.randint(1, 4)
    degenerate = [rng.random() < rng.choice([0.0, 0.3, 0.8, 1.0]) for _ in range(drawn)]
    choice = choose_groups(torch.tensor(degenerate), quota=quota)
    groups, kept, filler, dropped, surplus = reference_choice(degenerate, quota)
    assert choice.groups.tolist() == groups
    assert (choice.kept, choice.filler, choice.dropped, choice.surplus) == (kept, filler, dropped, surplus)
    # Every drawn group is accounted for once, and the batch is always full.
    assert choice.kept + choice.filler + choice.dropped + choice.surplus == drawn
    assert len(choice.groups) == quota and choice.short == quota - choice.kept


def test_refill_accounting_over_rounds():
    """Round 1: 1 of 4 groups informative; round 2: 2 more; round 3: 3 (one surplus). Quota 4 is met in round 3."""
    rounds = [[True, False, True, True], [True, False, False, True], [False, True, False, False]]
    flat = torch.tensor(sum(rounds, []))
    after = [choose_groups(flat[: 4 * (n + 1)], quota=4) for n in range(3)]
    assert [c.short for c in after] == [3, 1, 0]
    last = after[-1]
    assert last.groups.tolist() == [1, 5, 6, 8]
    assert (last.kept, last.filler, last.dropped, last.surplus) == (4, 0, 6, 2)
    assert group_rows(torch.tensor([1, 3]), group_size=2).tolist() == [2, 3, 6, 7]
    with pytest.raises(ValueError, match="quota"):
        choose_groups(torch.tensor([True]), quota=2)


def drawn_round(gen: torch.Generator, *, groups: int, k: int, prompt_len: int, max_len: int, equal: list[bool]) -> Drawn:
    """A synthetic round: random prompts of up to `prompt_len` tokens and responses of 1..max_len; group g's shaped
    scores all equal where `equal[g]`; every per-token tensor random at response tokens and 0 at padding."""
    n = groups * k
    prompts = [torch.randint(3, 50, (int(torch.randint(1, prompt_len + 1, (1,), generator=gen)),), generator=gen).tolist()
               for _ in range(n)]
    responses = [torch.randint(3, 50, (int(torch.randint(1, max_len + 1, (1,), generator=gen)),), generator=gen).tolist()
                 for _ in range(n)]
    prompts[-1], responses[-1] = [7] * prompt_len, [8] * max_len  # the widths are prompt_len and max_len
    seqs = pack_sequences(prompts, responses, pad_id=PAD, eos_id=2)
    mask = seqs.response_mask

    def per_token():
        return torch.randn(mask.shape, generator=gen).masked_fill(~mask, 0.0)

    shaped = torch.randn(n, generator=gen)
    for g, same in enumerate(equal):
        if same:
            shaped[g * k : (g + 1) * k] = shaped[g * k]
    scored = ScoredRollout(seqs=seqs, logprobs=per_token(), ref_logprobs=per_token(), values=None, scores=shaped.clone(),
                           entropy=per_token(), reward_parts={"oracle": torch.rand(n, generator=gen).double()})
    return Drawn(seqs=seqs, sampled=SampledLogprobs(logprobs=per_token(), entropy=per_token()), scored=scored, shaped=shaped,
                 generate_s=1.0, score_s=0.5)


def test_join_chosen_keeps_each_chosen_row_whole():
    """Rounds of different prompt and response widths, joined: each chosen row's real tokens, positions and per-token
    values are the original row's, padding is padding, and the rows come in draw order."""
    gen = torch.Generator().manual_seed(0)
    k = 2
    rounds = [drawn_round(gen, groups=3, k=k, prompt_len=3, max_len=1, equal=[True, False, True]),
              drawn_round(gen, groups=3, k=k, prompt_len=6, max_len=5, equal=[True, True, False])]
    choice = choice_of(rounds, group_size=k, quota=3)
    assert choice.groups.tolist() == [0, 1, 5]  # informative 1 and 5, topped up with the first degenerate, 0
    assert (choice.kept, choice.filler, choice.dropped) == (2, 1, 3)
    joined = join_chosen(rounds, choice, group_size=k, pad_id=PAD)
    origin = [(0, r) for r in (0, 1, 2, 3)] + [(1, r) for r in (4, 5)]  # groups 0, 1 of round 0; group 2 of round 1
    seqs = joined.seqs
    assert seqs.input_ids.shape[0] == 6
    assert (seqs.prompt_width, seqs.response_width) == (6, 5)  # round 1's widths: round 0's rows are padded
    for i, (r, row) in enumerate(origin):
        src = rounds[r].seqs
        keep = src.attention_mask[row].bool()
        at = torch.cat([torch.zeros(seqs.prompt_width - src.prompt_width, dtype=torch.bool), keep,
                        torch.zeros(seqs.response_width - src.response_width, dtype=torch.bool)])
        assert seqs.attention_mask[i].bool().tolist() == at.tolist()
        assert seqs.input_ids[i][at].tolist() == src.input_ids[row][keep].tolist()
        assert seqs.position_ids[i][at].tolist() == src.position_ids[row][keep].tolist()
        length = int(src.response_lengths[row])
        assert seqs.response_mask[i].tolist() == [c < length for c in range(seqs.response_width)]
        for name in ("logprobs", "ref_logprobs", "entropy"):
            got, want = getattr(joined.scored, name)[i], getattr(rounds[r].scored, name)[row]
            assert torch.equal(got[:length], want[:length]) and not got[length:].any()
        assert torch.equal(joined.sampled.logprobs[i][:length], rounds[r].sampled.logprobs[row][:length])
        assert joined.shaped[i] == rounds[r].shaped[row] and joined.scored.scores[i] == rounds[r].scored.scores[row]
        assert joined.scored.reward_parts["oracle"][i] == rounds[r].scored.reward_parts["oracle"][row]
    assert joined.scored.seqs is seqs and joined.scored.values is None
    assert (joined.generate_s, joined.score_s) == (2.0, 1.0)


def test_one_full_round_comes_back_as_it_is():
    gen = torch.Generator().manual_seed(1)
    first = drawn_round(gen, groups=2, k=3, prompt_len=4, max_len=3, equal=[False, False])
    choice = choice_of([first], group_size=3, quota=2)
    assert join_chosen([first], choice, group_size=3, pad_id=PAD) is first


def test_dynamic_metrics_sum_over_the_rank():
    from rlhf.rollouts.dynamic_sampling import dynamic_metrics

    choice = choose_groups(torch.tensor([True, False, True, False, False]), quota=2)
    metrics = dynamic_metrics(choice, rounds=3, dist=Dist(rank=0, local_rank=0, world_size=1, device=torch.device("cpu")))
    assert metrics == {"sampling_rounds": 3.0, "kept_groups": 2.0, "dropped_groups": 2.0, "filler_groups": 0.0,
                       "surplus_groups": 1.0}


GROUPS = ["ppo.estimator=grpo", "rollout.samples_per_prompt=4"]


def test_dynamic_sampling_settings_load():
    cfg = load_config(PPOConfig, None, [*GROUPS, "ppo.dynamic_sampling=true", "ppo.max_sampling_rounds=3"])
    assert cfg.ppo.dynamic_sampling and cfg.ppo.max_sampling_rounds == 3
    assert not load_config(PPOConfig).ppo.dynamic_sampling


@pytest.mark.parametrize(("overrides", "fragments"), [
    (["ppo.dynamic_sampling=true"], ["ppo.dynamic_sampling", "grpo or rloo", "not gae"]),
    (["ppo.estimator=reinforce_pp", "ppo.dynamic_sampling=true"], ["ppo.dynamic_sampling", "not reinforce_pp"]),
    (["ppo.estimator=grpo", "ppo.dynamic_sampling=true"], ["rollout.samples_per_prompt", "at least 2"]),
    ([*GROUPS, "ppo.dynamic_sampling=true", "ppo.max_sampling_rounds=0"], ["ppo.max_sampling_rounds must be at least 1"]),
    ([*GROUPS, "ppo.max_sampling_rounds=2"], ["ppo.max_sampling_rounds has no effect without ppo.dynamic_sampling"]),
    ([*GROUPS, "ppo.dynamic_sampling=true", "rollout.env=python:rlhf.tasks.envs:ToyRetryEnv", "rollout.max_turns=2"],
     ["ppo.dynamic_sampling is not supported with rollout.env"]),
])
def test_bad_dynamic_sampling_settings_are_one_line_errors(overrides, fragments):
    with pytest.raises(UserError) as err:
        load_config(PPOConfig, None, overrides)
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
