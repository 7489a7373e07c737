"""Layers (README.md, "Layout"): a library module imports only from its own subpackage or from
layers below it, and never test or tool code.

Every module under megatron_asvr/ is parsed (not imported); every import counts, including the ones
inside functions and ``importlib.import_module`` / ``__import__`` with a literal name. A failure
names file:line of each offending import. The demo's inputs (demo/) may import the library but not
tests/ or tools/; tools/ and tests/ (with tests/support/) may import anything.

Run on another checkout: ``python tests/test_layering.py /path/to/checkout``.
"""

import ast
import sys
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

LIBRARY = "megatron_asvr"
DEMO = "demo"
NOT_LIBRARY = ("tests", "tools", DEMO)  # top-level packages the library must never import
# Lowest first. A unit is a subpackage or top-level module of megatron_asvr; it may import its own
# unit and the units of lower layers. Units of one layer do not import each other.
LAYERS: Tuple[Tuple[str, ...], ...] = (
    ("config",),
    ("runtime",),
    ("kernels",),
    ("model",),
    ("checkpoint",),  # the one place that knows the disk: training, convert and evaluation read it
    ("tokenizers",),
    ("data",),
    ("training",),
    ("convert", "evaluation"),  # siblings: neither imports the other
    ("benchmark", "planner"),
)
# Units that are not a .py file or folder of their own: the csrc extensions belong to the kernels.
ALIASES = {"_fused_ce_cpu": "kernels", "_fused_ce_cuda": "kernels"}
ROOT_UNIT = "(package root)"  # megatron_asvr/__init__.py: imports nothing of the library
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}
RANK[ROOT_UNIT] = -1


