"""The driver of ``meshpilot run``: the controller state machine (:mod:`.controller`), the protocol
between it and a worker group (:mod:`.protocol`), the run store (:mod:`.store`) and the session that
the command drives (:mod:`.session`). Never imports torch."""
