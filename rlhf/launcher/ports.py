"""A free local TCP port: for the launcher's rendezvous and for a rank started alone, which makes up its own.

Its own module so the engine (inside a rank) need not import the launcher (the CLI's side).
"""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the OS picks it; another process could take it before use)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
