import errno

import pytest

from previewd.errors import (JobStateError, LoraError, NonFiniteOutput, PipelineError,
                             PipelineOutOfMemory, RenderInterrupted)
from previewd.retry import RetryDecision, RetryPolicy, is_transient


@pytest.mark.parametrize("error", [
    PipelineOutOfMemory(), RenderInterrupted(), OSError(errno.EIO, "I/O error"),
    FileNotFoundError("gone"), MemoryError(), TimeoutError(),
])
def test_transient_errors(error):
    assert is_transient(error)


@pytest.mark.parametrize("error", [
    LoraError(), NonFiniteOutput(), PipelineError(), ValueError("bad spec"), KeyError("x"),
    JobStateError(), RuntimeError("CUDA error: device-side assert triggered"),
])
def test_permanent_errors(error):
    assert not is_transient(error)


def test_explicit_transient_attribute_wins_over_type():
    class FlakyError(Exception):
        transient = True

    class BrokenFile(OSError):
        transient = False

    assert is_transient(FlakyError())
    assert not is_transient(BrokenFile())


def test_backoff_doubles_then_caps():
    policy = RetryPolicy(max_attempts=10, base_delay=10, factor=2, max_delay=60)
    delays = [policy.decide(n, PipelineOutOfMemory()).delay for n in range(1, 10)]
    assert delays == [10, 20, 40, 60, 60, 60, 60, 60, 60]


def test_huge_attempt_count_is_capped_not_overflowing():
    policy = RetryPolicy(max_attempts=100_000, base_delay=1, factor=10, max_delay=600)
    assert policy.decide(5_000, TimeoutError()).delay == 600


def test_gives_up_at_max_attempts():
    policy = RetryPolicy(max_attempts=3)
    assert policy.decide(2, PipelineOutOfMemory()).retry
    decision = policy.decide(3, PipelineOutOfMemory())
    assert decision == RetryDecision(False, 0.0, decision.reason)
    assert "gave up after 3 of 3 attempts" in decision.reason


def test_permanent_error_is_not_retried_even_on_first_attempt():
    decision = RetryPolicy().decide(1, LoraError("keys do not match"))
    assert not decision.retry
    assert decision.delay == 0
    assert "LoraError" in decision.reason


def test_reason_names_error_next_attempt_and_delay():
    decision = RetryPolicy(base_delay=10).decide(1, PipelineOutOfMemory())
    assert decision.retry
    assert decision.reason == "transient error (PipelineOutOfMemory), attempt 2 of 3 in 10 s"


@pytest.mark.parametrize("kwargs, name", [
    ({"max_attempts": 0}, "max_attempts"), ({"base_delay": -1}, "base_delay"),
    ({"factor": 0.5}, "factor"), ({"base_delay": 10, "max_delay": 5}, "max_delay"),
])
def test_invalid_policy_names_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        RetryPolicy(**kwargs)


def test_attempts_must_count_the_failed_run():
    with pytest.raises(ValueError, match="attempts"):
        RetryPolicy().decide(0, TimeoutError())
