"""torchrun, with the rendezvous stores it hosts listening on one address instead of all interfaces.

torch's ``TCPStore`` server binds the wildcard (``*:<port>``) whatever host it is given, so a
single-machine pool's store was reachable from the network although nothing there needs it. Its
constructor also takes an already-listening socket (``master_listen_fd``): this entry (run as
``python torchrun.py ARGS``, the same arguments as ``python -m torch.distributed.run``) gives every
store torchrun hosts a socket bound to ``LIVEAVATAR_STORE_HOST`` (``127.0.0.1`` for one machine),
or, when that is ``given``, to the host torchrun asked for (the rendezvous endpoint of a
multi-machine head, or this node's address for its bootstrap store). Clients are untouched.
Standard library and torch only: it runs outside the pack, like ``worker.py``.
"""
from __future__ import annotations

import os
import socket
import sys

ENV_STORE_HOST = "LIVEAVATAR_STORE_HOST"
_ARGS = ("host_name", "port", "world_size", "is_master", "timeout", "wait_for_workers", "multi_tenant",
         "master_listen_fd", "use_libuv")


def listening_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free one)."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.listen(128)
    return sock


def bind_stores(where: str) -> None:
    """Make ``torch.distributed.TCPStore`` servers listen on ``where`` (an address, or ``given``)."""
    import torch.distributed as dist

    base = dist.TCPStore

    class BoundTCPStore(base):  # a subclass, so isinstance checks in torch still hold
        def __init__(self, *args, **kwargs):
            bound = dict(zip(_ARGS, args))
            bound.update(kwargs)
            if bound.get("is_master") and bound.get("master_listen_fd") is None:
                host = bound["host_name"] if where == "given" else where
                sock = listening_socket(host, int(bound.get("port") or 0))
                bound["port"] = sock.getsockname()[1]
                bound["master_listen_fd"] = sock.detach()  # the store serves (and owns) it from now on
            super().__init__(**bound)

    BoundTCPStore.__name__ = BoundTCPStore.__qualname__ = "TCPStore"
    dist.TCPStore = BoundTCPStore


def main() -> None:
    where = os.environ.pop(ENV_STORE_HOST, "")  # not handed on to the workers
    if where:
        bind_stores(where)
    from torch.distributed.run import main as torchrun_main

    sys.argv[0] = "torchrun"
    torchrun_main(sys.argv[1:])


if __name__ == "__main__":
    main()
