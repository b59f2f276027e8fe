"""Extract the TensorRT Python API names, per version, from NVIDIA's real `tensorrt-cu12-bindings` wheels.

    python tools/trt_api_surface.py --out compile/tensorrt_api.json \
        10.3.0 10.8.0.43 10.12.0.36 10.16.1.11 11.0.0.114 11.4.0.106

The wheels' ``tensorrt.so`` cannot be imported without TensorRT's libraries (``tensorrt-cu12-libs`` is not
on PyPI), but pybind11 registers every class, enum value, method and property by a C string that the
registration code loads with a RIP-relative ``lea``; ``objdump -d -C`` shows those loads and the calls they
feed. Per version the table holds:
- ``enums``: exact. Each ``pybind11::enum_<T>::value(name, ...)`` call takes its name in rsi, and the
  ``enum_<T>`` constructor takes T's Python name in rdx: ``BuilderFlag.FP16`` is there in 10.x, gone in 11.0.
- ``module``: the CamelCase names (classes, enums) and the top-level names of the wheel's ``__init__.py``
  (``__version__``, ``nptype``).
- ``enums`` also holds enums with a single value (``OnnxParserFlag`` before 10.16), whose ``value`` call the
  compiler inlined into ``pybind11::detail::enum_base::value(name, ...)``: the value goes to the enum whose
  constructor came last.
- ``members``: {C++ class name without namespace: names} from the ``pybind11::class_<T, ...>::def*(name, ...)``
  calls (name in rsi). Partial: registrations the compiler inlined have no such call, so a class lacks some of
  its members; a name on no class is only in ``names``.
- ``names``: every other identifier the code loads (methods, properties, argument names), not attributed to
  a class: a method missing from ``members`` is checked against all names of the version (a superset; a name
  removed everywhere is caught).

Needs: pip (to download, ``--no-deps``), ``objdump`` (binutils), x86-64 wheels. Nothing is imported from them.
"""
from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import struct
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "tensorrt-cu12-bindings"
IDENT = re.compile(rb"^[A-Za-z_][A-Za-z0-9_]*$")
SCOPE = re.compile(r"^[A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*$")  # CamelCase: a class or enum
MANGLED = re.compile(r"^N\d|^_Z|^St\d")  # C++ type names that pybind11 also keeps as strings
LEA = re.compile(r"\blea\s+\w+,\[rip\+0x[0-9a-f]+\]\s+#\s+([0-9a-f]+)")


def download(version: str, dest: Path) -> Path:
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version", "3.11",
                    "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64", "-q", "-d", str(dest),
                    f"{PACKAGE}=={version}"], check=True)
    return next(dest.glob(f"tensorrt_cu12_bindings-{version}-*.whl"))


def rodata_reader(so: bytes):
    """A function address -> NUL-terminated string in .rodata (ELF64 little endian)."""
    shoff = struct.unpack_from("<Q", so, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", so, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", so, shoff + i * shentsize) for i in range(shnum)]
    names_off = sections[shstrndx][4]

    def name(off: int) -> str:
        return so[names_off + off:so.index(b"\0", names_off + off)].decode()
    ro = [(addr, off, size) for n, _t, _f, addr, off, size in sections if name(n).startswith(".rodata")]

    def read(addr: int) -> bytes | None:
        for start, off, size in ro:
            if start <= addr < start + size:
                pos = off + addr - start
                return so[pos:so.index(b"\0", pos)]
        return None
    return read


ENUM_VALUE = re.compile(r"<pybind11::enum_<([\w:]+)>::value\(")
ENUM_CTOR = re.compile(r"<pybind11::enum_<([\w:]+)>::enum_<")
ENUM_BASE_VALUE = re.compile(r"<pybind11::detail::enum_base::value\(")
CLASS_DEF = re.compile(r"call\s+[0-9a-f]+ <pybind11::class_<(.*?)>::(?:def|def_property|def_property_readonly|def_readwrite|"
                       r"def_readonly|def_static|def_property_static|def_property_readonly_static)<")


def first_template_arg(text: str) -> str:
    """``nvinfer1::IBuilder, std::unique_ptr<...>`` -> ``IBuilder``."""
    depth = 0
    for i, c in enumerate(text):
        depth += (c == "<") - (c == ">")
        if c == "," and depth == 0:
            text = text[:i]
            break
    return text.split("::")[-1].strip()


