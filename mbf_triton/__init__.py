"""mbf_triton: the mini-block Fisher (MBF) optimizer for PyTorch, with Triton kernels.

>>> from mbf_triton import MBF
>>> opt = MBF(model, lr=0.1, damping=1e-3)
"""

from ._version import __version__
from .blocks import Layout, layout_for
from .optimizer import MBF

__all__ = ["MBF", "Layout", "layout_for", "__version__"]
