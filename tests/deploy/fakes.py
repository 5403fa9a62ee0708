"""A server engine whose one device stream is a queue the test fills: RemoteRole calls
without a network (the test puts the device's answers in ``hub.inbound``)."""

import queue


class _Link:
    open = True

    def send(self, frame):
        pass


class _Hub:
    def __init__(self, node: str):
        self.inbound, self.ready, self.links = queue.Queue(), {}, {node: _Link()}


def remote_role(node: str = "device-0"):
    """``(hub, role)``: a ``RemoteRole`` for ``node`` on a ``GrpcEngine`` over a fake hub."""
    from cotune.deploy.remote_role import RemoteRole
    from cotune.deploy.server import GrpcEngine

    hub = _Hub(node)
    engine = GrpcEngine(hub, timeout_s=5)
    engine.links_seen[node] = hub.links[node]
    return hub, RemoteRole(node, engine, "cotune.paradigms.fedavg:FedDevice")
