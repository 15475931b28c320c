"""retryPolicy as an Airflow RetryPolicy: exact exponential delays, no retry for permanent errors."""

from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any

from airflow.sdk.definitions.retry_policy import RetryDecision, RetryPolicy

if TYPE_CHECKING:
    from airflow.sdk import Context


class MigrationRetryPolicy(RetryPolicy):
    """Delay before retry N is ``backoff * 2**(N-1)`` capped at ``max_backoff`` (5m, 10m, 20m, 30m for the
    guide's defaults), without Airflow's jitter; permanent migration errors are not retried.

    :param backoff_seconds: the spec's retryPolicy.backoffDuration, in seconds
    :param max_backoff_seconds: the spec's retryPolicy.maxBackoffDuration, in seconds
    """

    def __init__(self, backoff_seconds: float, max_backoff_seconds: float, *,
                 from_run_state: tuple[str, str] | None = None) -> None:
        self.backoff_seconds = float(backoff_seconds)
        self.max_backoff_seconds = float(max_backoff_seconds)
        #: (namespace, name): the DAG was shaped from its id alone (a worker whose store does not hold the
        #: migration): the delays are the retryPolicy of the spec the run keeps in its run state, when it has one
        self.from_run_state = from_run_state

    def _delays(self) -> tuple[float, float]:
        if self.from_run_state is None:
            return self.backoff_seconds, self.max_backoff_seconds
        try:
            from include.phases.context import SPEC
            from include.spec import parse_vmmigration
            from include.store import SpecStore

            ns, name = self.from_run_state
            saved = SpecStore().state.read(ns, name, SPEC) or {}
            doc = next(d for d in saved.get("documents") or () if d.get("kind") == "VMMigration")
            policy = parse_vmmigration(doc).spec.retryPolicy
            return policy.backoff_seconds, policy.max_backoff_seconds
        except Exception:  # noqa: BLE001 - no saved spec (or an unreadable one): the guide's defaults
            return self.backoff_seconds, self.max_backoff_seconds

    def evaluate(self, exception: BaseException, try_number: int, max_tries: int,
                 context: Context | None = None) -> RetryDecision:
        from include.backoff import backoff_delay
        from include.phases import failure_message, is_permanent

        if is_permanent(exception) or is_permanent(exception.__cause__ or exception):
            return RetryDecision.fail(reason=f"permanent: {failure_message(exception)}")
        backoff, max_backoff = self._delays()
        delay = backoff_delay(backoff, max_backoff, max(try_number, 1))
        return RetryDecision.retry(delay=timedelta(seconds=delay), reason=f"retryPolicy backoff {delay:.0f}s")

    def serialize(self) -> dict[str, Any]:
        return {"__type": "MigrationRetryPolicy", "backoff_seconds": self.backoff_seconds,
                "max_backoff_seconds": self.max_backoff_seconds}

    @classmethod
    def deserialize(cls, data: dict[str, Any]) -> MigrationRetryPolicy:
        return cls(data["backoff_seconds"], data["max_backoff_seconds"])
