"""The devnet simulators on their own: the controller's block rules, the controller
and network hub processes driven by gRPC clients, and the devnet command with the
stub consensus. No consensus.py here (see tests/integration for that)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent import futures

import grpc
import pytest

from cita_raft_pb import (
    common_pb2,
    consensus_pb2_grpc,
    controller_pb2_grpc,
    network_pb2,
    network_pb2_grpc,
)
from devnet import chain as ch
from devnet import cli
from devnet.layout import origin_of
from devnet.network import partition_cuts
from devnet.ops import Devnet
from tests import waiting

U64_MAX = 2**64 - 1
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Bounded waits (tests/waiting.py): TEST_WAIT_SCALE multiplies every bound (default 4,
# as in tests/service); a passing wait returns as soon as its condition holds.
WAIT_SCALE = waiting.wait_scale(4)


def wait_for(cond, timeout: float, what: str):
    """tests/waiting.wait_for with this module's scale."""
    return waiting.wait_for(cond, timeout, what, scale=WAIT_SCALE, interval=0.02)


# ---------------------------------------------------------------------------
# Block rules (pure)
# ---------------------------------------------------------------------------

VALS = [bytes([i]) * 20 for i in (1, 2, 3)]
GEN = b"\x07" * 32


def new_chain(tmp_path, name="chain.jsonl") -> ch.Chain:
    return ch.Chain(str(tmp_path / name), GEN, [v.hex() for v in VALS], 0)


def propose(c: ch.Chain, proposer: bytes = VALS[0], txs=None) -> tuple[int, bytes]:
    h = c.height + 1
    data = ch.build_proposal(h, c.block(h - 1), GEN, proposer, txs or [b"\x01" * 32], c.tip_timestamp)
    return h, data


def commit(c: ch.Chain, data: bytes, h: int) -> ch.Block:
    code, block, why = c.make_block(h, data)
    assert code == ch.SUCCESS, why
    c.append(block)
    return block


def mutate(data: bytes, fn) -> bytes:
    inner = common_pb2.ProposalInner.FromString(data)
    fn(inner)
    return inner.SerializeToString()


def test_check_proposal_accepts_a_valid_next_block_and_links_blocks(tmp_path):
    c = new_chain(tmp_path)
    h, data = propose(c)
    assert c.check_proposal(h, data) == (ch.SUCCESS, "ok")
    b1 = commit(c, data, h)
    assert b1.prevhash == GEN and c.height == 1
    h2, data2 = propose(c, VALS[1])
    assert c.check_proposal(h2, data2)[0] == ch.SUCCESS
    b2 = commit(c, data2, h2)
    assert b2.prevhash == b1.hash and c.tip_hash == b2.hash


