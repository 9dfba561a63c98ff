"""Multi-turn rollouts (rlhf/rollouts/multiturn.py): the layout of episodes, and the PPO math over the holes
the environment's tokens leave in the mask, against float64 loops over the policy's tokens alone."""

from __future__ import annotations

import random

import pytest
import torch

from rlhf.algos.critic_free import group_advantages, leave_one_out_advantages, per_token, returns_to_go, sequence_rewards
from rlhf.algos.ppo import gae, kl_per_token, masked_whiten, penalized_rewards, value_loss
from rlhf.data.templates import DEFAULT_CHAT_TEMPLATE
from rlhf.errors import UserError
from rlhf.rollouts.generation import Sampling, policy_logprobs
from rlhf.rollouts.multiturn import (
    EnvFailed,
    Renderer,
    Segment,
    assemble,
    checked_step,
    load_env_class,
    sample_episodes,
)
from rlhf.tasks.envs import ToolEnv, ToyRetryEnv
from rlhf.toy import ToyModelConfig, build_model, build_tokenizer
from tests.envs import StopAtDigits


def random_episodes(rng: random.Random, rows: int) -> tuple[list[list[int]], list[list[Segment]], list[list[float]]]:
    """Prompts and episodes of random layouts: 1-4 policy turns of 1-5 tokens, 0-4 environment tokens between."""
    prompts, segments, rewards = [], [], []
    for _ in range(rows):
        prompts.append([rng.randrange(4, 100) for _ in range(rng.randint(1, 6))])
        row = []
        turns = rng.randint(1, 4)
        for turn in range(turns):
            row.append(Segment([rng.randrange(4, 100) for _ in range(rng.randint(1, 5))], policy=True))
            observed = rng.randint(0, 4)
            if turn + 1 < turns and observed:
                row.append(Segment([rng.randrange(4, 100) for _ in range(observed)], policy=False))
        segments.append(row)
        rewards.append([rng.uniform(-1, 1) for _ in range(turns)])
    return prompts, segments, rewards


def layout(segments: list[Segment]) -> tuple[list[int], list[bool], list[int]]:
    """A row's tokens, which are the policy's, and the column of each policy turn's last token: by hand."""
    tokens, policy, ends = [], [], []
    for s in segments:
        tokens += s.tokens
        policy += [s.policy] * len(s.tokens)
        if s.policy:
            ends.append(len(tokens) - 1)
    return tokens, policy, ends


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("per_turn", [False, True])
def test_assemble_lays_out_random_turns(seed, per_turn):
    rng = random.Random(seed)
    prompts, segments, rewards = random_episodes(rng, 7)
    has_eos = [rng.random() < 0.5 for _ in prompts]
    seqs, env_rewards = assemble(prompts, segments, rewards, has_eos=has_eos, pad_id=0, per_turn=per_turn)
    width = seqs.response_width
    assert seqs.has_eos.tolist() == has_eos
    for i, row in enumerate(segments):
        tokens, policy, ends = layout(row)
        n = len(tokens)
        prompt_len = len(prompts[i])
        assert seqs.input_ids[i, seqs.prompt_width - prompt_len : seqs.prompt_width].tolist() == prompts[i]
        assert seqs.response_ids[i, :n].tolist() == tokens and seqs.response_ids[i, n:].eq(0).all()
        assert seqs.response_mask[i].tolist() == policy + [False] * (width - n)
        # Both sides are context: the attention mask covers the prompt and every episode token.
        assert seqs.attention_mask[i].tolist() == [0] * (seqs.prompt_width - prompt_len) + [1] * (prompt_len + n) + [0] * (width - n)
        assert seqs.position_ids[i, seqs.prompt_width + n - 1] == prompt_len + n - 1
        # An episode ends with a policy token: one past it is the row's extent; the length counts policy tokens.
        assert seqs.response_extents[i] == n and seqs.response_lengths[i] == sum(policy)
        expected = torch.zeros(width, dtype=torch.float64)
        if per_turn:
            for end, r in zip(ends, rewards[i]):
                expected[end] += r
        else:
            expected[ends[-1]] = sum(rewards[i])
        torch.testing.assert_close(env_rewards[i].double(), expected, rtol=0, atol=1e-6)
    trimmed = seqs.trimmed()
    assert trimmed.response_width == max(len(layout(r)[0]) for r in segments)
    assert trimmed.response_mask.sum() == seqs.response_mask.sum()


