"""The Temporal SDK runtime of a Kernelflow process, built in one place.

The runtime owns the SDK core's threads, its logging and its metrics. Kernelflow builds it so that:

- the core's logs are forwarded to the ``temporalio.core`` stdlib logger, and from there rendered
  like every other line (JSON with ``KERNELFLOW_LOG_FORMAT=json``), instead of being written to
  stderr by the core itself as coloured text;
- with a metrics address, the core serves Prometheus metrics: its own runtime metrics (workflow
  and activity task latencies, slots, sticky cache, polls) and every metric Kernelflow records
  through the runtime's meter (see ``worker.metrics``).
"""

from __future__ import annotations

import logging

from temporalio.runtime import (
    LogForwardingConfig,
    LoggingConfig,
    PrometheusConfig,
    Runtime,
    TelemetryConfig,
    TelemetryFilter,
)

from worker.logs import CORE_LOGGER

__all__ = ["HISTOGRAM_BUCKETS", "build_runtime"]

HISTOGRAM_BUCKETS: dict[str, list[float]] = {
    # Seconds. Model calls run from tens of milliseconds (cached, small) to minutes (long generations).
    "gen_ai_client_operation_duration": [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24,
                                         20.48, 40.96, 81.92],
    "kernelflow_time_to_first_token": [0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24],
    # Tokens per call, GenAI semantic conventions' recommended boundaries.
    "gen_ai_client_token_usage": [1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304],
}  # fmt: skip


def build_runtime(*, metrics_bind: str | None = None, core_log_level: str = "WARN") -> Runtime:
    """A runtime forwarding the core's logs (at ``core_log_level`` and above) to Python logging and,
    with ``metrics_bind`` (``host:port``), serving Prometheus metrics there at ``/metrics``."""
    metrics = (
        PrometheusConfig(
            bind_address=metrics_bind,
            counters_total_suffix=True,
            durations_as_seconds=True,
            histogram_bucket_overrides=HISTOGRAM_BUCKETS,
        )
        if metrics_bind is not None
        else None
    )
    return Runtime(
        telemetry=TelemetryConfig(
            logging=LoggingConfig(
                filter=TelemetryFilter(core_level=core_log_level, other_level="ERROR"),
                forwarding=LogForwardingConfig(
                    logger=logging.getLogger(CORE_LOGGER),
                    append_target_to_name=False,
                    prepend_target_on_message=False,
                    append_log_fields_to_message=False,
                ),
            ),
            metrics=metrics,
        )
    )
