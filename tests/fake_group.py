"""A scripted worker group (the WorkerGroup protocol of meshpilot.orchestrator.run.protocol) for driving the
controller and the session without Ray: the k-th start replays scripts[k], a list of polls, or raises it
when it is a GangError. It records every call and what it was built with."""
from __future__ import annotations

from typing import Any

from meshpilot.orchestrator.run.protocol import GangError, GroupPoll


class ScriptedGroup:
    def __init__(self, scripts: list, run_dir: str = "", log_path: Any = None, plan: Any = None):
        self.scripts, self.run_dir, self.log_path, self.plan = scripts, run_dir, log_path, plan
        self.calls: list[tuple] = []
        self.starts: list[int] = []
        self._polls: list[GroupPoll] = []
        self.alive = False

    def start(self, attempt: int) -> list[int]:
        self.calls.append(("start", attempt))
        script = self.scripts[len(self.starts)]
        self.starts.append(attempt)
        if isinstance(script, GangError):
            raise script
        self._polls = list(script)
        self.alive = True
        return [100 + attempt * 10 + r for r in range(2)]

    def poll(self) -> GroupPoll:
        self.calls.append(("poll",))
        return self._polls.pop(0) if self._polls else GroupPoll()

    def stop(self, grace_s: float) -> None:
        self.calls.append(("stop", grace_s))

    def shutdown(self) -> None:
        self.calls.append(("shutdown",))
        self.alive = False
