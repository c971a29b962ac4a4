"""The execution plan (plan.py) and the house rules it stands for: choices made once, passed down, never module
attributes; no import cycles; the fast wing reached only from the model's floors."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
import torch
from conftest import sharp_tiny

from longllama.errors import InputError
from longllama.plan import ExecutionPlan, build_plan, parse_overrides

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "longllama"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path, name: str, modules=()) -> set[str]:
    """longllama modules imported at module level (what runs at import time), resolved to module names: for
    `from package import submodule`, the submodule (the package's own __init__ is Python's business)."""
    tree = ast.parse(path.read_text())
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in tree.body:
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("longllama"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.startswith("longllama"):
                subs = {f"{base}.{a.name}" for a in node.names}
                found.update(subs & set(modules) or {base})
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {
        name: {m for m in _top_level_imports(path, name, modules) if m in modules and m != name}
        for name, path in modules.items()
    }


def test_the_package_has_no_import_cycle():
    graph = import_graph()
    assert "longllama.fast.attention" in graph and "longllama.plan" in graph  # the walk sees the package
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                pytest.fail(f"import cycle: {' -> '.join(stack[stack.index(nxt) :] + [nxt])}")
            if state.get(nxt) is None:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])


def test_the_import_walk_finds_a_cycle(tmp_path):
    """The walk above is not vacuous: a cycle written into a copy of two modules' import lines is reported."""
    a = tmp_path / "longllama" / "a.py"
    a.parent.mkdir()
    a.write_text("from longllama import b\n")
    (tmp_path / "longllama" / "b.py").write_text("from longllama.a import thing\n")
    names = {"longllama.a": a, "longllama.b": tmp_path / "longllama" / "b.py"}
    edges = {n: _top_level_imports(p, n, names) & set(names) for n, p in names.items()}
    assert "longllama.b" in edges["longllama.a"] and "longllama.a" in edges["longllama.b"]


def test_the_model_floors_do_not_import_kernel_files():
    """The model, its exact attention, the windows, memory and cache read without any kernel file: no module
    outside fast/ imports a Triton kernel module at module level."""
    graph = import_graph()
    for module, imports in graph.items():
        if module.startswith("longllama.fast"):
            continue
        assert not {m for m in imports if m.endswith("_kernels")}, module
    for module in (
        "longllama.attention",
        "longllama.memory",
        "longllama.cache",
        "longllama.ops",
        "longllama.plan",
        "longllama.config",
    ):
        assert not {m for m in graph[module] if m.startswith("longllama.fast")}, module


# Tests may patch these for instrumentation, not as settings: private sizes (`_NAME`, e.g. attention's
# _INT8_CHUNK, so that small inputs take several chunks) and the shipped model's folder (an install without it).
TEST_INSTRUMENTATION = {"SHIPPED_MODEL"}


def _uppercase_module_writes(path: Path, *, instrumentation: bool = False) -> list[str]:
    """Writes of an UPPER_CASE attribute of a longllama module (`mod.NAME = ...`, monkeypatch.setattr(mod, "NAME"));
    with `instrumentation` (tests), not those of TEST_INSTRUMENTATION or private names."""
    tree = ast.parse(path.read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("longllama"):
            modules.update(a.asname or a.name for a in node.names)
        elif isinstance(node, ast.Import):
            modules.update((a.asname or a.name).split(".")[0] for a in node.names if a.name.startswith("longllama"))

    def setting(name: str) -> bool:
        return name.isupper() and not (instrumentation and (name.startswith("_") or name in TEST_INSTRUMENTATION))

    bad = []
    for node in ast.walk(tree):
        targets = (
            node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AugAssign) else []
        )
        for t in targets:
            if (
                isinstance(t, ast.Attribute)
                and isinstance(t.value, ast.Name)
                and t.value.id in modules
                and setting(t.attr)
            ):
                bad.append(f"{path.name}:{node.lineno} {t.value.id}.{t.attr}")
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "setattr"
            and len(node.args) >= 2
            and isinstance(node.args[0], ast.Name)
            and node.args[0].id in modules
            and isinstance(node.args[1], ast.Constant)
            and setting(str(node.args[1].value))
        ):
            bad.append(f"{path.name}:{node.lineno} setattr({node.args[0].id}, {node.args[1].value!r})")
    return bad


