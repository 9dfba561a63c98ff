"""Multi-turn rollouts: the policy and an environment take turns, and one sequence per episode holds
both, the environment's tokens as context only.

An environment (rollout.env=python:package.module:Class, one instance per episode) has

    reset(prompt: str) -> list[dict]                    # messages; [] keeps the dataset's prompt
    step(text: str) -> (list[dict], float | None, bool)  # observation messages, reward, done

and may name `stop_strings` (texts that end a policy turn besides EOS, e.g. "</tool>"): generation
ends each turn at the token that first puts one in its text (rlhf/rollouts/stops.py). `reset` gets
the prompt's text (special tokens dropped); `step` gets the text of the policy's turn.

An episode's tokens after its prompt, laid out as one turn's response side (rlhf/rollouts/generation.py):

    [turn 1 (policy) | observation 1 (env) | turn 2 (policy) | ... | turn n (policy)] + padding

response_mask is True at the policy's tokens only (holes at the environment's) and attention_mask 1
at both. An episode always ends with a policy token: the reward model's last real token and the
last True of response_mask are the same token. rlhf/algos handles masks with holes: an
environment's positions get no advantage, KL or value loss, and GAE steps from one turn's last
token to the next turn's first.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Callable

import torch

from rlhf.data.collate import left_pad_prompts
from rlhf.data.templates import render_chat, validate_messages
from rlhf.errors import UserError, first_line
from rlhf.protocols import CausalLM, Environment, Tokenizer
from rlhf.rollouts.generation import Sampling, Sequences
from rlhf.rollouts.stops import generate_turns
from rlhf.training.engine import Dist
from rlhf.training.rank_sums import RankSums

ENV_KEY = "rollout.env"
_MARK = "x"  # an assistant turn's stand-in content, to find what a chat template puts around one


def load_env_class(text: str) -> type:
    """Import rollout.env's class by its dotted name (never from a path), or stop in one line."""
    from rlhf.rollouts.rewards import load_function, parse_source

    source = parse_source(text, key=ENV_KEY)
    if source.kind != "python":
        raise UserError(f"{ENV_KEY}={text!r} is not python:package.module:Class (e.g. python:rlhf.tasks.envs:ToolEnv)")
    found = load_function(source, key=ENV_KEY)
    if not isinstance(found, type):
        raise UserError(f"{ENV_KEY}: {text}: {source.module}.{source.function} is a {type(found).__name__}, not a class with "
                        "reset(prompt) and step(text)")
    missing = [name for name in ("reset", "step") if not callable(getattr(found, name, None))]
    if missing:
        raise UserError(f"{ENV_KEY}: {text}: class {found.__name__} has no {' or '.join(missing)} method; an environment has "
                        "reset(prompt) -> messages and step(text) -> (messages, reward, done)")
    return found


class EnvFailed(UserError):
    """An environment's reset or step raised, or returned something outside the protocol."""


@dataclass(frozen=True)
class Segment:
    """A run of an episode's tokens: one policy turn, or what the environment appended after one."""

    tokens: list[int]
    policy: bool


