"""Benchmarks behind ``livemig bench``; each prints figures as ratios to an in-run baseline."""
