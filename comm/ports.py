"""A free TCP port for a rendezvous (MASTER_PORT)."""
from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free on ``host`` ("" = every interface, for a multi-node rendezvous).

    The socket is closed before the port is used, so another process may take it in between;
    callers that can, retry on EADDRINUSE."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
