"""Benchmark library: step profiles (and, below the commands, the pieces the benchmark command calls)."""
