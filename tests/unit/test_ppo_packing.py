"""`rlhf ppo` with data.packing: the rollout's forwards over packed rows (rlhf/rollouts/packed.py) against the
padded ones, in fp32 on every architecture of the matrix, eager and sdpa attention: per-token log-probs, entropies
and values, the rewards, the stage's own actor loss (PPO's token ratio, and GSPO's sequence ratio with the KL in
the loss) and value loss, and every gradient of actor and critic; multi-turn rows (environment tokens inside the
response side) included."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from rlhf.algos.ppo import value_loss
from rlhf.config import PPOConfig, load_config
from rlhf.errors import UserError
from rlhf.models.loading import ScalarModel
from rlhf.models.stage_models import PPOModels
from rlhf.rollouts.generation import policy_logprobs, sequence_scores, token_values
from rlhf.rollouts.multiturn import Segment, assemble
from rlhf.rollouts.packed import (
    pack_rollout,
    packed_logprobs,
    packed_scores,
    packed_values,
)
from rlhf.rollouts.scoring import Packing, check_rollout_packing, score_rollout
from rlhf.stages.ppo_context import PPOContext, packing_capacity
from rlhf.stages.ppo_rollout import Rollout
from rlhf.stages.ppo_update import actor_loss_on
from rlhf.toy import build_tokenizer
from tests.unit.test_architectures import ARCHITECTURES, causal_lm, scalar_model
from tests.unit.test_packing import with_attention

TEMPERATURE = 0.7
CAPACITIES = (24, 60, 400)  # each sequence nearly a row of its own, a few to a row, all in one row


def random_rollout(vocab: int, *, n: int, seed: int, pad_id: int):
    """n rows: a prompt of 1..8 tokens, then 1..3 segments, policy turns and environment tokens (a multi-turn
    episode's holes in response_mask) alternating, the last a policy turn; 24 tokens at most."""
    rng = random.Random(seed)
    prompts, segments = [], []
    for _ in range(n):
        prompts.append([rng.randrange(3, vocab) for _ in range(rng.randint(1, 8))])
        turns = rng.choice([1, 1, 3])
        segments.append([Segment([rng.randrange(3, vocab) for _ in range(rng.randint(1, 5))], policy=(turns - 1 - t) % 2 == 0)
                         for t in range(turns)])
    seqs, _ = assemble(prompts, segments, [[0.0] * sum(s.policy for s in row) for row in segments],
                       has_eos=[rng.random() < 0.5 for _ in range(n)], pad_id=pad_id, per_turn=False)
    return seqs


def models_of(arch: str, attention: str, tokenizer):
    actor = with_attention(causal_lm(arch, tokenizer).float(), attention)
    critic = ScalarModel(with_attention(scalar_model(arch, tokenizer).float(), attention))
    return actor, critic


def ppo_context(actor, critic, *overrides: str) -> PPOContext:
    """The stage's context with what `actor_loss_on` reads: the config, the actor, no ptx data."""
    cfg = load_config(PPOConfig, None, ["rollout.max_new_tokens=8", *overrides])
    models = PPOModels(actor=actor, critic=critic, reference=None, reward=None)
    return PPOContext(models=models, data=SimpleNamespace(ptx_batches=None), cfg=cfg, sampling=None, dist=None, keeper=None)


def stage_losses(ctx: PPOContext, rollout: Rollout, packed) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """The minibatch's actor loss (`actor_loss_on`, the stage's own), value loss, and the gradients of both models."""
    actor, critic = ctx.models.actor, ctx.models.critic
    actor.zero_grad()
    critic.zero_grad()
    seqs, rows = rollout.seqs, torch.arange(rollout.seqs.input_ids.shape[0])
    loss, _ = actor_loss_on(ctx, rollout, rows, seqs, seqs.response_mask, micro_step=0, beta=0.3, packed=packed)
    values = token_values(critic, seqs) if packed is None else packed_values(critic, packed)
    vf_loss, _ = value_loss(values, rollout.scored.values, rollout.returns, seqs.response_mask, clip=0.2)
    (loss + vf_loss).backward()
    grads = {f"actor.{n}": p.grad.clone() for n, p in actor.named_parameters() if p.grad is not None}
    grads.update({f"critic.{n}": p.grad.clone() for n, p in critic.named_parameters() if p.grad is not None})
    return loss.detach(), vf_loss.detach(), grads


def a_rollout(seqs, actor, critic) -> Rollout:
    """The padded forward's outputs, perturbed, as the old policy's and critic's; random advantages and returns."""
    torch.manual_seed(7)
    mask = seqs.response_mask
    with torch.no_grad():
        logp, entropy = policy_logprobs(actor, seqs, temperature=TEMPERATURE, with_entropy=True)
        values = token_values(critic, seqs)
    noisy = lambda x: (x + 0.1 * torch.randn_like(x)).masked_fill(~mask, 0.0)  # noqa: E731
    scored = SimpleNamespace(logprobs=noisy(logp), ref_logprobs=noisy(logp), values=noisy(values), entropy=entropy)
    return Rollout(seqs, scored, score=torch.zeros(mask.shape[0]), penalized_kl=torch.zeros_like(logp),
                   advantages=torch.randn_like(logp).masked_fill(~mask, 0.0), returns=noisy(values))


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_packed_log_probs_values_losses_and_gradients_equal_unpacked(arch, attention):
    """fp32, within 1e-5. Sliding window 8 (Mistral, Gemma 2) is shorter than the sequences."""
    tokenizer = build_tokenizer()
    actor, critic = models_of(arch, attention, tokenizer)
    seqs = random_rollout(len(tokenizer), n=7, seed=1, pad_id=tokenizer.pad_token_id)
    assert (seqs.response_mask.sum(1) < seqs.response_extents).any()  # some rows hold environment tokens
    rollout = a_rollout(seqs, actor, critic)
    with torch.no_grad():
        logp, entropy = policy_logprobs(actor, seqs, temperature=TEMPERATURE, with_entropy=True)
        values = token_values(critic, seqs)
    diffs = []
    for overrides in ((), ("ppo.ratio=sequence", "ppo.kl_in=loss", "ppo.loss_aggregation=sequence_mean")):
        ctx = ppo_context(actor, critic, *overrides)
        plain = stage_losses(ctx, rollout, None)
        for capacity in CAPACITIES:
            packed = pack_rollout(seqs, pad_id=tokenizer.pad_token_id, capacity=capacity)
            with torch.no_grad():
                got = (*packed_logprobs(actor, packed, temperature=TEMPERATURE, with_entropy=True), packed_values(critic, packed))
            for a, b in zip(got, (logp, entropy, values)):
                assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=0)
                assert (a[~seqs.response_mask] == 0).all()
                diffs.append((a - b).abs().max().item())
            loss, vf_loss, grads = stage_losses(ctx, rollout, packed)
            assert loss.item() == pytest.approx(plain[0].item(), abs=1e-5) and vf_loss.item() == pytest.approx(plain[1].item(), abs=1e-5)
            assert grads.keys() == plain[2].keys()
            for name, g in grads.items():
                assert torch.allclose(g, plain[2][name], atol=1e-5, rtol=0), name
                diffs.append((g - plain[2][name]).abs().max().item())
    print(f"ppo {arch}/{attention}: max abs diff {max(diffs):.2e}")


