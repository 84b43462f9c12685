"""train/stop.py: SIGTERM is handled from the start of `train` to its end, at once outside a training loop
and at the next micro-batch inside one. The signal is really sent to this process."""

import os
import signal

import pytest

from train.errors import TrainingInterrupted
from train.stop import Stop


@pytest.fixture
def stop():
    previous = signal.getsignal(signal.SIGTERM)
    yield Stop().install()
    signal.signal(signal.SIGTERM, previous)


def test_outside_a_training_loop_sigterm_stops_at_once_naming_the_phase(stop):
    with pytest.raises(TrainingInterrupted, match="training stopped by SIGTERM while extracting the base model"):
        with stop.phase("running the job"):
            with stop.phase("extracting the base model"):
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(10**7):  # a long step: the handler raises inside it
                    pass


def test_inside_a_training_loop_it_waits_for_the_step_boundary_then_the_next_phase_raises(stop):
    with pytest.raises(TrainingInterrupted, match="while evaluating sft"):
        with stop.phase("running the job"):
            with stop.phase("training sft", deferred=True):
                os.kill(os.getpid(), signal.SIGTERM)
                assert stop.requested and stop.agree()  # one process: its own flag
            with stop.phase("evaluating sft"):
                pytest.fail("a phase must not start once a stop was asked for")


def test_a_sigterm_before_the_first_phase_is_kept_for_it(stop):
    os.kill(os.getpid(), signal.SIGTERM)  # no boundary in place yet: only noted
    with pytest.raises(TrainingInterrupted, match="while reading the configuration"):
        with stop.phase("reading the configuration"):
            pass


def test_no_library_can_swallow_it_with_except_exception(stop):
    def download_with_retries():
        for _ in range(3):
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                for _ in range(10**6):
                    pass
            except Exception:  # what a retry loop does
                continue

    with pytest.raises(TrainingInterrupted):
        with stop.phase("downloading the base model"):
            download_with_retries()