@pytest.mark.parametrize("case,code", [
    ("garbage", ch.DECODE_ERROR), ("no_block", ch.NONE_PROPOSAL), ("no_header", ch.NONE_BLOCK_HEADER),
    ("height_mismatch", ch.PROPOSAL_CHECK_ERROR), ("too_low", ch.PROPOSAL_TOO_LOW),
    ("too_high", ch.PROPOSAL_TOO_HIGH), ("bad_parent", ch.PROPOSAL_CHECK_ERROR),
    ("bad_state_root", ch.PROPOSAL_CHECK_ERROR), ("not_validator", ch.PROPOSAL_CHECK_ERROR),
    ("future_timestamp", ch.PROPOSAL_CHECK_ERROR), ("old_timestamp", ch.PROPOSAL_CHECK_ERROR),
    ("bad_tx_root", ch.PROPOSAL_CHECK_ERROR), ("bad_system_tx", ch.PROPOSAL_CHECK_ERROR),
])
def test_check_proposal_rejects_with_the_real_status_codes(tmp_path, case, code):
    c = new_chain(tmp_path)
    commit(c, propose(c)[1], 1)
    h, data = propose(c)
    if case == "garbage":
        data = b"\xff\xff\xff"
    elif case == "no_block":
        data = common_pb2.ProposalInner(pre_state_root=b"x").SerializeToString()
    elif case == "no_header":
        data = mutate(data, lambda i: i.proposal.ClearField("header"))
    elif case == "height_mismatch":
        data = mutate(data, lambda i: setattr(i.proposal.header, "height", h + 1))
    elif case == "too_low":
        h, data = 1, c.block(1).data
    elif case == "too_high":
        data = mutate(data, lambda i: setattr(i.proposal.header, "height", h + 1))
        h += 1
    elif case == "bad_parent":
        data = mutate(data, lambda i: setattr(i.proposal.header, "prevhash", b"\x00" * 32))
    elif case == "bad_state_root":
        data = mutate(data, lambda i: setattr(i, "pre_state_root", b"\x00" * 32))
    elif case == "not_validator":
        h, data = propose(c, b"\x09" * 20)
    elif case == "future_timestamp":
        data = mutate(data, lambda i: setattr(i.proposal.header, "timestamp", ch.now_ms() + 60_000))
    elif case == "old_timestamp":
        data = mutate(data, lambda i: setattr(i.proposal.header, "timestamp", c.tip_timestamp - 1))
    elif case == "bad_tx_root":
        data = mutate(data, lambda i: setattr(i.proposal.header, "transactions_root", b"\x00" * 32))
    elif case == "bad_system_tx":
        txs = [ch.SYSTEM_TX_PREFIX + b"{not json"]
        h, data = propose(c, txs=txs)
    got, why = c.check_proposal(h, data)
    assert got == code, f"{case}: expected {code}, got {got} ({why})"


def test_commit_checks_prevhash_and_a_validator_change_takes_effect_from_the_next_height(tmp_path):
    c = new_chain(tmp_path)
    commit(c, propose(c)[1], 1)
    stale = ch.build_proposal(2, None, GEN, VALS[0], [b"\x02" * 32], 0)   # links to genesis
    assert c.make_block(2, stale)[0] == ch.PROPOSAL_CHECK_ERROR
    new_vals = [VALS[2].hex()]
    h, data = propose(c, txs=[b"\x03" * 32, ch.system_tx(1, new_vals)])
    assert c.check_proposal(h, data)[0] == ch.SUCCESS
    b = commit(c, data, h)
    assert b.validators == new_vals and b.changes == [1] and c.applied_changes() == {1}
    # Block 3 was proposed by a validator of the old set; from height 3 only VALS[2] may propose.
    assert c.check_proposal(*propose(c, VALS[0]))[0] == ch.PROPOSAL_CHECK_ERROR
    assert c.check_proposal(*propose(c, VALS[2]))[0] == ch.SUCCESS


def test_chain_file_survives_reopen_and_a_torn_tail_is_cut(tmp_path):
    c = new_chain(tmp_path)
    for h in (1, 2, 3):
        commit(c, propose(c)[1], h)
    tip = c.tip_hash
    c.close()
    with open(tmp_path / "chain.jsonl", "a") as f:
        f.write('{"h": 4, "hash": "ab')          # crash mid-append
    c2 = new_chain(tmp_path)
    assert (c2.height, c2.tip_hash) == (3, tip)
    assert c2.truncated_bytes > 0
    commit(c2, propose(c2)[1], 4)
    assert [b.height for b in ch.read_chain(str(tmp_path / "chain.jsonl"))] == [1, 2, 3, 4]


def test_compare_chains_reports_a_height_committed_differently(tmp_path):
    a = new_chain(tmp_path, "a")
    commit(a, propose(a)[1], 1)
    b2 = new_chain(tmp_path, "b2")
    b2.append(a.blocks[0])
    assert ch.compare_chains({0: a.blocks, 1: b2.blocks}) == []
    commit(a, propose(a, txs=[b"\x05" * 32])[1], 2)
    commit(b2, propose(b2, txs=[b"\x06" * 32])[1], 2)
    problems = ch.compare_chains({0: a.blocks, 1: b2.blocks, 2: a.blocks[:1]})
    assert len(problems) == 1 and "height 2" in problems[0]


