"""``python -m mbf_triton {demo,tune} [options]`` (``--help`` on each)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
