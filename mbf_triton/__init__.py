"""mbf_triton: the mini-block Fisher (MBF) optimizer for PyTorch, with Triton kernels.

>>> from mbf_triton import MBF
>>> opt = MBF(model, lr=1e-3)  # your Adam learning rate (the default grafts Adam's step length)
"""

from ._version import __version__
from .blocks import Layout, layout_for
from .optimizer import MBF

__all__ = ["MBF", "Layout", "layout_for", "__version__"]