def _module_name(root: Path, path: Path) -> List[str]:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imported_names(tree: ast.AST, module: List[str], is_package: bool) -> Iterator[Tuple[int, str]]:
    """(line, dotted module name) of every import in ``tree``, however deep; ``from a import b`` gives
    ``a.b`` (b may be a module), relative imports resolved against ``module``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = module if is_package else module[:-1]
                base = package[: len(package) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                yield node.lineno, source if alias.name == "*" else f"{source}.{alias.name}"
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value


def library_unit(name: str, library_root: Path) -> Optional[str]:
    """The unit of megatron_asvr that ``name`` imports, or None when it is not the library."""
    parts = name.split(".")
    if parts[0] != LIBRARY:
        return None
    if len(parts) == 1:
        return ROOT_UNIT
    unit = ALIASES.get(parts[1], parts[1])
    if unit in RANK or (library_root / unit).is_dir() or (library_root / f"{unit}.py").is_file():
        return unit
    return ROOT_UNIT  # an attribute of the root package (``from megatron_asvr import __version__``)


def violations(checkout: Path) -> List[str]:
    """Every import that breaks the layering in ``checkout`` (a repository root), as 'file:line: why'."""
    found = []
    library_root = checkout / LIBRARY
    for path in sorted(library_root.rglob("*.py")):
        module = _module_name(checkout, path)
        unit = ROOT_UNIT if len(module) == 1 else ALIASES.get(module[1], module[1])
        where = path.relative_to(checkout)
        if unit not in RANK:
            found.append(f"{where}:1: {LIBRARY}.{unit} is in no layer: place it in LAYERS (tests/test_layering.py)")
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for line, name in imported_names(tree, module, path.name == "__init__.py"):
            top = name.split(".")[0]
            if top in NOT_LIBRARY:
                found.append(f"{where}:{line}: imports {name}: the library never imports test or tool code")
                continue
            target = library_unit(name, library_root)
            if target is None or target == unit:
                continue
            if target not in RANK:
                found.append(f"{where}:{line}: imports {name}: {LIBRARY}.{target} is in no layer")
            elif RANK[target] >= RANK[unit]:
                how = "sideways" if RANK[target] == RANK[unit] else "up"
                found.append(f"{where}:{line}: imports {name}: {unit} -> {target} goes {how}")
    demo_root = checkout / DEMO
    for path in sorted(demo_root.rglob("*.py")) if demo_root.is_dir() else []:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        for line, name in imported_names(tree, _module_name(checkout, path), path.name == "__init__.py"):
            if name.split(".")[0] in ("tests", "tools"):
                found.append(f"{path.relative_to(checkout)}:{line}: imports {name}: "
                             f"{DEMO} is imported by tests and tools, not the other way round")
    return found


REPO = Path(__file__).resolve().parents[1]


def test_library_imports_only_downward():
    found = violations(REPO)
    assert not found, "imports against the layering:\n" + "\n".join(found)


def test_every_unit_has_a_layer():
    units = {p.stem if p.suffix == ".py" else p.name for p in (REPO / LIBRARY).iterdir()
             if (p.is_dir() and (p / "__init__.py").is_file()) or (p.suffix == ".py" and p.stem != "__init__")}
    assert units <= set(RANK), f"place {sorted(units - set(RANK))} in LAYERS"
    assert not (REPO / LIBRARY / "testing").exists(), "test helpers live in tests/support/, outside the library"


def _write(root: Path, files: dict) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


def test_the_check_finds_each_kind_of_violation(tmp_path):
    """A synthetic checkout with one violation of each kind, lazy and relative imports included."""
    root = _write(tmp_path, {
        "megatron_asvr/__init__.py": "__version__ = '0'\n",
        "megatron_asvr/config/__init__.py": "",
        "megatron_asvr/data/__init__.py": "from megatron_asvr import __version__\n",
        "megatron_asvr/data/ok.py": "from megatron_asvr.model import vlm\nfrom . import sibling\n"
                                    "import megatron_asvr.config\n",
        "megatron_asvr/tokenizers/__init__.py": "",
        "megatron_asvr/tokenizers/lazy.py": "def f():\n    from megatron_asvr.convert.hf_vision import x\n",
        "megatron_asvr/tokenizers/relative.py": "from ..data import images\n",
        "megatron_asvr/planner/side.py": "import importlib\nm = importlib.import_module('megatron_asvr.benchmark.x')\n",
        "megatron_asvr/convert/tool.py": "import os\n\n\ndef g():\n    import tools.bench_convert\n",
        "megatron_asvr/convert/dev.py": "from tests.support.multirank import run_ranks\n",
        "megatron_asvr/testing/harness.py": "",
        "megatron_asvr/convert/demo.py": "def f():\n    from demo.data import make_demo_data\n",
        "demo/__init__.py": "",
        "demo/helper.py": "from megatron_asvr.training import trainer\nfrom tests.conftest import x\n",
    })
    found = violations(root)
    expected = [
        "demo/helper.py:2: imports tests.conftest.x",
        "megatron_asvr/convert/demo.py:2: imports demo.data.make_demo_data: the library never imports",
        "megatron_asvr/convert/dev.py:1: imports tests.support.multirank.run_ranks: the library never imports",
        "megatron_asvr/convert/tool.py:5: imports tools.bench_convert: the library never imports",
        "megatron_asvr/planner/side.py:2: imports megatron_asvr.benchmark.x: planner -> benchmark goes sideways",
        "megatron_asvr/testing/harness.py:1: megatron_asvr.testing is in no layer",
        "megatron_asvr/tokenizers/lazy.py:2: imports megatron_asvr.convert.hf_vision.x: tokenizers -> convert goes up",
        "megatron_asvr/tokenizers/relative.py:1: imports megatron_asvr.data.images: tokenizers -> data goes up",
    ]
    assert len(found) == len(expected), "\n".join(found)
    for line, start in zip(sorted(found), sorted(expected)):
        assert line.startswith(start), (line, start)


if __name__ == "__main__":
    problems = violations(Path(sys.argv[1] if len(sys.argv) > 1 else REPO).resolve())
    print("\n".join(problems) or "layering: no violations")
    sys.exit(1 if problems else 0)
