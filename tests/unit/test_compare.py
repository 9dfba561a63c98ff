"""`rlhf compare`'s choice of methods (`--methods`) and its table rows, without running a stage
(tests/integration/test_compare.py runs them)."""

from __future__ import annotations

import pytest

from rlhf.cli.compare import chosen_methods, measured, methods
from rlhf.errors import UserError


def test_every_method_unless_some_are_named_in_the_tables_order():
    every = methods(quick=True)
    assert chosen_methods(None, quick=True) == every
    assert len({m.key for m in every}) == len(every) == 12
    assert [m.key for m in chosen_methods(" kto, ppo ", quick=True)] == ["ppo", "kto"]


@pytest.mark.parametrize("text", ["ppo,nosuch", "", ","])
def test_an_unknown_or_empty_choice_is_refused_naming_the_keys(text):
    with pytest.raises(UserError, match="choose from bon, ppo, grpo, rloo, reinforce_pp, dapo, gspo, dpo, ipo, kto, simpo, orpo"):
        chosen_methods(text, quick=False)


def test_best_of_n_reports_its_largest_n_and_the_kl_bound():
    [bon] = chosen_methods("bon", quick=True)
    metrics = {"best_of_1_oracle_score": 50.0, "best_of_4_oracle_score": 70.0, "best_of_2_oracle_score": 60.0,
               "best_of_4_kl_bound": 0.6363}
    row = measured(bon, {"id": "bon-1", "metrics": metrics}, wall_s=3.0, peak_mib=200.0)
    assert (row.oracle_sampled, row.oracle_greedy, row.kl) == (70.0, None, 0.6363)
    assert row.command == "rlhf bon --launcher python " + " ".join(bon.args)
