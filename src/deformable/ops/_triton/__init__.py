"""Triton kernels (CUDA, or CPU through ``TRITON_INTERPRET=1``), imported only on demand.

``deform_conv``: forward/backward of ``deformable::deform_conv2d`` for backend "triton";
``compile_check``: compiles the kernels for sm_90 without a GPU and reports registers and spills.
"""
