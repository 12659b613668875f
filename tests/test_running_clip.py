"""Progressive clipping's running estimate (core/running_clip.py) against a float64 reference written
from its definition: each weight's coefficient is Megatron's, min(1, clip / (norm + 1e-6)), of the
squared norm "the other parameters' share of the previous step + this step's sums of the weights
already updated + the previous step's sums of the rest", times the weight's multiplier."""

import math

import pytest
import torch

from forge_megatron import ForgeState
from forge_megatron.core.running_clip import RunningClip
from forge_megatron.core.table import StepTable

TILES = [3, 5, 2, 1]
MULTIPLIERS = [1.0, 0.5, 1.0, 2.0]
CLIP = 1.0


def _table(gen) -> StepTable:
    states = [ForgeState(torch.zeros(4, 4), "sgd", lr=0.1) for _ in TILES]
    table = StepTable(states, TILES, torch.device("cpu"))
    table.set_multipliers(MULTIPLIERS)
    for slots in table.slots:  # the previous step's by-products
        slots.stats[:, 0] = torch.rand(slots.stats.shape[0], generator=gen)
    return table


def _sums(table) -> list[float]:
    return [float(s.stats[:, 0].double().sum()) * m * m for s, m in zip(table.slots, MULTIPLIERS)]


def _coefficient(sumsq: float) -> float:
    return min(1.0, CLIP / (math.sqrt(sumsq) + 1e-6))


@pytest.mark.parametrize("order", [[3, 1, 0, 2], [0, 1, 2, 3]])
def test_each_coefficient_counts_the_updated_weights_now_and_the_rest_as_before(gen, order):
    table = _table(gen)
    previous = _sums(table)
    previous_norm = math.sqrt(sum(previous) + 0.7)  # the other parameters' share: 0.7
    running = RunningClip(table, CLIP, previous_norm, fallback=0.123)
    now = list(previous)
    for i in order:
        table.slots[i].coefs[0] = float("nan")  # unwritten would fail
        running.before(table.slots[i])
        expected = _coefficient(0.7 + sum(now)) * MULTIPLIERS[i]
        assert float(table.slots[i].coefs[0]) == pytest.approx(expected, rel=1e-6), i
        # the weight's kernel writes this step's by-products (here 2-40x the previous: the norm grows)
        table.slots[i].stats[:, 0] *= 2.0 + 38.0 * torch.rand((), generator=gen)
        now[i] = _sums(table)[i]
        running.after(table.slots[i])
    coefficients = [float(c) for c in running.coefficients]
    effective = math.sqrt(sum(c * c * s for c, s in zip(coefficients, now)) / sum(now))
    assert running.effective_coefficient() == pytest.approx(effective, rel=1e-9)


def test_a_spike_in_an_updated_weight_shrinks_every_later_coefficient(gen):
    table = _table(gen)
    previous_norm = math.sqrt(sum(_sums(table)))
    running = RunningClip(table, CLIP, previous_norm, fallback=0.5)
    first, later = table.slots[3], table.slots[0]
    running.before(first)
    assert float(first.coefs[0]) == pytest.approx(_coefficient(previous_norm ** 2) * MULTIPLIERS[3], rel=1e-6)
    first.stats[:, 0] *= 100.0  # the norm of this weight's gradient jumps 10x
    running.after(first)
    running.before(later)
    sums = _sums(table)
    assert float(later.coefs[0]) == pytest.approx(_coefficient(sum(sums)), rel=1e-6)
    assert float(later.coefs[0]) < 0.5 * _coefficient(previous_norm ** 2)


def test_a_non_finite_sum_is_left_out_and_a_non_finite_estimate_falls_back(gen):
    table = _table(gen)
    previous = _sums(table)
    running = RunningClip(table, CLIP, None, fallback=0.25)  # first step: no previous norm
    bad = table.slots[1]
    running.before(bad)
    bad.stats[0, 0] = float("nan")
    running.after(bad)
    running.before(table.slots[2])
    assert float(table.slots[2].coefs[0]) == pytest.approx(_coefficient(sum(previous)) * MULTIPLIERS[2], rel=1e-6)
    table.slots[0].stats[0, 0] = float("inf")  # a previous step's non-finite by-product counts as 0
    overflow = RunningClip(table, CLIP, 1e200, fallback=0.25)  # the norm squared overflows
    overflow.before(table.slots[3])
    assert float(table.slots[3].coefs[0]) == pytest.approx(0.25 * MULTIPLIERS[3])
