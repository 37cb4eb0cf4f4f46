"""Stepping aside per engine (vllm_ernie45.in_tree): with bitsandbytes the plugin's classes
build vLLM's in-tree ERNIE classes, with one warning; with anything else their own model.

vLLM 0.32 (the CPU venv) has no bitsandbytes ("Unknown quantization method"), so no engine
here can be started with it: the decision is tested on configs, the handover through the
classes' constructors (a recording stand-in for the in-tree class where a real one needs a
distributed setup), and, in a child process, through vLLM's own ``initialize_model`` on real
tiny checkpoints whose engine config is told ``quantization="bitsandbytes"`` after it was made.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

import vllm_ernie45
from vllm_ernie45 import compat, in_tree

from conftest import run_python

BNB = "bitsandbytes"


def fake_config(quantization=None, load_format="auto", draft_quantization=None, draft_load_format=None):
    """The parts of a VllmConfig the decision reads (and the handover passes on)."""
    spec = None
    if draft_quantization is not None or draft_load_format is not None:
        spec = SimpleNamespace(
            draft_model_config=SimpleNamespace(quantization=draft_quantization),
            draft_load_config=None if draft_load_format is None else SimpleNamespace(load_format=draft_load_format),
        )
    return SimpleNamespace(
        model_config=SimpleNamespace(quantization=quantization, convert_type="none"),
        load_config=SimpleNamespace(load_format=load_format),
        speculative_config=spec,
        quant_config=None,
    )


@pytest.mark.version_smoke
@pytest.mark.parametrize(
    ("config", "setting"),
    [
        (fake_config(quantization=BNB, load_format=BNB), "quantization"),  # as EngineArgs sets both
        (fake_config(load_format=BNB), "load_format"),
        (fake_config(load_format=SimpleNamespace(value=BNB)), "load_format"),  # an enum member
        (fake_config(draft_quantization=BNB), "speculative draft's quantization"),
        (fake_config(draft_load_format=BNB), "speculative draft's load_format"),
    ],
)
def test_bitsandbytes_anywhere_in_the_engine_steps_aside(config, setting):
    assert in_tree.in_tree_reason(config) == f"{setting} 'bitsandbytes'"


@pytest.mark.version_smoke
@pytest.mark.parametrize("quantization", [None, "compressed-tensors", "fp8", "gptq_marlin", "awq"])
def test_other_quantizations_keep_the_plugin(quantization):
    assert in_tree.in_tree_reason(fake_config(quantization, draft_quantization=quantization or "fp8")) is None


@pytest.mark.version_smoke
def test_in_tree_classes_come_from_vllms_own_table():
    """The architecture each plugin class names is in vLLM's built-in table (register() replaced
    ModelRegistry's entries, not the table), and the table gives vLLM's ERNIE classes."""
    from vllm import ModelRegistry

    from vllm_ernie45.model import ErnieDenseForCausalLM, ErnieMoeForCausalLM
    from vllm_ernie45.mtp import ErnieMTPDraft

    vllm_ernie45.register()
    expected = {
        ErnieMoeForCausalLM: "vllm.model_executor.models.ernie45_moe.Ernie4_5_MoeForCausalLM",
        ErnieDenseForCausalLM: "vllm.model_executor.models.ernie45.Ernie4_5ForCausalLM",
        ErnieMTPDraft: "vllm.model_executor.models.ernie_mtp.ErnieMTP",
    }
    for plugin_cls, name in expected.items():
        found = compat.in_tree_model_cls(plugin_cls.in_tree_architecture)
        assert f"{found.__module__}.{found.__qualname__}" == name
        assert not issubclass(found, plugin_cls)  # so Python skips the plugin's __init__
        # what vLLM reads from the class before building it agrees with the in-tree class
        assert getattr(found, "packed_modules_mapping", None) == getattr(plugin_cls, "packed_modules_mapping", None)
    # ...while the registry itself resolves to the plugin
    assert ModelRegistry._try_load_model_cls("Ernie4_5_MoeForCausalLM") is ErnieMoeForCausalLM
    embed = compat.in_tree_model_cls("Ernie4_5_MoeForCausalLM", "embed")
    assert issubclass(embed, compat.in_tree_model_cls("Ernie4_5_MoeForCausalLM"))
    assert embed.__name__ != "Ernie4_5_MoeForCausalLM"  # vLLM's pooling adapter around it
    with pytest.raises(compat.UnsupportedVllmVersion, match="Ernie4_5_ForCausalLM"):
        compat.in_tree_model_cls("Ernie4_5_ForCausalLM")  # vLLM has no class for the first name


class _Recorder:
    """A stand-in for vLLM's in-tree class: records what it was built with."""

    packed_modules_mapping = {"recorded": ["a", "b"]}
    built: list = []

    def __init__(self, *, vllm_config, prefix=""):
        _Recorder.built.append((vllm_config, prefix))
        self.vllm_config, self.prefix = vllm_config, prefix


