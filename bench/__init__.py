"""
The benchmark: the daemon against the stand-in on loopback, and a plain sequential
client for comparison. Run it with ``bench/run``; docs/benchmarks.md has the figures.
"""
