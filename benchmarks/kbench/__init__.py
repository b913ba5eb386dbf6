"""The sections of benchmarks/kernels.py, one module per kernel family (common.py: what they share).

benchmarks/kernels.py is the entry point (CLI, section order, reports); it puts benchmarks/ on
sys.path, so these modules import each other as `kbench.<module>`.
"""