@pytest.fixture
def recorded(monkeypatch):
    """The in-tree class is the recorder, the plugin's logger a list, the once-flag fresh."""
    warnings: list[str] = []
    looked_up: list[tuple] = []

    class Logger:
        def warning(self, msg, *args):
            warnings.append(msg % args)

    def lookup(arch, convert_type="none"):
        looked_up.append((arch, convert_type))
        return _Recorder

    monkeypatch.setattr(_Recorder, "built", [])
    monkeypatch.setattr(compat, "in_tree_model_cls", lookup)
    monkeypatch.setattr(in_tree, "_logger", lambda: Logger())
    monkeypatch.setattr(in_tree, "_warned", set())
    return SimpleNamespace(warnings=warnings, looked_up=looked_up)


def test_bitsandbytes_hands_every_class_over_with_one_warning(recorded):
    from vllm_ernie45.model import ErnieDenseForCausalLM, ErnieMoeForCausalLM
    from vllm_ernie45.mtp import ErnieMTPDraft

    config = fake_config(quantization=BNB, load_format=BNB)
    config.quant_config = SimpleNamespace(packed_modules_mapping={"from_plugin_class": []})
    models = [cls(vllm_config=config, prefix=f"p{i}")
              for i, cls in enumerate((ErnieMoeForCausalLM, ErnieMTPDraft, ErnieDenseForCausalLM))]
    assert all(type(m) is _Recorder for m in models)
    assert _Recorder.built == [(config, "p0"), (config, "p1"), (config, "p2")]
    assert recorded.looked_up == [("Ernie4_5_MoeForCausalLM", "none"), ("ErnieMTPModel", "none"),
                                  ("Ernie4_5ForCausalLM", "none")]
    # vLLM's configure_quant_config, redone for the class that is built
    assert config.quant_config.packed_modules_mapping is _Recorder.packed_modules_mapping
    assert len(recorded.warnings) == 1, recorded.warnings  # the target and its draft: one warning
    for part in ("steps aside", "quantization 'bitsandbytes'", "in-tree ERNIE 4.5",
                 "not verified with vLLM's bitsandbytes loader", "To silence this", "VLLM_PLUGINS="):
        assert part in recorded.warnings[0], (part, recorded.warnings[0])


def test_pooling_conversion_is_passed_on(recorded):
    from vllm_ernie45.model import ErnieMoeForCausalLM

    config = fake_config(quantization=BNB)
    config.model_config.convert_type = "embed"
    ErnieMoeForCausalLM(vllm_config=config, prefix="")
    assert recorded.looked_up == [("Ernie4_5_MoeForCausalLM", "embed")]


@pytest.mark.parametrize("quantization", [None, "compressed-tensors"])
def test_other_quantizations_build_the_plugins_model(recorded, monkeypatch, quantization):
    from vllm_ernie45.model import ErnieMoeForCausalLM

    inits = []
    monkeypatch.setattr(ErnieMoeForCausalLM, "__init__",
                        lambda self, *, vllm_config, prefix="": inits.append((vllm_config, prefix)))
    config = fake_config(quantization)
    model = ErnieMoeForCausalLM(vllm_config=config, prefix="model")
    assert type(model) is ErnieMoeForCausalLM and inits == [(config, "model")]
    assert recorded.looked_up == [] and recorded.warnings == []


