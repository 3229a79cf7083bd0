"""lab/ is layered: no module imports, directly or around a circle, one that imports it back, except the backend factory."""
import ast
from pathlib import Path

import lab

PACKAGE = Path(lab.__file__).resolve().parent
# engine/backend.py picks an implementation at run time; the implementations build on its interface
ALLOWED = {("lab.engine.backend", "lab.engine.wgpu"), ("lab.engine.backend", "lab.engine.numpy_backend")}


def _modules():
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = ("lab",) + path.relative_to(PACKAGE).with_suffix("").parts
        is_pkg = parts[-1] == "__init__"
        mods[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return mods


def import_graph():
    """module -> {imported lab module: first line}, over imports anywhere in the file (module level and inside functions)."""
    mods = _modules()
    graph = {}
    for name, (path, is_pkg) in mods.items():
        package = name if is_pkg else name.rpartition(".")[0]
        edges = graph.setdefault(name, {})
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` loads the submodule; `from pkg import name` loads pkg's __init__
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:  # `import lab.x.y` where y is a name: the deepest module
                    t = t.rpartition(".")[0]
                if t and t != name and (name, t) not in ALLOWED:
                    edges.setdefault(t, node.lineno)
    return graph


def circles(graph):
    """The strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _describe(comp, graph):
    inside = set(comp)
    return "; ".join(f"{a} -> {b} (line {graph[a][b]})" for a in comp for b in sorted(graph[a]) if b in inside)


def test_circle_finder_sees_function_level_and_relative_imports():
    # the walker must see the imports it polices, or the layering test below could not fail
    graph = import_graph()
    assert "lab.engine.backend" in graph["lab.engine.tensor"]  # module-level, relative
    assert "lab.engine.wgpu" not in graph["lab.engine.backend"]  # the factory, and only it, is exempt
    assert "lab.engine.backend" in graph["lab.engine.wgpu.backend"]
    assert "lab.data" in graph["lab.cli"]  # function-level, absolute
    assert circles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]


def test_no_import_circle_except_the_backend_factory():
    graph = import_graph()
    found = [_describe(c, graph) for c in circles(graph)]
    assert not found, "import circles in lab/:\n" + "\n".join(found)


def test_old_checkpoint_import_paths_name_the_io_objects():
    # the file I/O moved to lab.io; code written against lab.checkpoint keeps working with the same objects
    from lab import checkpoint, data, io, lora
    from lab.data import pretrained
    for name in ("CheckpointError", "NonFiniteSaveError", "atomic_files", "reading", "read_json", "read_safetensors",
                 "check_save_target", "finish_interrupted_save", "JOURNAL_FILE"):
        assert getattr(checkpoint, name) is getattr(io, name), name
    # a save may remove exactly the stale parts checkpoints, adapters, pretrained tokenizers and exports leave: io
    # spells their names itself
    assert io.REMOVABLE == {checkpoint.OPTIMIZER_FILE, checkpoint.STATE_FILE, lora.ADAPTER_FILE, lora.ADAPTER_CONFIG,
                            pretrained.TEMPLATE_FILE, pretrained.SPECIAL_TOKENS_FILE, io.INDEX_FILE,
                            data.LAB_TOKENIZER_FILE}   # (+ io.SHARD_NAME)


def test_adapter_methods_come_from_lora_not_from_nn():
    # nn's Module knows nothing of LoRA; the models that support adapters take its methods from lora.Adapters
    from lab import lora, nn
    from lab.models import ProNeuralLM, TransformerLM
    methods = ("use_adapter", "save_adapter", "merge_adapter", "unmerge_adapter")
    assert not any(hasattr(nn.Module, m) for m in methods)
    for cls in (TransformerLM, ProNeuralLM):
        assert issubclass(cls, lora.Adapters) and all(callable(getattr(cls, m)) for m in methods)
    assert TransformerLM.peft_prefix == "base_model.model.transformer."   # where PEFT's GPT-2 files name weights


def _reachable(graph, start):
    seen, todo = set(), [start]
    while todo:
        for t in graph[todo.pop()]:
            if t not in seen:
                seen.add(t)
                todo.append(t)
    return seen


def test_lower_layers_import_nothing_above_them():
    # the planner's arithmetic is called by models and trainers; file I/O by models, checkpoints and adapters
    graph = import_graph()
    engine = {m for m in graph if m.startswith("lab.engine.") or m == "lab.engine"}
    allowed = {
        "lab.plan.estimator": {"lab.checks", "lab.plan.profiles"} | engine,
        "lab.plan.profiles": {"lab.checks"} | engine,
        "lab.io": {"lab.checks"},
        "lab.nn": {"lab.checks"} | engine,
    }
    for module, below in allowed.items():
        assert _reachable(graph, module) <= below, (module, sorted(_reachable(graph, module) - below))


def test_every_op_of_the_ops_modules_is_reachable_from_lab_engine_ops():
    # ops.py became a package of modules by kind; code reaches the ops as F.name, so __init__ must export each
    import inspect
    from lab.engine import ops
    kinds = ("elementwise", "reductions", "shape", "linalg", "nn", "attention")
    for kind in kinds:
        module = getattr(ops, kind)
        for name, fn in inspect.getmembers(module, inspect.isfunction):
            if fn.__module__ == module.__name__:
                assert getattr(ops, name, None) is fn, f"lab.engine.ops.{kind}.{name} is not lab.engine.ops.{name}"


def test_star_import_of_ops_gives_the_ops_not_its_submodules():
    # the submodules' names (nn, shape) would shadow a caller's own, as ops.py's star import never did
    from lab.engine import ops
    names = {}
    exec("from lab.engine.ops import *", names)
    assert names["matmul"] is ops.matmul and names["rms_norm"] is ops.rms_norm
    assert not {"nn", "shape", "linalg", "attention", "elementwise", "reductions"} & set(names)
