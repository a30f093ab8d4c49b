"""Retry rules: what a C-STORE status means for a delivery, and capped exponential backoff with jitter."""

from __future__ import annotations

import random

import pytest

from gateway.config import RetryPolicy
from gateway.retry import Outcome, backoff_delay, classify_status


def policy(
    initial_delay: float = 5.0,
    max_delay: float = 600.0,
    factor: float = 2.0,
    jitter: float = 0.0,
    max_attempts: int = 10,
) -> RetryPolicy:
    return RetryPolicy(
        initial_delay=initial_delay,
        max_delay=max_delay,
        factor=factor,
        jitter=jitter,
        max_attempts=max_attempts,
    )


def seeded(seed: int) -> random.Random:
    """A reproducible random source for the jitter."""
    return random.Random(seed)  # noqa: S311 - jitter spreads retries; it needs no cryptography


# ---------------------------------------------------------------- classify_status


@pytest.mark.parametrize(
    "status",
    [
        0x0000,  # success
        0x0001,  # warning: elements coerced (PS3.7 C)
        0xB000,  # warning: coercion of data elements
        0xB006,  # warning: elements discarded
        0xB007,  # warning: data set does not match SOP class
    ],
)
def test_success_and_warnings_mean_the_archive_kept_the_object(status):
    assert classify_status(status) is Outcome.DONE


@pytest.mark.parametrize("status", [0xA700, 0xA701, 0xA7FF])
def test_out_of_resources_is_transient(status):
    assert classify_status(status) is Outcome.TRANSIENT


@pytest.mark.parametrize(
    "status",
    [
        0xA900,  # data set does not match SOP class (error)
        0xC000,  # cannot understand
        0xC123,  # another cannot-understand code
        0x0122,  # SOP class not supported
        0x0111,  # duplicate SOP instance
        0xA800,  # just past the Out of Resources range: not "out of resources"
    ],
)
def test_other_failures_are_permanent_refusals(status):
    assert classify_status(status) is Outcome.PERMANENT


# ---------------------------------------------------------------- backoff_delay without jitter


def test_first_retry_waits_the_initial_delay():
    assert backoff_delay(policy(), 1) == 5.0


def test_attempt_zero_also_waits_the_initial_delay():
    assert backoff_delay(policy(), 0) == 5.0


def test_delay_grows_by_factor_per_attempt():
    delays = [backoff_delay(policy(initial_delay=1.0, factor=2.0, max_delay=1000.0), n) for n in range(1, 7)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]


def test_delay_grows_by_a_non_integer_factor():
    delays = [backoff_delay(policy(initial_delay=2.0, factor=1.5, max_delay=1000.0), n) for n in range(1, 4)]
    assert delays == pytest.approx([2.0, 3.0, 4.5])


def test_delay_is_capped_at_max_delay():
    rule = policy(initial_delay=5.0, max_delay=60.0, factor=2.0)
    delays = [backoff_delay(rule, n) for n in range(1, 9)]
    assert delays == [5.0, 10.0, 20.0, 40.0, 60.0, 60.0, 60.0, 60.0]


@pytest.mark.parametrize("attempt", [1_025, 5_000, 1_000_000])
def test_delay_stays_capped_after_very_many_attempts(attempt):
    # Transient refusals retry without limit, and a destination down for a long holiday keeps counting
    # probe failures: the attempt count grows without bound, the delay must not (nor raise).
    rule = policy(initial_delay=5.0, max_delay=600.0, factor=2.0)
    assert backoff_delay(rule, attempt) == 600.0
    assert backoff_delay(policy(initial_delay=5.0, max_delay=600.0, factor=2.0, jitter=0.2), attempt) <= 600.0


def test_factor_one_keeps_a_fixed_delay():
    assert {backoff_delay(policy(initial_delay=3.0, factor=1.0), n) for n in range(1, 20)} == {3.0}


def test_without_jitter_the_random_source_is_not_used():
    rng = seeded(1)
    state = rng.getstate()
    assert backoff_delay(policy(jitter=0.0), 3, rng) == 20.0
    assert rng.getstate() == state


# ---------------------------------------------------------------- backoff_delay with jitter


@pytest.mark.parametrize("attempt", [1, 2, 3, 4, 5])
def test_jitter_stays_within_its_fraction_of_the_base(attempt):
    rule = policy(initial_delay=5.0, max_delay=1000.0, factor=2.0, jitter=0.2)
    base = 5.0 * 2.0 ** (attempt - 1)
    rng = seeded(attempt)
    for _ in range(500):
        delay = backoff_delay(rule, attempt, rng)
        assert base * 0.8 <= delay <= base * 1.2


def test_jitter_never_exceeds_max_delay_nor_goes_below_zero():
    rule = policy(initial_delay=5.0, max_delay=60.0, factor=2.0, jitter=1.0)
    rng = seeded(7)
    for attempt in range(12):
        for _ in range(200):
            assert 0.0 <= backoff_delay(rule, attempt, rng) <= 60.0


def test_jitter_at_the_cap_only_spreads_downwards():
    rule = policy(initial_delay=5.0, max_delay=60.0, factor=2.0, jitter=0.25)
    rng = seeded(3)
    delays = [backoff_delay(rule, 10, rng) for _ in range(500)]
    assert all(45.0 <= d <= 60.0 for d in delays)
    assert min(delays) < 50.0  # the spread is really used


def test_jitter_spreads_gateways_apart():
    rule = policy(initial_delay=5.0, max_delay=600.0, factor=2.0, jitter=0.2)
    delays = [backoff_delay(rule, 3, seeded(seed)) for seed in range(20)]
    assert len(set(delays)) > 10, "different random sources must not retry in lockstep"
    assert max(delays) - min(delays) > 2.0  # base 20 s, +-4 s: a real spread, not rounding noise


def test_same_seed_gives_the_same_delays():
    rule = policy(jitter=0.2)
    first = [backoff_delay(rule, n, seeded(42)) for n in range(1, 6)]
    second = [backoff_delay(rule, n, seeded(42)) for n in range(1, 6)]
    assert first == second