def test_copy_and_pickle_construction_is_unchanged():
    """copy / pickle call cls.__new__(cls) without arguments: the plugin's object."""
    from vllm_ernie45.model import ErnieDenseForCausalLM
    from vllm_ernie45.mtp import ErnieMTPDraft

    for cls in (ErnieDenseForCausalLM, ErnieMTPDraft):
        assert type(cls.__new__(cls)) is cls


# ----------------------------------------------------------------------------- real classes

_BUILD_CHILD = """
import json, sys, tempfile
if __name__ == "__main__":
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.model_loader.utils import initialize_model
    from vllm_ernie45.model import ErnieDenseForCausalLM, ErnieMoeForCausalLM
    from vllm_ernie45.mtp import ErnieMTPDraft

    moe_dir, dense_dir = sys.argv[1], sys.argv[2]
    def config(model, **kw):  # a fresh config per model: attention layer names are per config
        return EngineArgs(model=model, dtype="float32", enforce_eager=True, skip_tokenizer_init=True,
                          max_model_len=256, **kw).create_engine_config()
    first = config(moe_dir)  # an MoE config: vLLM makes the EP group for MoE models only
    with set_current_vllm_config(first):
        init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                     distributed_init_method="file://" + tempfile.mktemp())
        initialize_model_parallel(1, 1)
    built = {}
    for quantization in (None, "bitsandbytes"):
        cases = [("moe", config(moe_dir), ErnieMoeForCausalLM, None),
                 ("dense", config(dense_dir), ErnieDenseForCausalLM, None)]
        spec = config(moe_dir, speculative_config={"method": "mtp", "num_speculative_tokens": 1})
        cases.append(("mtp", spec, ErnieMTPDraft, spec.speculative_config.draft_model_config))
        for name, vllm_config, cls, model_config in cases:
            vllm_config.model_config.quantization = quantization  # as vLLM 0.26 sets it for bnb
            with set_current_vllm_config(vllm_config):  # as vLLM's loaders call it
                model = initialize_model(vllm_config, model_class=cls, model_config=model_config)
            built[f"{name} {quantization}"] = f"{type(model).__module__}.{type(model).__qualname__}"
    print("RESULT " + json.dumps(built))
"""


def test_vllms_initialize_model_builds_in_tree_classes_for_bitsandbytes(tiny_checkpoint):
    """Real models through vLLM's ``initialize_model`` (the class the registry gave -- the
    plugin's -- as ``model_class``): bitsandbytes gives vLLM's in-tree MoE, dense and MTP
    classes, built and working as modules, with one warning in the process; otherwise the
    plugin's own."""
    proc = run_python(["-c", _BUILD_CHILD, str(tiny_checkpoint("legacy")), str(tiny_checkpoint("dense"))],
                      timeout=600, env={"VLLM_ERNIE45_STRICT": "1"})
    results = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert proc.returncode == 0 and results, (proc.stdout + proc.stderr)[-6000:]
    built = json.loads(results[-1][len("RESULT "):])
    assert built == {
        "moe None": "vllm_ernie45.model.ErnieMoeForCausalLM",
        "dense None": "vllm_ernie45.model.ErnieDenseForCausalLM",
        "mtp None": "vllm_ernie45.mtp.ErnieMTPDraft",
        "moe bitsandbytes": "vllm.model_executor.models.ernie45_moe.Ernie4_5_MoeForCausalLM",
        "dense bitsandbytes": "vllm.model_executor.models.ernie45.Ernie4_5ForCausalLM",
        "mtp bitsandbytes": "vllm.model_executor.models.ernie_mtp.ErnieMTP",
    }, built
    # vLLM's log handler, as a user sees it: one warning for the three handovers
    warnings = [l for l in (proc.stdout + proc.stderr).splitlines() if "vllm-ernie45" in l and "WARNING" in l]
    assert len(warnings) == 1, warnings
    assert "steps aside for this engine (quantization 'bitsandbytes')" in warnings[0]