def test_assemble_refuses_an_episode_ending_with_the_environment():
    with pytest.raises(ValueError, match="ending with a policy turn"):
        assemble([[5]], [[Segment([6], True), Segment([7], False)]], [[0.0]], has_eos=[True], pad_id=0, per_turn=False)


def reference_gae(rewards: list[float], values: list[float], gamma: float, lam: float) -> list[float]:
    """Textbook GAE over one row's policy tokens, in float64, the environment's tokens left out."""
    advantages, next_adv, next_value = [0.0] * len(rewards), 0.0, 0.0
    for t in reversed(range(len(rewards))):
        delta = rewards[t] + gamma * next_value - values[t]
        next_adv = delta + gamma * lam * next_adv
        advantages[t], next_value = next_adv, values[t]
    return advantages


def holey_batch(seed: int):
    """A batch with environment holes, float64 per-token tensors holding garbage at the holes and padding."""
    rng = random.Random(seed)
    prompts, segments, turn_rewards = random_episodes(rng, 8)
    seqs, env_rewards = assemble(prompts, segments, turn_rewards, has_eos=[True] * 8, pad_id=0, per_turn=True)
    gen = torch.Generator().manual_seed(seed)
    shape = seqs.response_mask.shape
    garbage = lambda: torch.randn(shape, generator=gen, dtype=torch.float64)  # noqa: E731
    return seqs, env_rewards.double(), garbage(), garbage(), garbage(), torch.randn(8, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("seed", range(4))
def test_gae_kl_and_value_loss_see_the_policy_tokens_only(seed):
    seqs, env_rewards, logp, ref_logp, values, scores = holey_batch(seed)
    mask = seqs.response_mask
    rewards, kl = penalized_rewards(logp, ref_logp, scores, mask, beta=0.1)
    rewards = rewards + env_rewards
    advantages, returns = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    holes = ~mask
    assert kl[holes].eq(0).all() and advantages[holes].eq(0).all() and returns[holes].eq(0).all()
    for i in range(mask.shape[0]):
        keep = mask[i].nonzero().squeeze(1).tolist()
        d = [logp[i, t].item() - ref_logp[i, t].item() for t in keep]
        r = [-0.1 * x + env_rewards[i, t].item() for x, t in zip(d, keep)]
        r[-1] += scores[i].item()  # the score at the last policy token
        v = [values[i, t].item() for t in keep]
        expected = reference_gae(r, v, 0.9, 0.8)
        torch.testing.assert_close(advantages[i, keep], torch.tensor(expected, dtype=torch.float64))
        torch.testing.assert_close(kl[i, keep], torch.tensor(d, dtype=torch.float64))
    # The value loss: the mean over policy tokens alone, whatever sits at the holes.
    new_values = values + 0.3
    loss, _ = value_loss(new_values, values, returns, mask, clip=None)
    expected = 0.5 * ((new_values - returns)[mask] ** 2).mean()
    torch.testing.assert_close(loss, expected)
    moved = new_values.masked_fill(holes, 1e6)
    torch.testing.assert_close(value_loss(moved, values, returns, mask, clip=0.2)[0],
                               value_loss(new_values, values, returns, mask, clip=0.2)[0])


@pytest.mark.parametrize("seed", range(4))
def test_critic_free_estimators_see_the_policy_tokens_only(seed):
    seqs, env_rewards, logp, ref_logp, _, scores = holey_batch(seed)
    mask = seqs.response_mask
    rewards = penalized_rewards(logp, ref_logp, scores, mask, beta=0.05)[0] + env_rewards
    totals = sequence_rewards(rewards, mask)
    by_hand = [sum(rewards[i, t].item() for t in mask[i].nonzero().squeeze(1).tolist()) for i in range(8)]
    torch.testing.assert_close(totals, torch.tensor(by_hand, dtype=torch.float64))
    for advantages in (group_advantages(totals, group_size=4), leave_one_out_advantages(totals, group_size=4)):
        tokens = per_token(advantages, mask)
        assert tokens[~mask].eq(0).all()
        for i in range(8):
            assert tokens[i, mask[i]].eq(advantages[i]).all()
    groups = totals.reshape(2, 4)
    expected = ((groups - groups.mean(1, keepdim=True)) / (groups.std(1, keepdim=True) + 1e-4)).reshape(-1)
    torch.testing.assert_close(group_advantages(totals, group_size=4), expected)
    # REINFORCE++: discounted returns-to-go over the policy tokens, whitened over them.
    rtg = returns_to_go(rewards, mask, gamma=0.95)
    assert rtg[~mask].eq(0).all()
    for i in range(8):
        keep = mask[i].nonzero().squeeze(1).tolist()
        expected_row, carry = [], 0.0
        for t in reversed(keep):
            carry = rewards[i, t].item() + 0.95 * carry
            expected_row.append(carry)
        torch.testing.assert_close(rtg[i, keep], torch.tensor(expected_row[::-1], dtype=torch.float64))
    white = masked_whiten(rtg, mask)
    assert white[~mask].eq(0).all() and abs(white[mask].mean().item()) < 1e-9
    assert abs(white[mask].var(unbiased=False).item() - 1) < 1e-6
    assert kl_per_token(logp, ref_logp, mask, estimator="k3")[~mask].eq(0).all()


def toy_model():
    tokenizer = build_tokenizer()
    model = build_model(ToyModelConfig(), tokenizer, seed=0).eval()
    return tokenizer, model


def test_policy_logprobs_of_an_episode_are_each_turn_scored_in_its_context():
    """One forward over [prompt | turn | observation | turn] scores each policy token as a forward of
    the episode alone does (the trimmed batch keeps the tokens after the first turn), 0 at the holes."""
    tokenizer, model = toy_model()
    rng = random.Random(3)
    prompts, segments, rewards = random_episodes(rng, 5)
    seqs, _ = assemble(prompts, segments, rewards, has_eos=[True] * 5, pad_id=tokenizer.pad_token_id, per_turn=False)
    with torch.no_grad():
        logp, _ = policy_logprobs(model, seqs, temperature=0.7)
        for i, row in enumerate(segments):
            tokens, policy, _ = layout(row)
            ids = torch.tensor([prompts[i] + tokens])
            logits = model(input_ids=ids).logits[0, len(prompts[i]) - 1 : -1] / 0.7
            alone = torch.log_softmax(logits.float(), dim=-1).gather(1, torch.tensor(tokens)[:, None]).squeeze(1)
            keep = torch.tensor(policy)
            torch.testing.assert_close(logp[i, : len(tokens)][keep], alone[keep], rtol=1e-4, atol=1e-4)
            assert logp[i, : len(tokens)][~keep].eq(0).all() and logp[i, len(tokens):].eq(0).all()


def test_sampled_episodes_keep_the_turn_and_token_caps():
    """A random toy model answers wrong, so ToyRetryEnv asks again ("\\nno. a+b=", 11 tokens for 2-digit
    operands): 5 + 11 + 5 tokens fit in 24, but another observation would leave no room for a token, so the
    token cap ends every episode after 2 of its 3 turns."""
    tokenizer, model = toy_model()
    prompts = [tokenizer(f"{a}+{b}=")["input_ids"] for a, b in [(12, 34), (58, 84), (7, 5), (40, 60)]]
    sampling = Sampling(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_new_tokens=5)
    torch.manual_seed(0)
    episodes = sample_episodes(model, prompts, sampling, env_class=ToyRetryEnv, tokenizer=tokenizer, max_turns=3, max_tokens=24,
                               per_turn=True)
    seqs = episodes.seqs
    assert seqs.response_extents.max() <= 24 and seqs.response_width <= 24
    assert episodes.turns.tolist() == [2.0] * 4
    observation = tokenizer("\nno. 12+34=", add_special_tokens=False)["input_ids"]
    env_side = ~seqs.response_mask & seqs.attention_mask[:, seqs.prompt_width :].bool()
    assert seqs.response_ids[0][env_side[0]].tolist() == observation and episodes.env_tokens[0] == len(observation)
    assert env_side.sum(1).tolist() == episodes.env_tokens.long().tolist()
    assert episodes.reward_prompts[0].startswith("12+34=") and episodes.reward_prompts[0].endswith("no. 12+34=")
    assert episodes.env_rewards[~seqs.response_mask].eq(0).all()
    # Each turn's oracle score sits at its last token: two rewards per row, the policy's tokens between them.
    assert (episodes.env_rewards != 0).sum(1).le(2).all()
    # With 16 tokens the observation does not fit: one turn each, no environment token.
    torch.manual_seed(0)
    short = sample_episodes(model, prompts, sampling, env_class=ToyRetryEnv, tokenizer=tokenizer, max_turns=3, max_tokens=16,
                            per_turn=False)
    assert short.turns[:2].tolist() == [1.0, 1.0] and short.env_tokens[:2].tolist() == [0.0, 0.0]


def test_tool_env_runs_the_call_and_ends_without_one():
    env = ToolEnv()
    assert env.reset("What is 47+6?") == []
    messages, reward, done = env.step('Let me compute. <tool name="calculator">47+6</tool>')
    assert not done and reward == 0.0 and messages == [{"role": "tool", "content": "<result>\n53\n</result>"}]
    assert env.step("The answer is 53.") == ([], 0.0, True)
    messages, _, done = env.step('<tool name="nope">1</tool>')
    assert not done and "unknown tool 'nope'" in messages[0]["content"]


def test_each_turn_ends_at_its_first_stop_string():
    """StopAtDigits (tests/envs.py) ends a turn at its first digit: generation stops each row there, the
    others go on, and the episode's next turn starts after the observation."""
    tokenizer, model = toy_model()
    prompts = [tokenizer(f"{a}+{b}=")["input_ids"] for a, b in [(12, 34), (58, 84), (7, 5), (40, 60)] * 2]
    sampling = Sampling(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_new_tokens=12)
    torch.manual_seed(1)
    episodes = sample_episodes(model, prompts, sampling, env_class=StopAtDigits, tokenizer=tokenizer, max_turns=3, max_tokens=60,
                               per_turn=False)
    seqs, turns = episodes.seqs, []
    for i in range(len(prompts)):
        mask, ids = seqs.response_mask[i].tolist(), seqs.response_ids[i].tolist()
        starts = [t for t in range(len(mask)) if mask[t] and (t == 0 or not mask[t - 1])]
        turns += [ids[t : next((u for u in range(t, len(mask)) if not mask[u]), len(mask))] for t in starts]
    assert len(turns) == episodes.turns.sum()
    for turn in turns:
        assert len(turn) <= 12 and not any(c.isdigit() for c in tokenizer.decode(turn[:-1]))
    assert any(len(t) < 12 and tokenizer.decode(t[-1:]).isdigit() for t in turns)


def test_observations_through_a_chat_template_and_as_plain_text():
    tokenizer = build_tokenizer()
    tool = [{"role": "tool", "content": "<result>\n2\n</result>"}]
    assert tokenizer.decode(Renderer(tokenizer).observation(tool, closed=False)) == "<result>\n2\n</result>"
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    chat = Renderer(tokenizer)
    # The turn stopped at "</tool>": the template's end of an assistant turn (EOS) first, then the tool turn, then the next header.
    assert tokenizer.decode(chat.observation(tool, closed=False)) == "</s><|tool|>\n<result>\n2\n</result>\n<|assistant|>\n"
    assert tokenizer.decode(chat.observation(tool, closed=True)) == "<|tool|>\n<result>\n2\n</result>\n<|assistant|>\n"
    prompt = chat.prompt([{"role": "user", "content": "1+1="}], default=[9])
    assert tokenizer.decode(prompt) == "<|user|>\n1+1=\n<|assistant|>\n" and chat.prompt([], default=[9]) == [9]


class NotAProtocol:
    def step(self, text):
        return "no"


def test_the_environment_is_held_to_its_protocol():
    with pytest.raises(EnvFailed, match=r"NotAProtocol.step returned str, not \(messages, reward, done\)"):
        checked_step(NotAProtocol(), "x")
    with pytest.raises(UserError, match="cannot import module 'no_such_module_here'"):
        load_env_class("python:no_such_module_here:Env")
    with pytest.raises(UserError, match="is a function, not a class"):
        load_env_class("python:rlhf.rollouts.multiturn:checked_step")
    with pytest.raises(UserError, match="has no reset method"):
        load_env_class("python:tests.unit.test_multiturn:NotAProtocol")
    assert load_env_class("python:rlhf.tasks.envs:ToolEnv") is ToolEnv
