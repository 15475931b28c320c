"""include/backoff.py: the guide's "Exponential backoff is applied: 5m, 10m, 20m (capped at 30m)"."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from include.backoff import retry_delay, retry_schedule
from include.spec import RetryPolicy, format_duration


def test_defaults_follow_the_guide():
    policy = RetryPolicy()
    assert retry_schedule(policy) == [300, 600, 1200]
    assert retry_delay(policy, 4) == 1800  # 40m capped at 30m
    assert retry_delay(policy, 10) == 1800


def test_schedule_length_is_max_attempts():
    assert retry_schedule(RetryPolicy(maxAttempts=5)) == [300, 600, 1200, 1800, 1800]
    assert retry_schedule(RetryPolicy(maxAttempts=1)) == [300]
    assert retry_schedule(RetryPolicy(maxAttempts=0)) == []


def test_scenario_3_policy():
    # maxAttempts 5, backoffDuration 10m: 10m, 20m, then capped at the default 30m
    assert retry_schedule(RetryPolicy(maxAttempts=5, backoffDuration="10m")) == [600, 1200, 1800, 1800, 1800]


def test_composite_and_sub_second_durations():
    assert retry_schedule(RetryPolicy(maxAttempts=3, backoffDuration="1m30s", maxBackoffDuration="5m")) == [
        90, 180, 300]
    assert retry_delay(RetryPolicy(backoffDuration="500ms", maxBackoffDuration="1h"), 3) == pytest.approx(2.0)


@pytest.mark.parametrize("retry_number", [0, -1])
def test_retry_numbers_start_at_one(retry_number):
    with pytest.raises(ValueError, match="starts at 1"):
        retry_delay(RetryPolicy(), retry_number)


policies = st.builds(
    lambda backoff, extra, attempts: RetryPolicy(maxAttempts=attempts, backoffDuration=format_duration(backoff),
                                                 maxBackoffDuration=format_duration(backoff + extra)),
    st.integers(1, 7200), st.integers(0, 86_400), st.integers(0, 30),
)


@given(policies)
def test_schedule_properties(policy):
    schedule = retry_schedule(policy)
    assert len(schedule) == policy.maxAttempts
    # monotone non-decreasing
    assert all(a <= b for a, b in zip(schedule, schedule[1:]))
    # never above the cap, never below the first delay
    assert all(policy.backoff_seconds <= d <= policy.max_backoff_seconds for d in schedule)
    if schedule:
        assert schedule[0] == policy.backoff_seconds


@given(policies, st.integers(1, 1000))
def test_delay_properties(policy, n):
    delay = retry_delay(policy, n)
    assert delay <= policy.max_backoff_seconds
    assert delay >= retry_delay(policy, max(n - 1, 1))
    # exact exponential until the cap is reached
    uncapped = policy.backoff_seconds * 2 ** (n - 1)
    assert delay == min(uncapped, policy.max_backoff_seconds)
    if delay < policy.max_backoff_seconds:
        assert retry_delay(policy, n + 1) == min(2 * delay, policy.max_backoff_seconds)


def test_delay_is_capped_for_very_large_retry_numbers():
    assert retry_delay(RetryPolicy(), 2000) == 1800
