"""`edgepipe bench`, the run's measure and report steps, budgets, the Pareto chart, and standalone tools."""
from __future__ import annotations

import sys
from typing import Callable


def run_tool(prog: str, work: Callable[[], object]) -> int:
    """A standalone tool's main: print what ``work()`` returns (exit 0); a UserError is one line on stderr
    naming the tool (exit 2)."""
    from edgepipe import UserError
    try:
        out = work()
    except UserError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if out is not None:
        print(out)
    return 0