def test_no_code_sets_a_module_setting():
    files = [*PACKAGE.rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    bad = [w for f in files for w in _uppercase_module_writes(f)]
    bad += [
        w
        for f in (ROOT / "tests").glob("*.py")
        if f.name != "test_plan.py"
        for w in _uppercase_module_writes(f, instrumentation=True)
    ]
    assert not bad, bad


def test_the_setting_scan_catches_a_write(tmp_path):
    f = tmp_path / "x.py"
    f.write_text(
        "from longllama.fast import flash4\nflash4.PARTS = 2\n"
        "def t(monkeypatch):\n    monkeypatch.setattr(flash4, 'PARTS_FROM', 1)\n"
        "    monkeypatch.setattr(flash4, '_PARTS', 1)\n"
    )
    assert len(_uppercase_module_writes(f)) == 3
    assert len(_uppercase_module_writes(f, instrumentation=True)) == 2  # a test's private size: instrumentation


def test_no_work_log_labels_in_the_package():
    label = re.compile(
        r"""\bruns? "[a-z]\d*"|\bsession \d|\bmachine [A-L]\b|\b20\d\d-[01]\d-[0-3]\d\b
                       |\bSPEC\ [A-Z]\.?\d""",
        re.X,
    )
    hits = [
        f"{p.relative_to(ROOT)}:{i}"
        for p in PACKAGE.rglob("*.py")
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if label.search(line)
    ]
    assert not hits, hits


def test_plan_of_the_cpu_is_the_exact_path():
    config = sharp_tiny().config
    plan = build_plan(config, "cpu")
    assert plan.attention == "eager" and not plan.compile and plan.device == "cpu"
    assert plan.memory_storage_dim(100) == 104  # rows of 8 on the CPU
    assert ExecutionPlan(device="cuda:0").memory_storage_dim(100) == 112
    assert ExecutionPlan(device="cuda:0", memory_width=64).memory_storage_dim(100) == 128
    config.attn_impl, config.compile_elementwise = "fast", True
    assert build_plan(config, "cpu").attention == "fast" and build_plan(config, "cpu").compile
    config.torch_attention = True
    assert build_plan(config, "cpu").attention == "sdpa"


def test_a_plan_is_replaced_never_mutated_and_prints_every_choice():
    plan = ExecutionPlan()
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.window_group_tokens = 1  # frozen
    wider = plan.replace(window_group_tokens=4096, fa4_tiles={112: (128, 128, True, False)})
    assert plan.window_group_tokens == 8192 and wider.window_group_tokens == 4096
    assert wider.tile(112) == (128, 128, True, False) and wider.tile(128) is None
    assert wider.failures is plan.failures  # failure records follow the replaced plans
    text = str(wider)
    for name in ("attention", "memory_kernel", "window_group_tokens=4096", "skip_dead_layers", "gemv_max_rows"):
        assert name in text
    assert wider.to_dict()["fa4_tiles"] == {"112": [128, 128, True, False]}


@pytest.mark.parametrize(
    "changes, hint",
    [
        (dict(window_group_tokens=0), "window_group_tokens"),
        (dict(memory_width=12), "multiple of 8"),
        (dict(memory_kernel="fast"), "memory_kernel"),
        (dict(attention="flash"), "attention"),
        (dict(no_such_choice=True), "unknown plan field"),
        (dict(device="cuda"), "move the model"),
    ],
)
def test_bad_plan_changes_are_one_line_errors(changes, hint):
    model = sharp_tiny()
    before = model.plan
    with pytest.raises(InputError) as info:
        model.set_plan(**changes)
    assert hint in str(info.value) and "\n" not in str(info.value)
    assert model.plan == before


def test_command_line_plan_values():
    assert parse_overrides(
        ["window_group_tokens=4096", "skip_dead_layers=false", "key_parts=none", "memory_kernel=cudnn"]
    ) == dict(window_group_tokens=4096, skip_dead_layers=False, key_parts=None, memory_kernel="cudnn")
    for bad in ("window_group_tokens", "device=cpu", "nope=1"):
        with pytest.raises(InputError):
            parse_overrides([bad])


def test_the_model_runs_the_plan_it_shows(monkeypatch):
    """set_plan reaches the forward: with window groups of 2 windows a 5-window input goes as 2 groups then
    one window at a time; the logits equal those of one window at a time (the same maths)."""
    from longllama import windows

    model = sharp_tiny(attn_impl="fast")
    ids = torch.randint(0, model.config.vocab_size, (1, 5 * 64 + 24))
    calls = []
    real = windows.forward_window

    def counting(layers, norm, rope, h, **kwargs):
        calls.append((h.shape[0], kwargs.get("grouped", False)))
        return real(layers, norm, rope, h, **kwargs)

    monkeypatch.setattr(windows, "forward_window", counting)
    with torch.no_grad():
        model.set_plan(window_group_tokens=64)
        one = model(ids).logits
        singles = list(calls)
        calls.clear()
        model.set_plan(window_group_tokens=128)
        grouped = model(ids).logits
    assert all(not g for _, g in singles) and len(singles) == 6
    assert calls[:2] == [(2, True), (2, True)] and len(calls) == 4
    torch.testing.assert_close(grouped, one, rtol=0, atol=1e-5)
    assert model.plan.window_group_tokens == 128


def test_the_plan_follows_the_device_and_the_config():
    model = sharp_tiny()
    model.set_plan(skip_dead_layers=False)
    assert model.plan.attention == "eager" and not model.plan.skip_dead_layers
    model.config.attn_impl = "fast"
    assert model.plan.attention == "fast" and not model.plan.skip_dead_layers  # rebuilt, changes kept