def test_partition_cuts_any_shape_and_one_way():
    assert partition_cuts([[0, 1], [2, 3]], 4) == {(s, d) for s in (0, 1) for d in (2, 3)} | \
        {(s, d) for s in (2, 3) for d in (0, 1)}
    # Unnamed nodes form one more group.
    assert partition_cuts([[0]], 3) == {(0, 1), (0, 2), (1, 0), (2, 0)}
    assert partition_cuts([[0], [1, 2]], 3, oneway=True) == {(0, 1), (0, 2)}


# ---------------------------------------------------------------------------
# Processes: a fake consensus / handler server in this test process
# ---------------------------------------------------------------------------

class FakeConsensus(consensus_pb2_grpc.ConsensusServiceServicer, network_pb2_grpc.NetworkMsgHandlerServiceServicer):
    """Records what the simulators send to a node's consensus port."""

    def __init__(self, reconfigure_codes=(), handler_errors=()):
        self.reconfigures: list[common_pb2.ConsensusConfiguration] = []
        self.check_blocks: list[int] = []
        self.msgs: list[network_pb2.NetworkMsg] = []
        self.attempts = 0
        self._codes = list(reconfigure_codes)
        self._errors = list(handler_errors)
        self.lock = threading.Lock()

    def Reconfigure(self, request, context):
        with self.lock:
            self.reconfigures.append(request)
            code = self._codes.pop(0) if self._codes else 0
        return common_pb2.StatusCode(code=code)

    def CheckBlock(self, request, context):
        with self.lock:
            self.check_blocks.append(request.proposal.height)
        return common_pb2.StatusCode(code=0)

    def ProcessNetworkMsg(self, request, context):
        with self.lock:
            self.attempts += 1
            err = self._errors.pop(0) if self._errors else None
        if err is not None:
            context.abort(err, "test says no")
        with self.lock:
            self.msgs.append(request)
        return common_pb2.StatusCode(code=0)


@pytest.fixture
def serve_fake():
    servers = []

    def start(port: int, fake: FakeConsensus) -> FakeConsensus:
        s = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        consensus_pb2_grpc.add_ConsensusServiceServicer_to_server(fake, s)
        network_pb2_grpc.add_NetworkMsgHandlerServiceServicer_to_server(fake, s)
        s.add_insecure_port(f"127.0.0.1:{port}")
        s.start()
        servers.append(s)
        return fake

    yield start
    for s in servers:
        s.stop(0)


@pytest.fixture
def devnet_factory(tmp_path):
    made: list[Devnet] = []

    def make(nodes: int, **kw) -> Devnet:
        dn = Devnet.create(str(tmp_path / f"dn{len(made)}"), nodes=nodes, consensus="stub", **kw)
        made.append(dn)
        return dn

    yield make
    for dn in made:
        dn.down()


def ctl_stub(dn: Devnet, i: int):
    return controller_pb2_grpc.Consensus2ControllerServiceStub(
        grpc.insecure_channel(f"127.0.0.1:{dn.spec.controller_port(i)}"))


def pwp(height: int, data: bytes = b"") -> common_pb2.ProposalWithProof:
    return common_pb2.ProposalWithProof(proposal=common_pb2.Proposal(height=height, data=data))


