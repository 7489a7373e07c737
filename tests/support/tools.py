"""The command-line tools (tools/<name>.py, not a package) from the tests.

    load_tool("benchmark").main([...])        the module, its main() called in this process
    run_tool("convert", [...])                its main() in a forked rank (multirank): exit code and
                                              output, as a shell would see them, without an
                                              interpreter start
"""

import importlib.util
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Sequence

from tests.support.multirank import run_ranks

TOOLS = Path(__file__).resolve().parents[2] / "tools"


def load_tool(name: str) -> ModuleType:
    """tools/<name>.py as a module (not run as __main__)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass(frozen=True)
class ToolRun:
    returncode: int
    stdout: str
    stderr: str


def _main_with_output(name: str, argv: Sequence[str]) -> ToolRun:
    """In a rank: the tool's main(argv) with file descriptors 1 and 2 captured; SystemExit as Python
    turns it into an exit status (a message: printed to stderr, status 1)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        saved = os.dup(1), os.dup(2)
        os.dup2(out.fileno(), 1)
        os.dup2(err.fileno(), 2)
        try:
            code = load_tool(name).main(list(argv)) or 0
        except SystemExit as exit_:
            code = exit_.code
            if isinstance(code, str):
                print(code, file=sys.stderr)
                code = 1
            code = code or 0
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
        out.seek(0)
        err.seek(0)
        return ToolRun(code, out.read(), err.read())


def run_tool(name: str, argv: Sequence[str], timeout: float = 600.0) -> ToolRun:
    """tools/<name>.py main(argv) in a forked rank of its own (a fresh process state, torchrun's
    environment): what `python tools/<name>.py ARGV` returns and prints."""
    return run_ranks(_main_with_output, 1, name, [str(a) for a in argv], timeout=timeout)[0]
