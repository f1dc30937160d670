"""User-facing errors.

Every mistake in a job file or on the command line raises :class:`ConfigError`, which
names the full key, the bad value and what would be accepted or how to fix it. The CLI
prints the message and exits with status 2, without a traceback.
"""
from __future__ import annotations

from typing import Any, Iterable

# at most this many characters of a value are echoed in a message (a 100 KB name is shown cut)
MAX_ECHO = 200


def shown(value: Any, limit: int = MAX_ECHO) -> str:
    """``repr(value)``, cut to about ``limit`` characters (with the full length), so that a huge
    value can neither flood nor stall the terminal."""
    if isinstance(value, str) and len(value) > limit:
        return repr(value[:limit]) + f"... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text)} characters)"


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite: the run fails at that step (a restart from the
    last checkpoint would repeat the same steps, so the controller does not retry it)."""

    def __init__(self, step: int, loss: float, hint: str = ""):
        self.step, self.loss, self.hint = step, loss, hint
        super().__init__(f"the training loss is {loss} at step {step}" + (f" ({hint})" if hint else "")
                         + "; not retried: check train.lr, train.precision and the data")

    def __reduce__(self) -> Any:            # keeps step and loss across process boundaries (Ray)
        return (type(self), (self.step, self.loss, self.hint))


class ConfigError(ValueError):
    """A bad key or value in the job configuration (or a plan that cannot run)."""

    def __init__(self, key: str, value: Any = None, *, allowed: Iterable[Any] | None = None,
                 fix: str | None = None, reason: str | None = None):
        self.key, self.value = key, value
        self.allowed = list(allowed) if allowed is not None else None
        self.fix, self.reason = fix, reason
        key = key if len(str(key)) <= MAX_ECHO else shown(str(key))
        parts = [f"{key}={shown(value)}" if value is not None else key]
        if reason:
            parts.append(reason)
        if self.allowed is not None:
            parts.append("allowed: " + ", ".join(str(a)[:MAX_ECHO] for a in self.allowed[:50])
                         + (f", ... ({len(self.allowed)} in all)" if len(self.allowed) > 50 else ""))
        if fix:
            parts.append(fix)
        super().__init__(": ".join(parts[:2]) + ("; " + "; ".join(parts[2:]) if parts[2:] else ""))

    def __reduce__(self) -> Any:            # the same message after pickling (Ray ships a worker's error)
        return (_config_error, (self.key, self.value, self.allowed, self.fix, self.reason, str(self)))


def _config_error(key: str, value: Any, allowed: Any, fix: Any, reason: Any, message: str) -> ConfigError:
    e = ConfigError(key, value, allowed=allowed, fix=fix, reason=reason)
    e.args = (message,)
    return e


def check_choice(key: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = list(allowed)
    if value not in allowed:
        raise ConfigError(key, value, reason="not a valid choice", allowed=allowed)


def check_positive(key: str, value: Any, *, zero_ok: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not zero_ok):
        raise ConfigError(key, value, reason="must be a " + ("non-negative" if zero_ok else "positive") + " number")
