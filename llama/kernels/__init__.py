"""Our C++ kernels (``cpu_kernels.cpp``) and their Python side (``cpu``)."""
