"""serve/readiness.py: the board of workers with a warm engine (the wiring into gunicorn's workers is
tests/contract/test_serve.py's two-worker scenario)."""

from serve.readiness import ReadyBoard


def test_a_worker_sees_the_others_ready_never_itself_and_a_killed_one_is_unmarked(tmp_path):
    board = ReadyBoard.create(str(tmp_path))
    assert not board.others_ready(101) and not board.others_ready(102)
    board.mark(101, True)
    assert board.others_ready(102) and not board.others_ready(101)  # 102 loading leaves the traffic to 101
    board.mark(101, False)  # 101 exits (or the master saw it killed)
    assert not board.others_ready(102)
    board.mark(103, True)
    again = ReadyBoard.create(str(tmp_path))  # the same master pid, restarted: an empty board
    assert again.folder == board.folder and not again.others_ready(102)
    again.mark(103, True)
    again.remove()
    assert not board.others_ready(102)  # a board gone (the server stopping) has nobody ready