def test_controller_process_serves_the_consensus2controller_contract(devnet_factory, serve_fake):
    dn = devnet_factory(1, block_interval=0)
    fake = serve_fake(dn.spec.consensus_port(0), FakeConsensus(reconfigure_codes=[200]))
    dn.start_controller(0)
    ctl = ctl_stub(dn, 0)
    # Reconfigure at start, retried (every second) until consensus answers 0.
    wait_for(lambda: len(fake.reconfigures) >= 2, 10, "a second Reconfigure after a non-zero reply")
    first = fake.reconfigures[0]
    assert first.height == 0 and list(first.validators) == [dn.spec.address(0)]

    r1, r2 = ctl.GetProposal(common_pb2.Empty()), ctl.GetProposal(common_pb2.Empty())
    assert r1.status.code == 0 and r1.proposal.height == 1
    assert r2.proposal.data == r1.proposal.data, "the proposal is cached until a block commits"
    inner = common_pb2.ProposalInner.FromString(r1.proposal.data)
    assert inner.proposal.header.proposer == dn.spec.address(0) and inner.proposal.header.height == 1
    assert len(inner.proposal.body.tx_hashes) >= 1
    assert ctl.CheckProposal(r1.proposal).code == 0

    ping = ctl.CommitBlock(pwp(U64_MAX))
    assert ping.status.code == 0 and ping.config.height == 0
    c1 = ctl.CommitBlock(pwp(1, r1.proposal.data))
    assert c1.status.code == 0 and c1.config.height == 1 and c1.config.block_interval == 0
    again = ctl.CommitBlock(pwp(1, r1.proposal.data))
    assert again.status.code == 0 and again.config.height == 1, "old heights are idempotent"
    gap = ctl.CommitBlock(pwp(5, r1.proposal.data))
    assert gap.status.code == ch.PROPOSAL_TOO_HIGH and gap.config.height == 5
    assert ctl.CheckProposal(r1.proposal).code == ch.PROPOSAL_TOO_LOW
    r3 = ctl.GetProposal(common_pb2.Empty())
    assert r3.proposal.height == 2 and r3.proposal.data != r1.proposal.data
    with pytest.raises(grpc.RpcError) as e:
        ctl.CommitBlock(common_pb2.ProposalWithProof())
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert ctl.CommitBlock(pwp(U64_MAX)).config.height == 1

    # The chain survives a controller restart (kill -9 even: every block is fsynced).
    dn.stop_controller(0, kill=True)
    dn.start_controller(0)
    assert ctl_stub(dn, 0).CommitBlock(pwp(U64_MAX)).config.height == 1
    assert dn.chains()[0][0]["height"] == 1


def test_controller_that_falls_behind_syncs_from_a_peer_and_reconfigures(devnet_factory, serve_fake):
    dn = devnet_factory(2, validators=1, block_interval=0)   # node1 is not a validator: it syncs
    serve_fake(dn.spec.consensus_port(0), FakeConsensus())
    fake1 = serve_fake(dn.spec.consensus_port(1), FakeConsensus())
    dn.start_controller(0)
    ctl0 = ctl_stub(dn, 0)
    for h in range(1, 6):
        p = ctl0.GetProposal(common_pb2.Empty()).proposal
        assert p.height == h
        assert ctl0.CommitBlock(pwp(h, p.data)).status.code == 0
    # Sync goes over the (simulated) network: no hub or a cut link, no sync.
    dn.start_hub()
    dn.partition([[0], [1]])
    dn.start_controller(1)
    time.sleep(1.0)   # three sync rounds (0.3 s each) that must not reach node0
    assert dn.heights()[1] == 0, "a partitioned controller synced through the cut"
    dn.heal()
    wait_for(lambda: dn.heights()[1] == 5, 15, "node1's controller to sync 5 blocks")
    rows, problems = dn.chains()
    assert problems == [] and rows[0]["tip"] == rows[1]["tip"]
    wait_for(lambda: any(r.height == 5 for r in fake1.reconfigures), 5, "Reconfigure with the synced height")
    assert sorted(set(fake1.check_blocks)) == [1, 2, 3, 4, 5], "CheckBlock is asked for every synced block"


def test_controller_faults_make_it_slow_or_fail(devnet_factory, serve_fake):
    dn = devnet_factory(1, block_interval=0)
    serve_fake(dn.spec.consensus_port(0), FakeConsensus())
    dn.start_controller(0)
    dn.controller_fault(0, fail_rate=1.0, duration_s=60)
    with pytest.raises(grpc.RpcError) as e:
        ctl_stub(dn, 0).GetProposal(common_pb2.Empty(), timeout=2)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE
    dn.controller_fault(0, delay_ms=300, duration_s=60)
    with pytest.raises(grpc.RpcError) as e:
        ctl_stub(dn, 0).GetProposal(common_pb2.Empty(), timeout=0.1)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    dn.controller_fault(0, duration_s=0)
    assert ctl_stub(dn, 0).GetProposal(common_pb2.Empty(), timeout=2).status.code == 0


