"""retryPolicy as retry delays: exponential from backoffDuration, capped at maxBackoffDuration."""

from __future__ import annotations

from include.spec import RetryPolicy


def backoff_delay(backoff_seconds: float, max_backoff_seconds: float, retry_number: int) -> float:
    """Seconds to wait before retry ``retry_number`` (1-based): 5m, 10m, 20m, then 30m for the guide's defaults."""
    if retry_number < 1:
        raise ValueError("retry_number starts at 1")
    if retry_number > 64:  # 2**63 times any backoff is past every cap; avoid float overflow
        return max_backoff_seconds
    return min(backoff_seconds * (2 ** (retry_number - 1)), max_backoff_seconds)


def retry_delay(policy: RetryPolicy, retry_number: int) -> float:
    return backoff_delay(policy.backoff_seconds, policy.max_backoff_seconds, retry_number)


def retry_schedule(policy: RetryPolicy) -> list[float]:
    """Every delay a task may wait, in order (``maxAttempts`` retries)."""
    return [retry_delay(policy, n) for n in range(1, policy.maxAttempts + 1)]
