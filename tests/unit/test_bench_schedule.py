"""bench/serve_throughput.py's order of runs: what lets a row's ratio stand against drift over the run."""

from bench.serve_throughput import ROWS, SIDES, baseline_against_itself, schedule


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
