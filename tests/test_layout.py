"""The package's layout: no import cycles (registries are leaves), no oversized modules."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "prdp_jax")
MAX_LINES = 420


def modules() -> dict[str, str]:
    """{dotted module name: path} of every module of prdp_jax."""
    out = {}
    for folder, _, names in os.walk(PACKAGE):
        for name in names:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].replace(os.sep, ".")
                out[rel[:-len(".__init__")] if rel.endswith(".__init__") else rel] = \
                    os.path.join(folder, name)
    return out


def import_graph() -> dict[str, set[str]]:
    """Module -> the prdp_jax modules importing it runs, at any depth of its code (function-level
    imports count too), including the packages whose __init__ an import executes."""
    mods = modules()

    def with_parents(name: str) -> set[str]:
        parts = name.split(".")
        return {".".join(parts[:i]) for i in range(2, len(parts) + 1)} & set(mods)

    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for target in targets:
                if target.split(".")[0] == "prdp_jax":
                    deps |= with_parents(target)
        deps.discard(name)
        deps.discard("prdp_jax")  # the top-level __init__ imports nothing
        graph[name] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]):
    """One import cycle as a list of modules, or None."""
    state = {}

    def visit(node, path):
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep, path + [dep])
                if found:
                    return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start, [start])
            if found:
                return found
    return None


def test_find_cycle_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycles():
    graph = import_graph()
    assert "prdp_jax.plugins" in graph["prdp_jax.rewards.combine"]  # the graph sees imports
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), ()):
            if dep not in seen:
                seen.add(dep)
                todo.append(dep)
    return seen


def test_registries_are_leaves():
    """The registries reach no plugin (plugins import them), and only `plugins` lists them."""
    graph = import_graph()
    plugins = graph["prdp_jax.plugins"]
    assert {"prdp_jax.pipelines.sd", "prdp_jax.world.pipeline", "prdp_jax.rewards.jpeg",
            "prdp_jax.world.prompts"} <= plugins
    for registry in ("prdp_jax.pipelines.base", "prdp_jax.rewards.registry",
                     "prdp_jax.prompts.registry"):
        assert not reachable(graph, registry) & (plugins | {"prdp_jax.plugins"}), registry


def test_no_oversized_modules():
    long = {name: n for name, path in modules().items()
            if (n := sum(1 for _ in open(path))) > MAX_LINES}
    assert not long, long
