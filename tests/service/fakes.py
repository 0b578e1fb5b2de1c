"""In-process fake controller and network gRPC servers for service tests.

They run inside the (gevent-patched) test process on 127.0.0.1 and free
ports. The fake controller keeps a chain of heights with the real
controller's status codes for the cases consensus acts on, by the height rules
the devnet's simulated controller uses too (devnet/chain.py: commit_route,
proposal_height_code, consensus_config); its blocks, validator schedule,
faults and peer sync are its own. The fake network
routes NetworkMsg between in-process services by origin (first 8 bytes of
the address, as network_zenoh) and can drop or cut links."""
import hashlib
import random
import socket
import threading
from concurrent import futures

import grpc

from cita_raft_pb import common_pb2, controller_pb2_grpc, network_pb2, network_pb2_grpc
from devnet.chain import (
    GAP,
    PING,
    PROPOSAL_CHECK_ERROR,
    PROPOSAL_TOO_HIGH,
    STORED,
    SUCCESS,
    commit_route,
    config_reply,
    consensus_config,
    proposal_height_code,
)

_handed_out: set[int] = set()


def free_port() -> int:
    """A port nothing listens on, never the same twice in this process, and below
    the kernel's ephemeral range (32768-60999 here): a port the kernel picked for
    bind(0) can be handed to an outgoing connection's local end before the
    server that was to use it binds ("metrics port already in use" in one run).
    The devnet takes 20000-32000; these tests take 10000-19999."""
    rng = random.Random()
    for _ in range(1000):
        port = rng.randrange(10000, 20000)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port in 10000-19999")


def origin_of(address: bytes) -> int:
    return int.from_bytes(address[:8], "big")


class FakeController(controller_pb2_grpc.Consensus2ControllerServiceServicer):
    """A chain: committed[h] = proposal data. Proposals are b'block <h> <parent>'."""

    def __init__(self, validators: list[bytes], block_interval: int = 0, name: str = "c"):
        self.validators = list(validators)
        self.block_interval = block_interval
        self.name = name
        self.committed: dict[int, bytes] = {}
        self.height = 0
        self.calls: list[tuple[str, int]] = []
        self.fail_codes: dict[str, list[int]] = {}   # method -> codes to return next (consumed)
        self.delay: dict[str, float] = {}            # method -> seconds to sleep
        self.unavailable = False
        self.schedule: dict[int, list[bytes]] = {}   # height -> validators from height+1
        self.lock = threading.Lock()
        self.peers: list[FakeController] = []         # where a controller that is behind syncs from
        self.port = free_port()
        self.server = None

    def start(self):
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        controller_pb2_grpc.add_Consensus2ControllerServiceServicer_to_server(self, self.server)
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()
        return self

    def stop(self):
        if self.server:
            self.server.stop(0).wait(5)   # ended before the test (or the interpreter) goes on

    def _enter(self, method, context, height=0):
        import gevent
        self.calls.append((method, height))
        if self.delay.get(method):
            gevent.sleep(self.delay[method])
        if self.unavailable:
            context.abort(grpc.StatusCode.UNAVAILABLE, "fake controller unavailable")
        codes = self.fail_codes.get(method)
        if codes:
            return codes.pop(0)
        return 0

    def sync_from_peers(self):
        """As the real controller on ProposalTooHigh: fetch the missing blocks
        from a peer that has them (here: copy them)."""
        for peer in self.peers:
            while peer.height > self.height and (self.height + 1) in peer.committed:
                self.height += 1
                self.committed[self.height] = peer.committed[self.height]

    def block_data(self, h: int) -> bytes:
        parent = hashlib.sha256(self.committed.get(h - 1, b"genesis")).hexdigest()[:16]
        return f"block {h} {parent}".encode()

    def config(self, height):
        return consensus_config(height, self.block_interval, self.validators)

    def GetProposal(self, request, context):  # noqa: N802
        code = self._enter("GetProposal", context)
        if code:
            return common_pb2.ProposalResponse(status=common_pb2.StatusCode(code=code))
        h = self.height + 1
        return common_pb2.ProposalResponse(status=common_pb2.StatusCode(code=0),
                                           proposal=common_pb2.Proposal(height=h, data=self.block_data(h)))

    def CheckProposal(self, request, context):  # noqa: N802
        code = self._enter("CheckProposal", context, request.height)
        if code:
            return common_pb2.StatusCode(code=code)
        code, _ = proposal_height_code(request.height, self.height)
        if code == PROPOSAL_TOO_HIGH:
            self.sync_from_peers()
        if code:
            return common_pb2.StatusCode(code=code)
        if request.data != self.block_data(request.height):
            return common_pb2.StatusCode(code=PROPOSAL_CHECK_ERROR)
        return common_pb2.StatusCode(code=SUCCESS)

    def CommitBlock(self, request, context):  # noqa: N802
        h = request.proposal.height
        code = self._enter("Ping" if commit_route(h, self.height) == PING else "CommitBlock", context, h)
        with self.lock:
            route = commit_route(h, self.height)
            if route == PING:
                return config_reply(SUCCESS, self.config(self.height))
            if code:
                return config_reply(code, self.config(h))
            if route == STORED:
                return config_reply(SUCCESS, self.config(h))
            if route == GAP:
                self.sync_from_peers()
                return config_reply(PROPOSAL_TOO_HIGH, self.config(h))
            if request.proposal.data != self.block_data(h):
                return config_reply(PROPOSAL_CHECK_ERROR, self.config(h))
            self.committed[h] = request.proposal.data
            self.height = h
            if h in self.schedule:
                # validators scheduled at h are in effect from h+1 (as a devnet system tx)
                self.validators = self.schedule.pop(h)
            return config_reply(SUCCESS, self.config(h))


