"""Chaos for training: one small job (the tiny model as a model.tar.gz, SFT then DPO, checkpoints every few
steps) SIGTERMed or SIGKILLed at random moments in every phase, K times, each run followed by a rerun on
the same /opt/ml tree, as SageMaker restarts an interrupted spot job.

    .venv/bin/python bench/chaos_train.py [--runs 16] [--seed 0] [--signals TERM,KILL]

Run i sends signal i mod 2 in phase (i div 2) mod 8, a random 0-0.5 s after the phase begins (its log line
shows): start-up, extracting the base, loading it, SFT steps, the SFT stage's merge and save, DPO steps, the
export, and after. 16 runs give every phase each signal once; only the delay is drawn. Prints a line per run,
then the totals, and exits 1 when a check failed:

- a SIGTERMed run exits 143 with output/failure saying it was stopped (unless its work was done: a
  SIGTERM after "training complete" changes nothing, and the run exits 0);
- the rerun completes, and its model equals an uninterrupted run's: the same steps in every stage, the
  same files, the same weights (up to 1e-4: resuming restores the optimizer, scheduler and RNG states);
- /opt/ml/model is never seen half-written: it is watched every 5 ms during every run, and each look
  finds nothing or a complete model (container.model_dir.load_spec accepts it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from container.model_dir import ModelDirError, load_spec  # noqa: E402
from local_test.tiny_model import TINY_ROWS, build_tiny_model  # noqa: E402

TRAIN = Path(sys.executable).parent / "train"
SFT_STEPS, DPO_STEPS = 24, 12
HYPERPARAMETERS = {"method": "sft+dpo", "max_steps": str(SFT_STEPS), "dpo_max_steps": str(DPO_STEPS),
                   "save_steps": "5", "logging_steps": "1", "per_device_train_batch_size": "2",
                   "gradient_accumulation_steps": "1", "max_length": "64", "warmup_steps": "0",
                   "validation_split": "0"}
# A resumed run restores the optimizer, scheduler and RNG states, so its weights match an uninterrupted
# run's up to float summation order.
WEIGHT_TOLERANCE = 1e-4
PREFERENCES = [{"prompt": f"Write about lesson {i}.", "chosen": f"Lesson {i}: measure first.",
                "rejected": f"Great question! Lesson {i} is crucial."} for i in range(6)]
STEP = re.compile(r"^stage=(\w+) step=(\d+) ")
RESUMED = re.compile(r"resuming (\w+) from .* \(step (\d+)\)")
# Where a run may be stopped: a predicate on a log line marking the phase's start (None: at launch).
PHASES = {
    "start-up": None,
    "extracting the base": lambda line: "extracting " in line,
    "loading the libraries": lambda line: "base model: " in line,
    "SFT steps": lambda line: line.startswith("stage=sft step=3 "),
    "SFT merge and save": lambda line: line.startswith(f"stage=sft step={SFT_STEPS} "),
    "DPO steps": lambda line: line.startswith("stage=dpo step=4 "),
    "export": lambda line: line.startswith(f"stage=dpo step={DPO_STEPS} "),
    "after the export": lambda line: "model written to " in line,
}


@dataclass
class Run:
    code: int
    lines: list[str]
    seconds: float
    torn_looks: list[str] = field(default_factory=list)  # what the watcher saw that was not a whole model
    signalled: bool = False

    def last_step(self, stage: str) -> int:
        steps = [int(m.group(2)) for m in map(STEP.match, self.lines) if m and m.group(1) == stage]
        return max(steps, default=0)

    def resumed_from(self, stage: str) -> int | None:
        for line in self.lines:
            m = RESUMED.search(line)
            if m and m.group(1) == stage:
                return int(m.group(2))
        return None

    def skipped(self, stage: str) -> bool:
        return any(f"stage {stage} finished in an earlier run" in line for line in self.lines)


def make_job(root: Path, tarball: Path) -> Path:
    for relative, rows in (("train/d.jsonl", TINY_ROWS), ("preference/p.jsonl", PREFERENCES)):
        path = root / "input" / "data" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (root / "input" / "data" / "model").mkdir()
    (root / "input" / "data" / "model" / "model.tar.gz").symlink_to(tarball)
    (root / "input" / "config").mkdir(parents=True)
    (root / "input" / "config" / "hyperparameters.json").write_text(json.dumps(HYPERPARAMETERS))
    return root


def run(root: Path, stop: tuple[int, str, float] | None = None) -> Run:
    """Run `train` on `root`; stop = (signal, phase, delay) sends the signal `delay` s after the phase begins."""
    env = {**os.environ, "SAGEMAKER_BASE_DIR": str(root), "TMPDIR": str(root / "tmp")}
    (root / "tmp").mkdir(exist_ok=True)  # a fresh extraction folder per tree: extraction is a phase each time
    begun = time.monotonic()
    process = subprocess.Popen([str(TRAIN)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    result = Run(code=0, lines=[], seconds=0.0)
    reached = threading.Event()
    predicate = PHASES[stop[1]] if stop else None
    done = threading.Event()

    def read():
        for line in process.stdout:
            result.lines.append(line.rstrip("\n"))
            if predicate is not None and predicate(line):
                reached.set()
        reached.set()  # the run ended before the phase: nothing left to stop

    def look(model: Path) -> str | None:
        try:
            if model.is_dir() and any(model.iterdir()):
                load_spec(model)
        except (ModelDirError, OSError, ValueError) as e:
            return f"{type(e).__name__}: {e}"
        return None

    def watch():
        model = root / "model"
        while not done.is_set():
            # a look that spans a rename (a rerun replacing the model) can fail halfway: only a second
            # failed look at a folder that is still there counts as seeing it half-written
            if look(model) is not None:
                time.sleep(0.002)
                again = look(model)
                if again is not None:
                    result.torn_looks.append(again)
            time.sleep(0.005)

    threads = [threading.Thread(target=read, daemon=True), threading.Thread(target=watch, daemon=True)]
    for thread in threads:
        thread.start()
    if stop is not None:
        number, phase, delay = stop
        if predicate is not None:
            reached.wait()
        time.sleep(delay)
        if process.poll() is None:
            process.send_signal(number)
            result.signalled = True
    result.code = process.wait()
    threads[0].join()
    done.set()
    threads[1].join()
    result.seconds = time.monotonic() - begun
    return result


def model_summary(root: Path) -> tuple[dict, list[str]]:
    report = json.loads((root / "model" / "training_report.json").read_text())
    steps = {stage: values["steps"] for stage, values in report["stages"].items()}
    files = sorted(str(p.relative_to(root / "model")) for p in (root / "model").rglob("*") if p.is_file())
    return steps, files


def weight_difference(root: Path, reference: Path) -> float:
    """The largest absolute difference between the two models' weights (0.0: bit for bit the same)."""
    from safetensors.torch import load_file

    ours, theirs = load_file(root / "model" / "model.safetensors"), load_file(reference / "model" / "model.safetensors")
    if ours.keys() != theirs.keys():
        return float("inf")
    return max(float((ours[k].float() - theirs[k].float()).abs().max()) for k in ours)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="for the delays")
    parser.add_argument("--signals", default="TERM,KILL", help="which to send, in turn")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    signals = [getattr(signal, f"SIG{name.strip().upper()}") for name in args.signals.split(",")]
    work = Path(tempfile.mkdtemp(prefix="chaos-train-"))
    tarball = work / "model.tar.gz"
    with tarfile.open(tarball, "w:gz") as archive:
        archive.add(build_tiny_model(work / "tiny"), arcname=".")

    reference = run(make_job(work / "reference", tarball))
    if reference.code != 0:
        print("\n".join(reference.lines[-30:]))
        print(f"the uninterrupted run failed with {reference.code}")
        return 1
    expected = model_summary(work / "reference")
    print(f"uninterrupted: {reference.seconds:.1f} s, steps {expected[0]}, {len(expected[1])} files")

    problems, resumed, repeated, stops, differences = [], 0, 0, {}, []
    phases = list(PHASES)
    for index in range(args.runs):
        number, phase = signals[index % len(signals)], phases[(index // len(signals)) % len(phases)]
        delay = rng.uniform(0, 0.5)
        root = make_job(work / f"run-{index}", tarball)
        first = run(root, (number, phase, delay))
        failure_file = root / "output" / "failure"
        failure = failure_file.read_text().splitlines()[0] if failure_file.is_file() else ""  # the rerun clears it
        second = run(root)
        name = signal.Signals(number).name
        finished = first.code == 0 and any("training complete" in line for line in first.lines)
        stops[name] = stops.get(name, 0) + (first.signalled and not finished)
        found = []
        if not first.signalled or finished:
            found.append("finished before the signal") if finished else found.append(f"exited {first.code} unasked")
        elif number == signal.SIGTERM and first.code != 143:
            found.append(f"SIGTERM ended it with {first.code}, not 143")
        elif number == signal.SIGTERM and not failure.startswith("training stopped by SIGTERM"):
            found.append(f"SIGTERM left no failure file saying it stopped: {failure!r}")
        if first.torn_looks or second.torn_looks:
            found.append(f"model seen half-written: {(first.torn_looks + second.torn_looks)[0]}")
        if second.code != 0:
            found.append(f"the rerun failed with {second.code}: {' | '.join(second.lines[-3:])}")
        elif model_summary(root) != expected:
            found.append(f"the rerun's model differs: {model_summary(root)[0]} vs {expected[0]}")
        else:
            difference = weight_difference(root, work / "reference")
            differences.append(difference)
            if difference > WEIGHT_TOLERANCE:
                found.append(f"the rerun's weights differ from the uninterrupted run's by up to {difference:.2g}")
        again = 0
        for stage in ("sft", "dpo"):
            start = second.resumed_from(stage)
            if start is not None or second.skipped(stage):
                resumed += 1
            if start is not None:
                again += max(0, first.last_step(stage) - start)
            elif not second.skipped(stage):
                again += first.last_step(stage)  # trained again from its beginning
        repeated += again
        real = [f for f in found if f != "finished before the signal"]
        problems += [f"run {index}: {f}" for f in real]
        how = f"exit {first.code}" + (f", failure: {failure[:100]}" if failure else "")
        print(f"run {index}: {name} {delay:.2f} s into {phase:<20} {how}; rerun exit {second.code}, "
              f"{again} step(s) repeated {'; '.join(found) or 'ok'}")

    print(f"\n{args.runs} runs ({', '.join(f'{n} {s}' for s, n in stops.items())} delivered), "
          f"{resumed} stage resumes (from a checkpoint or a finished stage), {repeated} steps repeated in all "
          f"(of {SFT_STEPS + DPO_STEPS} per job), largest weight difference from the uninterrupted run "
          f"{max(differences, default=0.0):.2g}, {len(problems)} problem(s)")
    for problem in problems:
        print(f"  {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
