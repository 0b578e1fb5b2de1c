"""A stand-in for consensus.py, only to test the devnet plumbing: `python -m devnet.stub_consensus CONFIG`.

NOT consensus: the first validator proposes, broadcasts each block through
the network and commits it; the others commit what they receive. It speaks
the real gRPC surface (ConsensusService, NetworkMsgHandlerService, Health,
/metrics gauges) so the simulators, the devnet command and its tests can run
before, or without, the real service. Never use it to judge safety.
"""
from __future__ import annotations

import http.server
import sys
import threading
import time
import tomllib
from concurrent import futures

import grpc

from cita_raft_pb import (
    common_pb2,
    consensus_pb2_grpc,
    controller_pb2_grpc,
    health_check_pb2,
    health_check_pb2_grpc,
    network_pb2,
    network_pb2_grpc,
)

U64_MAX = 2**64 - 1


class Stub(consensus_pb2_grpc.ConsensusServiceServicer, network_pb2_grpc.NetworkMsgHandlerServiceServicer,
           health_check_pb2_grpc.HealthServicer):
    def __init__(self, cfg: dict):
        self.cfg = cfg
        with open(cfg["node_addr"]) as f:
            self.address = bytes.fromhex(f.read().strip().removeprefix("0x"))
        self.ctl = controller_pb2_grpc.Consensus2ControllerServiceStub(
            grpc.insecure_channel(f"127.0.0.1:{cfg['controller_port']}"))
        self.net = network_pb2_grpc.NetworkServiceStub(grpc.insecure_channel(f"127.0.0.1:{cfg['network_port']}"))
        self.validators: list[bytes] = []
        self.block_interval = 3
        self.height = 0
        self.lock = threading.Lock()

    def Reconfigure(self, request, context):
        with self.lock:
            self.validators = list(request.validators)
            self.block_interval = request.block_interval
            self.height = max(self.height, request.height)
        return common_pb2.StatusCode(code=0)

    def CheckBlock(self, request, context):
        return common_pb2.StatusCode(code=0)

    def Check(self, request, context):
        return health_check_pb2.HealthCheckResponse(status=health_check_pb2.HealthCheckResponse.SERVING)

    def ProcessNetworkMsg(self, request, context):
        if request.module != "consensus" or request.type != "block":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "unknown message")
        p = common_pb2.Proposal.FromString(request.msg)
        self.commit(p)
        return common_pb2.StatusCode(code=0)

    def commit(self, p: common_pb2.Proposal) -> None:
        with self.lock:
            if p.height <= self.height:
                return
            if self.ctl.CheckProposal(p, timeout=3).code != 0:
                return
            r = self.ctl.CommitBlock(common_pb2.ProposalWithProof(proposal=p), timeout=3)
            if r.status.code == 0:
                self.height = p.height
                self.validators = list(r.config.validators)
                self.block_interval = r.config.block_interval

    def is_leader(self) -> bool:
        return bool(self.validators) and self.validators[0] == self.address

    def run(self) -> None:
        last_register = 0.0
        while True:
            try:
                if time.monotonic() - last_register > 1:
                    self.net.RegisterNetworkMsgHandler(network_pb2.RegisterInfo(
                        module_name="consensus", hostname="localhost", port=str(self.cfg["grpc_listen_port"])),
                        timeout=1)
                    last_register = time.monotonic()
                r = self.ctl.CommitBlock(common_pb2.ProposalWithProof(proposal=common_pb2.Proposal(height=U64_MAX)),
                                         timeout=1)
                with self.lock:
                    self.validators = list(r.config.validators)
                    self.block_interval = r.config.block_interval
                    self.height = max(self.height, r.config.height)
                if self.is_leader():
                    pr = self.ctl.GetProposal(common_pb2.Empty(), timeout=1)
                    if pr.status.code == 0 and pr.proposal.height == self.height + 1:
                        self.net.Broadcast(network_pb2.NetworkMsg(module="consensus", type="block",
                                                                  msg=pr.proposal.SerializeToString()), timeout=1)
                        self.commit(pr.proposal)
                    time.sleep(max(self.block_interval, 0.05))
                else:
                    time.sleep(0.2)
            except grpc.RpcError:
                time.sleep(0.2)

    def metrics_text(self) -> str:
        role = 2 if self.is_leader() else 0
        return (f"consensus_raft_role {role}\nconsensus_raft_term 1\nconsensus_raft_is_leader {role // 2}\n"
                f"consensus_raft_block_height {self.height}\nconsensus_raft_commit_index {self.height}\n"
                f"consensus_raft_applied_index {self.height}\nconsensus_raft_peer_running 1\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    with open(argv[0], "rb") as f:
        cfg = tomllib.load(f)["consensus_raft"]
    stub = Stub(cfg)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    consensus_pb2_grpc.add_ConsensusServiceServicer_to_server(stub, server)
    network_pb2_grpc.add_NetworkMsgHandlerServiceServicer_to_server(stub, server)
    health_check_pb2_grpc.add_HealthServicer_to_server(stub, server)
    server.add_insecure_port(f"127.0.0.1:{cfg['grpc_listen_port']}")
    server.start()

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = stub.metrics_text().encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", cfg["metrics_port"]), Metrics)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    print(f"stub consensus serving on {cfg['grpc_listen_port']}", flush=True)
    stub.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
