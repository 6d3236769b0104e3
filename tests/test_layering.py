"""The core is sans-IO (DESIGN.md, "Layers"): nothing under src/podnet/core/ may import an I/O,
concurrency or clock module, read the clock, or import the layers above it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parent.parent / "src" / "podnet" / "core"

FORBIDDEN_MODULES = frozenset({
    "trio", "socket", "fcntl", "subprocess", "pyroute2", "pytun", "select", "selectors", "asyncio",
    "threading", "time",
})
# imports go one way: core <- runtime <- linux
FORBIDDEN_PODNET_LAYERS = ("podnet.runtime", "podnet.linux", "podnet.cli")
CLOCK_NAMES = frozenset({"monotonic", "monotonic_ns", "perf_counter", "perf_counter_ns", "time_ns"})
CLOCK_ATTRIBUTES = frozenset({"now", "utcnow", "today"})
IMPORT_FUNCTIONS = frozenset({"__import__", "import_module"})


def _dotted(node: ast.AST) -> str | None:
    """'a.b.c' for a Name/Attribute chain, else None."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _module_problem(module: str) -> str | None:
    if module.split(".")[0] in FORBIDDEN_MODULES:
        return f"imports {module}"
    if any(module == layer or module.startswith(layer + ".") for layer in FORBIDDEN_PODNET_LAYERS):
        return f"imports {module} (core must not import the layers above it)"
    return None


def layering_violations(source: str, filename: str = "<string>") -> list[str]:
    """Every forbidden import or clock use in `source`, as 'file:line: what'."""
    tree = ast.parse(source, filename=filename)
    found: list[str] = []

    def report(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{node.lineno}: {what}")

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if problem := _module_problem(alias.name):
                    report(node, problem)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                if problem := _module_problem(node.module):
                    report(node, problem)
                for alias in node.names:
                    if node.module.split(".")[0] == "datetime" and alias.name in {"datetime", "date"}:
                        continue  # the class is fine; calling .now()/.today() on it is caught below
                    if problem := _module_problem(f"{node.module}.{alias.name}"):
                        if not _module_problem(node.module):
                            report(node, problem)
                    if alias.name in CLOCK_NAMES:
                        report(node, f"imports the clock {node.module}.{alias.name}")
        elif isinstance(node, ast.Call):
            func = _dotted(node.func) or ""
            if func.split(".")[-1] in IMPORT_FUNCTIONS and node.args and isinstance(node.args[0], ast.Constant) \
                    and isinstance(node.args[0].value, str):
                if problem := _module_problem(node.args[0].value):
                    report(node, f"dynamically {problem}")
        elif isinstance(node, ast.Attribute):
            dotted = _dotted(node) or ""
            parts = dotted.split(".")
            if parts[0] == "time" and len(parts) > 1:
                report(node, f"uses the clock {dotted}")
            elif (node.attr in CLOCK_ATTRIBUTES and "datetime" in parts[:-1]) or dotted == "date.today":
                report(node, f"uses the clock {dotted}")
            elif node.attr in CLOCK_NAMES:
                report(node, f"uses the clock {dotted or node.attr}")
        elif isinstance(node, ast.Name) and node.id in CLOCK_NAMES:
            report(node, f"uses the clock {node.id}")
    return found


def core_files() -> list[Path]:
    return sorted(CORE.rglob("*.py"))


def test_core_has_the_modules_the_design_names():
    names = {p.name for p in core_files()}
    assert {"checksum.py", "packet.py", "l2.py", "routing.py", "datapath.py"} <= names


@pytest.mark.parametrize("path", core_files(), ids=lambda p: str(p.relative_to(CORE)))
def test_core_module_is_sans_io(path):
    problems = layering_violations(path.read_text(), str(path.relative_to(CORE.parent.parent.parent)))
    assert not problems, "core must stay sans-IO (DESIGN.md):\n" + "\n".join(problems)


# --- the checker itself ---------------------------------------------------------------------------

@pytest.mark.parametrize("source, expected", [
    ("import socket\n", "x.py:1: imports socket"),
    ("import os, trio\n", "x.py:1: imports trio"),
    ("import asyncio.subprocess as sp\n", "x.py:1: imports asyncio.subprocess"),
    ("\n\nfrom pyroute2 import IPRoute\n", "x.py:3: imports pyroute2"),
    ("from pytun import TunTapDevice\n", "x.py:1: imports pytun"),
    ("from concurrent import futures\nimport threading\n", "x.py:2: imports threading"),
    ("import selectors\n", "x.py:1: imports selectors"),
    ("from time import monotonic\n", "x.py:1: imports time"),
    ("def f():\n    import fcntl\n", "x.py:2: imports fcntl"),
    ("import importlib\nm = importlib.import_module('subprocess')\n", "x.py:2: dynamically imports subprocess"),
    ("s = __import__('select')\n", "x.py:1: dynamically imports select"),
    ("from podnet.runtime import serve\n", "x.py:1: imports podnet.runtime (core must not import the layers above it)"),
    ("from podnet import linux\n", "x.py:1: imports podnet.linux (core must not import the layers above it)"),
    ("def f(time):\n    return time.monotonic()\n", "x.py:2: uses the clock time.monotonic"),
    ("from datetime import datetime\nt = datetime.now()\n", "x.py:2: uses the clock datetime.now"),
    ("import datetime\nt = datetime.datetime.utcnow()\n", "x.py:2: uses the clock datetime.datetime.utcnow"),
    ("t = clock.monotonic()\n", "x.py:1: uses the clock clock.monotonic"),
    ("t = monotonic()\n", "x.py:1: uses the clock monotonic"),
    ("from os import times\nfrom mytimer import perf_counter\n", "x.py:2: imports the clock mytimer.perf_counter"),
])
def test_checker_finds_forbidden_imports_and_clock_reads(source, expected):
    assert expected in layering_violations(source, "x.py")


@pytest.mark.parametrize("source", [
    "import os\nimport struct\nimport ipaddress\n",
    "from dataclasses import dataclass\nfrom collections import Counter\n",
    "import dpkt\nfrom sortedcontainers import SortedList\n",
    "from . import packet as pk\nfrom .routing import RouteTable\n",
    "from podnet.errors import ConfigError\n",
    "from datetime import timedelta\n",
    "import timeit_helpers\nimport sockets_are_words\n",     # prefixes of forbidden names are fine
    "def process(frame, now):\n    return now + 1.0\n",
    "timeout_s = 30.0\nnext_deadline = None\n",
])
def test_checker_accepts_sans_io_code(source):
    assert layering_violations(source, "ok.py") == []


def test_failure_message_names_the_file_and_the_import(tmp_path):
    bad = tmp_path / "leaky.py"
    bad.write_text('"""docstring"""\nimport struct\nimport socket\n')
    problems = layering_violations(bad.read_text(), str(bad.name))
    assert problems == ["leaky.py:3: imports socket"]
