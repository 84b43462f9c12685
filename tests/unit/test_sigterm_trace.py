"""A SIGTERM always leaves a line in the job's log, said by the process that received it. A reviewer saw a job
SIGTERMed at step 7 log steps 8 and 9, no 'SIGTERM received' line, and run on: the signal had stopped at the
launcher (its main thread blocked in waitpid while another thread took the signal, fixed in 736de22), which
said nothing, so the log showed no trace of it. The launcher now says so when it passes the signal on."""

import os
import signal
import sys
import threading
import time

from train.config import TrainConfig
from train.launcher import Topology

TORCHRUN = """
import pathlib, signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: sys.exit(1))  # torchrun exits 1 when its workers stop
pathlib.Path(sys.argv[1]).touch()
time.sleep(30)
"""


def test_the_launcher_says_it_received_sigterm_and_passes_it_on(tmp_path, monkeypatch, capfd):
    import train.launcher as launcher

    script, started = tmp_path / "torchrun.py", tmp_path / "started"
    script.write_text(TORCHRUN)
    monkeypatch.setattr(launcher, "torchrun_command", lambda top, config, master: [sys.executable, str(script),
                                                                                   str(started)])

    def spot_notice():
        while not started.exists():
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=spot_notice, daemon=True).start()
    begun = time.monotonic()
    code, _ = launcher.launch(TrainConfig(master_port=7777), Topology(("algo-1",), "algo-1", 2, None, None))
    assert code == 143 and time.monotonic() - begun < 20
    assert ("launcher: SIGTERM received: passing it on to torchrun, which stops the training processes"
            in capfd.readouterr().out)
