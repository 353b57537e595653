"""Kernelflow's benchmarks: each figure measured against a baseline in the same run.

`make bench` (or `python -m bench [--quick | --smoke]`) runs them all, prints the table and writes
`bench/results/latest.json`. One module per figure: `kernel_overhead` (1), `durable_latency` (2),
`durable_throughput` (3), `history_growth` (4), `worker_memory` (5). See BENCHMARKS.md.
"""

from __future__ import annotations

__all__: list[str] = []
