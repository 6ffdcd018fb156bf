"""The CUDA path: the make bench-gpu gate and the Triton kernel compiled ahead of time."""
