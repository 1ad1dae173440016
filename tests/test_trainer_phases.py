"""The trainer's pure phases: the time-budget planner and the run-start check."""

import pytest

from spaf_edge.core.config import SpAFConfig
from spaf_edge.core.errors import ConfigError
from spaf_edge.training.trainer import (
    BUDGET_PROBE,
    TimeBudget,
    check_run_start,
    recipe_of,
    train_run,
)


def budget_points(first_step, planned, last_step):
    """The steps at which a TimeBudget opens its probe window and checks its plan (which never moves here)."""
    budget = TimeBudget(100.0, planned, first_step, now=0.0)
    windows, checks = [], []
    for step in range(first_step + 1, last_step + 1):
        if budget.opens_window(step):
            windows.append(step)
        elif budget.check_due(step):
            checks.append(step)
            budget.checked(float(step), step, planned)
    return windows, checks


def test_budget_checks_at_doubling_steps_until_half_the_plan():
    assert BUDGET_PROBE == (5, 25)
    assert budget_points(0, 10_000, 10_000) == ([5], [25, 50, 100, 200, 400, 800, 1600, 3200])
    # A resumed run counts from its first step.
    assert budget_points(100, 1100, 1100) == ([105], [125, 150, 200, 300, 500])
    # A run too short for the probe is never re-planned.
    assert budget_points(0, 24, 24) == ([5], [])


def test_budget_step_time_is_measured_over_the_open_window():
    budget = TimeBudget(100.0, 1000, 0, now=0.0)
    budget.open_window(2.0, 5)
    assert budget.seconds_per_step(10.0, 25) == pytest.approx(0.4)
    budget.checked(11.0, 25, 1000)
    assert budget.seconds_per_step(21.0, 50) == pytest.approx(0.4)


def test_first_plan_always_applies_later_ones_only_past_the_tolerance():
    budget = TimeBudget(100.0, 1000, 0, now=0.0)
    # First check: 95 % of the 90 s left at 0.4 s/step is 213 more steps.
    assert budget.plan(25, 1000, elapsed=10.0, per_step=0.4) == 238
    # Later: 237 is within 5 % of the 188 steps left of a plan of 238, so the plan stays ...
    assert budget.plan(50, 238, elapsed=21.0, per_step=0.4) is None
    # ... but moves up or down when the step time changed more.
    assert budget.plan(50, 238, elapsed=21.0, per_step=0.2) == 425
    assert budget.plan(50, 238, elapsed=21.0, per_step=0.5) == 200
    # Never past the requested steps; a budget longer than the run changes nothing.
    assert budget.plan(50, 238, elapsed=21.0, per_step=0.01) == 1000
    assert TimeBudget(3600.0, 30, 0, now=0.0).plan(25, 30, elapsed=5.0, per_step=0.2) is None


@pytest.mark.parametrize("resume, init_from, spaf_options, message", [
    (True, "components", (), "--resume continues a run's checkpoint; --init-from starts a new run"),
    (True, None, ("--config",), "--resume keeps the saved SpAF config: drop --config"),
    (False, "components", ("--config",), "--init-from keeps its components' SpAF config: drop --config"),
])
def test_run_start_refuses_contradictory_options(resume, init_from, spaf_options, message):
    with pytest.raises(ConfigError, match=message):
        check_run_start(resume, init_from, spaf_options)


def test_init_from_may_change_the_loss_recipe_but_resume_may_not():
    check_run_start(False, "components", (), ("--rollout-decay", "--topk-weight"))
    with pytest.raises(ConfigError, match="--resume keeps the saved SpAF config: drop --rollout-decay"):
        check_run_start(True, None, (), ("--rollout-decay",))
    components = SpAFConfig(cutoff_layer=2, adapter_kind="attention").resolved(4)
    recipe = components.with_recipe(rollout_decay=0.7, topk_weight=0.5, rollout_steps=2)
    changed = recipe_of(components, recipe, 4, "components")
    assert (changed.alignment_rollout_decay, changed.loss_weights.topk, changed.alignment_rollout_steps) == (
        0.7, 0.5, 2)
    assert changed.differs_beyond_recipe(components) == []
    with pytest.raises(ConfigError, match="keeps its components' modules: the config given changes adapter_kind"):
        recipe_of(components, recipe.replace(adapter_kind="fused"), 4, "components")


@pytest.mark.parametrize("resume, init_from", [(False, None), (True, None), (False, "components")])
def test_run_start_accepts_one_source(resume, init_from):
    check_run_start(resume, init_from, spaf_options=())
    if not (resume or init_from):
        check_run_start(resume, init_from, spaf_options=("--config",))


def test_train_run_refuses_a_config_the_run_would_not_use(tmp_path):
    """The library call refuses what the CLI refuses, in the same words, before loading anything (a config
    with --init-from may change the loss recipe: checked once the components are loaded, by recipe_of)."""
    with pytest.raises(ConfigError, match="--resume keeps the saved SpAF config"):
        train_run(None, "data.jsonl", tmp_path, config=SpAFConfig(), resume=True)
