"""How many rollouts one scoring forward takes (rollout.score_batch_size): the set value, or the
most whose response logits fit SCORE_LOGITS_BUDGET, between the training minibatch and the batch."""

from __future__ import annotations

from rlhf.config import PPOConfig, load_config
from rlhf.stages.ppo_rollout import SCORE_LOGITS_BUDGET, score_batch_size


def config(*overrides: str) -> PPOConfig:
    return load_config(PPOConfig, None, list(overrides))


def test_the_embedded_default_scores_the_whole_batch_in_one_forward():
    cfg = config()
    assert (cfg.rollout.batch_size, cfg.engine.micro_batch_size) == (64, 32)
    assert score_batch_size(cfg, vocab_size=100) == 64


def test_a_set_value_is_used_as_it_is():
    assert score_batch_size(config("rollout.score_batch_size=8"), vocab_size=100) == 8
    assert score_batch_size(config("rollout.score_batch_size=128"), vocab_size=10**6) == 128


def test_the_logits_budget_bounds_the_rows_between_the_minibatch_and_the_batch():
    cfg = config("rollout.batch_size=512", "engine.micro_batch_size=8", "rollout.max_new_tokens=255")
    row_bytes = 256 * 4  # (max_new_tokens + 1) float32 logits per vocabulary entry
    vocab = SCORE_LOGITS_BUDGET // (row_bytes * 100)  # a vocabulary where exactly 100 rows fit
    assert score_batch_size(cfg, vocab_size=vocab) == 100
    assert score_batch_size(cfg, vocab_size=vocab + 1) == 99
    assert score_batch_size(cfg, vocab_size=49152) == 8  # SmolLM2's: 5 rows fit, never below the training minibatch
    assert score_batch_size(cfg, vocab_size=2) == 512  # never above the rollout batch


def test_smollm2_at_the_chat_tasks_sizes_scores_in_one_forward():
    cfg = config("rollout.batch_size=16", "engine.micro_batch_size=8", "rollout.max_new_tokens=16")
    assert score_batch_size(cfg, vocab_size=49152) == 16  # 17 x 49152 floats a row: 80 rows would fit


def test_the_stage_scores_with_that_many_rows_per_forward(monkeypatch):
    """rlhf.stages.ppo_rollout.score hands score_batch_size to the scoring (a spy around the real function),
    and the whole batch in one forward scores as the training minibatch's chunks do."""
    import types

    import torch

    import rlhf.stages.ppo_rollout as ppo_rollout
    from rlhf.models.loading import ScalarModel
    from rlhf.rollouts.generation import Sampling, sample_rollout_with_logprobs
    from rlhf.rollouts.rewards import Reward, parse_sources
    from rlhf.toy import ToyModelConfig, build_model, build_tokenizer

    tokenizer = build_tokenizer()
    actor = build_model(ToyModelConfig(), tokenizer, seed=1).eval()
    reference = build_model(ToyModelConfig(), tokenizer, seed=2).eval()
    reward_model = ScalarModel(build_model(ToyModelConfig(), tokenizer, seed=3, head="scalar").eval())
    models = types.SimpleNamespace(actor=types.SimpleNamespace(module=actor), reference=reference, reward=reward_model, ensemble=None)
    data = types.SimpleNamespace(reward=Reward(parse_sources(["rm:latest"], None)), tokenizer=tokenizer)
    prompts = [tokenizer(f"{a}+{a % 7}=").input_ids for a in range(64)]
    sampling = Sampling(pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id, max_new_tokens=8, temperature=1.0, top_k=0,
                        top_p=1.0, zero3_engine=None, gather=True, device=torch.device("cpu"))
    torch.manual_seed(0)
    seqs, sampled = sample_rollout_with_logprobs(actor, prompts, sampling, keep_logprobs=True)
    chunks = []
    real = ppo_rollout.score_rollout

    def spy(*args, **kwargs):
        chunks.append(kwargs["chunk"])
        return real(*args, **kwargs)

    monkeypatch.setattr(ppo_rollout, "score_rollout", spy)
    with torch.no_grad():
        whole, chunked = (ppo_rollout.score(types.SimpleNamespace(models=models, cfg=config(*overrides), data=data, dist=None), seqs,
                                            critic=None, sampled=sampled)
                          for overrides in ([], ["rollout.score_batch_size=32"]))
    assert chunks == [64, 32]
    mask = seqs.response_mask
    assert torch.allclose(whole.ref_logprobs[mask], chunked.ref_logprobs[mask], atol=1e-5)
    assert torch.allclose(whole.scores, chunked.scores, atol=1e-5)
    assert whole.scores.std() > 0  # rows in their own order: scores of different sequences differ
