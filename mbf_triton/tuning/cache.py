"""The on-disk autotune cache: one JSON file per (GPU, triton version, mbf_triton version).

``${MBF_TRITON_CACHE_DIR:-~/.cache/mbf_triton}/autotune-<gpu>-triton<ver>-mbf<ver>.json`` holds a header
repeating those fields and the entries ``{key: {"config": {...}, "ms": ..., "heuristic_ms": ...}}``. A
stale header, corrupt JSON or an invalid entry is ignored with an :class:`AutotuneCacheWarning`. Writes
merge with the file under an exclusive lock (``fcntl.flock`` where available) and replace it atomically,
so concurrent processes keep each other's entries.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

from .configs import KERNELS, config_from_dict
from .environment import versions

ENV_CACHE_DIR = "MBF_TRITON_CACHE_DIR"
# 2: conv statistics read x with in-kernel padding, whole blocks for b <= 16, precision;
# 3: every kernel takes the step's skip flag (other register allocation: entries timed without it are stale)
CACHE_FORMAT = 3


class AutotuneCacheWarning(UserWarning):
    """A cache file or entry was ignored (corrupt, stale or invalid)."""


def _sanitise(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_") or "unknown"


def cache_dir() -> Path:
    """``$MBF_TRITON_CACHE_DIR``, else ``$XDG_CACHE_HOME/mbf_triton``, else ``~/.cache/mbf_triton``."""
    env = os.environ.get(ENV_CACHE_DIR)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "mbf_triton"


def cache_header(gpu: str) -> dict[str, object]:
    v = versions()
    return {"format": CACHE_FORMAT, "gpu": gpu, "triton": v["triton"], "mbf_triton": v["mbf_triton"]}


def cache_path(gpu: str, directory: Path | None = None) -> Path:
    h = cache_header(gpu)
    tv, mv = _sanitise(str(h["triton"])), _sanitise(str(h["mbf_triton"]))
    name = f"autotune-{_sanitise(gpu)}-triton{tv}-mbf{mv}.json"
    return (directory or cache_dir()) / name


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``path`` + ``.lock`` (no-op where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(str(path) + ".lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


class DiskCache:
    """One JSON file ``{"header": {...}, "entries": {key: {"config": {...}, "ms": ...}}}``."""

    def __init__(self, path: Path, header: dict[str, object]) -> None:
        self.path = Path(path)
        self.header = dict(header)

    @staticmethod
    def _ignored(warn: bool, message: str) -> dict[str, dict]:
        """Nothing is trusted from what ``message`` describes (warned once per load)."""
        if warn:
            warnings.warn(message, AutotuneCacheWarning, stacklevel=4)
        return {}

    def _read(self, warn: bool) -> dict[str, dict]:
        try:
            text = self.path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as e:
            return self._ignored(warn, f"ignoring unreadable autotune cache {self.path}: {e}")
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:
            return self._ignored(warn, f"ignoring corrupt autotune cache {self.path} ({e}); it will be rewritten")
        if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
            return self._ignored(warn, f"ignoring malformed autotune cache {self.path} (no 'entries' object)")
        if data.get("header") != self.header:
            return self._ignored(warn, f"ignoring stale autotune cache {self.path}: header "
                                       f"{data.get('header')!r} does not match {self.header!r}")
        entries: dict[str, dict] = {}
        for key, entry in data["entries"].items():
            try:
                validate_entry(key, entry)
            except ValueError as e:
                self._ignored(warn, f"ignoring invalid autotune cache entry {key!r} in {self.path}: {e}")
                continue
            entries[key] = entry
        return entries

    def load(self) -> dict[str, dict]:
        """Valid entries on disk; anything corrupt, stale or invalid is skipped with a warning."""
        return self._read(warn=True)

    def store(self, entries: dict[str, dict]) -> None:
        """Merge ``entries`` into the file (they win over what is there) atomically, under the lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path):
            merged = self._read(warn=False)
            merged.update(entries)
            payload = json.dumps({"header": self.header, "entries": merged}, indent=1, sort_keys=True)
            fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(payload)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise


def validate_entry(key: object, entry: object) -> None:
    """Raise ``ValueError`` unless ``entry`` is a well-formed cache entry for ``key``."""
    if not isinstance(key, str) or key.split("|", 1)[0] not in KERNELS:
        raise ValueError(f"key {key!r} does not name a kernel of {KERNELS}")
    if not isinstance(entry, dict) or "config" not in entry:
        raise ValueError("entry must be an object with a 'config'")
    ms = entry.get("ms")
    if ms is not None and (not isinstance(ms, (int, float)) or not math.isfinite(ms) or ms < 0):
        raise ValueError(f"ms={ms!r} must be a finite number >= 0")
    config_from_dict(key.split("|", 1)[0], entry["config"])
