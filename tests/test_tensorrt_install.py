"""Every install line that names a TensorRT package picks the CUDA 12 build: the bare `tensorrt` package (and
`tensorrt-cu13`) on the package index pulls TensorRT for CUDA 13 since 11.x, which a JetPack 6 / CUDA 12 machine
and edgepipe's `cuda-python<13` pin cannot run. Reads every .py and .md file of the repository and pyproject's
extras."""
from __future__ import annotations

import re
import tomllib

from conftest import REPO

INSTALL = re.compile(r"\bpip3?\s+install\b(?P<args>[^`(;#\n]*)")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
SKIP_DIRS = {".venv", ".git", "node_modules", "__pycache__", "build", "dist"}


def tensorrt_packages(line: str) -> list[str]:
    """The TensorRT package names (normalised) a line's `pip install` commands name."""
    found = []
    for m in INSTALL.finditer(line):
        for token in m.group("args").replace(" or ", " ").split():
            name = NAME.match(token.strip("'\"\\"))
            if name and name.group(0).lower().replace("_", "-").startswith("tensorrt"):
                found.append(name.group(0).lower().replace("_", "-"))
    return found


def bad_package(name: str) -> bool:
    """A TensorRT package that is not the CUDA 12 build (bare meta package, cu13 and newer)."""
    return not name.startswith("tensorrt-cu12")


def repo_files():
    for path in sorted(REPO.rglob("*")):
        if path.suffix in (".py", ".md") and path.is_file() and not SKIP_DIRS & set(path.relative_to(REPO).parts):
            yield path


def test_the_scanner_can_fail():
    bare = "pip install " + "tensorrt"
    assert tensorrt_packages(f"on an x86 host: {bare} (NVIDIA's index)") == ["tensorrt"]
    assert bad_package("tensorrt") and bad_package("tensorrt-cu13") and bad_package("tensorrt-cu13-libs")
    assert tensorrt_packages("pip install 'tensorrt-cu12>=10.3,<12' 'cuda-python>=12.6,<13' (or the bare tensorrt)") \
        == ["tensorrt-cu12"]
    assert tensorrt_packages("pip install --extra-index-url https://pypi.nvidia.com './edgepipe[tensorrt,onnxruntime]'") == []


def test_every_tensorrt_install_line_names_the_cuda12_build():
    seen, bad = [], []
    for path in repo_files():
        if path.name == "test_tensorrt_install.py":
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            for name in tensorrt_packages(line):
                where = f"{path.relative_to(REPO)}:{number}: {line.strip()[:160]}"
                seen.append(where)
                if bad_package(name):
                    bad.append(where)
    assert bad == [], "install lines that pull TensorRT for CUDA 13 (use 'tensorrt-cu12>=10.3,<12'):\n" + "\n".join(bad)
    assert len(seen) >= 3, f"too few TensorRT install lines found, the scan reads nothing: {seen}"
    from edgepipe.runtime.backends.base import BACKENDS
    hint = BACKENDS["tensorrt"].install_hint
    assert tensorrt_packages(hint) == ["tensorrt-cu12"] and "cuda-python>=12.6,<13" in hint


def test_pyproject_extras_pin_the_cuda12_packages():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    named = [req for reqs in extras.values() for req in reqs
             if NAME.match(req) and NAME.match(req).group(0).lower().startswith(("tensorrt", "cuda-python"))]
    assert "tensorrt-cu12>=10.3,<12" in extras["tensorrt"] and "cuda-python>=12.6,<13" in extras["tensorrt"]
    assert [r for r in named if r.startswith("tensorrt") and bad_package(r.lower())] == []
