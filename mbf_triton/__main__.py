"""Command line: ``python -m mbf_triton {demo,tune} [options]`` (``--help`` on each)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="python -m mbf_triton", description=__doc__)
    parser.add_argument("command", choices=["demo", "tune"], help="demo: MBF vs Adam on digits; "
                        "tune: autotune the Triton kernels' launch configurations")
    args, rest = parser.parse_known_args(argv[:1])
    if args.command == "demo":
        from .demo import main as run
    else:
        from .autotune import main as run
    return run(argv[1:] + rest)


if __name__ == "__main__":
    raise SystemExit(main())
