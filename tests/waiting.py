"""The one bounded wait of the tests and the development scripts.

Every wait is a bounded wait on a condition: a passing wait returns as soon as the
condition holds, so only a failing one pays for the bound. Bounds are sized for a quiet
machine and multiplied by TEST_WAIT_SCALE, so that a machine with both cores busy
elsewhere (`make test-loaded`) does not turn slowness into failures. Each suite keeps its
own default scale (`wait_scale`): 4 in tests/service and tests/test_devnet_sim.py, 2 in
tests/integration, whose base bounds are already long.

`wait_for` sleeps with `time.sleep`, looked up at every call, or with the `sleep` it is
given (the gevent-patched service tests pass `gevent.sleep`); it imports nothing else, so
gevent and plain code share it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any


def wait_scale(default: float) -> float:
    """TEST_WAIT_SCALE from the environment, else `default`."""
    return float(os.environ.get("TEST_WAIT_SCALE", default))


def wait_for(
    cond: Callable[[], Any],
    timeout: float,
    what: str = "condition",
    *,
    scale: float = 1.0,
    interval: float = 0.05,
    sleep: Callable[[float], Any] | None = None,
    detail: Callable[[], str] | None = None,
    error: type[Exception] = AssertionError,
) -> Any:
    """Poll `cond` every `interval` seconds until it returns something truthy, and return
    that; after `timeout * scale` seconds raise `error` naming `what`, the bound, the time
    actually waited and the scale, followed by `detail()` (the state worth seeing)."""
    bound = timeout * scale
    start = time.monotonic()
    deadline = start + bound
    pause = sleep or time.sleep
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        pause(interval)
    waited = time.monotonic() - start
    text = f"timed out after {bound:g} s waiting for {what}"
    if scale != 1.0:
        text += f" ({timeout:g} s x TEST_WAIT_SCALE {scale:g})"
    text += f"; waited {waited:.1f} s"
    if detail is not None:
        text += "\n" + detail()
    raise error(text)
