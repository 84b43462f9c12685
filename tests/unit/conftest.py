"""Several unit tests send SIGTERM to this very process, to the handler of the code they test. Should that
handler be missing (a regression), the default action would kill pytest itself, with no report and the
session's servers left running: a guard handler turns it into this test's failure instead."""

import signal

import pytest


def _unhandled(signum, frame):
    raise AssertionError("SIGTERM reached the test process with no handler of the code under test installed")


@pytest.fixture(autouse=True)
def sigterm_fails_the_test_instead_of_killing_pytest():
    previous = signal.signal(signal.SIGTERM, _unhandled)
    yield
    signal.signal(signal.SIGTERM, previous)
