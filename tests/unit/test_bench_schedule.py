"""bench/serve_throughput.py's order of runs, what lets a row's ratio stand against drift over the run, and its
stopping of the server not measured."""

import subprocess
import time
from pathlib import Path

from bench.serve_throughput import ROWS, SIDES, baseline_against_itself, schedule
from bench.servers import only


def test_every_round_runs_every_row_once_and_the_rows_order_rotates():
    runs = schedule(list(ROWS), 9)
    rounds = [[row for row, _ in runs[i:i + len(ROWS)]] for i in range(0, len(runs), len(ROWS))]
    assert len(rounds) == 9 and all(sorted(r) == sorted(ROWS) for r in rounds)
    for row in ROWS:  # each row is first in some round and last in another
        assert {r.index(row) for r in rounds} == set(range(len(ROWS)))


def test_who_goes_first_on_a_row_alternates_from_round_to_round():
    for rows in (list(ROWS), ["chat_greedy", "tgi_greedy"], ["tgi_twin"], list(ROWS[:3])):
        runs = schedule(rows, 6)
        for row in rows:
            firsts = [order[0] for r, order in runs if r == row]
            assert firsts == [firsts[0], *[s for s in SIDES if s != firsts[0]]] * 3, (rows, row, firsts)


def test_the_noise_floor_is_vllm_serve_against_itself_on_a_samplings_two_rows():
    def run(ours: float, theirs: float) -> dict:
        return {"ours": {"tokens_per_second": ours}, "vllm_serve": {"tokens_per_second": theirs}}

    runs = {"chat_greedy": [run(1, 300), run(1, 330)], "tgi_greedy": [run(9, 300), run(9, 300)],
            "chat_twin": [run(1, 200)]}
    assert baseline_against_itself(runs) == {"greedy": [1.0, 1.1]}  # twin has no TGI row: no floor
    assert baseline_against_itself(runs, "ours") == {"greedy": [0.11, 0.11]}


def test_only_the_server_measured_runs_and_none_lets_both_go_on():
    def state(pid: int) -> str:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]

    def settled(pid: int, wanted: set[str]) -> bool:  # a signal is delivered a moment after kill() returns
        deadline = time.monotonic() + 10
        while state(pid) not in wanted and time.monotonic() < deadline:
            time.sleep(0.01)
        return state(pid) in wanted

    servers = [subprocess.Popen(["sleep", "60"], start_new_session=True) for _ in SIDES]
    sides = {side: ("", server.pid) for side, server in zip(SIDES, servers)}
    try:
        only(sides, "ours")
        assert settled(sides["vllm_serve"][1], {"T"}) and settled(sides["ours"][1], {"S", "R"})
        only(sides, "vllm_serve")
        assert settled(sides["ours"][1], {"T"}) and settled(sides["vllm_serve"][1], {"S", "R"})
        only(sides, "ours")  # the stopped one goes on
        assert settled(sides["vllm_serve"][1], {"T"}) and settled(sides["ours"][1], {"S", "R"})
        only(sides, None)
        assert all(settled(pid, {"S", "R"}) for _, pid in sides.values())
    finally:
        for server in servers:
            server.kill()
            server.wait()