@dataclass(frozen=True)
class Renderer:
    """Messages to token ids. With a chat template (the tokenizer's): as the template renders them after
    an assistant turn, with the turn's closing markup first when the turn stopped without EOS (at a
    tool call's stop string) and the next assistant header last. Without one (the embedded default):
    the messages' contents, concatenated as they are."""

    tokenizer: Tokenizer

    @property
    def chat(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def prompt(self, messages: list[dict], *, default: list[int]) -> list[int]:
        """reset's messages as the policy's prompt; [] keeps `default` (the dataset's)."""
        if not messages:
            return default
        messages = validate_messages(messages, where=f"{ENV_KEY} reset()")
        if self.chat:
            text = render_chat(self.tokenizer, messages, add_generation_prompt=True, where=f"{ENV_KEY} reset()")
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.tokenizer("".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"]

    def observation(self, messages: list[dict], *, closed: bool) -> list[int]:
        """An observation's token ids; `closed`: the policy's turn ended with EOS."""
        if messages:
            messages = validate_messages(messages, where=f"{ENV_KEY} step()")
        text = self._chat_observation(messages, closed=closed) if self.chat else "".join(m["content"] for m in messages)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _chat_observation(self, messages: list[dict], *, closed: bool) -> str:
        # The template knows how a turn closes and how the next opens: render a stand-in conversation
        # with and without the observation and keep the difference.
        user = [{"role": "user", "content": "?"}]
        turn = user + [{"role": "assistant", "content": _MARK}]
        where = f"{ENV_KEY} step()"
        asked = render_chat(self.tokenizer, user, add_generation_prompt=True, where=where)
        answered = render_chat(self.tokenizer, turn, add_generation_prompt=False, where=where)
        observed = render_chat(self.tokenizer, turn + messages, add_generation_prompt=True, where=where)
        if not answered.startswith(asked + _MARK) or not observed.startswith(answered):
            raise UserError(f"{ENV_KEY}: the tokenizer's chat template does not render a conversation as an extension of its "
                            "beginning, so an observation cannot be appended to a rollout; use a tokenizer whose template does")
        closer = answered[len(asked) + len(_MARK):]
        eos = self.tokenizer.eos_token or ""
        if closed and eos and closer.startswith(eos):
            closer = closer[len(eos):]  # the policy's own EOS closed the turn already
        return closer + observed[len(answered):]


def checked_step(env: Environment, text: str) -> tuple[list[dict], float, bool]:
    """env.step(text) held to the protocol: (messages, finite reward (None = 0), done)."""
    name = type(env).__name__
    try:
        out = env.step(text)
    except Exception as exc:  # the environment is the user's code: name it and its message, not a traceback
        raise EnvFailed(f"{ENV_KEY}: {name}.step raised {type(exc).__name__}: {first_line(exc)}") from None
    if not isinstance(out, tuple) or len(out) != 3:
        raise EnvFailed(f"{ENV_KEY}: {name}.step returned {type(out).__name__}, not (messages, reward, done)")
    messages, reward, done = out
    if not isinstance(messages, (list, tuple)):
        raise EnvFailed(f"{ENV_KEY}: {name}.step returned {type(messages).__name__} messages, not a list of {{role, content}}")
    reward = 0.0 if reward is None else reward
    if isinstance(reward, bool) or not isinstance(reward, numbers.Real) or not math.isfinite(reward):
        raise EnvFailed(f"{ENV_KEY}: {name}.step returned the reward {reward!r}; return a finite float or None")
    return list(messages), float(reward), bool(done)


def checked_reset(env: Environment, prompt: str) -> list[dict]:
    name = type(env).__name__
    try:
        messages = env.reset(prompt)
    except Exception as exc:
        raise EnvFailed(f"{ENV_KEY}: {name}.reset raised {type(exc).__name__}: {first_line(exc)}") from None
    if messages is None or not isinstance(messages, (list, tuple)):
        raise EnvFailed(f"{ENV_KEY}: {name}.reset returned {type(messages).__name__}, not a list of messages ([] keeps the prompt)")
    return list(messages)


@dataclass
class Episodes:
    """A batch of multi-turn episodes laid out as a rollout, with what PPO needs besides.

    seqs: as `sample_rollout`'s, response_mask True at the policy's tokens only; has_eos: the last
    policy turn ended with EOS. env_rewards: (B, R) the environment's rewards, each at the last token
    of the turn it answered (turn_rewards=per_turn) or summed at the last policy token (end).
    reward_prompts / reward_responses: what the configured reward scores, the last policy turn as the
    response and everything before it as its prompt (text, special tokens dropped). turns, env_tokens:
    (B,) float policy turns and environment tokens per episode."""

    seqs: Sequences
    env_rewards: torch.Tensor
    reward_prompts: list[str]
    reward_responses: list[str]
    turns: torch.Tensor
    env_tokens: torch.Tensor


def assemble(prompts: list[list[int]], segments: list[list[Segment]], rewards: list[list[float]], *, has_eos: list[bool],
             pad_id: int, per_turn: bool) -> tuple[Sequences, torch.Tensor]:
    """Episodes -> (Sequences with the policy's tokens in response_mask and both sides' in attention_mask,
    (B, R) float32 environment rewards). `segments[i]`: row i's segments in order, none empty, the
    last a policy turn; `rewards[i]`: one reward per policy turn of row i, placed at that turn's last
    token (`per_turn`) or summed at the last one; `has_eos[i]`: row i's last turn ended with EOS."""
    left = left_pad_prompts(prompts, pad_id=pad_id)
    width = max(sum(len(s.tokens) for s in row) for row in segments)
    batch = len(segments)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    policy = torch.zeros((batch, width), dtype=torch.bool)
    context = torch.zeros((batch, width), dtype=torch.long)
    env_rewards = torch.zeros((batch, width), dtype=torch.float32)
    for i, row in enumerate(segments):
        turn_ends = _fill_row(i, row, ids, policy, context)
        if len(turn_ends) != len(rewards[i]):
            raise ValueError(f"row {i}: {len(turn_ends)} policy turns but {len(rewards[i])} rewards")
        if per_turn:
            for end, reward in zip(turn_ends, rewards[i]):
                env_rewards[i, end] += reward
        else:
            env_rewards[i, turn_ends[-1]] = sum(rewards[i])
    attention_mask = torch.cat([left["attention_mask"], context], dim=1)  # (B, P + R)
    seqs = Sequences(input_ids=torch.cat([left["input_ids"], ids], dim=1), attention_mask=attention_mask,
                     position_ids=(attention_mask.cumsum(dim=1) - 1).clamp(min=0), response_mask=policy,
                     has_eos=torch.tensor(has_eos, dtype=torch.bool), prompt_width=left["input_ids"].shape[1])
    return seqs, env_rewards


def _fill_row(i: int, row: list[Segment], ids: torch.Tensor, policy: torch.Tensor, context: torch.Tensor) -> list[int]:
    """Write row i's segments; return the column of each policy turn's last token."""
    if not row or not row[-1].policy or any(not s.tokens for s in row):
        raise ValueError(f"row {i}: an episode is non-empty segments ending with a policy turn")
    at, turn_ends = 0, []
    for segment in row:
        end = at + len(segment.tokens)
        ids[i, at:end] = torch.as_tensor(segment.tokens, dtype=torch.long)
        context[i, at:end] = 1
        if segment.policy:
            policy[i, at:end] = True
            turn_ends.append(end - 1)
        at = end
    return turn_ends


def _alone(active: bool) -> bool:
    return active


@dataclass
class _Episode:
    env: Environment
    prompt: list[int]
    segments: list[Segment]
    rewards: list[float]
    done: bool = False
    closed: bool = False

    def used(self) -> int:
        return sum(len(s.tokens) for s in self.segments)

    def context(self) -> list[int]:
        return self.prompt + [t for s in self.segments for t in s.tokens]


@torch.no_grad()
def sample_episodes(model: CausalLM, prompts: list[list[int]], sampling: Sampling, *, env_class: type, tokenizer: Tokenizer,
                    max_turns: int, max_tokens: int, per_turn: bool, keep_going: Callable[[bool], bool] = _alone) -> Episodes:
    """Run one episode per prompt: each turn, `generate_turns` continues every unfinished episode up to
    the environment's first stop string or EOS (at most sampling.max_new_tokens, and what is left of
    `max_tokens` after the prompt), and env.step answers it; up to `max_turns` policy turns.

    `keep_going(any episode of this rank unfinished)` -> whether any rank's is: under ZeRO-3 every
    rank must join each generation (a partitioned forward is a collective), so a rank with none
    left generates for a stand-in row and drops it."""
    renderer = Renderer(tokenizer)
    stops = tuple(getattr(env_class, "stop_strings", ()) or ())
    texts = tokenizer.batch_decode(prompts, skip_special_tokens=True)
    episodes = []
    for prompt, text in zip(prompts, texts):
        env = _make_env(env_class)
        episodes.append(_Episode(env, renderer.prompt(checked_reset(env, text), default=prompt), [], []))
    for turn in range(max_turns):
        active = [e for e in episodes if not e.done]
        if not keep_going(bool(active)):
            break
        longest = max((max_tokens - e.used() for e in active), default=1)
        step_sampling = replace(sampling, max_new_tokens=max(1, min(sampling.max_new_tokens, longest)))
        # A rank with no episode left generates one token for a stand-in row (budget 1), then waits on the others.
        outputs = generate_turns(model, [e.context() for e in active] or [episodes[0].prompt], step_sampling, tokenizer=tokenizer,
                                 stops=stops, budgets=[max_tokens - e.used() for e in active] or [1])
        for episode, tokens in zip(active, outputs):
            _take_turn(episode, tokens, renderer, eos_id=sampling.eos_id, last=turn + 1 == max_turns, max_tokens=max_tokens)
    return _episodes_of(episodes, tokenizer, pad_id=sampling.pad_id, per_turn=per_turn, device=sampling.device)


def _make_env(env_class: type) -> Environment:
    try:
        return env_class()
    except Exception as exc:
        raise EnvFailed(f"{ENV_KEY}: {env_class.__name__}() raised {type(exc).__name__}: {first_line(exc)}") from None


def _take_turn(episode: _Episode, tokens: list[int], renderer: Renderer, *, eos_id: int, max_tokens: int, last: bool) -> None:
    """Record a policy turn (as generated: ended at a stop string, EOS or the episode's budget), let the
    environment answer it, and append its observation unless the episode ends: the environment says
    done, `last` turn, or no room after the observation."""
    episode.closed = bool(tokens) and tokens[-1] == eos_id
    episode.segments.append(Segment(tokens, policy=True))
    messages, reward, done = checked_step(episode.env, renderer.tokenizer.decode(tokens, skip_special_tokens=True))
    episode.rewards.append(reward)
    if done or last:
        episode.done = True
        return
    observation = renderer.observation(messages, closed=episode.closed)
    if episode.used() + len(observation) + 1 > max_tokens:
        episode.done = True  # truncated: no room for the observation and one more token
    elif observation:
        episode.segments.append(Segment(observation, policy=False))


def _episodes_of(episodes: list[_Episode], tokenizer: Tokenizer, *, pad_id: int, per_turn: bool,
                 device: torch.device | None) -> Episodes:
    seqs, env_rewards = assemble([e.prompt for e in episodes], [e.segments for e in episodes], [e.rewards for e in episodes],
                                 has_eos=[e.closed for e in episodes], pad_id=pad_id, per_turn=per_turn)
    before = [e.prompt + [t for s in e.segments[:-1] for t in s.tokens] for e in episodes]
    return Episodes(
        seqs=seqs if device is None else seqs.to(device), env_rewards=env_rewards.to(device),
        reward_prompts=tokenizer.batch_decode(before, skip_special_tokens=True),
        reward_responses=tokenizer.batch_decode([e.segments[-1].tokens for e in episodes], skip_special_tokens=True),
        turns=torch.tensor([float(sum(s.policy for s in e.segments)) for e in episodes], device=device),
        env_tokens=torch.tensor([float(sum(len(s.tokens) for s in e.segments if not s.policy)) for e in episodes], device=device),
    )


def any_rank(flag: bool, *, dist: Dist) -> bool:
    """Whether `flag` holds on any rank (every rank gets the same answer)."""
    if dist.world_size == 1:
        return flag
    value = torch.tensor([float(flag)], device=dist.device)
    torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.MAX)
    return bool(value.item())


def episode_metrics(episodes: Episodes | None, dist: Dist) -> dict[str, float]:
    """With rollout.env, per episode over every rank: turns (the policy's), env_tokens (the environment's,
    context only) and env_reward (the sum of its rewards; the score is the reward's part alone)."""
    if episodes is None:
        return {}
    sums = RankSums(("turns", "env_tokens", "env_reward", "episodes"), dist.device)
    sums.add(turns=episodes.turns, env_tokens=episodes.env_tokens, env_reward=episodes.env_rewards.double(),
             episodes=float(len(episodes.turns)))
    total = sums.over_ranks()
    return {k: total[k] / total["episodes"] for k in ("turns", "env_tokens", "env_reward")}
