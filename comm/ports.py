"""Ports for a rendezvous (MASTER_PORT), bound to one address rather than every interface.

:func:`free_port` asks the OS for a free port on ``host`` (the socket is closed before the port
is used, so another process may take it in between). :func:`listen_socket` keeps the socket
open instead, and :func:`rendezvous_store` serves torch.distributed's TCPStore on it: torch's
own store (``init_process_group("env://")`` on rank 0) listens on every interface of the
machine, whatever MASTER_ADDR says. The launcher (:mod:`meshpilot.launch.actor`) serves the
store from rank 0's actor on the node's address (127.0.0.1 for an embedded local Ray) and sets
``TORCHELASTIC_USE_AGENT_STORE=True`` there, so that every rank joins it as a client, as under
torchrun's agent.
"""
from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any

# the environment variable that makes torch's env:// rendezvous connect to an existing store
USE_EXISTING_STORE_ENV = "TORCHELASTIC_USE_AGENT_STORE"


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def free_port(host: str = "127.0.0.1") -> int:
    """A port the OS reports free on ``host``. ("" means every interface: avoid it; a rendezvous
    should listen on the address its peers use, see :func:`listen_socket`.)

    The socket is closed before the port is used, so another process may take it in between;
    callers that can, retry on EADDRINUSE."""
    with socket.socket(_family(host), socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def listen_socket(host: str, port: int = 0, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on ``host`` only (port 0: a free one), kept open by the caller so that
    nobody can take the port before the store uses it."""
    s = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        s.listen(backlog)
    except BaseException:
        s.close()
        raise
    return s


def bound_address(s: socket.socket) -> tuple[str, int]:
    host, port = s.getsockname()[:2]
    return str(host), int(port)


def rendezvous_store(sock: socket.socket, world_size: int, timeout_s: float = 1800.0) -> Any:
    """A torch.distributed TCPStore server listening on ``sock`` (see :func:`listen_socket`) only.

    The store gets a duplicate of the socket's descriptor and owns it; ``sock`` may be closed
    afterwards. Keep the returned store alive for as long as the process group exists."""
    import torch.distributed as dist

    host, port = bound_address(sock)
    fd = os.dup(sock.fileno())
    try:
        return dist.TCPStore(host, port, world_size, True, timedelta(seconds=timeout_s), wait_for_workers=False,
                             master_listen_fd=fd)
    except BaseException:
        os.close(fd)
        raise
