"""Long loops say how far they are and how long is left: a bar on a terminal, else a plain line every interval,
in the console and in log.txt, and never blank lines in a redirected console."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from qcfs_snntorch import progress
from qcfs_snntorch.progress import Progress, reporting, track

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
LINE = re.compile(r"^\[(?P<label>[^\]]+)\] (?P<done>\d+)/(?P<total>\d+) .*\((?P<pct>\d+) %\).*, "
                  r"(?:about (?P<left>\S+) left|time left unknown yet)$")


def test_off_a_terminal_each_interval_writes_one_line_with_the_count_and_the_time_left(capsys):
    lines = []
    with reporting(0.0, lambda line, console: lines.append((line, console))):
        with Progress("eval SNN T≤8", 4, unit="batches", fields={"loss": 1.0}) as bar:
            for value in (0.5, 0.25, 0.125, 0.0625):
                bar.advance(loss=value)
    assert [console for _, console in lines] == [True] * 4, "off a terminal the lines go to the console too"
    parsed = [LINE.match(line) for line, _ in lines]
    assert all(parsed), lines
    assert [int(m["done"]) for m in parsed] == [1, 2, 3, 4] and {m["total"] for m in parsed} == {"4"}
    assert parsed[-1]["pct"] == "100" and parsed[-1]["left"] == "0s"
    assert "loss 0.0625" in lines[-1][0] and "batches" in lines[-1][0]
    assert capsys.readouterr().out == "", "with a run's log as the sink nothing else is printed"


def test_without_a_run_lines_are_printed_and_no_line_is_blank(capsys):
    with reporting(0.0):
        for _ in track(range(3), "export NIR", unit="nodes"):
            pass
    out = capsys.readouterr().out
    assert out.count("\n") == 3 and "" not in out.splitlines()
    assert all(LINE.match(line) for line in out.splitlines()), out


def test_a_long_interval_prints_nothing_for_a_short_loop(capsys):
    lines = []
    with reporting(3600.0, lambda line, console: lines.append(line)):
        for _ in track(range(5), "calibrate"):
            pass
    assert lines == [] and capsys.readouterr().out == ""


def test_on_a_terminal_the_bar_shows_and_the_lines_go_to_the_log_only(monkeypatch):
    monkeypatch.setattr(progress, "_on_terminal", lambda: True)
    lines = []
    with reporting(0.0, lambda line, console: lines.append(console)):
        for _ in track(range(2), "eval ANN"):
            pass
    assert lines == [False, False]


def test_other_processes_report_nothing():
    lines = []
    with reporting(0.0, lambda line, console: lines.append(line), enabled=False):
        for _ in track(range(3), "eval ANN"):
            pass
    assert lines == []


@pytest.mark.parametrize("seconds, text", [(0.4, "0s"), (59, "59s"), (61, "1m01s"), (3725, "1h02m")])
def test_durations_read_as_a_person_writes_them(seconds, text):
    assert progress._duration(seconds) == text


def test_a_redirected_run_shows_progress_with_time_left_in_console_and_log_and_no_blank_line(tmp_path):
    """Every long loop of train, eval (and its statistics), calibrate and export, through the command line."""
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "launch.py", "stages=[train,convert,eval,calibrate,export]", "train.epochs=1",
         "train.max_steps_per_epoch=4", "snn.timesteps=[1,2]", "snn.calibrate=[channel]", "snn.calibrate_timesteps=[1]",
         "progress_interval=0.000001", f"run_dir={run_dir}"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)  # stdout is a pipe: not a terminal
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout.splitlines()
    assert "" not in [line.strip() for line in console], "a blank line in the redirected console"
    stamped = [line[len("2026-01-01 00:00:00 "):] for line in (run_dir / "log.txt").read_text().splitlines()]
    log = [line for line in stamped if LINE.match(line)]
    shown = [line for line in console if LINE.match(line)]
    assert shown == log, "the console and log.txt get the same progress lines"
    labels = {LINE.match(line)["label"] for line in shown}
    for expected in ("ANN epoch 1/1", "eval SNN T≤2", "eval ANN at L=2", "conversion error per layer",
                     "calibrate v(0) for T=1", "export NIR (portable form)"):
        assert expected in labels, f"no progress line for {expected!r}; saw {sorted(labels)}"
    assert any(LINE.match(line)["left"] for line in shown), "no line gives the time left"
