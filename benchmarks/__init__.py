"""Benchmarks of megatron_lite (throughput, MFU, scaling); results are kept in BENCHMARKS.md."""
