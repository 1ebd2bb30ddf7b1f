"""Triton kernels of mbf_triton, one file per kernel family (installed as ``mbf_triton.kernels``).

* :mod:`.fisher_stats`: mini-block Fisher statistics of Linear and convolution layers, fused with the
  running-average update of the curvature state.
* :mod:`.block_update`: damped mini-block solve fused with momentum, weight decay and the parameter write.
"""
