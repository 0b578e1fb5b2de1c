"""The `devnet` command: `python -m devnet <command> ...` (or ./devnet.py).

Every command takes --dir (default $DEVNET_DIR or ./devnet-data) and acts on
the devnet living there, so commands can be issued one by one against a
running devnet. Exit codes: 0 ok, 1 a check failed (chains disagree, node
not running), 2 bad usage.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time

import grpc

from .ops import Devnet, dump_json


def _parse_link(text: str) -> tuple[str, float]:
    link, _, p = text.partition("=")
    s, _, d = link.partition(">")
    int(s), int(d)
    return f"{int(s)}>{int(d)}", float(p)


def build_parser() -> argparse.ArgumentParser:
    # --dir may come before or after the command; the subcommand's copy must not
    # overwrite a value given before it, hence SUPPRESS there.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", default=argparse.SUPPRESS,
                        help="devnet state dir (default $DEVNET_DIR or ./devnet-data)")
    p = argparse.ArgumentParser(prog="devnet", description="A local CITA-Cloud chain: simulated controllers "
                                "and network around real consensus.py processes.")
    p.add_argument("--dir", default=os.environ.get("DEVNET_DIR", "devnet-data"),
                   help="devnet state dir (default $DEVNET_DIR or ./devnet-data)")
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common])

    up = add("up", "create the devnet in --dir and start every process")
    up.add_argument("--nodes", type=int, default=3)
    up.add_argument("--validators", type=int, default=None, help="initial validators: nodes 0..K-1 (default all)")
    up.add_argument("--base-port", type=int, default=None, help="default: a free range below 32000")
    up.add_argument("--block-interval", type=int, default=3, help="seconds (controller system config)")
    up.add_argument("--tick-ms", type=int, default=200)
    up.add_argument("--heartbeat-tick", type=int, default=15)
    up.add_argument("--election-tick", type=int, default=50)
    up.add_argument("--seed", type=int, default=1)
    up.add_argument("--log-level", default="info")
    up.add_argument("--stub", action="store_true", help="use devnet.stub_consensus instead of consensus.py")
    st = add("status", "per node: processes, raft role/term/height, controller height")
    st.add_argument("--json", action="store_true")
    for name, help in (("kill", "SIGKILL node I's consensus"), ("stop", "SIGTERM node I's consensus"),
                       ("start", "start node I's consensus (and controller)"),
                       ("wipe", "delete node I's raft data dir (kills its consensus first)")):
        add(name, help).add_argument("node", type=int)
    for name, help in (("kill-controller", "SIGKILL node I's controller"),
                       ("start-controller", "start node I's controller")):
        add(name, help).add_argument("node", type=int)
    pa = add("partition", "cut the network between groups, e.g. `partition 0,1 2,3` (unnamed nodes: one more group)")
    pa.add_argument("groups", nargs="+")
    pa.add_argument("--oneway", action="store_true", help="only cut traffic from the first group to the others")
    he = add("heal", "restore every link")
    he.add_argument("--all", action="store_true", help="also clear drop/delay/dup")
    ne = add("net", "network faults: drop rate, delay/jitter, duplication, per-link drop")
    ne.add_argument("--drop", type=float)
    ne.add_argument("--delay-ms", type=float)
    ne.add_argument("--jitter-ms", type=float)
    ne.add_argument("--dup", type=float)
    ne.add_argument("--link", action="append", default=[], type=_parse_link, metavar="S>D=P",
                    help="drop rate of one directed link, e.g. 0>1=0.5 (repeatable)")
    add("net-restart", "restart the network hub (it forgets registrations and faults)")
    ct = add("controller-fault", "make node I's controller slow or failing for a while")
    ct.add_argument("node", type=int)
    ct.add_argument("--delay-ms", type=int, default=0)
    ct.add_argument("--fail-rate", type=float, default=0.0, help="fraction of calls answered UNAVAILABLE")
    ct.add_argument("--duration", type=float, default=10.0, help="seconds")
    va = add("validators", "schedule a validator set, carried by block H and effective from H+1")
    va.add_argument("--at-height", type=int, required=True)
    va.add_argument("addresses", nargs="+", help="hex addresses or node indices")
    ch = add("chains", "per-node height and tip hash; exit 1 if two chains disagree at a height")
    ch.add_argument("--json", action="store_true")
    add("down", "stop every process of the devnet (state stays in --dir)")
    wa = add("watch", "live view: role, term, height per node and blocks/s")
    wa.add_argument("--duration", type=float, default=0, help="seconds (default: until Ctrl-C)")
    de = add("demo", "set up a devnet, watch it live, tear it down")
    de.add_argument("--nodes", type=int, default=3)
    de.add_argument("--duration", type=float, default=0, help="seconds (default: until Ctrl-C)")
    de.add_argument("--block-interval", type=int, default=1)
    de.add_argument("--tick-ms", type=int, default=100)
    de.add_argument("--keep", action="store_true", help="keep the state dir afterwards")
    de.add_argument("--stub", action="store_true")
    return p


def render(status: dict, rate: float | None, elapsed: float) -> str:
    lines = [f"devnet {status['dir']}   t={elapsed:6.1f}s   blocks/s={'-' if rate is None else f'{rate:6.1f}'}",
             f"{'node':>4} {'role':<12} {'term':>5} {'raft_h':>7} {'chain_h':>7} {'tip':<12} {'val':>3} "
             f"{'consensus':>9} {'ctl':>6}"]
    for n in status["nodes"]:
        lines.append(f"{n['node']:>4} {n['role'] or '-':<12} {n['term'] if n['term'] is not None else '-':>5} "
                     f"{n['raft_height'] if n['raft_height'] is not None else '-':>7} "
                     f"{n['height'] if n['height'] is not None else '-':>7} {n['tip'] or '-':<12} "
                     f"{'y' if n['validator'] else ('n' if n['validator'] is False else '-'):>3} "
                     f"{n['consensus_pid'] or 'down':>9} {n['controller_pid'] or 'down':>6}")
    net = status.get("network")
    if net:
        s = net["stats"]
        lines.append(f"network: sent={s['sent']} broadcast={s['broadcast']} delivered={s['delivered']} "
                     f"dropped={s['dropped_cut'] + s['dropped_fault']} dup={s['duplicated']} retries={s['retries']} "
                     f"cut_links={len(net['faults']['cut'])}")
    else:
        lines.append("network: down")
    return "\n".join(lines)


def watch(dn: Devnet, duration: float) -> None:
    t0 = time.monotonic()
    prev = None
    tty = sys.stdout.isatty()
    while duration <= 0 or time.monotonic() - t0 < duration:
        st = dn.status()
        hs = [n["height"] for n in st["nodes"] if n["height"] is not None]
        now = time.monotonic()
        rate = None
        if prev and hs:
            rate = (max(hs) - prev[1]) / max(1e-6, now - prev[0])
        if hs:
            prev = (now, max(hs))
        text = render(st, rate, now - t0)
        if tty:
            sys.stdout.write("\x1b[H\x1b[2J" + text + "\n(Ctrl-C to stop)\n")
        else:
            sys.stdout.write(text + "\n\n")
        sys.stdout.flush()
        time.sleep(1.0)


def print_chains(dn: Devnet, as_json: bool) -> int:
    rows, problems = dn.chains()
    if as_json:
        print(dump_json({"chains": rows, "problems": problems}))
    else:
        for r in rows:
            print(f"node{r['node']}: height={r['height']} tip={r['tip']}")
        for p in problems:
            print(f"DISAGREE: {p}")
        print("chains agree" if not problems else f"{len(problems)} problem(s)")
    return 1 if problems else 0


def demo(args) -> int:
    own_dir = args.dir == os.environ.get("DEVNET_DIR", "devnet-data") and not os.path.exists(args.dir)
    dir = tempfile.mkdtemp(prefix="devnet-demo-") if own_dir else args.dir
    print(f"devnet demo: {args.nodes} nodes in {dir} (block interval {args.block_interval} s, tick "
          f"{args.tick_ms} ms)")
    dn = Devnet.create(dir, nodes=args.nodes, block_interval=args.block_interval, tick_ms=args.tick_ms,
                       heartbeat_tick=3, election_tick=15, consensus="stub" if args.stub else "real")
    interrupted = False

    def on_term(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    try:
        dn.up()
        watch(dn, args.duration)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.signal(signal.SIGTERM, old)
        print("\ntearing down ...")
        dn.down()
        code = print_chains(dn, False)
        if own_dir and not args.keep:
            shutil.rmtree(dir, ignore_errors=True)
        elif args.keep or not own_dir:
            print(f"state kept in {dir}")
    return code if not interrupted else code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (FileNotFoundError, FileExistsError, ValueError, TimeoutError) as e:
        print(f"devnet {args.cmd}: {e}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        print(f"devnet {args.cmd}: a simulator did not answer: {e.code()} {e.details()}", file=sys.stderr)
        return 1


def run(args) -> int:
    if args.cmd == "demo":
        return demo(args)
    if args.cmd == "up":
        dn = Devnet.create(args.dir, nodes=args.nodes, validators=args.validators, base_port=args.base_port,
                           block_interval=args.block_interval, tick_ms=args.tick_ms,
                           heartbeat_tick=args.heartbeat_tick, election_tick=args.election_tick, seed=args.seed,
                           consensus="stub" if args.stub else "real", log_level=args.log_level)
        dn.up()
        s = dn.spec
        print(f"devnet up: {s.nodes} nodes in {s.dir}, ports from {s.base_port}, hub admin {s.hub_admin_port()}")
        for i in range(s.nodes):
            print(f"  node{i}: address={s.addresses[i]} consensus={s.consensus_port(i)} "
                  f"network={s.network_port(i)} controller={s.controller_port(i)} metrics={s.metrics_port(i)}")
        return 0
    dn = Devnet.open(args.dir)
    if args.cmd == "status":
        st = dn.status()
        print(dump_json(st) if args.json else render(st, None, 0.0))
        return 0
    if args.cmd in ("kill", "stop", "start", "wipe"):
        if not 0 <= args.node < dn.spec.nodes:
            raise ValueError(f"no node {args.node}")
        if args.cmd == "start":
            print(f"node{args.node}: consensus pid {dn.start(args.node)}")
            return 0
        done = {"kill": dn.kill, "stop": dn.stop, "wipe": dn.wipe}[args.cmd](args.node)
        if args.cmd == "wipe":
            print(f"node{args.node}: raft data dir deleted{' (consensus was killed first)' if done else ''}")
            return 0
        print(f"node{args.node}: consensus {'signalled' if done else 'was not running'}")
        return 0 if done else 1
    if args.cmd == "kill-controller":
        return 0 if dn.stop_controller(args.node, kill=True) else 1
    if args.cmd == "start-controller":
        print(f"node{args.node}: controller pid {dn.start_controller(args.node)}")
        return 0
    if args.cmd == "partition":
        groups = [[int(x) for x in g.split(",") if x != ""] for g in args.groups]
        r = dn.partition(groups, args.oneway)
        print(f"cut {len(r['cut'])} directed links: {r['cut']}")
        return 0
    if args.cmd == "heal":
        dn.heal(args.all)
        print("healed")
        return 0
    if args.cmd == "net":
        req = {k: v for k, v in (("drop", args.drop), ("delay_ms", args.delay_ms), ("jitter_ms", args.jitter_ms),
                                 ("dup", args.dup)) if v is not None}
        if args.link:
            req["link_drop"] = dict(args.link)
        print(dump_json(dn.net(**req)))
        return 0
    if args.cmd == "net-restart":
        dn.stop_hub()
        dn.start_hub()
        print("network hub restarted")
        return 0
    if args.cmd == "controller-fault":
        dn.controller_fault(args.node, args.delay_ms, args.fail_rate, args.duration)
        print(f"controller{args.node}: delay {args.delay_ms} ms, fail rate {args.fail_rate} for {args.duration} s")
        return 0
    if args.cmd == "validators":
        e = dn.schedule_validators(args.at_height, args.addresses)
        print(f"scheduled change id={e['id']} in block {e['height']}: {e['validators']}")
        return 0
    if args.cmd == "chains":
        return print_chains(dn, args.json)
    if args.cmd == "down":
        stopped = dn.down()
        print("stopped: " + ", ".join(k for k, v in stopped.items() if v))
        return 0
    if args.cmd == "watch":
        try:
            watch(dn, args.duration)
        except KeyboardInterrupt:
            pass
        return 0
    raise ValueError(f"unknown command {args.cmd}")
