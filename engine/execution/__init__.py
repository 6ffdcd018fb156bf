"""Running a step: loading, models, attention backends, C and Triton kernels, weight formats, sampling."""