def scan(so_path: Path) -> tuple[list[str], dict[str, set[str]], dict[str, set[str]]]:
    """(identifier strings the code loads, in code order, minus enum values; {enum: values}; {class: members}).

    Enum values are exact: each ``pybind11::enum_<T>::value(name, ...)`` call takes its name in rsi, and the
    ``enum_<T>`` constructor takes the Python name of T in rdx."""
    read = rodata_reader(so_path.read_bytes())
    dis = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", "-M", "intel", str(so_path)],
                         check=True, capture_output=True, text=True).stdout
    order: list[str | None] = []
    last: dict[str, int] = {}  # register -> index in order of the string it was last loaded with
    values: dict[str, set[str]] = {}
    members: dict[str, set[str]] = {}
    py_name: dict[str, str] = {}
    current_enum = None
    for line in dis.splitlines():
        m = LEA.search(line)
        if m:
            s = read(int(m.group(1), 16))
            if s and IDENT.match(s):
                order.append(s.decode())
                last[line.split("lea", 1)[1].split(",")[0].strip()] = len(order) - 1
            continue
        if "call" not in line:
            continue
        v, c, d = ENUM_VALUE.search(line), ENUM_CTOR.search(line), CLASS_DEF.search(line)
        name = order[last["rsi"]] if "rsi" in last else None
        inlined = ENUM_BASE_VALUE.search(line) and current_enum
        if (v or inlined) and name is not None:
            values.setdefault(v.group(1) if v else current_enum, set()).add(name)
            order[last.pop("rsi")] = None  # consumed: not a member of the class scope around it
        elif c:
            current_enum = c.group(1)
            if "rdx" in last and order[last["rdx"]] is not None:
                py_name[c.group(1)] = order[last["rdx"]]
        elif d and name is not None:
            members.setdefault(first_template_arg(d.group(1)), set()).add(name)
        last.clear()
    enums = {py_name.get(cpp, cpp.split("::")[-1]): names for cpp, names in values.items()}
    return [n for n in order if n is not None], enums, members


def surface_of(names: list[str], enums: dict[str, set[str]], members: dict[str, set[str]], init: list[str]) -> dict:
    """{module: [top-level names], enums: {enum: [values]}, members: {class: [names]} (partial), names: [every
    other registered name]}.

    Enum values are exact per enum. Class members are not attributed to their class (newer pybind11
    registers them out of order), so a method name is checked against every name the version registers."""
    module = set(enums) | set(init) | {n for n in names if SCOPE.match(n) and not MANGLED.match(n)}
    rest = {n for n in names if not MANGLED.match(n) and n not in module}
    classes = {k: sorted(v) for k, v in sorted(members.items()) if SCOPE.match(k) and not MANGLED.match(k)}
    return {"module": sorted(module), "enums": {k: sorted(v) for k, v in sorted(enums.items())}, "members": classes,
            "names": sorted(rest)}


def init_names(source: str) -> list[str]:
    """Top-level names the wheel's tensorrt/__init__.py defines."""
    out = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Assign):
            out.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return sorted(out)


def surface(wheel: Path, work: Path) -> dict:
    with zipfile.ZipFile(wheel) as z:
        so = work / "extracted" / wheel.stem / "tensorrt.so"
        so.parent.mkdir(parents=True, exist_ok=True)
        so.write_bytes(z.read("tensorrt_bindings/tensorrt.so"))
        init = z.read("tensorrt_bindings/__init__.py").decode()
    names, enums, members = scan(so)
    return surface_of(names, enums, members, init_names(init))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("versions", nargs="+", help=f"{PACKAGE} versions, e.g. 10.3.0 11.4.0.106")
    ap.add_argument("--out", required=True, help="JSON table to write")
    ap.add_argument("--wheels", help="folder with the wheels already downloaded (default: pip download them)")
    args = ap.parse_args(argv)
    table = {"source": f"pybind11 names registered in {PACKAGE} tensorrt.so (tools/trt_api_surface.py)",
             "versions": {}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for v in args.versions:
            found = list(Path(args.wheels).glob(f"tensorrt_cu12_bindings-{v}-*.whl")) if args.wheels else []
            wheel = found[0] if found else download(v, work)
            table["versions"][v] = dict(surface(wheel, work), wheel=wheel.name, wheel_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest())
            t = table["versions"][v]
            print(f"{v}: {len(t['module'])} module names, {len(t['enums'])} enums, {len(t['names'])} other names ({wheel.name})")
    # one list per line: readable, and a new version is a small diff
    text = json.dumps(table, indent=1)
    text = re.sub(r"\[\s+([^\[\]{}]*?)\s+\]", lambda m: "[" + re.sub(r",\s+", ", ", m.group(1)) + "]", text)
    Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
