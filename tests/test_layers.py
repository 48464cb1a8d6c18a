"""The package imports one way: no cycle anywhere (imports inside functions count), no private
name taken from another module, and the recording side layered dataset -> collate -> storage
core -> sinks -> record, with integrations on the public API only. The storage core is a
package of small modules, and only it writes its state."""
import ast
import os

import pytest

PACKAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "provcollate")

# Each module's layer: a module may import only modules of lower layers.
LAYERS = {
    "_checks": 0, "_progress": 0, "_keys": 0, "reference": 0,
    "ops": 1, "dataset": 1, "fingerprints": 1.5, "verify": 1.6,
    "collate": 2, "sampler": 2,
    # the storage core, bottom up
    "store.memory": 3.0, "store.staging": 3.0,
    "store.records": 3.1, "store.keys": 3.1,
    "store.slots": 3.2, "store.rows": 3.2,
    "store.result": 3.3, "store.fast": 3.3, "store.room": 3.3, "store.writes": 3.3,
    "store.store": 3.4,
    "store.__init__": 3.5,
    "_inputs": 4,
    "io": 5, "shards": 5, "distributed": 5,
    "record": 6,
    "cli": 7,
    "__init__": 8,
    "__main__": 9,
}


def _modules():
    """{dotted name relative to the package: path} of every Python module in it."""
    found = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), PACKAGE)[:-3].replace(os.sep, ".")
                found[rel] = os.path.join(root, f)
    return found


def _imports(name: str, path: str):
    """(imported package module, names taken from it) for every import of the package in the module."""
    modules = _modules()
    tree = ast.parse(open(path).read(), path)
    package = name.split(".")[:-1]  # the module's own package, relative
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "provcollate" or node.module.startswith("provcollate.")):
                target = node.module[len("provcollate."):] if node.module != "provcollate" else ""
            else:
                continue
            names = [a.name for a in node.names]
            if node.module is None or target == "":
                # "from . import x" / "from provcollate import x": x is a module, or a name of the package
                for n in names:
                    sub = f"{target}.{n}" if target else n
                    if sub in modules or n == "_C":
                        out.append((sub, []))
                    else:
                        out.append((target or "__init__", [n]))
            else:
                out.append((target + ".__init__" if target + ".__init__" in modules else target, names))
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name == "provcollate" or a.name.startswith("provcollate."):
                    out.append((a.name[len("provcollate."):] if a.name != "provcollate" else "__init__", []))
    return out


def _graph():
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        edges = set()
        for target, _ in _imports(name, path):
            if target in modules and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def test_no_import_cycle_in_the_package():
    graph = _graph()
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_every_module_imports_only_lower_layers():
    graph = _graph()
    for name, edges in graph.items():
        if name.startswith("integrations"):
            continue
        assert name in LAYERS, f"provcollate/{name}.py has no layer in tests/test_layers.py: give it one"
        for target in edges:
            if target == "_C":
                continue
            assert LAYERS[target] < LAYERS[name], f"{name} (layer {LAYERS[name]}) imports {target} (layer {LAYERS[target]})"


def test_no_private_name_is_imported_across_modules():
    for name, path in _modules().items():
        for target, names in _imports(name, path):
            private = [n for n in names if n.startswith("_") and n != "__version__"]
            assert not private, f"provcollate/{name}.py imports private {private} from {target}: move them to a shared layer"


def test_integrations_use_the_public_api_only():
    for name, path in _modules().items():
        if not name.startswith("integrations."):
            continue
        for target, names in _imports(name, path):
            if target.startswith("integrations"):
                continue
            assert target == "__init__", f"provcollate/{name}.py imports provcollate.{target}: integrations use `import provcollate as pc`"


def test_the_cycle_check_finds_a_cycle(tmp_path):
    """The checker itself: a package whose two modules import each other inside functions fails."""
    pkg = tmp_path / "provcollate"
    pkg.mkdir()
    (pkg / "a.py").write_text("def f():\n    from . import b\n")
    (pkg / "b.py").write_text("def g():\n    from .a import f\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, str(pkg)
    try:
        with pytest.raises(pytest.fail.Exception, match="import cycle: a -> b -> a"):
            test_no_import_cycle_in_the_package()
    finally:
        PACKAGE = saved


STORE = os.path.join(PACKAGE, "store")
# The store's state: the Store, its slot table and row stores, as modules outside the package name them.
STORE_NAMES = {"store", "_store", "merged", "table", "dense", "tokens", "staging"}


def _writes_into_store(path: str):
    """(line, target) of every assignment outside the store package that writes into an attribute
    or item of something named like the store or its parts (``store.records += n``,
    ``store.table.flat[s] = 0``, ``self._store.table.disk[...] = True``)."""
    tree = ast.parse(open(path).read(), path)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "setattr" and node.args:
            targets = [ast.Attribute(value=node.args[0], attr="?")]
        else:
            continue
        for target in targets:
            for t in (target.elts if isinstance(target, ast.Tuple) else [target]):
                chain = []  # names from the assigned attribute or item back to the root, innermost last
                cur = t
                while isinstance(cur, (ast.Attribute, ast.Subscript, ast.Call)):
                    cur = cur.func if isinstance(cur, ast.Call) else cur.value  # x.reshape(-1)[s] writes into x
                    chain.append(cur.attr if isinstance(cur, ast.Attribute) else cur.id if isinstance(cur, ast.Name) else "")
                if any(name in STORE_NAMES for name in chain):
                    found.append((node.lineno, ast.unparse(t)))
    return found


def test_only_the_store_writes_store_state():
    offenders = []
    for root, _, files in os.walk(PACKAGE):
        if os.path.abspath(root).startswith(os.path.abspath(STORE)):
            continue
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(root, f)
                offenders += [f"{os.path.relpath(path, PACKAGE)}:{line}: {target}" for line, target in _writes_into_store(path)]
    assert not offenders, "writes into the store's state from outside provcollate/store/: " + "; ".join(offenders)


def test_the_store_write_check_finds_writes(tmp_path):
    """The checker itself: each of these writes is found, and plain local assignments are not."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f(store, rec, self, block):\n"
                   "    store.records += 3\n"
                   "    store.table.flat[slots] = 0\n"
                   "    self._store.table.disk.reshape(-1)[s] = True\n"
                   "    rec._store.tokens['x'].starts[0] = 1\n"
                   "    setattr(store, 'version', 2)\n"
                   "    store = object()\n"
                   "    block.records = 3\n"
                   "    self._store = store\n")
    assert [line for line, _ in _writes_into_store(str(bad))] == [2, 3, 4, 5, 6]


def test_store_modules_and_classes_are_small():
    """No module of the storage core over 500 lines, no class over 450."""
    for f in sorted(os.listdir(STORE)):
        if not f.endswith(".py"):
            continue
        path = os.path.join(STORE, f)
        source = open(path).read()
        assert source.count("\n") <= 500, f"provcollate/store/{f} has {source.count(chr(10))} lines (at most 500)"
        for node in ast.walk(ast.parse(source, path)):
            if isinstance(node, ast.ClassDef):
                size = node.end_lineno - node.lineno + 1
                assert size <= 450, f"provcollate/store/{f}: class {node.name} has {size} lines (at most 450)"
