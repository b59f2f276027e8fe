"""The import rules of docs/architecture.md, read from its layer table, and a checker that reads every import
statement of the code with `ast` (imports inside functions included, nothing is imported or run)."""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Python package -> folder, as pyproject.toml's package-dir maps them
PACKAGE_DIRS = {"edgepipe.train": "train", "edgepipe.compile": "compile", "edgepipe.runtime": "runtime",
                "edgepipe.benchmarks": "benchmarks", "edgepipe.recipes": "recipes", "edgepipe": "edgepipe"}
CHECKED = ("runtime", "compile", "train", "benchmarks", "edgepipe")


@dataclass(frozen=True)
class Layer:
    name: str
    code: tuple[str, ...]          # folders ("runtime/") and files ("edgepipe/log.py")
    may_import: tuple[str, ...]    # layer names and code paths; ("*",) for every layer
    never: tuple[str, ...]         # third-party top-level packages


def read_layers(doc: Path = ROOT / "docs" / "architecture.md") -> list[Layer]:
    """The rows of the table whose header starts with `| layer | code |`."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.replace(" ", "").startswith("|layer|code|"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    layers = []
    for ln in lines[start + 2:]:
        if not ln.startswith("|"):
            break
        cells = dict(zip(header, (c.strip() for c in ln.strip().strip("|").split("|"))))
        ticks = {k: tuple(re.findall(r"`([^`]+)`", v)) for k, v in cells.items()}
        layers.append(Layer(ticks["layer"][0], ticks["code"],
                            ("*",) if "every layer" in cells["may import"] else ticks["may import"],
                            ticks["never imports"]))
    return layers


def module_path(module: str, root: Path) -> str | None:
    """The file (relative to ``root``) of an edgepipe module, or None for other packages."""
    for package, folder in sorted(PACKAGE_DIRS.items(), key=lambda kv: -len(kv[0])):
        if module == package or module.startswith(package + "."):
            rest = module[len(package):].lstrip(".").replace(".", "/")
            base = Path(folder) / rest if rest else Path(folder)
            if (root / base).is_dir():
                return (base / "__init__.py").as_posix()
            return base.with_suffix(".py").as_posix()
    return None


def imports_of(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in the file; ``from A import b`` counts as A.b when b is a module."""
    rel = path.relative_to(root)
    package = next(p for p, f in PACKAGE_DIRS.items() if rel.parts[0] == f)
    here = package.split(".") + list(rel.with_suffix("").parts[1:])
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: from the file's package upwards
                up = here[:len(here) - node.level + (1 if rel.name == "__init__.py" else 0)]
                module = ".".join(up + ([module] if module else []))
            for a in node.names:
                sub = f"{module}.{a.name}"
                is_module = module_path(sub, root) and (root / module_path(sub, root)).exists()
                found.append((node.lineno, sub if is_module else module))
    return found


def layer_of(path: str, layers: list[Layer]) -> Layer:
    """The layer whose code names ``path`` most closely (a file over its folder, a sub-folder over its parent)."""
    matches = [(len(c), layer) for layer in layers for c in layer.code
               if path == c or (c.endswith("/") and path.startswith(c))]
    return max(matches, key=lambda m: m[0])[1]


def violations(root: Path = ROOT, layers: list[Layer] | None = None) -> list[str]:
    """'file:line imports module (layer X may not import layer Y)' for every import the table forbids."""
    layers = layers or read_layers()
    by_name = {layer.name: layer for layer in layers}
    out = []
    for folder in CHECKED:
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            mine = layer_of(rel, layers)
            allowed = {mine.name} | {n for n in mine.may_import if n in by_name}
            paths = {p for p in mine.may_import if "/" in p}
            for line, module in imports_of(path, root):
                target = module_path(module, root)
                if target is None:
                    if module.split(".")[0] in mine.never:
                        out.append(f"{rel}:{line} imports {module} (layer {mine.name} never imports it)")
                    continue
                theirs = layer_of(target, layers)
                if "*" in mine.may_import or theirs.name in allowed or target in paths:
                    continue
                out.append(f"{rel}:{line} imports {module} (layer {mine.name} may not import layer {theirs.name})")
    return out
