"""The parent's verdict on a vLLM child process (vllm_ernie45.child_run): exit status, a
complete result file, and a clean engine shutdown are all required; a crash after a complete
result is reported as such, never ignored. An engine that hangs at shutdown leaves its stacks,
and its child runs once more -- a second hang fails."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from types import SimpleNamespace

import pytest

from vllm_ernie45 import child_run
from vllm_ernie45.child_run import (
    CHILD_ENV,
    STATUS_KEY,
    ChildFailed,
    EngineHung,
    close_llm,
    judge_child,
    run_judged,
    write_result,
)

CLEAN = {"engine_shutdown_s": 5.9, "engine_exit_codes": {"EngineCore:1": 0}, "engine_shutdown_clean": True}


def test_complete_result_of_a_clean_child_is_returned(tmp_path):
    out = tmp_path / "r.json"
    write_result(out, {"tokens": [1, 2]}, CLEAN)
    result = judge_child(0, out)
    assert result["tokens"] == [1, 2]
    assert result[STATUS_KEY]["complete"] and result[STATUS_KEY]["engine_exit_codes"] == {"EngineCore:1": 0}
    assert not (tmp_path / "r.json.partial").exists()


def test_crash_after_a_complete_result_fails_and_says_so(tmp_path):
    out = tmp_path / "r.json"
    write_result(out, {"tokens": [1]}, CLEAN)
    with pytest.raises(ChildFailed, match=r"signal 6\) after writing a complete result.*teardown") as err:
        judge_child(-6, out, "terminate called without an active exception")
    assert "terminate called" in str(err.value)


def test_crash_before_a_result_fails(tmp_path):
    with pytest.raises(ChildFailed, match=r"exit 1\) before writing a complete result"):
        judge_child(1, tmp_path / "missing.json")


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "left no complete result"),
        ('{"tokens": [1]}', "left no complete result"),  # written without write_result
        ('{"tokens": [', "not valid JSON"),  # torn file
    ],
)
def test_exit_0_without_a_complete_result_fails(tmp_path, content, message):
    out = tmp_path / "r.json"
    if content is not None:
        out.write_text(content)
    with pytest.raises(ChildFailed, match=message):
        judge_child(0, out)


def test_killed_engine_fails(tmp_path):
    out = tmp_path / "r.json"
    killed = {**CLEAN, "engine_exit_codes": {"EngineCore:1": -9}, "engine_shutdown_clean": False}
    write_result(out, {"tokens": [1]}, killed)
    with pytest.raises(ChildFailed, match="did not shut down cleanly"):
        judge_child(0, out)


def test_child_without_an_engine(tmp_path):
    out = tmp_path / "r.json"
    write_result(out, {"engine": "hf"}, None)
    assert judge_child(0, out)["engine"] == "hf"
    assert json.loads(out.read_text())[STATUS_KEY]["complete"]


def test_hung_engine_is_its_own_verdict(tmp_path):
    out = tmp_path / "r.json"
    hung = {**CLEAN, "engine_exit_codes": {"EngineCore:1": -6}, "engine_shutdown_clean": False,
            "engine_hung": ["python3:1", "python3:2"]}  # fmt: skip
    write_result(out, {"tokens": [1]}, hung)
    with pytest.raises(EngineHung, match=r"hung at shutdown: \['python3:1', 'python3:2'\].*stacks"):
        judge_child(0, out)


# An engine process that ignores SIGTERM (as the hung EngineCore did) and has a worker child of
# its own that does too; each writes its pid to a file when its handler is set, then loops in a function
# named after its role, which its stack dump must show.
STUBBORN = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    from pathlib import Path

    def stuck_in_engine_loop():
        while True:
            time.sleep(0.05)

    def stuck_in_worker_loop():
        while True:
            time.sleep(0.05)

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    here, role = Path(sys.argv[1]), sys.argv[2]
    if role == "engine":
        subprocess.Popen([sys.executable, __file__, str(here), "worker"])
    (here / role).write_text(str(os.getpid()))
    stuck_in_engine_loop() if role == "engine" else stuck_in_worker_loop()
    """
)


class _EngineProcess:
    """The parts of a ``multiprocessing.Process`` that close_llm reads, over a Popen."""

    def __init__(self, popen: subprocess.Popen) -> None:
        self.popen, self.name, self.pid = popen, "EngineCore", popen.pid

    @property
    def exitcode(self):
        return self.popen.poll()

    def is_alive(self) -> bool:
        return self.popen.poll() is None


def _llm_over(proc: _EngineProcess):
    """An object shaped like ``vllm.LLM`` whose engine client shuts down as vLLM's does:
    SIGTERM, a join of up to ``timeout`` s, then a kill."""

    def shutdown(timeout):
        proc.popen.terminate()
        try:
            proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.popen.kill()
            proc.popen.wait()

    client = SimpleNamespace(resources=SimpleNamespace(engine_manager=SimpleNamespace(processes=[proc])),
                             shutdown=shutdown)  # fmt: skip
    return SimpleNamespace(llm_engine=SimpleNamespace(engine_core=client))


