"""The plugin's switches (vllm_ernie45.envs): defaults, case, and a clear error naming the
variable for a value it does not know."""

from __future__ import annotations

import pytest

from vllm_ernie45 import envs


def test_quant_scope(monkeypatch):
    monkeypatch.delenv("VLLM_ERNIE45_QUANT_SCOPE", raising=False)
    assert envs.quant_scope() == "all"
    monkeypatch.setenv("VLLM_ERNIE45_QUANT_SCOPE", "Experts")
    assert envs.quant_scope() == "experts"
    monkeypatch.setenv("VLLM_ERNIE45_QUANT_SCOPE", "attention")
    with pytest.raises(ValueError, match="VLLM_ERNIE45_QUANT_SCOPE"):
        envs.quant_scope()


@pytest.mark.parametrize(
    "read, name, default, other",
    [
        (lambda: envs.router_backend(True), "VLLM_ERNIE45_ROUTER", "triton", "torch"),
        (lambda: envs.mtp_draft(), "VLLM_ERNIE45_MTP_DRAFT", "plugin", "intree"),
        (lambda: envs.mtp_hidden_state(), "VLLM_ERNIE45_MTP_HIDDEN", "pre_norm", "post_norm"),
        (lambda: envs.moe_warmup(), "VLLM_ERNIE45_MOE_WARMUP", True, False),
    ],
)
def test_choices(monkeypatch, read, name, default, other):
    monkeypatch.delenv(name, raising=False)
    assert read() == default
    monkeypatch.setenv(name, {True: "1", False: "0"}.get(other, str(other)).upper())
    assert read() == other
    monkeypatch.setenv(name, "nonsense")
    with pytest.raises(ValueError, match=name):
        read()


def test_router_on_cpu(monkeypatch):
    monkeypatch.delenv("VLLM_ERNIE45_ROUTER", raising=False)
    assert envs.router_backend(False) == "torch"
    monkeypatch.setenv("VLLM_ERNIE45_ROUTER", "triton")
    with pytest.raises(ValueError, match="CUDA"):
        envs.router_backend(False)


def test_shared_beside_above(monkeypatch):
    monkeypatch.delenv("VLLM_ERNIE45_SHARED_BESIDE_ABOVE", raising=False)
    assert envs.shared_beside_above() is None  # off until measured (docs/performance.md)
    for value, expected in (("OFF", None), ("", None), ("512", 512), (" 0 ", 0)):
        monkeypatch.setenv("VLLM_ERNIE45_SHARED_BESIDE_ABOVE", value)
        assert envs.shared_beside_above() == expected
    for bad in ("-1", "1e3", "auto"):
        monkeypatch.setenv("VLLM_ERNIE45_SHARED_BESIDE_ABOVE", bad)
        with pytest.raises(ValueError, match="VLLM_ERNIE45_SHARED_BESIDE_ABOVE"):
            envs.shared_beside_above()
