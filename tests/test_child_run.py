"""The parent's verdict on a vLLM child process (vllm_ernie45.child_run): exit status, a
complete result file, and a clean engine shutdown are all required; a crash after a complete
result is reported as such, never ignored."""

from __future__ import annotations

import json

import pytest

from vllm_ernie45.child_run import STATUS_KEY, ChildFailed, judge_child, write_result

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