def test_engine_ignoring_sigterm_prints_its_stacks_and_is_not_clean(tmp_path, monkeypatch):
    script, stderr = tmp_path / "stubborn.py", tmp_path / "stderr.txt"
    script.write_text(STUBBORN)
    pids = {role: tmp_path / role for role in ("engine", "worker")}
    with stderr.open("w") as err:
        popen = subprocess.Popen([sys.executable, str(script), str(tmp_path), "engine"], stderr=err,
                                 env={**CHILD_ENV, "PATH": "/usr/bin:/bin"})  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not all(f.exists() and f.read_text() for f in pids.values()):
            assert time.monotonic() < deadline and popen.poll() is None, stderr.read_text()
            time.sleep(0.05)
        monkeypatch.setattr(child_run, "STACK_DUMP_LEAD_S", 2.0)
        status = close_llm(_llm_over(_EngineProcess(popen)), timeout=4.0)
        assert not status["engine_shutdown_clean"]
        assert len(status["engine_hung"]) == 2, status  # the engine and its worker
        assert status["engine_exit_codes"] == {f"EngineCore:{popen.pid}": -6}
        deadline = time.monotonic() + 10  # the worker dies on its own SIGABRT
        while "stuck_in_worker_loop" not in stderr.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        dump = stderr.read_text()
        assert "Fatal Python error: Aborted" in dump
        assert "stuck_in_engine_loop" in dump and "stuck_in_worker_loop" in dump
    finally:  # nothing left behind when an assertion fails
        popen.kill()
        for f in pids.values():
            with contextlib.suppress(ProcessLookupError, FileNotFoundError, ValueError):
                os.kill(int(f.read_text()), signal.SIGKILL)


def test_engine_exiting_on_sigterm_is_not_aborted(tmp_path):
    popen = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    status = close_llm(_llm_over(_EngineProcess(popen)), timeout=30.0)
    assert status["engine_shutdown_clean"] is False  # SIGTERM's default: exit code -15, not 0
    assert "engine_hung" not in status and status["engine_shutdown_s"] < 10


# A child that writes its result as close_llm would report the engine: hung on the runs named in
# argv[3] (a comma list of 1-based attempt numbers), clean otherwise; it counts its runs in argv[2].
FLAKY_CHILD = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from vllm_ernie45.child_run import write_result
    out, counter, hung_on = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3].split(",")
    attempt = int(counter.read_text() or 0) + 1 if counter.exists() else 1
    counter.write_text(str(attempt))
    shutdown = {"engine_exit_codes": {"EngineCore:1": 0}, "engine_shutdown_clean": True}
    if str(attempt) in hung_on:
        print("Fatal Python error: Aborted (a stack would be here)", file=sys.stderr)
        shutdown = {"engine_exit_codes": {"EngineCore:1": -6}, "engine_shutdown_clean": False,
                    "engine_hung": ["EngineCore:1"]}
    write_result(out, {"attempt": attempt}, shutdown)
    """
)


def _flaky(tmp_path, hung_on: str) -> tuple[list[str], object, object]:
    out, counter = tmp_path / "r.json", tmp_path / "runs"
    return [sys.executable, "-c", FLAKY_CHILD, str(out), str(counter), hung_on], out, counter


def test_a_hung_engine_runs_the_child_once_more_and_keeps_the_log(tmp_path):
    cmd, out, counter = _flaky(tmp_path, "1")
    with pytest.warns(RuntimeWarning, match="hung at shutdown; running the child again"):
        result = run_judged(cmd, out)
    assert result["attempt"] == 2 and counter.read_text() == "2"
    log = (tmp_path / "r.json.hung1.log").read_text()
    assert "hung at shutdown" in log and "Fatal Python error: Aborted" in log


def test_a_second_hang_fails(tmp_path):
    cmd, out, counter = _flaky(tmp_path, "1,2")
    with pytest.warns(RuntimeWarning), pytest.raises(EngineHung, match="EngineCore:1"):
        run_judged(cmd, out)
    assert counter.read_text() == "2"


def test_other_failures_are_not_run_again(tmp_path):
    out, counter = tmp_path / "r.json", tmp_path / "runs"
    cmd = [sys.executable, "-c", "import sys; open(sys.argv[1], 'a').write('x'); sys.exit(3)", str(counter)]
    with pytest.raises(ChildFailed, match="exit 3"):
        run_judged(cmd, out)
    assert counter.read_text() == "x"


def test_children_get_the_fault_handler(tmp_path):
    out = tmp_path / "r.json"
    code = ("import sys, faulthandler; from vllm_ernie45.child_run import write_result; "
            "write_result(sys.argv[1], {'on': faulthandler.is_enabled()}, None)")  # fmt: skip
    assert run_judged([sys.executable, "-c", code, str(out)], out)["on"] is True
