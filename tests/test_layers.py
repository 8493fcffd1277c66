"""The package's layers, read from the source: every import inside src/gradroute (also the ones
inside functions) goes to the same layer or one below it, the module graph has no cycle, and no
module imports another module's private name.

    core (route, masks, adapters, hooks, surgery, params, modules, models)
      <- hf <- lm (with utils, sweep, data, envs) <- experiments <- reproduce, cli, demo
"""
import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "gradroute"

LAYERS = {
    "core": ["gradroute", "core", "masks", "adapters", "hooks", "surgery", "params", "modules", "models"],
    "hf": ["hf"],
    "lm": ["lm", "utils", "sweep", "data", "envs"],
    "experiments": ["experiments"],
    "app": ["reproduce", "cli", "demo"],
}
ORDER = list(LAYERS)


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """The layer of a dotted gradroute module name: that of its first component below the package."""
    parts = module.split(".")
    top = parts[1] if len(parts) > 1 else "gradroute"
    for layer, names in LAYERS.items():
        if top in names:
            return layer
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (and to the README's layout)")


def resolve(node: ast.AST, module: str, is_package: bool) -> list[tuple[str, list[str]]]:
    """(imported gradroute module, names taken from it) for one import statement."""
    if isinstance(node, ast.Import):
        return [(a.name, []) for a in node.names if a.name.split(".")[0] == "gradroute"]
    base = module.split(".") if is_package else module.split(".")[:-1]
    if node.level:
        base = base[:len(base) - (node.level - 1)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "gradroute":
        return []
    names = [a.name for a in node.names]
    # `from . import x` / `from gradroute import hf` may name submodules: count those as imports
    subs = [f"{target}.{n}" for n in names if (SRC.parent / f"{target}.{n}".replace(".", "/")).exists()
            or (SRC.parent / (f"{target}.{n}".replace(".", "/") + ".py")).exists()]
    return [(target, [n for n in names if f"{target}.{n}" not in subs])] + [(s, []) for s in subs]


def import_graph() -> dict[str, list[tuple[str, list[str], int]]]:
    graph = {}
    for path in sorted(SRC.rglob("*.py")):
        mod = module_name(path)
        edges = []
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target, names in resolve(node, mod, path.name == "__init__.py"):
                    edges.append((target, names, node.lineno))
        graph[mod] = edges
    return graph


def test_the_graph_is_read():
    graph = import_graph()
    assert "gradroute.hf" in graph and "gradroute.lm.tokenizer" in graph
    # a known import edge, so a broken parser cannot pass the tests below by finding nothing
    assert any(t == "gradroute.lm.corpus" for t, _, _ in graph["gradroute.lm.tokenizer"])
    assert any(t == "gradroute.hf" for t, _, _ in graph["gradroute.lm.tokenizer"])


def test_no_import_against_the_layer_order():
    bad = []
    for mod, edges in import_graph().items():
        for target, _, line in edges:
            if ORDER.index(layer_of(target)) > ORDER.index(layer_of(mod)):
                bad.append(f"{mod}:{line} ({layer_of(mod)}) imports {target} ({layer_of(target)})")
    assert not bad, "imports against core <- hf <- lm <- experiments <- app:\n" + "\n".join(bad)


def test_no_private_name_across_modules():
    bad = [f"{mod}:{line} takes {n} from {target}" for mod, edges in import_graph().items()
           for target, names, line in edges for n in names
           if n.startswith("_") and not n.startswith("__") and target != mod]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = {m: sorted({t for t, _, _ in e if t != m}) for m, e in import_graph().items()}
    graph = {m: [t for t in ts if t in graph] for m, ts in graph.items()}
    state: dict[str, int] = {}      # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in graph[m]:
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m)


# Test modules share helpers through conftest.py fixtures, never by importing one another (or conftest).
# A helper module without tests (fsdp_cases.py: worker functions that spawned processes import by name)
# may be imported.
def test_no_test_module_imports_another():
    tests = Path(__file__).resolve().parent
    local = {p.stem for p in tests.glob("test_*.py")} | {"conftest"}
    bad = []
    for path in sorted(tests.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad += [f"{path.name}:{node.lineno} imports {n}" for n in names if n.split(".")[0] in local | {"tests"}]
    assert not bad, "\n".join(bad)
