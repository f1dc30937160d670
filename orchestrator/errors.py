"""User-facing errors.

Every mistake in a job file or on the command line raises :class:`ConfigError`, which
names the full key, the bad value and what would be accepted or how to fix it. The CLI
prints the message and exits with status 2, without a traceback.
"""
from __future__ import annotations

from typing import Any, Iterable


class ConfigError(ValueError):
    """A bad key or value in the job configuration (or a plan that cannot run)."""

    def __init__(self, key: str, value: Any = None, *, allowed: Iterable[Any] | None = None,
                 fix: str | None = None, reason: str | None = None):
        self.key, self.value = key, value
        self.allowed = list(allowed) if allowed is not None else None
        self.fix, self.reason = fix, reason
        parts = [f"{key}={value!r}" if value is not None else key]
        if reason:
            parts.append(reason)
        if self.allowed is not None:
            parts.append("allowed: " + ", ".join(str(a) for a in self.allowed))
        if fix:
            parts.append(fix)
        super().__init__(": ".join(parts[:2]) + ("; " + "; ".join(parts[2:]) if parts[2:] else ""))


def check_choice(key: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(key, value, reason="not a valid choice", allowed=allowed)


def check_positive(key: str, value: Any, *, zero_ok: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(key, value, reason="must be a " + ("non-negative" if zero_ok else "positive") + " number")
