"""scripts/check_vllm_sources.py (the static check of a vLLM release's sources) against the
installed vLLM: its answer for compat.code_paths() must be what compat.py picks when it
imports that vLLM, and nothing the plugin needs may be reported missing or changed. Plus its
resolver and its exit status on a tiny synthetic tree.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import sys
from pathlib import Path

import pytest

from vllm_ernie45 import compat

pytestmark = pytest.mark.version_smoke

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "check_vllm_sources.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("check_vllm_sources", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


checker = _load_script()


@pytest.fixture(scope="module")
def installed_result():
    spec = importlib.util.find_spec("vllm")
    assert spec is not None and spec.submodule_search_locations
    root = Path(next(iter(spec.submodule_search_locations))).parent  # site-packages
    return checker.check(root)


def test_code_paths_agree_with_compat_on_the_installed_vllm(installed_result):
    from vllm.platforms import current_platform

    expected = compat.code_paths()
    read = dict(installed_result["code_paths"])
    if not current_platform.is_cpu():  # the script answers for CPU; on a GPU compat picks GateLinear
        read["gate_linear"] = "GateLinear"
    assert read == expected
    assert compat.parse_minor(installed_result["version"]) == compat.parse_minor(compat.installed_vllm_version())


def test_nothing_the_plugin_needs_is_missing_on_the_installed_vllm(installed_result):
    bad = [c for c in installed_result["checks"] if c["status"] in ("MISSING", "CHANGED")]
    assert not bad, "\n".join(f"{c['status']} {c['what']} [{c['where']}] {c['detail']}" for c in bad)
    whats = " | ".join(c["what"] for c in installed_result["checks"])
    # the inventory really covered the plugin: its model imports, the factory call, the MTP draft
    for expected in ("import vllm.model_executor.models.interfaces.MixtureOfExperts",
                     "compat.fused_moe_factory()(", "compat.gate_linear_cls()(",
                     "calls the draft: model(**", "ErnieMTPModel"):
        assert expected in whats


def _tiny_tree(root: Path) -> Path:
    pkg = root / "vllm"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "MODULE_ATTRS = {'Lazy': '.sub.impl:Lazy'}\n"
        "def __getattr__(name):\n    raise AttributeError(name)\n"
    )
    (pkg / "_version.py").write_text("__version__ = version = '0.99.0'\n")
    (pkg / "sub" / "__init__.py").write_text("from .impl import *\nfrom .impl import Thing as Alias\n")
    (pkg / "sub" / "impl.py").write_text(
        "from typing import overload\n"
        "class Thing:\n    def __init__(self, a, b=1, *, c, d=None):\n        pass\n"
        "@overload\ndef make(x: int) -> int: ...\n"
        "def make(x, y=0, **kw):\n    return x\n"
    )
    return root


def test_resolver_follows_reexports_star_imports_and_lazy_getattr(tmp_path):
    tree = checker.Tree(_tiny_tree(tmp_path))
    assert tree.version == "0.99.0"
    thing = tree.find("vllm.sub", "Thing")  # through the star import
    assert isinstance(thing.node, ast.ClassDef) and thing.module == "vllm.sub.impl"
    assert tree.find("vllm.sub", "Alias").node is thing.node
    assert tree.find("vllm", "Lazy").kind == "lazy"
    assert tree.find("vllm.sub", "Nope") is None
    c = checker.Checker(tree, REPO)
    sig, _ = c.callable_signature(thing)
    assert checker.check_call(sig, 1, ["c"], False, False) == []
    assert checker.check_call(sig, 1, ["e"], False, False) == ["no parameter 'e'", "required ['c'] not passed"]
    assert checker.check_call(sig, 3, ["c"], False, False) == ["3 positional arguments, accepts 2"]
    make, _ = c.callable_signature(tree.find("vllm.sub", "make"))  # the implementation, not the @overload
    assert make.varkw and checker.check_call(make, 2, ["anything"], False, False) == []


def test_cli_exit_status_and_json_on_a_tree_missing_everything(tmp_path, capsys):
    root = _tiny_tree(tmp_path)
    assert checker.main([str(root), "--json"]) == 1
    result = json.loads(capsys.readouterr().out)
    assert result["version"] == "0.99.0"
    assert result["counts"]["MISSING"] > 0
    assert result["code_paths"]["fused_moe"] == "MISSING"
