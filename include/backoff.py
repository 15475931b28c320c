"""retryPolicy as retry delays: exponential from backoffDuration, capped at maxBackoffDuration."""

from __future__ import annotations

from include.spec import RetryPolicy


def retry_delay(policy: RetryPolicy, retry_number: int) -> float:
    """Seconds to wait before retry ``retry_number`` (1-based): 5m, 10m, 20m, then 30m for the defaults."""
    if retry_number < 1:
        raise ValueError("retry_number starts at 1")
    delay = policy.backoff_seconds * (2 ** (retry_number - 1))
    return min(delay, policy.max_backoff_seconds)


def retry_schedule(policy: RetryPolicy) -> list[float]:
    """Every delay a task may wait, in order (``maxAttempts`` retries)."""
    return [retry_delay(policy, n) for n in range(1, policy.maxAttempts + 1)]
