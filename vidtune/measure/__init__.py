"""Measuring: counters (FLOPs, peak live bytes, bytes materialised), full-size probes on fake
tensors, device classes. The planner and the benchmarks both import it; it imports neither."""
