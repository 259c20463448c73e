"""Infrastructure every layer uses: option definitions (settings), errors, stage records and
resume, atomic file writes, seeds, progress bars, devices, the C++ kernels and the case engine
(local or Ray). Imports nothing else of the package.
"""
