"""One direction of dependencies (issue 17): a module of src/fedhubert imports only modules of its own layer or
lower ones, and no two packages import each other, not even through others. Imports inside functions count as
much as those at the top of a file: a function-level import hides a dependency, it does not remove it."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
ROOT = "fedhubert"

# Bottom to top. A name covers that module or package and everything in it (the most specific name wins), except
# the root package's name, which stands for its __init__ alone: every module must be placed here explicitly.
LAYERS: dict[str, tuple[str, ...]] = {
    "core": (  # framework-free: no Flower, no stage
        "fedhubert",
        "fedhubert.atomic",
        "fedhubert.errors",
        "fedhubert.config",
        "fedhubert.runlog",
        "fedhubert.parallel",
        "fedhubert.plots",
        "fedhubert.display",
        "fedhubert.audio",
        "fedhubert.manifest",
        "fedhubert.corpus",
        "fedhubert.model",
        "fedhubert.train",
        "fedhubert.labels.mfcc",
        "fedhubert.labels.features",
        "fedhubert.labels.kmeans",
        "fedhubert.labels.quality",
        "fedhubert.labels.speakers",
        "fedhubert.labels.settings",
        "fedhubert.eval.speech_commands_format",
    ),
    "fl": ("fedhubert.fl",),  # the Flower library: round loop, client round, weights, records, federation runner
    "stages": (
        "fedhubert.partition",
        "fedhubert.labels",
        "fedhubert.pretrain",
        "fedhubert.distill",
        "fedhubert.eval",
    ),
    # Wiring (../shared/ARCHITECTURE.md): the composition roots, and the report, which reads every stage's files.
    "top": ("fedhubert.cli", "fedhubert.__main__", "fedhubert.app", "fedhubert.secagg_app", "fedhubert.report"),
}
ORDER = list(LAYERS)


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    where: str  # file:line


def module_name(path: Path, src: Path) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str | None:
    covering = [
        (len(name), layer)
        for layer, names in LAYERS.items()
        for name in names
        if module == name or (name != ROOT and module.startswith(name + "."))
    ]
    return max(covering)[1] if covering else None


def package_of(module: str) -> str:
    """The unit of the cycle check: `fedhubert.labels.mfcc` -> `fedhubert.labels`; a top-level module is its own."""
    return ".".join(module.split(".")[:2])


def imports(src: Path) -> list[Import]:
    """Every import of a fedhubert module by a fedhubert module, wherever in the file it is."""
    files = {module_name(path, src): path for path in sorted((src / ROOT).rglob("*.py"))}
    found = []
    for importer, path in files.items():
        package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([node.module] if node.module else []))
                # `from package import module` imports that module; `from module import name`, the module
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in files else base for alias in node.names]
            else:
                continue
            where = f"{path.relative_to(src)}:{node.lineno}"
            found += [
                Import(importer, target, where) for target in targets if target == ROOT or target.startswith(ROOT + ".")
            ]
    return found


def unplaced(src: Path) -> list[str]:
    return sorted(module_name(p, src) for p in (src / ROOT).rglob("*.py") if layer_of(module_name(p, src)) is None)


def upward_imports(src: Path) -> list[str]:
    return sorted(
        f"{i.where}: {i.importer} ({layer_of(i.importer)}) imports {i.imported} ({layer_of(i.imported)})"
        for i in imports(src)
        if ORDER.index(layer_of(i.imported)) > ORDER.index(layer_of(i.importer))
    )


def package_cycles(src: Path) -> list[str]:
    """Each group of packages that import one another (directly or through others), with the imports between them."""
    edges: dict[tuple[str, str], str] = {}
    for i in imports(src):
        pair = (package_of(i.importer), package_of(i.imported))
        if pair[0] != pair[1]:
            edges.setdefault(pair, i.where)
    graph: dict[str, set[str]] = {}
    for a, b in edges:
        graph.setdefault(a, set()).add(b)
    reach = {package: _reachable(graph, package) for package in graph}
    groups = {frozenset(q for q in reach if q in reach[p] and p in reach[q]) for p in reach if p in reach[p]}
    cycles = []
    for group in groups:
        inside = "; ".join(f"{a} -> {b} ({where})" for (a, b), where in sorted(edges.items()) if {a, b} <= group)
        cycles.append(f"{', '.join(sorted(group))} import one another: {inside}")
    return sorted(cycles)


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_every_module_has_a_layer():
    missing = unplaced(SRC)
    assert not missing, "place these modules in LAYERS:\n" + "\n".join(missing)


def test_no_module_imports_a_higher_layer():
    upward = upward_imports(SRC)
    assert not upward, "\n".join(upward)


def test_no_two_packages_import_each_other():
    cycles = package_cycles(SRC)
    assert not cycles, "\n".join(cycles)
