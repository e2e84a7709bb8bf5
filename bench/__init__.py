"""Loopback load benchmarks (`make bench`): figures, never pass/fail."""
