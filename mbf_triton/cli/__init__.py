"""The command line: ``mbf-triton`` / ``python -m mbf_triton`` with one subcommand per job.

Each subcommand is a module of this package with ``DESCRIPTION`` (its one-line help),
``add_arguments(parser)`` and ``run(args) -> exit code``; they use the same public API as users do.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# name -> module; imported only when chosen (``tune`` needs no demo data, ``--help`` imports nothing)
SUBCOMMANDS = {
    "demo": ("mbf_triton.cli.demo", "train MBF against Adam and SGD on bundled digits, with a table and a plot"),
    "tune": ("mbf_triton.cli.tune", "autotune the Triton kernels' launch configurations (GPU; --smoke on CPU)"),
}


def _prog() -> str:
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m mbf_triton" if name in ("", "__main__.py", "-c") else name


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog=_prog(), description="MBF (mini-block Fisher) optimizer: tools.")
    sub = parser.add_subparsers(dest="command", metavar="{" + ",".join(SUBCOMMANDS) + "}", required=True)
    # parse the subcommand first, so that only the chosen module is imported
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, summary) in SUBCOMMANDS.items():
        if name == chosen:
            module = importlib.import_module(module_name)
            p = sub.add_parser(name, help=summary, description=module.DESCRIPTION)
            module.add_arguments(p)
            p.set_defaults(run=module.run)
        else:
            sub.add_parser(name, help=summary)
    args = parser.parse_args(argv)
    return args.run(args)
