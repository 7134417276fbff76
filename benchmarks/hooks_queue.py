"""The hooks' queue (procrastinate on PostgreSQL) under a burst: 1 worker vs 2 workers in one run, and the
delay from a registration to its job's start. See registry_hooks/benchmark.py.
  .venv/bin/python benchmarks/hooks_queue.py [--burst 12] [--probes 5]      (or: make benchmark-hooks)
"""
from registry_hooks.benchmark import main

main()
