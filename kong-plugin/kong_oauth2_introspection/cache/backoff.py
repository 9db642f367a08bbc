"""How the Redis store backs off after failures: one probe at a time, delays
doubling from BACKOFF_FIRST to BACKOFF_MAX, and a grace for the probe."""

import threading
import time
from typing import Optional

BACKOFF_FIRST = 1.0


BACKOFF_MAX = 10.0


class _Backoff:
    """Skip Redis for a while after a failure; let one caller probe afterwards."""

    def __init__(self, probe_grace: float, clock=time.monotonic):
        self._lock = threading.Lock()
        self._clock = clock
        self._grace = probe_grace
        self.failures = 0          # failed windows in a row; 0: healthy
        self.until = 0.0           # monotonic time before which Redis is skipped
        self._probing = False      # one caller was let through to test Redis

    def allow(self) -> bool:
        if self.failures == 0:
            return True
        if self._clock() < self.until:
            return False
        with self._lock:
            now = self._clock()
            if self.failures == 0:
                return True
            if now < self.until:
                return False
            # This caller probes; the others keep skipping while it does.
            self._probing = True
            self.until = now + self._grace
            return True

    def failed(self) -> Optional[float]:
        """Start a backoff window (doubling each time); its length, or None when
        one is running already (calls failing together count once)."""
        with self._lock:
            now = self._clock()
            if self.failures and not self._probing and now < self.until:
                return None
            delay = min(BACKOFF_FIRST * (2 ** self.failures), BACKOFF_MAX)
            self.failures += 1
            self._probing = False
            self.until = now + delay
            return delay

    def succeeded(self) -> bool:
        """True when this success ends a backoff (Redis is back)."""
        if self.failures == 0:
            return False
        with self._lock:
            was = self.failures
            self.failures = 0
            self._probing = False
            self.until = 0.0
            return was > 0