def net_stub(dn: Devnet, i: int):
    return network_pb2_grpc.NetworkServiceStub(grpc.insecure_channel(f"127.0.0.1:{dn.spec.network_port(i)}"))


def msg(typ: str, origin: int = 0, body: bytes = b"x") -> network_pb2.NetworkMsg:
    return network_pb2.NetworkMsg(module="consensus", type=typ, origin=origin, msg=body)


@pytest.fixture
def hub3(devnet_factory, serve_fake):
    dn = devnet_factory(3)
    dn.start_hub()
    fakes = [serve_fake(dn.spec.consensus_port(i), FakeConsensus()) for i in range(3)]
    for i in range(3):
        r = net_stub(dn, i).RegisterNetworkMsgHandler(network_pb2.RegisterInfo(
            module_name="consensus", hostname="localhost", port=str(dn.spec.consensus_port(i))))
        assert r.code == 0
    return dn, fakes


def types(fake: FakeConsensus) -> list[str]:
    with fake.lock:
        return [m.type for m in fake.msgs]


def test_hub_routes_sendmsg_by_origin_and_rewrites_origin_to_the_sender(hub3):
    dn, fakes = hub3
    origin = [origin_of(dn.spec.address(i)) for i in range(3)]
    assert net_stub(dn, 0).SendMsg(msg("raft", origin[1], b"hello")).code == 0
    wait_for(lambda: types(fakes[1]) == ["raft"], 5, "node1 to get the message")
    got = fakes[1].msgs[0]
    assert got.origin == origin[0] and got.msg == b"hello" and got.module == "consensus"
    assert net_stub(dn, 2).Broadcast(msg("probe", 0)).code == 0
    wait_for(lambda: "probe" in types(fakes[0]) and "probe" in types(fakes[1]), 5, "the broadcast")
    assert [m.origin for m in fakes[0].msgs if m.type == "probe"] == [origin[2]]
    # Unknown origin: dropped silently with status 0 (zenoh).
    assert net_stub(dn, 0).SendMsg(msg("lost", 12345)).code == 0
    assert dn.hub({"op": "status"})["stats"]["dropped_unknown_origin"] == 1
    assert "probe" not in types(fakes[2]), "a broadcast is not delivered to its sender"


def test_hub_partitions_one_way_cuts_drop_and_duplication(hub3):
    dn, fakes = hub3
    origin = [origin_of(dn.spec.address(i)) for i in range(3)]
    dn.partition([[0], [1, 2]])
    net_stub(dn, 0).SendMsg(msg("cut01", origin[1]))
    net_stub(dn, 1).SendMsg(msg("cut10", origin[0]))
    net_stub(dn, 1).SendMsg(msg("ok12", origin[2]))
    wait_for(lambda: "ok12" in types(fakes[2]), 5, "traffic inside a side of the partition")
    dn.partition([[0], [1, 2]], oneway=True)
    net_stub(dn, 0).SendMsg(msg("oneway01", origin[1]))
    net_stub(dn, 1).SendMsg(msg("back10", origin[0]))
    wait_for(lambda: "back10" in types(fakes[0]), 5, "the uncut direction of a one-way cut")
    dn.heal()
    net_stub(dn, 0).SendMsg(msg("healed01", origin[1]))
    wait_for(lambda: "healed01" in types(fakes[1]), 5, "delivery after heal")
    assert "cut01" not in types(fakes[1]) and "cut10" not in types(fakes[0]) and "oneway01" not in types(fakes[1])
    dn.net(dup=1.0)
    net_stub(dn, 0).SendMsg(msg("dup", origin[2]))
    wait_for(lambda: types(fakes[2]).count("dup") == 2, 5, "two copies of a duplicated message")
    dn.net(dup=0.0, drop=1.0)
    net_stub(dn, 0).SendMsg(msg("dropped", origin[2]))
    dn.net(drop=0.0, delay_ms=200)
    net_stub(dn, 0).SendMsg(msg("late", origin[2]))
    wait_for(lambda: "late" in types(fakes[2]), 5, "a delayed message")
    assert "dropped" not in types(fakes[2])
    stats = dn.hub({"op": "status"})["stats"]
    assert stats["dropped_cut"] == 3 and stats["dropped_fault"] == 1 and stats["duplicated"] == 1


