"""Mutation check of the test suite: each planted fault must make the tests named for it fail.

Every mutant below is one small, real fault (a sign flipped, an off-by-one, a mask dropped, a check
skipped, a quote removed) in one file, with the part of the suite that must catch it. For each, the
script checks that its source snippet occurs exactly once (so a refactor that moves the code is
noticed, not silently skipped), writes the fault into the file, runs those tests serially, and puts
the original bytes (and mtime) back: in a `finally`, on SIGINT/SIGTERM/SIGHUP, at exit, and, after
a SIGKILL, at the next start from a journal in the temp folder.

    .venv/bin/python scripts/mutants.py [--only NAME ...] [--fast] [--list] [--out FILE]

--fast skips the mutants only the integration tests catch (`slow`): the stage loops' faults that
need real DeepSpeed runs. Exit status 0 when every mutant was killed; 1 when one survived or its run
failed otherwise (a collection error, a timeout); 2 when the table or the baseline is broken.

The files are mutated in place: while a mutant is in, other pytest runs in this checkout see it.
"""

from __future__ import annotations

import argparse
import atexit
import base64
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
AREAS = ("algos", "registry", "checkpoint", "resume", "launcher", "slurm", "data", "rewards", "stages")
# The tests as `make test` runs them: its markers leave out what only `make test-full` runs.
PYTEST = ("-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "-p", "no:xdist", "-m", "not matrix and not full")


@dataclass(frozen=True)
class Mutant:
    name: str
    area: str
    path: str
    """The file, relative to the repository root."""
    fault: str
    original: str
    """Source text that occurs exactly once in the file."""
    mutated: str
    tests: tuple[str, ...]
    """pytest node ids (or files) of the part of the suite that must fail."""
    slow: bool = False
    """Only integration tests catch it (real stage runs: minutes each)."""


U = "tests/unit/"
IT = "tests/integration/"

MUTANTS: tuple[Mutant, ...] = (
    # --- rlhf/algos ----------------------------------------------------------------------------
    Mutant("ppo_clip_takes_min", "algos", "rlhf/algos/ppo.py", "clipped surrogate takes the min, not the max",
           "masked_where(torch.maximum(unclipped, clipped), mask)", "masked_where(torch.minimum(unclipped, clipped), mask)",
           (U + "test_ppo_algos.py::test_policy_loss_with_active_clipping_by_hand",
            U + "test_ppo_algos.py::test_policy_loss_matches_loop")),
    Mutant("gae_lambda_dropped", "algos", "rlhf/algos/ppo.py", "GAE recursion without lambda",
           "adv = delta + gamma * lam * next_adv", "adv = delta + gamma * next_adv",
           (U + "test_ppo_algos.py::test_gae_matches_loop_over_valid_tokens",)),
    Mutant("gae_hole_not_skipped", "algos", "rlhf/algos/ppo.py", "a masked column resets V_next instead of being skipped",
           "next_value = torch.where(valid, values[:, t], next_value)", "next_value = values[:, t]",
           (U + "test_ppo_algos.py::test_gae_skips_a_hole_by_hand",)),
    Mutant("whiten_padding_kept", "algos", "rlhf/algos/ppo.py", "whitened values not zeroed at padding (mask dropped)",
           "    return masked_where(out, mask)[0]", "    return out",
           (U + "test_ppo_algos.py::test_masked_whiten_matches_loop",)),
    Mutant("value_clip_dropped", "algos", "rlhf/algos/ppo.py", "value loss never clipped",
           "clipped = old_values + (values - old_values).clamp(-clip, clip)", "clipped = values",
           (U + "test_ppo_algos.py::test_value_loss_matches_loop",)),
    Mutant("rloo_baseline_off_by_one", "algos", "rlhf/algos/critic_free.py", "RLOO baseline divides by K, not K - 1",
           "(groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)", "(groups.sum(dim=1, keepdim=True) - groups) / group_size",
           (U + "test_critic_free_algos.py::test_leave_one_out_matches_loop",)),
    Mutant("dpo_margin_sign", "algos", "rlhf/algos/preference.py", "DPO margin is rejected - chosen",
           "z = chosen_rewards - rejected_rewards", "z = rejected_rewards - chosen_rewards",
           (U + "test_preference_algos.py::test_dpo_exact_cases",)),
    Mutant("kto_reference_point_unclamped", "algos", "rlhf/algos/preference.py", "KTO's z0 may go below 0",
           "(kl_logps - kl_ref_logps).mean().clamp(min=0).detach()", "(kl_logps - kl_ref_logps).mean().detach()",
           (U + "test_preference_algos.py::test_kto_exact_cases_and_reference_point",)),
    Mutant("bradley_terry_sign", "algos", "rlhf/algos/reward.py", "pairwise loss prefers the worse response",
           "gap = rewards[better] - rewards[worse]", "gap = rewards[worse] - rewards[better]",
           (U + "test_reward.py::test_bradley_terry_k_way_matches_a_float64_loop",)),
    Mutant("reward_read_right_padding_only", "algos", "rlhf/algos/reward.py", "last real token = length - 1 (wrong under left padding)",
           "return (positions * attention_mask.long()).argmax(dim=1)", "return attention_mask.long().sum(dim=1) - 1",
           (U + "test_reward.py::test_reward_is_read_at_the_last_real_token",)),
    Mutant("lm_loss_mask_dropped", "algos", "rlhf/algos/lm.py", "prompt and padding tokens counted in the SFT loss",
           "total = (nll * counted).sum()", "total = nll.sum()",
           (U + "test_lm_loss.py::test_tokens_outside_the_mask_change_nothing",)),
    Mutant("best_of_n_cut_may_win", "algos", "rlhf/algos/best_of_n.py", "a response cut without EOS can be kept",
           "cand = torch.where(ended.any(dim=1, keepdim=True), ended, torch.ones_like(ended))", "cand = torch.ones_like(ended)",
           (U + "test_best_of_n.py::test_an_ended_response_beats_a_cut_one_whatever_their_rewards",)),
    # --- rlhf/store/start_record.py, rlhf/feedback/labelers.py, rlhf/feedback/judge.py, ties ------------------------------
    Mutant("start_record_seal_unchecked", "resume", "rlhf/store/start_record.py", "any start record verifies, whoever sealed it",
           "if key is None or not isinstance(seal, str) or not hmac.compare_digest(seal, _seal(key, data)):",
           "if key is None or not isinstance(seal, str):",
           (U + "test_start_record.py::test_a_record_verifies_only_under_its_key_registry_stage_and_folder",)),
    Mutant("label_equal_scores_not_tied", "data", "rlhf/feedback/labelers.py", "equal scores get different ranks",
           "if scores[order[head]] - scores[i] > tolerance:", "if scores[order[head]] - scores[i] >= tolerance:",
           (U + "test_labelers.py::test_rank_orders_best_first_and_ties_equal_scores",)),
    Mutant("tied_ranks_give_pairs", "data", "rlhf/data/tokenize.py", "a tie in a ranked list becomes a preference pair",
           "group.ranks is None or group.ranks[i] < group.ranks[j]", "group.ranks is None or group.ranks[i] <= group.ranks[j]",
           (U + "test_labelers.py::test_ties_give_no_pair_and_bad_ranks_are_one_line",)),
    Mutant("judge_one_order_only", "rewards", "rlhf/feedback/judge.py", "the judge is asked in one order: position bias stays",
           "better[i][j] = (first[(i, j)] + 1.0 - first[(j, i)]) / 2", "better[i][j] = first[(i, j)]",
           (U + "test_labelers.py::test_the_judge_prefers_by_both_orders_as_an_unbatched_float64_computation",)),
    # --- rlhf/store/ (the registry) ---------------------------------------------------------------
    Mutant("registry_latest_is_oldest", "registry", "rlhf/store/registry.py", "`stage:latest` resolves to the oldest entry",
           "                    return done[-1]", "                    return done[0]",
           (U + "test_registry.py::test_resolve_reference_forms",)),
    Mutant("registry_tag_file_stage_trusted", "registry", "rlhf/store/files.py", "a tag file's stage is used unchecked (../ traversal)",
           'd["entry"] or "", d["tagged"]\n        check_name("stage", stage)\n', 'd["entry"] or "", d["tagged"]\n',
           (U + "test_registry.py::test_names_read_from_a_tag_file_are_checked_not_trusted",)),
    Mutant("registry_tag_may_hold_a_slash", "registry", "rlhf/store/entry.py", "tag names may contain '/'",
           r'_TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")', r'_TAG_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,99}")',
           (U + "test_registry.py::test_invalid_tag_names_are_refused_before_any_write",)),
    # --- rlhf/training/checkpoint.py: sealing and safe loading --------------------------------------------
    Mutant("checkpoint_sha256_not_compared", "checkpoint", "rlhf/training/checkpoint.py", "manifest check compares sizes only, not SHA-256",
           '_digest(path)["sha256"] != expected["sha256"]', '_digest(path)["size"] != expected["size"]',
           (U + "test_checkpoint_manifest.py::test_damage_is_found_by_some_rank",)),
    Mutant("checkpoint_manifest_may_point_outside", "checkpoint", "rlhf/training/checkpoint.py", "a manifest may name ../ files",
           'if Path(name).is_absolute() or ".." in Path(name).parts:', "if Path(name).is_absolute():",
           (U + "test_checkpoint_manifest.py::test_a_manifest_cannot_point_outside_its_folder",)),
    Mutant("checkpoint_weights_only_off", "checkpoint", "rlhf/training/checkpoint.py", "`weights_only` flipped: resuming unpickles code",
           'kwargs["weights_only"] = True', 'kwargs["weights_only"] = False',
           (U + "test_checkpoint_manifest.py::test_every_load_while_resuming_refuses_pickled_code",)),
    # --- resume: rlhf/training/run_keeper.py, rlhf/training/tracking.py, checkpoint order ------------------------
    Mutant("resume_unknown_state_accepted", "resume", "rlhf/training/run_keeper.py", "a checkpoint's unknown state fields are not refused",
           "unknown = sorted(set(saved) - known)", "unknown = []",
           (U + "test_run_keeper.py::test_state_a_stage_does_not_know_is_refused",)),
    Mutant("resume_keeps_a_row_past_the_checkpoint", "resume", "rlhf/training/tracking.py",
           "metrics row one past the checkpoint not dropped",
           'elif row is not None and row["step"] <= step:', 'elif row is not None and row["step"] <= step + 1:',
           (U + "test_run_keeper.py::test_a_resume_drops_the_metric_rows_past_its_checkpoint",)),
    Mutant("resume_checkpoints_one_step_early", "resume", "rlhf/training/run_keeper.py", "periodic checkpoint at step k*N - 1",
           "state.step % train.save_every == 0", "(state.step + 1) % train.save_every == 0",
           (IT + "test_run_safety.py::test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one",), slow=True),
    Mutant("resume_from_the_oldest_checkpoint", "resume", "rlhf/training/checkpoint.py", "resume tries the oldest checkpoint first",
           'ckpt_dir.glob(f"{TAG_PREFIX}*") if p.is_dir()), reverse=True)', 'ckpt_dir.glob(f"{TAG_PREFIX}*") if p.is_dir()))',
           (IT + "test_run_safety.py::test_a_planted_pickle_payload_is_refused_in_one_line",), slow=True),
    Mutant("resume_torch_rng_not_restored", "resume", "rlhf/training/checkpoint.py",
           "a resume leaves torch's RNG where the new process seeded it",
           '    torch.set_rng_state(state["torch"])', "    torch.get_rng_state()",
           (IT + "test_resume.py::test_a_killed_run_resumes_to_the_weights_of_an_uninterrupted_run[ppo]",), slow=True),
    # --- rlhf/launcher/command.py ------------------------------------------------------------------------
    Mutant("launcher_num_gpus_flag", "launcher", "rlhf/launcher/command.py", "ranks passed to deepspeed as --num_nodes",
           'cmd += ["--num_gpus", str(spec.num_procs)', 'cmd += ["--num_nodes", str(spec.num_procs)',
           (U + "test_launch.py::test_deepspeed_command",)),
    Mutant("launcher_python_takes_many_ranks", "launcher", "rlhf/launcher/command.py", "--launcher python accepts -n 2 (runs one rank)",
           "if spec.num_procs != 1 or spec.hostfile:", "if spec.hostfile:",
           (U + "test_launch.py::test_torchrun_and_python_commands",)),
    Mutant("launcher_threads_not_split", "launcher", "rlhf/launcher/command.py", "every rank gets all cores' OpenMP threads",
           "str(max(1, usable_cores() // num_procs))", "str(max(1, usable_cores()))",
           (U + "test_launch.py::test_env_splits_cores_between_ranks_unless_user_set_it",)),
    # --- rlhf/cli/slurm.py -------------------------------------------------------------------------
    Mutant("slurm_stage_args_unquoted", "slurm", "rlhf/cli/slurm.py", "stage arguments joined without shell quoting",
           "{shlex.join(job.stage_args)}", '{" ".join(job.stage_args)}',
           (U + "test_slurm.py::test_hostile_values_arrive_as_single_literal_arguments",)),
    Mutant("slurm_backslash_not_doubled", "slurm", "rlhf/cli/slurm.py", "#SBATCH values: backslashes not escaped for sbatch",
           r'return "#SBATCH " + shlex.quote(arg).replace("\\", "\\\\")', 'return "#SBATCH " + shlex.quote(arg)',
           (U + "test_slurm.py::test_hostile_values_arrive_as_single_literal_arguments",)),
    Mutant("slurm_control_characters_allowed", "slurm", "rlhf/cli/slurm.py", "control characters (newlines) not refused",
           "bad = _CONTROL_RE.search(value)", "bad = None",
           (U + "test_slurm.py::test_control_characters_are_refused_before_anything_is_written",)),
    # --- rlhf/data -----------------------------------------------------------------------------
    Mutant("tokenize_mask_shifted", "data", "rlhf/data/tokenize.py", "response mask starts one token early (last prompt token)",
           "response_mask=[False] * len(p) + [True] * len(r)", "response_mask=[False] * (len(p) - 1) + [True] * (len(r) + 1)",
           (U + "test_data.py::test_sft_mask_hand_checked",)),
    Mutant("tokenize_cut_keeps_eos", "data", "rlhf/data/tokenize.py", "a truncated response still ends in EOS",
           "        return response[:room]", "        return response[: room - 1] + [eos]",
           (U + "test_data.py::test_sft_truncation_counted",)),
    Mutant("hh_split_at_raw_common_prefix", "data", "rlhf/data/formats.py", "hh-rlhf prompt cut at the common prefix, not the marker",
           "cut = marker + len(ASSISTANT_MARKER) if marker >= 0 else n", "cut = n",
           (U + "test_data.py::test_hh_rlhf_prefix_split",)),
    Mutant("sampler_ranks_overlap", "data", "rlhf/data/sampler.py", "a step's slice ignores world_size: ranks share rows",
           "start = within * self.batch_size * self.world_size", "start = within * self.batch_size",
           (U + "test_sampler.py::test_each_epoch_covers_rows_once_split_across_ranks",)),
    # --- rlhf/rollouts/rewards.py -----------------------------------------------------------------------
    Mutant("rewards_weights_ignored", "rewards", "rlhf/rollouts/rewards.py", "reward components summed without their weights",
           "weighted = source.weight * scaled[source.text].to(dtype)", "weighted = scaled[source.text].to(dtype)",
           (U + "test_rewards.py::test_weighted_sum_matches_a_float64_loop",)),
    Mutant("rewards_normalized_by_multiplying", "rewards", "rlhf/rollouts/rewards.py", "learned score multiplied by its std",
           "(learned - self.mean) / self.std", "(learned - self.mean) * self.std",
           (U + "test_rewards.py::test_a_lone_reward_model_gives_todays_shaped_score_bit_for_bit",)),
    Mutant("rewards_nan_accepted", "rewards", "rlhf/rollouts/rewards.py", "a function's NaN score is accepted",
           "if not math.isfinite(value):", "if math.isinf(value):",
           (U + "test_rewards.py::test_a_function_that_fails_stops_in_one_line_naming_it",)),
    # --- rlhf/stages/*.py ---------------------------------------------------------------------------
    Mutant("ppo_score_rows_miss_a_logit_column", "stages", "rlhf/stages/ppo_rollout.py",
           "scoring budget counts episode_tokens(), not + 1, columns",
           "SCORE_LOGITS_BUDGET // ((r.episode_tokens() + 1) * vocab_size * 4)",
           "SCORE_LOGITS_BUDGET // (r.episode_tokens() * vocab_size * 4)",
           (U + "test_ppo_score_batch.py::test_the_logits_budget_bounds_the_rows_between_the_minibatch_and_the_batch",)),
    Mutant("ppo_generation_logprobs_in_bf16", "stages", "rlhf/stages/ppo_rollout.py", "old log-probs from generation's logits in bf16 too",
           'r.logprobs_from_generation and cfg.engine.precision == "fp32" and kept', "r.logprobs_from_generation and kept",
           (U + "test_ppo_logprob_source.py::test_otherwise_the_actor_forward",)),
    Mutant("dpo_kl_partner_off_by_one", "stages", "rlhf/stages/dpo_batches.py",
           "KTO's KL partner offset (n - 1) // 2: row 0 of 2 meets itself",
           "return (i + n // 2) % n", "return (i + (n - 1) // 2) % n",
           (U + "test_dpo_data.py::test_kto_kl_partners_are_mismatched_and_fixed",)),
    Mutant("sft_loss_scale_ignores_ranks", "stages", "rlhf/stages/sft.py", "SFT loss divided by all ranks' tokens on each rank",
           "scale = global_tokens / (dist.world_size * accum)", "scale = global_tokens / accum",
           (IT + "test_sft_cli.py::test_two_ranks_learn_under_zero",), slow=True),
    Mutant("rm_pairs_swapped", "stages", "rlhf/stages/rm.py", "RM step trains on (worse, better)",
           'bradley_terry_loss(rewards, batch["better"], batch["worse"],', 'bradley_terry_loss(rewards, batch["worse"], batch["better"],',
           (IT + "test_rm_cli.py::test_zero3_from_an_sft_entry",), slow=True),
    Mutant("ppo_kl_controller_stalled", "stages", "rlhf/stages/ppo.py", "adaptive beta updated with n_steps=0: it never moves",
           "n_steps=responses)", "n_steps=0)",
           (IT + "test_ppo_cli.py::test_two_ranks_zero3_with_ptx_and_adaptive_beta",), slow=True),
)


# --- the table ------------------------------------------------------------------------------------


def file_of(node_id: str) -> str:
    return node_id.split("::", 1)[0]


def missing_test(node_id: str, repo: Path) -> str | None:
    """Why `node_id` names no test (None when its file defines it): tests get renamed and moved."""
    path = repo / file_of(node_id)
    if not path.is_file():
        return f"no test file {file_of(node_id)}"
    function = node_id.split("::")[-1].split("[")[0] if "::" in node_id else None
    if function and f"def {function}(" not in path.read_text(encoding="utf-8"):
        return f"no test {function} in {file_of(node_id)}"
    return None


def table_problems(mutants: tuple[Mutant, ...], repo: Path = REPO) -> list[str]:
    """Why the table cannot run as it stands (empty when it can): names, areas, snippets, test files."""
    problems = []
    names = [m.name for m in mutants]
    problems += [f"{name}: the name is used twice" for name in sorted({n for n in names if names.count(n) > 1})]
    for m in mutants:
        path = repo / m.path
        if m.area not in AREAS:
            problems.append(f"{m.name}: unknown area {m.area!r} (one of {', '.join(AREAS)})")
        if m.mutated == m.original:
            problems.append(f"{m.name}: the replacement equals the original")
        if not m.tests:
            problems.append(f"{m.name}: names no test")
        problems += [f"{m.name}: {why}" for why in (missing_test(t, repo) for t in m.tests) if why]
        if not path.is_file():
            problems.append(f"{m.name}: no file {m.path}")
            continue
        text = path.read_text(encoding="utf-8")
        count = text.count(m.original)
        if count != 1:
            left = " and holds the mutant instead: a mutant left in place? (see `git diff`)" if not count and m.mutated in text else ""
            problems.append(f"{m.name}: its snippet occurs {count} times in {m.path}, not once{left}: update the table")
    return problems


# --- planting and restoring -----------------------------------------------------------------------


def journal_path(repo: Path) -> Path:
    """Where the mutant in place is recorded, outside the checkout (survives a SIGKILL of this script)."""
    return Path(tempfile.gettempdir()) / f"rlhf-mutants-{hashlib.sha1(str(repo).encode()).hexdigest()[:12]}.json"


def write_atomically(path: Path, data: bytes, mtime_ns: int | None = None) -> None:
    """Readers (another pytest in this checkout) see the old bytes or the new, never half a file."""
    tmp = path.with_name(f".{path.name}.mutants-tmp")
    tmp.write_bytes(data)
    shutil.copymode(path, tmp)
    if mtime_ns is not None:
        os.utime(tmp, ns=(mtime_ns, mtime_ns))
    os.replace(tmp, path)


class Planter:
    """Puts one mutant at a time into its file and always takes it out again."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.journal = journal_path(repo)
        self.applied: dict | None = None
        self.child: subprocess.Popen | None = None
        self._lock = None

    def lock(self) -> bool:
        """Whether this is the only run planting faults in this checkout (held until exit)."""
        self._lock = open(self.journal.with_suffix(".lock"), "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def guard(self) -> None:
        """Restore on exit and on the signals that end a run (the pytest child is ended first)."""
        atexit.register(self.restore)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.child is not None and self.child.poll() is None:
            self.child.terminate()
            try:
                self.child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.child.kill()
        self.restore()
        raise SystemExit(128 + signum)

    def recover(self) -> None:
        """A run killed with its mutant in place (SIGKILL, a crash): take that mutant out first."""
        if self.journal.is_file():
            self.applied = json.loads(self.journal.read_text())
            print(f"mutants: restoring {self.applied['path']}, left mutated by an earlier run", file=sys.stderr)
            self.restore()

    def apply(self, m: Mutant) -> None:
        path = self.repo / m.path
        original = path.read_bytes()
        text = original.decode("utf-8")
        if text.count(m.original) != 1:
            raise SnippetMoved(f"{m.name}: its snippet no longer occurs exactly once in {m.path}")
        mtime_ns = path.stat().st_mtime_ns
        # A .pyc is trusted when the source's size and whole-second mtime match: never let the mutant share the original's second.
        mutant_mtime = max(time.time_ns(), mtime_ns + 2_000_000_000)
        self.applied = {"path": m.path, "original": b64(original), "mutated": b64(text.replace(m.original, m.mutated).encode("utf-8")),
                        "mtime_ns": mtime_ns, "original_snippet": m.original, "mutated_snippet": m.mutated}
        self.journal.write_text(json.dumps(self.applied))  # before the file changes: a kill from here on is recoverable
        write_atomically(path, unb64(self.applied["mutated"]), mutant_mtime)

    def restore(self) -> None:
        """Put the original bytes and mtime back; idempotent. An edit someone made meanwhile is kept."""
        if self.applied is None:
            return
        a, path = self.applied, self.repo / self.applied["path"]
        original, mutated = unb64(a["original"]), unb64(a["mutated"])
        current = path.read_bytes() if path.is_file() else None
        if current is None:  # deleted meanwhile
            path.write_bytes(original)
        elif current == mutated:
            write_atomically(path, original, a["mtime_ns"])
        elif current != original:
            self._restore_edited(path, current, original)
        path.with_name(f".{path.name}.mutants-tmp").unlink(missing_ok=True)  # a write cut short by a signal
        self.journal.unlink(missing_ok=True)
        self.applied = None

    def _restore_edited(self, path: Path, current: bytes, original: bytes) -> None:
        """Someone changed the file while the mutant was in it: take out only the fault, keep their edit."""
        a = self.applied
        text = current.decode("utf-8", errors="surrogateescape")
        if text.count(a["mutated_snippet"]) == 1 and text.count(a["original_snippet"]) == 0:
            write_atomically(path, text.replace(a["mutated_snippet"], a["original_snippet"]).encode("utf-8", errors="surrogateescape"))
            print(f"mutants: {a['path']} was edited during the run; took the fault out and kept the edit", file=sys.stderr)
            return
        kept = self.journal.with_name(f"{self.journal.stem}-{path.name}.edited")
        kept.write_bytes(current)
        write_atomically(path, original, a["mtime_ns"])
        print(f"mutants: {a['path']} was edited during the run; restored the original, the edited version is in {kept}", file=sys.stderr)


class SnippetMoved(Exception):
    """The file changed since the table was checked (someone is editing it)."""


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text)


# --- running --------------------------------------------------------------------------------------


@dataclass
class Outcome:
    result: str
    """killed, SURVIVED, or error (...) for any other end of the run."""
    seconds: float
    tail: str = ""


def run_pytest(planter: Planter, tests: tuple[str, ...], timeout: float) -> tuple[int | None, float, str]:
    """(pytest's exit status or None on timeout, seconds, the output's last lines); serial, one thread."""
    # No .pyc is written for a mutated module, so none can outlive the mutant.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    started = time.monotonic()
    planter.child = subprocess.Popen([sys.executable, *PYTEST, *tests], cwd=planter.repo, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = planter.child.communicate(timeout=timeout)
        code = planter.child.returncode
    except subprocess.TimeoutExpired:
        planter.child.kill()
        output, _ = planter.child.communicate()
        code = None
    finally:
        planter.child = None
    return code, time.monotonic() - started, "\n".join(output.strip().splitlines()[-15:])


def judge(code: int | None) -> str:
    if code is None:
        return "error (timeout)"
    # pytest: 1 = a test failed; 2 interrupted or collection error, 4 usage (an unknown node id), 5 nothing collected.
    return {0: "SURVIVED", 1: "killed"}.get(code, f"error (exit {code})")


def run_mutant(planter: Planter, m: Mutant, timeout: float) -> Outcome:
    try:
        planter.apply(m)
    except SnippetMoved as exc:
        return Outcome("error (snippet moved)", 0.0, str(exc))
    try:
        code, seconds, tail = run_pytest(planter, m.tests, timeout)
    finally:
        planter.restore()
    return Outcome(judge(code), seconds, tail)


def baseline_ok(planter: Planter, mutants: list[Mutant], timeout: float) -> bool:
    """The named tests pass on the unmutated code; else a failure would pass for a kill."""
    tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
    print(f"baseline: {len(tests)} test node(s) on the unmutated code ...", file=sys.stderr, flush=True)
    code, seconds, tail = run_pytest(planter, tests, timeout * 2)
    print(f"baseline: {judge(code).replace('SURVIVED', 'passed')} in {seconds:.0f} s", file=sys.stderr)
    if code != 0:
        print(tail, file=sys.stderr)
    return code == 0


# --- the report -----------------------------------------------------------------------------------


def markdown(mutants: list[Mutant], outcomes: dict[str, Outcome] | None = None) -> str:
    """The table: with results and seconds after a run, with the area and `slow` for --list."""
    if outcomes is None:
        head = ["mutant", "area", "file", "fault", "tests", "slow"]
        rows = [[m.name, m.area, m.path, m.fault, tests_cell(m), "slow" if m.slow else ""] for m in mutants]
    else:
        head = ["mutant", "file", "fault", "tests", "result", "seconds"]
        rows = [[m.name, m.path, m.fault, tests_cell(m), outcomes[m.name].result, f"{outcomes[m.name].seconds:.1f}"]
                for m in mutants if m.name in outcomes]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows])


def tests_cell(m: Mutant) -> str:
    return "<br>".join(f"`{t}`" for t in m.tests)


def summary(outcomes: dict[str, Outcome]) -> str:
    results = [o.result for o in outcomes.values()]
    errors = sum(r.startswith("error") for r in results)
    return f"{results.count('killed')} killed, {results.count('SURVIVED')} survived, {errors} error(s) of {len(results)} mutants"


# --- main -----------------------------------------------------------------------------------------


def selected(args: argparse.Namespace) -> list[Mutant]:
    by_name = {m.name: m for m in MUTANTS}
    unknown = [n for n in args.only or () if n not in by_name]
    if unknown:
        raise SystemExit(f"mutants: no mutant {', '.join(unknown)}; `--list` shows them")
    chosen = [by_name[n] for n in dict.fromkeys(args.only)] if args.only else list(MUTANTS)
    return [m for m in chosen if not (args.fast and m.slow)]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Plant each fault of the table, run the tests named for it, restore the file.")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    parser.add_argument("--fast", action="store_true", help="skip the slow mutants (only integration tests catch them)")
    parser.add_argument("--list", action="store_true", help="print the table and exit")
    parser.add_argument("--out", type=Path, help="also write the Markdown table to this file")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per mutant's test run (default 900)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run of the named tests on the unmutated code")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mutants = selected(args)
    planter = Planter(REPO)
    if planter.lock():
        planter.recover()
    elif not args.list:
        print("mutants: another run of this script is planting faults in this checkout; wait for it to end", file=sys.stderr)
        return 2
    problems = table_problems(tuple(mutants))
    if args.list:
        print(markdown(mutants))
    if problems:
        print("mutants: the table does not match the code:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    if args.list:
        return 0
    planter.guard()
    if not args.no_baseline and not baseline_ok(planter, mutants, args.timeout):
        print("mutants: the named tests fail without any mutant; fix them first", file=sys.stderr)
        return 2
    outcomes: dict[str, Outcome] = {}
    for i, m in enumerate(mutants, 1):
        print(f"[{i}/{len(mutants)}] {m.name} ...", end=" ", file=sys.stderr, flush=True)
        outcomes[m.name] = run_mutant(planter, m, args.timeout)
        print(f"{outcomes[m.name].result} ({outcomes[m.name].seconds:.1f} s)", file=sys.stderr, flush=True)
        if outcomes[m.name].result != "killed":
            print(outcomes[m.name].tail, file=sys.stderr)
    table = markdown(mutants, outcomes)
    print(table + "\n\n" + summary(outcomes))
    if args.out:
        args.out.write_text(table + "\n\n" + summary(outcomes) + "\n")
    return 0 if all(o.result == "killed" for o in outcomes.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
