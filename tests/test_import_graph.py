"""Benchmark code stays out of the serving import graph, nothing reaches into
`processors`' private names, and the command line's `--help` and `--version` import no JAX."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ENTRY_POINTS = ("stream.daemon", "stream.cli", "stream.config", "stream.metrics", "processors")
"""What serving imports first (`stream.pipeline` too, where it exists)."""

FORBIDDEN = ("stream.bench", "processors.bench", "matplotlib")
"""Packages no serving module may import: the benchmark and its plotting."""


def _is_forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(*, include_bench: bool) -> Iterator[Path]:
    for package in ("stream", "processors"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if include_bench or not path.relative_to(ROOT).parts[:2] == ("stream", "bench"):
                yield path


def _serving_modules() -> list[str]:
    modules = list(ENTRY_POINTS)
    if importlib.util.find_spec("stream.pipeline") is not None:
        modules.append("stream.pipeline")
    modules += [_module_name(p) for p in _sources(include_bench=False)]
    return list(dict.fromkeys(m for m in modules if not _is_forbidden(m)))


IMPORT_THEM = textwrap.dedent(
    """
    import importlib, json, sys
    for name in sys.argv[1:]:
        before = set(sys.modules)
        importlib.import_module(name)
        for new in sorted(set(sys.modules) - before):
            print(json.dumps([name, new]))
    """
)


def test_serving_modules_do_not_import_the_benchmark() -> None:
    modules = _serving_modules()
    assert {*ENTRY_POINTS} <= set(modules) and "stream.executor" in modules
    proc = subprocess.run(
        [sys.executable, "-c", IMPORT_THEM, *modules],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    loaded = [json.loads(line) for line in proc.stdout.splitlines()]
    assert {new for _, new in loaded} >= {*ENTRY_POINTS}  # the listing itself works
    offenders = [(by, new) for by, new in loaded if _is_forbidden(new)]
    assert not offenders, f"(importing, imported) pairs that pull in {FORBIDDEN}: {offenders}"


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _dotted(node: ast.expr) -> list[str] | None:
    """`a.b.c` as `["a", "b", "c"]`; None for anything but names and attributes."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return None
    return [node.id, *reversed(parts)]


def private_processors_uses(source: str) -> list[str]:
    """Where `source` imports or reaches an underscore-private name of `processors`:
    `from processors.x import _y`, `import processors._x`, `processors.x._y`, or `_y` read
    off any name imported from `processors`. Relative imports are not counted: in
    `stream` they cannot reach `processors`, in `processors` they are its own business.

    **Returns:** one `"line N: what"` string per use.
    """
    tree = ast.parse(source)
    bound: set[str] = set()  # local names that come from `processors`
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "processors" or alias.name.startswith("processors."):
                    if any(_is_private(p) for p in alias.name.split(".")):
                        found.append(f"line {node.lineno}: import {alias.name}")
                    bound.add(alias.asname or alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom) and not node.level:
            target = node.module or ""
            if target != "processors" and not target.startswith("processors."):
                continue
            if any(_is_private(p) for p in target.split(".")):
                found.append(f"line {node.lineno}: from {target} import …")
            for alias in node.names:
                if _is_private(alias.name):
                    found.append(f"line {node.lineno}: from {target} import {alias.name}")
                bound.add(alias.asname or alias.name)
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute):
            chain = _dotted(node)
            if chain and chain[0] in bound and any(_is_private(p) for p in chain[1:]):
                found.append(f"line {node.lineno}: {'.'.join(chain)}")
        elif (  # getattr(processors.slab, "_slab_step")
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "getattr"
            and len(node.args) >= 2
            and (chain := _dotted(node.args[0])) is not None
            and chain[0] in bound
            and isinstance(name := node.args[1], ast.Constant)
            and isinstance(name.value, str)
            and _is_private(name.value)
        ):
            found.append(f"line {node.lineno}: getattr({'.'.join(chain)}, {name.value!r})")
    return sorted(set(found))


def test_nothing_reaches_into_processors_private_names() -> None:
    offenders = {
        str(path.relative_to(ROOT)): uses
        for path in _sources(include_bench=True)
        if (uses := private_processors_uses(path.read_text()))
    }
    assert not offenders, f"private names of `processors` used: {offenders}"


@pytest.mark.parametrize(
    "source",
    [
        "from processors.slab import _slab_step\n",
        "from processors.slab import SlabStep, _slab_step as step\n",
        "from processors import _private\n",
        "import processors._impl\n",
        "from processors._impl import thing\n",
        "import processors.slab\nprocessors.slab._slab_step(1)\n",
        "import processors.slab as s\nf = s._slab_step\n",
        "from processors import slab\nslab._slab_step\n",
        "from processors import SlabStep\nSlabStep._lower\n",
        "import processors.slab\ngetattr(processors.slab, '_slab_step')\n",
    ],
)
def test_the_private_name_scan_catches(source: str) -> None:
    assert private_processors_uses(source), source


@pytest.mark.parametrize(
    "source",
    [
        "from processors import SlabStep, FLAG_VALID\n",
        "import processors\nprocessors.__version__\n",
        "import processors\nprocessors.enable_compilation_cache('x')\n",
        "from stream.protocol import _types\n",
        "x = 1\nx._private\n",
        "from .slab import _slab_step\n",  # inside `processors`: its own helpers
    ],
)
def test_the_private_name_scan_passes(source: str) -> None:
    assert private_processors_uses(source) == []


HELP_AND_VERSION = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from stream.cli import main
    commands = ("run", "record", "replay", "send", "subscribe", "info", "check-config", "bench")
    for argv in (["--help"], ["--version"], *[[c, "--help"] for c in commands]):
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                main(argv)
            except SystemExit as e:
                assert e.code == 0, (argv, e.code)
    print(json.dumps(sorted(sys.modules)))
    """
)


def test_help_and_version_import_neither_jax_nor_the_model() -> None:
    """`--help` of the program and of every command, and `--version`, answer at once: the
    commands import JAX, the model and the daemon only when they run."""
    proc = subprocess.run(
        [sys.executable, "-c", HELP_AND_VERSION],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    loaded = set(json.loads(proc.stdout))
    assert "stream.cli" in loaded
    heavy = ("jax", "jaxlib", "equinox", "numpy", "anyio", "prometheus_client", "processors")
    assert not {m for m in loaded if m.split(".")[0] in heavy}
    assert loaded & {f"stream.{m}" for m in ("config", "daemon", "send", "bench")} == set()
