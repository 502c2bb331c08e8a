"""Prefect 3 flows around the ``pipeline`` library.

Importing this package sets the environment that keeps Prefect offline (no telemetry, no
update checks) before Prefect itself is imported (values already set win), makes
``${secret:NAME}`` references in storage options resolve to Prefect Secret blocks, and
installs the log scrubber (secrets masked in every record; no traceback for user errors).
"""

import functools
import os

from pipeline.lifetime import OFFLINE_ENV  # imports no Prefect

for _key, _value in OFFLINE_ENV.items():
    os.environ.setdefault(_key, _value)

from pipeline.secrets import install_log_scrubber, register_resolver  # noqa: E402


@functools.cache
def prefect_secret(name: str) -> str:
    """The value of the Prefect Secret block ``name`` (loaded once per process)."""
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(name).get()
    except ValueError:
        raise ValueError(f"Prefect Secret block {name!r} not found on the server") from None
    return value if isinstance(value, str) else str(value)


register_resolver("secret", prefect_secret)
install_log_scrubber()

from flows.factorize import factorize, factorize_batch, heartbeats  # noqa: E402

__all__ = ["OFFLINE_ENV", "factorize", "factorize_batch", "heartbeats", "prefect_secret"]
