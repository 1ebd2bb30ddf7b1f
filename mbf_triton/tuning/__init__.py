"""Launch-configuration tuning of the Triton kernels, one file per job:

* :mod:`.configs`: config types, heuristics, candidates, cache keys and :class:`Problem` (one kernel call);
* :mod:`.environment`: the on/off switch (``MBF_TRITON_AUTOTUNE``), interpreter, device name, versions;
* :mod:`.cache`: the JSON cache on disk (``MBF_TRITON_CACHE_DIR``);
* :mod:`.tuner`: the :class:`Tuner` that times candidates and remembers the winners.

The sweep command line, ``python -m mbf_triton tune``, lives in :mod:`mbf_triton.cli.tune`.
"""

from .cache import AutotuneCacheWarning, DiskCache, cache_dir, cache_path
from .configs import (
    BlockUpdateConfig,
    Problem,
    block_update_candidates,
    conv_stats_candidates,
    describe,
    linear_stats_candidates,
)
from .environment import is_enabled, set_enabled
from .tuner import Choice, Trial, Tuner, get_tuner

__all__ = [
    "AutotuneCacheWarning",
    "BlockUpdateConfig",
    "Choice",
    "DiskCache",
    "Problem",
    "Trial",
    "Tuner",
    "block_update_candidates",
    "cache_dir",
    "cache_path",
    "conv_stats_candidates",
    "describe",
    "get_tuner",
    "is_enabled",
    "linear_stats_candidates",
    "set_enabled",
]
