"""torchrun's c10d rendezvous with a bounded wait on the frontend's host: `rdzv-backend: ts-plugin`.

TorchServe 0.12 drops `rdzv-conf`, so c10d waits its default 600 s for the other nodes, while TorchServe gives a
worker 2 minutes to start and then answers a generic 507 that names no node. Registered for torchrun through the
`torchrun.handlers` entry point, this is c10d's store and protocol (nodes running plain c10d meet it) with two
changes on the frontend's host: the wait ends after JOIN_TIMEOUT_S, within TorchServe's limit, and its error names
the nodes that joined, how many did not, and the command that starts them.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Callable

from torch.distributed.elastic.rendezvous import (RendezvousHandler, RendezvousInfo, RendezvousParameters,
                                                  RendezvousTimeoutError)
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import create_backend
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import create_handler

from .config.rules import RDZV_JOIN_TIMEOUT_S as JOIN_TIMEOUT_S
from .distributed import JOINED_ENV

logger = logging.getLogger(__name__)


def handler_creator() -> Callable[[RendezvousParameters], RendezvousHandler]:
    """The `torchrun.handlers` entry point: torchrun registers what this returns under the entry point's name."""
    return create_rendezvous_handler


def create_rendezvous_handler(params: RendezvousParameters) -> RendezvousHandler:
    """c10d's handler, under this backend's name. On the frontend's host (not started by `ts-plugin join`) its join
    waits JOIN_TIMEOUT_S, unless `join_timeout` is given (torchrun's --rdzv-conf, when started by hand), and its
    timeout names the missing nodes; `join`'s nodes wait as c10d does, since `join` starts them again anyway."""
    frontend = os.environ.get(JOINED_ENV) != "1"
    if frontend and "join_timeout" not in params.config:
        params.config["join_timeout"] = JOIN_TIMEOUT_S
    backend, store = create_backend(params)
    return _NamingMissingNodes(create_handler(store, backend, params), params, frontend)


class _NamingMissingNodes(RendezvousHandler):
    """c10d's handler whose timeout says which nodes came and how the others join."""

    def __init__(self, handler: RendezvousHandler, params: RendezvousParameters, frontend: bool):
        self._handler = handler
        self._params = params
        self._frontend = frontend

    def next_rendezvous(self) -> RendezvousInfo:
        if not self._frontend:
            return self._handler.next_rendezvous()
        timeout = self._params.get_as_int("join_timeout")
        logger.warning("waiting up to %d s for the %d nodes of rendezvous %r at %s: start the others with %s", timeout,
                       self._params.max_nodes, self._params.run_id, self._params.endpoint, self._join_command())
        started = time.monotonic()
        try:
            return self._handler.next_rendezvous()
        except RendezvousTimeoutError:
            raise RendezvousTimeoutError(self._missing(time.monotonic() - started)) from None

    def _join_command(self) -> str:
        model = self._params.run_id.rpartition("_")[0] or self._params.run_id  # TorchServe's id: <model>_<port>
        return (f"`ts-plugin join {model}.mar --rdzv-id {self._params.run_id} --rdzv-endpoint "
                f"{self._params.endpoint}`")

    def _missing(self, waited_s: float) -> str:
        # torch 2.13's DynamicRendezvousHandler keeps the last state it read from the store here; a node that times
        # out has already taken itself out of it
        state = getattr(getattr(self._handler, "_state_holder", None), "state", None)
        others = [f"{node.addr} (pid {node.pid})" for node in sorted(getattr(state, "participants", {}), key=str)]
        joined, needed = 1 + len(others), self._params.min_nodes
        return (f"rendezvous {self._params.run_id!r} at {self._params.endpoint}: after {waited_s:.0f} s, {joined} of "
                f"the {needed} nodes had joined ({', '.join(['this host'] + others)}); {needed - joined} never came. "
                f"On each missing node run {self._join_command()} (README: Across hosts), and check that it reaches "
                "the endpoint")

    def get_backend(self) -> str:
        return self._params.backend  # torchrun checks it against the name it asked for

    # the rest as c10d does it

    @property
    def use_agent_store(self) -> bool:
        return self._handler.use_agent_store

    def is_closed(self) -> bool:
        return self._handler.is_closed()

    def set_closed(self):
        return self._handler.set_closed()

    def num_nodes_waiting(self) -> int:
        return self._handler.num_nodes_waiting()

    def get_run_id(self) -> str:
        return self._handler.get_run_id()

    def shutdown(self) -> bool:
        return self._handler.shutdown()