def test_hub_retries_internal_like_the_retry_client_but_not_invalid_argument(devnet_factory, serve_fake):
    dn = devnet_factory(2)
    dn.start_hub()
    flaky = serve_fake(dn.spec.consensus_port(1), FakeConsensus(handler_errors=[
        grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, None, grpc.StatusCode.INVALID_ARGUMENT]))
    net_stub(dn, 1).RegisterNetworkMsgHandler(network_pb2.RegisterInfo(
        module_name="consensus", hostname="localhost", port=str(dn.spec.consensus_port(1))))
    to1 = origin_of(dn.spec.address(1))
    net_stub(dn, 0).SendMsg(msg("retried", to1))
    wait_for(lambda: "retried" in types(flaky), 5, "delivery after two retryable failures")
    assert flaky.attempts == 3
    net_stub(dn, 0).SendMsg(msg("refused", to1))
    wait_for(lambda: dn.hub({"op": "status"})["stats"]["failed"] == 1, 5, "the refused message to be given up")
    assert flaky.attempts == 4 and "refused" not in types(flaky)
    # A restarted hub forgets registrations: delivery needs a new RegisterNetworkMsgHandler.
    dn.stop_hub()
    dn.start_hub()
    net_stub(dn, 0).SendMsg(msg("unregistered", to1))
    wait_for(lambda: dn.hub({"op": "status"})["stats"]["dropped_no_handler"] == 1, 5, "drop without handler")


def test_devnet_command_end_to_end_with_the_stub_consensus(tmp_path, capsys):
    d = str(tmp_path / "cli")

    def run(*args, check=True):
        """The devnet command in this process (each subprocess would pay ~1 s of imports)."""
        code = cli.main(["--dir", d, *args])
        out = capsys.readouterr().out
        if check:
            assert code == 0, f"devnet {args} exited {code}: {out}"
        return code, out

    run("up", "--nodes", "3", "--stub", "--block-interval", "0")
    try:
        dn = Devnet.open(d)
        wait_for(lambda: min(dn.heights()) >= 3, 20, "3 blocks on every node")
        # The ./devnet.py wrapper, as an operator types it (--dir after the command works too).
        r = subprocess.run([sys.executable, os.path.join(REPO, "devnet.py"), "status", "--dir", d],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "leader" in r.stdout, r.stdout + r.stderr
        run("kill", "1")
        assert dn.consensus_pid(1) is None
        assert run("kill", "1", check=False)[0] == 1, "killing a dead node reports it"
        run("start", "1")
        assert dn.consensus_pid(1) is not None
        assert "cut 4 directed links" in run("partition", "0", "1,2")[1]
        run("heal")
        out = run("chains")[1]
        assert out.count("height=") == 3 and "chains agree" in out
        # A forged divergent block in node2's chain file makes `chains` fail.
        run("down")
        blocks = ch.read_chain(dn.spec.chain_file(2))
        forged = blocks[0]
        forged.hash = b"\x00" * 32
        with open(dn.spec.chain_file(2), "w") as f:
            f.write(forged.to_json() + "\n")
        code, out = run("chains", check=False)
        assert code == 1 and "committed differently" in out
    finally:
        run("down", check=False)
        assert all(pid is None for pid in Devnet.open(d).running().values())