@pytest.mark.parametrize("arch", ["gpt2", "opt", "mistral", "gemma2"])
def test_packed_scoring_equals_the_padded_scoring(arch):
    """The rollout's scoring: actor log-probs and entropies, reference log-probs, values and reward-model scores."""
    tokenizer = build_tokenizer()
    actor, critic = models_of(arch, "sdpa", tokenizer)
    reference = causal_lm(arch, tokenizer, seed=3).float()
    reward = ScalarModel(scalar_model(arch, tokenizer, seed=4).float())
    seqs = random_rollout(len(tokenizer), n=9, seed=2, pad_id=tokenizer.pad_token_id)
    kwargs = dict(actor=actor, reference=reference, critic=critic, reward=reward, temperature=TEMPERATURE, chunk=4)
    plain = score_rollout(seqs, **kwargs)
    packed = score_rollout(seqs, packing=Packing(tokenizer.pad_token_id, 60), **kwargs)
    for key in ("logprobs", "entropy", "ref_logprobs", "values", "scores"):
        assert torch.allclose(getattr(packed, key), getattr(plain, key), atol=1e-5, rtol=0), key
    assert torch.allclose(packed_scores(reward, pack_rollout(seqs, pad_id=0, capacity=400)), sequence_scores(reward, seqs), atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "mistral", "gemma2"])