class FakeNetwork:
    """One NetworkService port per node; routes between registered handlers."""

    def __init__(self):
        self.nodes: dict[int, dict] = {}   # origin -> {"port", "handler_port", "server", ...}
        self.cut: set[tuple[int, int]] = set()   # (from_origin, to_origin) links that drop
        self.down: set[int] = set()              # origins whose network is "restarted"/unreachable
        self.registrations: list[tuple[int, network_pb2.RegisterInfo]] = []
        self.sent: list[tuple[int, network_pb2.NetworkMsg]] = []

    def add_node(self, address: bytes) -> int:
        origin = origin_of(address)
        port = free_port()
        node = {"port": port, "handler": None, "server": None, "address": address}
        self.nodes[origin] = node
        self._serve(origin)
        return port

    def _serve(self, origin):
        node = self.nodes[origin]
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        network_pb2_grpc.add_NetworkServiceServicer_to_server(_NodeNetwork(self, origin), server)
        server.add_insecure_port(f"127.0.0.1:{node['port']}")
        server.start()
        node["server"] = server

    def restart(self, address: bytes):
        """Stop a node's network and start it again with no registrations."""
        origin = origin_of(address)
        node = self.nodes[origin]
        node["server"].stop(0).wait()
        node["handler"] = None
        self._serve(origin)

    def stop(self):
        ended = [node["server"].stop(0) for node in self.nodes.values() if node["server"]]
        for e in ended:
            e.wait(5)

    def deliver(self, sender: int, target: int, msg: network_pb2.NetworkMsg):
        import gevent
        if (sender, target) in self.cut or target not in self.nodes:
            return
        stub = self.nodes[target].get("handler")
        if stub is None:
            return
        out = network_pb2.NetworkMsg(module=msg.module, type=msg.type, origin=sender, msg=msg.msg)

        def call():
            try:
                stub.ProcessNetworkMsg(out, timeout=5)
            except grpc.RpcError:
                pass
        gevent.spawn(call)


class _NodeNetwork(network_pb2_grpc.NetworkServiceServicer):
    def __init__(self, net: FakeNetwork, origin: int):
        self.net = net
        self.origin = origin

    def RegisterNetworkMsgHandler(self, request, context):  # noqa: N802
        self.net.registrations.append((self.origin, request))
        channel = grpc.insecure_channel(f"127.0.0.1:{request.port}")
        self.net.nodes[self.origin]["handler"] = network_pb2_grpc.NetworkMsgHandlerServiceStub(channel)
        return common_pb2.StatusCode(code=0)

    def SendMsg(self, request, context):  # noqa: N802
        self.net.sent.append((self.origin, request))
        self.net.deliver(self.origin, request.origin, request)
        return common_pb2.StatusCode(code=0)

    def Broadcast(self, request, context):  # noqa: N802
        self.net.sent.append((self.origin, request))
        for target in list(self.net.nodes):
            if target != self.origin:
                self.net.deliver(self.origin, target, request)
        return common_pb2.StatusCode(code=0)
