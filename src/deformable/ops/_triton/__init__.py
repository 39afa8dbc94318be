"""Triton kernels (CUDA, or CPU through ``TRITON_INTERPRET=1``). Imported only on demand."""