def test_packed_log_probs_equal_each_sequence_alone_in_float64(arch):
    """Against a float64 forward of each row's attended tokens alone (no padding, no packing)."""
    tokenizer = build_tokenizer()
    model = causal_lm(arch, tokenizer).double()
    seqs = random_rollout(len(tokenizer), n=6, seed=3, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        packed, _ = packed_logprobs(model, pack_rollout(seqs, pad_id=tokenizer.pad_token_id, capacity=48), temperature=TEMPERATURE)
        for b in range(seqs.input_ids.shape[0]):
            attended = seqs.attention_mask[b].bool()
            ids = seqs.input_ids[b][attended]
            logp = torch.log_softmax(model(input_ids=ids[None], use_cache=False).logits[0] / TEMPERATURE, dim=-1)
            # Response column t is attended column (prompt length + t) of the row; its log-prob is read one before.
            prompt = int(seqs.attention_mask[b, : seqs.prompt_width].sum())
            for t in seqs.response_mask[b].nonzero().flatten().tolist():
                expected = logp[prompt + t - 1, ids[prompt + t]]
                assert packed.dtype == torch.float64 and abs(packed[b, t].item() - expected.item()) < 1e-7, (b, t)


def test_the_packed_reference_without_adapters_is_the_unpacked_one():
    from peft import LoraConfig, get_peft_model

    tokenizer = build_tokenizer()
    actor = get_peft_model(with_attention(causal_lm("llama", tokenizer).float(), "sdpa"),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    seqs = random_rollout(len(tokenizer), n=6, seed=4, pad_id=tokenizer.pad_token_id)
    kwargs = dict(actor=actor, reference=None, critic=None, reward=None, temperature=1.0, chunk=6, reference_is_actor_without_adapters=True)
    plain, packed = score_rollout(seqs, **kwargs), score_rollout(seqs, packing=Packing(0, 48), **kwargs)
    assert torch.allclose(packed.ref_logprobs, plain.ref_logprobs, atol=1e-5, rtol=0)
    assert (packed.ref_logprobs - packed.logprobs).abs().max() > 1e-4  # the adapters were off for the reference only


def test_the_capacity_and_its_check():
    assert packing_capacity(load_config(PPOConfig, None, [])) is None
    assert packing_capacity(load_config(PPOConfig, None, ["data.packing=true"])) == 16 + 8
    assert packing_capacity(load_config(PPOConfig, None, ["data.packing=true", "data.packing_tokens=100"])) == 100
    with pytest.raises(UserError, match=r"data.packing_tokens \(20\) must be 0 or at least data.max_prompt_length \+ the longest "
                                        r"response side \(24\)"):
        load_config(PPOConfig, None, ["data.packing=true", "data.packing_tokens=20"]).validate()
    with pytest.raises(ValueError, match="does not fit"):
        pack_rollout(random_rollout(40, n=3, seed=5, pad_id=0), pad_id=0, capacity=2)


def test_packing_refuses_an_unchecked_model():
    tokenizer = build_tokenizer()
    actor, critic = models_of("llama", "eager", tokenizer)
    check_rollout_packing(PPOModels(actor=actor, critic=critic, reference=None, reward=critic))
    critic.hf_model.config._attn_implementation = "flex_attention"
    with pytest.raises(UserError, match="needs model.attn_implementation in"):
        check_rollout_packing(PPOModels(actor=actor, critic=critic, reference=None, reward=None))


@pytest.mark.parametrize("arch", ["gpt2", "opt", "mistral"])
def test_the_packed_ptx_loss_and_its_gradients_equal_unpacked(arch):
    """PPO-ptx's LM loss (the mean over the batch's targets), its rows packed as `rlhf sft` packs them."""
    from rlhf.data.sampler import ShuffledBatches
    from rlhf.stages.ppo_update import ptx_loss
    from tests.unit.test_packing import random_rows

    tokenizer = build_tokenizer()
    actor = with_attention(causal_lm(arch, tokenizer).float(), "sdpa")
    rows = random_rows(len(tokenizer), n=12, max_length=20, seed=8)
    data = SimpleNamespace(ptx_set=rows, ptx_batches=ShuffledBatches(len(rows), batch_size=6, world_size=1, seed=0), tokenizer=tokenizer)
    results = []
    for packing in ("false", "true"):
        cfg = load_config(PPOConfig, None, [f"data.packing={packing}", "data.ptx_max_length=20", "data.max_prompt_length=4",
                                            "rollout.max_new_tokens=4"])
        ctx = PPOContext(models=PPOModels(actor=actor, critic=None, reference=None, reward=None), data=data, cfg=cfg, sampling=None,
                         dist=SimpleNamespace(rank=0, device=torch.device("cpu")), keeper=None)
        actor.zero_grad()
        loss = ptx_loss(ctx, micro_step=1)
        loss.backward()
        results.append((loss.item(), {n: p.grad.clone() for n, p in actor.named_parameters() if p.grad is not None}))
    (plain, plain_grads), (packed, grads) = results
    assert packed == pytest.approx(plain, abs=1e-5) and grads.keys() == plain_grads.keys()
    for name, g in grads.items():
        assert torch.allclose(g, plain_grads[name], atol=1e-5, rtol=0), name


@pytest.mark.parametrize("arch", ["gpt2", "llama", "mistral"])
def test_the_flash_attention_layout_gives_the_same_outputs(arch, monkeypatch):
    """flash_attention_2 (no GPU here) gets the packed rows as one row (1, R' * P'), its sequences told apart by the
    position ids. That row, run through sdpa (which reads the same restarts), gives the padded log-probs and values:
    the indices into the one row are right."""
    import rlhf.rollouts.packed as packed_module
    from rlhf.data.packing import packed_forward_inputs

    def one_row(config, input_ids, position_ids, *, dtype):
        flash = SimpleNamespace(model_type=config.model_type, _attn_implementation="flash_attention_2")
        return packed_forward_inputs(flash, input_ids, position_ids, dtype=dtype)

    tokenizer = build_tokenizer()
    actor, critic = models_of(arch, "sdpa", tokenizer)
    seqs = random_rollout(len(tokenizer), n=7, seed=9, pad_id=tokenizer.pad_token_id)
    with torch.no_grad():
        logp, values = policy_logprobs(actor, seqs, temperature=TEMPERATURE)[0], token_values(critic, seqs)
        monkeypatch.setattr(packed_module, "packed_forward_inputs", one_row)
        packed = pack_rollout(seqs, pad_id=tokenizer.pad_token_id, capacity=24)
        assert packed.input_ids.shape[0] > 1
        assert torch.allclose(packed_logprobs(actor, packed, temperature=TEMPERATURE)[0], logp, atol=1e-5, rtol=0)
        assert torch.allclose(packed_values(critic, packed), values, atol=1e-5, rtol=0)
