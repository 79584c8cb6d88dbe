"""Whether and when a failed render is tried again. Pure: no database, no clock.

The worker asks `RetryPolicy.decide` and turns the decision into `JobStore.fail(...,
retry_in=delay)` or `retry_in=None`. The store also enforces each job's own
`max_attempts`, so the smaller of the two limits wins.
"""

from __future__ import annotations

from dataclasses import dataclass

# Retrying can help with these: the device or disk may be free next time.
_TRANSIENT_TYPES = (OSError, MemoryError, TimeoutError)


@dataclass(frozen=True)
class RetryDecision:
    retry: bool
    delay: float
    """Seconds to wait before the next attempt; 0 when not retrying."""
    reason: str


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for transient errors: `base_delay * factor**(attempts-1)`, capped."""

    max_attempts: int = 3
    base_delay: float = 10.0
    factor: float = 2.0
    max_delay: float = 600.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"`max_attempts` must be at least 1, got {self.max_attempts}")
        if self.base_delay < 0:
            raise ValueError(f"`base_delay` must not be negative, got {self.base_delay}")
        if self.factor < 1:
            raise ValueError(f"`factor` must be at least 1, got {self.factor}")
        if self.max_delay < self.base_delay:
            raise ValueError(f"`max_delay` ({self.max_delay}) is below `base_delay` "
                             f"({self.base_delay})")

    def delay(self, attempts: int) -> float:
        """Seconds to wait after the `attempts`-th consecutive failure."""
        try:
            return min(self.max_delay, self.base_delay * self.factor ** (attempts - 1))
        except OverflowError:  # factor**n beyond float range: the cap applies anyway
            return self.max_delay

    def decide(self, attempts: int, error: BaseException) -> RetryDecision:
        """`attempts` counts the runs made so far, including the one that raised `error`."""
        if attempts < 1:
            raise ValueError(f"`attempts` must be at least 1, got {attempts}")
        name = type(error).__name__
        if not is_transient(error):
            return RetryDecision(False, 0.0, f"permanent error ({name})")
        if attempts >= self.max_attempts:
            return RetryDecision(False, 0.0, f"transient error ({name}), gave up after "
                                             f"{attempts} of {self.max_attempts} attempts")
        delay = self.delay(attempts)
        return RetryDecision(True, delay, f"transient error ({name}), attempt {attempts + 1} "
                                          f"of {self.max_attempts} in {delay:g} s")


def is_transient(error: BaseException) -> bool:
    """An explicit `transient` attribute (previewd.errors.PipelineError) decides; otherwise
    I/O, memory and timeout errors are transient and everything else is permanent."""
    marked = getattr(error, "transient", None)
    if marked is not None:
        return bool(marked)
    return isinstance(error, _TRANSIENT_TYPES)
