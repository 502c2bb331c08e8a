"""Prefect 3 flows around the ``pipeline`` library.

Importing this package sets the environment that keeps Prefect offline (no telemetry, no
update checks) before Prefect itself is imported. Values already set win.
"""

import os

OFFLINE_ENV = {
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "PREFECT_LOGGING_EXTRA_LOGGERS": "pipeline",
}
for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)

from flows.factorize import factorize, factorize_batch  # noqa: E402

__all__ = ["OFFLINE_ENV", "factorize", "factorize_batch"]
