"""The `devnet` command: `python -m devnet <command> ...` (or ./devnet.py).

Every command takes --dir (default $DEVNET_DIR or ./devnet-data) and acts on
the devnet living there, so commands can be issued one by one against a
running devnet. Exit codes: 0 ok, 1 a check failed (chains disagree, node
not running), 2 bad usage.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import sys
import tempfile
import time

import grpc

from .ops import Devnet, dump_json


class DevnetError(Exception):
    """A problem the user can fix: printed as one line, exit code 1."""


def _parse_link(text: str) -> tuple[str, float]:
    try:
        link, _, p = text.partition("=")
        s, _, d = link.partition(">")
        return f"{int(s)}>{int(d)}", float(p)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not S>D=P (e.g. 0>1=0.5)") from None


def _node(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a node index (0, 1, ...)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a node index (0, 1, ...)")
    return value


EXAMPLES = {
    "up": "examples:\n  devnet --dir /tmp/dn up --nodes 4 --block-interval 0 --tick-ms 50\n"
          "  devnet --dir /tmp/dn up          # again after `down`: resumes that devnet",
    "status": "examples:\n  devnet --dir /tmp/dn status\n  devnet --dir /tmp/dn status --json | jq '.nodes[].lag'",
    "watch": "examples:\n  devnet --dir /tmp/dn watch\n  devnet --dir /tmp/dn watch --duration 30 > watch.log"
             "   # one line per refresh",
    "logs": "examples:\n  devnet --dir /tmp/dn logs            # the last 20 lines of every log, merged\n"
            "  devnet --dir /tmp/dn logs -f 0 2     # follow nodes 0 and 2 (consensus and controller)\n"
            "  devnet --dir /tmp/dn logs -f network",
    "kill": "example:\n  devnet --dir /tmp/dn kill 1 && devnet --dir /tmp/dn start 1",
    "stop": "example:\n  devnet --dir /tmp/dn stop 1",
    "start": "example:\n  devnet --dir /tmp/dn start 1",
    "wipe": "example:\n  devnet --dir /tmp/dn wipe 1 && devnet --dir /tmp/dn start 1",
    "kill-controller": "example:\n  devnet --dir /tmp/dn kill-controller 2",
    "start-controller": "example:\n  devnet --dir /tmp/dn start-controller 2",
    "partition": "examples:\n  devnet --dir /tmp/dn partition 0 1,2        # node 0 alone vs nodes 1 and 2\n"
                 "  devnet --dir /tmp/dn partition 0,1          # 0,1 vs everyone else\n"
                 "  devnet --dir /tmp/dn partition 0 --oneway   # node 0 cannot send, still receives",
    "heal": "examples:\n  devnet --dir /tmp/dn heal\n  devnet --dir /tmp/dn heal --all",
    "net": "examples:\n  devnet --dir /tmp/dn net --drop 0.2 --delay-ms 50 --jitter-ms 20\n"
           "  devnet --dir /tmp/dn net --link '0>1=1.0'",
    "net-restart": "example:\n  devnet --dir /tmp/dn net-restart",
    "controller-fault": "example:\n  devnet --dir /tmp/dn controller-fault 2 --delay-ms 500 --fail-rate 0.5 --duration 10",
    "validators": "examples:\n  devnet --dir /tmp/dn validators --at-height 40 0 1 3\n"
                  "  devnet --dir /tmp/dn validators --at-height 40 0x8a0b...   # hex addresses",
    "chains": "example:\n  devnet --dir /tmp/dn chains --json",
    "down": "example:\n  devnet --dir /tmp/dn down      # `up` on the same dir starts it again",
    "demo": "examples:\n  devnet demo\n  devnet demo --nodes 5 --duration 60 --keep",
}


def build_parser() -> argparse.ArgumentParser:
    # --dir may come before or after the command; the subcommand's copy must not
    # overwrite a value given before it, hence SUPPRESS there.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dir", default=argparse.SUPPRESS,
                        help="devnet state dir (default $DEVNET_DIR or ./devnet-data)")
    p = argparse.ArgumentParser(prog="devnet", description="A local CITA-Cloud chain: simulated controllers "
                                "and network around real consensus.py processes.",
                                epilog="start with `devnet demo`, or `devnet up` then `devnet watch`; "
                                "`devnet <command> -h` shows a command's flags and an example",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=os.environ.get("DEVNET_DIR", "devnet-data"),
                   help="devnet state dir (default $DEVNET_DIR or ./devnet-data)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="command")

    def add(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, parents=[common], epilog=EXAMPLES.get(name),
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    up = add("up", "create the devnet in --dir and start every process (an existing devnet there is resumed)")
    up.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    up.add_argument("--validators", type=int, default=None, help="initial validators: nodes 0..K-1 (default all)")
    up.add_argument("--base-port", type=int, default=None,
                    help="first port of the devnet's range (default: a free range below 32000)")
    up.add_argument("--block-interval", type=int, default=3, help="seconds between blocks (default 3)")
    up.add_argument("--tick-ms", type=int, default=200, help="raft tick in ms (default 200)")
    up.add_argument("--heartbeat-tick", type=int, default=15, help="ticks between heartbeats (default 15)")
    up.add_argument("--election-tick", type=int, default=50, help="ticks of the election timeout (default 50)")
    up.add_argument("--seed", type=int, default=1, help="seed of the node addresses and network faults")
    up.add_argument("--log-level", default="info", help="consensus log level (default info)")
    up.add_argument("--stub", action="store_true", help="use devnet.stub_consensus (no raft) instead of consensus.py")
    st = add("status", "per node: processes, raft (role, term, commit/applied index, lag, stuck), chain height")
    st.add_argument("--json", action="store_true", help="print the status as JSON")
    for name, help in (("kill", "SIGKILL node I's consensus"), ("stop", "SIGTERM node I's consensus"),
                       ("start", "start node I's consensus (and controller)"),
                       ("wipe", "delete node I's raft data dir (kills its consensus first)")):
        add(name, help).add_argument("node", type=_node, help="node index (0, 1, ...)")
    for name, help in (("kill-controller", "SIGKILL node I's controller"),
                       ("start-controller", "start node I's controller")):
        add(name, help).add_argument("node", type=_node, help="node index (0, 1, ...)")
    pa = add("partition", "cut the network between groups of nodes (nodes not named form one more group)")
    pa.add_argument("groups", nargs="+", help="comma-separated node indices per group, e.g. 0,1 2")
    pa.add_argument("--oneway", action="store_true", help="only cut traffic from the first group to the others")
    he = add("heal", "restore every link")
    he.add_argument("--all", action="store_true", help="also clear drop/delay/dup")
    ne = add("net", "network faults: drop rate, delay/jitter, duplication, per-link drop")
    ne.add_argument("--drop", type=float, help="fraction of messages dropped (0..1)")
    ne.add_argument("--delay-ms", type=float, help="delay of every message in ms")
    ne.add_argument("--jitter-ms", type=float, help="random extra delay up to this many ms")
    ne.add_argument("--dup", type=float, help="fraction of messages delivered twice (0..1)")
    ne.add_argument("--link", action="append", default=[], type=_parse_link, metavar="S>D=P",
                    help="drop rate of one directed link, e.g. 0>1=0.5 (repeatable)")
    add("net-restart", "restart the network hub (it forgets registrations and faults)")
    ct = add("controller-fault", "make node I's controller slow or failing for a while")
    ct.add_argument("node", type=_node, help="node index (0, 1, ...)")
    ct.add_argument("--delay-ms", type=int, default=0, help="delay of every call in ms")
    ct.add_argument("--fail-rate", type=float, default=0.0, help="fraction of calls answered UNAVAILABLE")
    ct.add_argument("--duration", type=float, default=10.0, help="seconds (default 10)")
    va = add("validators", "schedule a validator set, carried by block H and effective from H+1")
    va.add_argument("--at-height", type=int, required=True, help="the height H of the block carrying the change")
    va.add_argument("addresses", nargs="+", help="hex addresses or node indices")
    ch = add("chains", "per-node height and tip hash; exit 1 if two chains disagree at a height")
    ch.add_argument("--json", action="store_true", help="print as JSON")
    add("down", "stop every process of the devnet (state stays in --dir; `up` resumes it)")
    wa = add("watch", "live view: raft and chain per node, blocks/s, events (one line per refresh when piped)")
    wa.add_argument("--duration", type=float, default=0, help="seconds (default: until Ctrl-C)")
    wa.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default 1)")
    lo = add("logs", "the nodes' logs, interleaved, one prefix per process (as goreman)")
    lo.add_argument("names", nargs="*", metavar="NODE",
                    help="node indices (consensus and controller logs) or log names (network, consensus0, "
                         "controller1); default: all")
    lo.add_argument("-f", "--follow", action="store_true", help="keep printing new lines until Ctrl-C")
    lo.add_argument("-n", "--lines", type=int, default=20, help="lines from the end of each log (default 20)")
    de = add("demo", "set up a devnet, watch it live, tear it down")
    de.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    de.add_argument("--duration", type=float, default=0, help="seconds (default: until Ctrl-C)")
    de.add_argument("--block-interval", type=int, default=1, help="seconds between blocks (default 1)")
    de.add_argument("--tick-ms", type=int, default=100, help="raft tick in ms (default 100)")
    de.add_argument("--keep", action="store_true", help="keep the state dir (logs, chains) afterwards")
    de.add_argument("--stub", action="store_true", help="use devnet.stub_consensus (no raft)")
    return p


def _v(value, width: int) -> str:
    return f"{'-' if value is None else value:>{width}}"


def role_text(n: dict, leader: int | None) -> str:
    if n["consensus_pid"] is None:
        return "down"
    if n["role"] is None:
        return "starting"
    if n["role"] == "leader":
        return "leader*" if n["node"] == leader else "leader?"
    return n["role"]


def flags_text(n: dict) -> str:
    flags = []
    if n.get("stale_leader"):
        flags.append("NO-QUORUM")
    if n.get("stuck"):
        flags.append("STUCK")
    if n.get("ready") is False and not flags and n["consensus_pid"] is not None:
        flags.append("not-ready")
    return ",".join(flags) or "-"


def render(status: dict, rate: float | None = None, elapsed: float | None = None, events: list[str] = (),
           window: float = 10.0) -> str:
    """The status table: one row per node, a leader marker (* the leader, ? a
    leader without quorum), then the network line and recent events. `watch`
    adds the elapsed time and blocks/s."""
    leader = status.get("leader")
    live = "" if elapsed is None else (f"t={elapsed:.1f}s   blocks/s ({window:.0f} s avg)="
                                       f"{'-' if rate is None else f'{rate:.2f}'}   ")
    lines = [f"devnet {status['dir']}   {live}leader: {'none' if leader is None else f'node{leader}'}",
             f"{'node':>4} {'role':<12} {'term':>5} {'commit':>7} {'applied':>7} {'lag':>5} {'flags':<16} "
             f"{'chain_h':>7} {'tip':<12} {'val':>3} {'consensus_pid':>13} {'controller_pid':>14}"]
    for n in status["nodes"]:
        val = "y" if n["validator"] else ("n" if n["validator"] is False else "-")
        lines.append(f"{n['node']:>4} {role_text(n, leader):<12} {_v(n['term'] if n['in_raft'] else None, 5)} "
                     f"{_v(n['commit_index'] if n['in_raft'] else None, 7)} "
                     f"{_v(n['applied_index'] if n['in_raft'] else None, 7)} {_v(n['lag'] if n['in_raft'] else None, 5)} "
                     f"{flags_text(n):<16} {_v(n['height'], 7)} {n['tip'] or '-':<12} {val:>3} "
                     f"{n['consensus_pid'] or 'down':>13} {n['controller_pid'] or 'down':>14}")
    net = status.get("network")
    if net:
        s = net["stats"]
        lines.append(f"network: sent={s['sent']} broadcast={s['broadcast']} delivered={s['delivered']} "
                     f"dropped={s['dropped_cut'] + s['dropped_fault']} dup={s['duplicated']} retries={s['retries']} "
                     f"cut_links={len(net['faults']['cut'])}")
    else:
        lines.append("network: down")
    lines.append("leader*: the leader; leader?: says leader but has no quorum; STUCK: raft makes no progress "
                 "(chain moves by controller sync)")
    if events:
        lines.append("events:")
        lines += [f"  {e}" for e in events]
    return "\n".join(lines)


def compact(status: dict, rate: float | None, elapsed: float) -> str:
    """One line per refresh (watch when stdout is not a terminal)."""
    leader = status.get("leader")
    parts = [f"t={elapsed:.1f}s", f"leader={'-' if leader is None else f'node{leader}'}",
             f"bps={'-' if rate is None else f'{rate:.2f}'}"]
    for n in status["nodes"]:
        flags = flags_text(n)
        raft_part = (f" term={n['term']} commit={n['commit_index']} lag={_v(n['lag'], 0)}"
                     if n["in_raft"] else "")
        parts.append(f"| node{n['node']} {role_text(n, leader)}{raft_part} h={_v(n['height'], 0)}"
                     f"{'' if flags == '-' else ' ' + flags}")
    return " ".join(parts)


def events_between(prev: dict | None, cur: dict) -> list[str]:
    """What changed between two status snapshots: leader, elections (term),
    processes down/up, stuck flags, partitions."""
    if prev is None:
        return []
    out = []
    if prev.get("leader") != cur.get("leader"):
        new = cur.get("leader")
        terms = [n["term"] for n in cur["nodes"] if n["node"] == new]
        out.append("no leader" if new is None else
                   f"leader is node{new} (term {terms[0] if terms else '?'}), was "
                   f"{'none' if prev.get('leader') is None else 'node' + str(prev['leader'])}")
    pterm = max((n["term"] or 0 for n in prev["nodes"] if n["in_raft"]), default=0)
    cterm = max((n["term"] or 0 for n in cur["nodes"] if n["in_raft"]), default=0)
    if cterm > pterm:
        out.append(f"election: term {pterm} -> {cterm}")
    for a, b in zip(prev["nodes"], cur["nodes"], strict=False):
        i = b["node"]
        for proc in ("consensus", "controller"):
            was, now = a[f"{proc}_pid"], b[f"{proc}_pid"]
            if was and not now:
                out.append(f"node{i}: {proc} down (pid {was} gone)")
            elif now and now != was:
                out.append(f"node{i}: {proc} started (pid {now})")
        if b.get("stuck") and not a.get("stuck"):
            out.append(f"node{i}: raft STUCK (commit {b['commit_index']}, chain height {b['height']})")
        elif a.get("stuck") and not b.get("stuck") and b["consensus_pid"]:
            out.append(f"node{i}: raft no longer stuck")
        if b.get("stale_leader") and not a.get("stale_leader"):
            out.append(f"node{i}: a leader without quorum (term {b['term']})")
        if b.get("withholding_votes") and not a.get("withholding_votes"):
            out.append(f"node{i}: lost its raft state, withholding votes until it sees an election")
        elif a.get("withholding_votes") and b.get("withholding_votes") is False:
            out.append(f"node{i}: voting again")
    pcut = len(prev["network"]["faults"]["cut"]) if prev.get("network") else None
    ccut = len(cur["network"]["faults"]["cut"]) if cur.get("network") else None
    if pcut != ccut:
        if ccut is None:
            out.append("network hub down")
        elif pcut is None:
            out.append("network hub up")
        elif ccut == 0:
            out.append("network healed: no link cut")
        else:
            out.append(f"network partition: {ccut} directed links cut")
    return out


class Rate:
    """Blocks per second over the last `window` seconds of (time, highest height) samples."""

    def __init__(self, window: float = 10.0):
        self.window = window
        self.samples: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, now: float, height: int | None) -> float | None:
        if height is not None:
            self.samples.append((now, height))
        while len(self.samples) > 2 and now - self.samples[0][0] > self.window:
            self.samples.popleft()
        if len(self.samples) < 2:
            return None
        (t0, h0), (t1, h1) = self.samples[0], self.samples[-1]
        return (h1 - h0) / max(1e-6, t1 - t0)


def watch(dn: Devnet, duration: float, interval: float = 1.0, out=None) -> None:
    out = out or sys.stdout
    t0 = time.monotonic()
    rate = Rate()
    prev = None
    recent: collections.deque[str] = collections.deque(maxlen=6)
    tty = out.isatty()
    while duration <= 0 or time.monotonic() - t0 < duration:
        st = dn.status()
        now = time.monotonic()
        hs = [n["height"] for n in st["nodes"] if n["height"] is not None]
        bps = rate.add(now, max(hs) if hs else None)
        stamp = time.strftime("%H:%M:%S")
        new_events = [f"{stamp} {e}" for e in events_between(prev, st)]
        prev = st
        if tty:
            recent.extend(new_events)
            out.write("\x1b[H\x1b[2J" + render(st, bps, now - t0, list(recent), rate.window) +
                      "\n(Ctrl-C to stop)\n")
        else:
            for e in new_events:
                out.write(f"event {e}\n")
            out.write(compact(st, bps, now - t0) + "\n")
        out.flush()
        time.sleep(interval)


def log_names(dn: Devnet, names: list[str]) -> list[str]:
    everything = ["network"] + [f"{k}{i}" for i in range(dn.spec.nodes) for k in ("consensus", "controller")]
    if not names:
        return everything
    chosen = []
    for name in names:
        if name.isdigit():
            i = int(name)
            if i >= dn.spec.nodes:
                raise DevnetError(f"no node {i}: this devnet has nodes 0..{dn.spec.nodes - 1}")
            chosen += [f"consensus{i}", f"controller{i}"]
        elif name in everything:
            chosen.append(name)
        else:
            raise DevnetError(f"no log {name!r}: use a node index or one of {', '.join(everything)}")
    return chosen


# the time of day near the start of a log line: "2026-12-05 13:38:48,064 ..." (simulators),
# "Dec 05 13:39:35.179 WARN ..." (consensus.py), "==== 13:38:39 start: ..." (devnet)
_STAMP = re.compile(r"^.{0,16}?\b(\d{2}:\d{2}:\d{2})(?:[.,](\d{1,6}))?")


def logs(dn: Devnet, names: list[str], follow: bool, lines: int, out=None) -> None:
    """The last `lines` of each log merged by their leading timestamps (lines
    without one stay after their predecessor), each prefixed `name | `; with
    follow, then every new line as it is written, until Ctrl-C."""
    out = out or sys.stdout
    chosen = log_names(dn, names)
    width = max(len(n) for n in chosen)
    files, tails = {}, []
    for name in chosen:
        path = dn.spec.log_file(name)
        try:
            f = open(path, errors="replace")
        except FileNotFoundError:
            continue
        files[name] = f
        last_stamp = ""
        for k, line in enumerate(collections.deque(f, maxlen=lines) if lines > 0 else []):
            m = _STAMP.match(line)
            last_stamp = f"{m.group(1)}.{(m.group(2) or '').ljust(6, '0')}" if m else last_stamp
            tails.append((last_stamp, name, k, line.rstrip("\n")))
    if not files:
        raise DevnetError(f"no logs yet in {dn.spec.dir}/logs")
    for _, name, _, line in sorted(tails):
        out.write(f"{name:<{width}} | {line}\n")
    out.flush()
    try:
        while follow:
            wrote = False
            for name, f in files.items():
                for line in f:
                    out.write(f"{name:<{width}} | {line.rstrip(chr(10))}\n")
                    wrote = True
            if wrote:
                out.flush()
            else:
                time.sleep(0.2)
    finally:
        for f in files.values():
            f.close()


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
    me = "./devnet.py" if os.path.exists(os.path.join(os.getcwd(), "devnet.py")) else "python -m devnet"
    deleted = own_dir and not args.keep
    print(f"drive it from a second terminal:\n"
          f"  {me} --dir {dir} status          # the same table once (--json for scripts)\n"
          f"  {me} --dir {dir} kill 0          # then `start 0`;  stop, wipe, partition 0 1,2, heal ...\n"
          f"  {me} --dir {dir} logs -f         # every process's log, interleaved\n"
          f"logs: {dir}/logs/ -- "
          f"{'deleted with the devnet at the end (--keep, or make demo KEEP=1, keeps them)' if deleted else 'kept'}")
    interrupted = False

    def on_term(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, on_term)
    if sys.stdout.isatty() and not args.duration:
        time.sleep(3)   # time to read the lines above before the live view clears the screen
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
        if deleted:
            shutil.rmtree(dir, ignore_errors=True)
            print(f"deleted {dir} (logs and chains; --keep keeps them)")
        else:
            print(f"state and logs kept in {dir} (`{me} --dir {dir} up` starts it again)")
    return code if not interrupted else code


HUB_COMMANDS = ("partition", "heal", "net", "net-restart")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except DevnetError as e:
        print(f"devnet {args.cmd}: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, FileExistsError, ValueError, TimeoutError, RuntimeError) as e:
        text = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror else str(e)
        print(f"devnet {args.cmd}: {text}", file=sys.stderr)
        return 1
    except grpc.RpcError as e:
        if args.cmd in HUB_COMMANDS:
            who = "the network hub"
        elif getattr(args, "node", None) is not None:
            who = f"node{args.node}'s controller"
        else:
            who = "a devnet process"
        code = e.code().name if hasattr(e, "code") and e.code() else "error"
        why = "is not running" if code in ("UNAVAILABLE", "DEADLINE_EXCEEDED") else f"refused the request ({code})"
        print(f"devnet {args.cmd}: {who} {why}: is the devnet up? (`devnet --dir {args.dir} status`; "
              f"logs in {args.dir}/logs)", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:   # `devnet logs | head`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def open_devnet(dir: str) -> Devnet:
    if not os.path.exists(os.path.join(dir, "devnet.json")):
        raise DevnetError(f"no devnet in {os.path.abspath(dir)}: create one with `devnet --dir {dir} up` "
                          f"(or name another with --dir or $DEVNET_DIR)")
    return Devnet.open(dir)


def parse_groups(texts: list[str], nodes: int) -> list[list[int]]:
    groups, seen = [], {}
    for k, text in enumerate(texts):
        group = []
        for part in text.split(","):
            if part == "":
                continue
            if not part.isdigit():
                raise DevnetError(f"{part!r} in group {text!r} is not a node index")
            i = int(part)
            if i >= nodes:
                raise DevnetError(f"no node {i}: this devnet has nodes 0..{nodes - 1}")
            if i in seen:
                raise DevnetError(f"node {i} is in two groups ({texts[seen[i]]!r} and {text!r})")
            seen[i] = k
            group.append(i)
        if not group:
            raise DevnetError(f"group {text!r} names no node")
        groups.append(group)
    if len(groups) == 1 and len(groups[0]) == nodes:
        raise DevnetError("one group holding every node cuts nothing")
    return groups


def run(args) -> int:
    if args.cmd == "demo":
        return demo(args)
    if args.cmd == "up":
        if os.path.exists(os.path.join(args.dir, "devnet.json")):
            dn = Devnet.open(args.dir)
            print(f"devnet up: resuming the devnet in {dn.spec.dir} ({dn.spec.nodes} nodes; the layout flags "
                  "apply only to a new devnet)")
        else:
            dn = Devnet.create(args.dir, nodes=args.nodes, validators=args.validators, base_port=args.base_port,
                               block_interval=args.block_interval, tick_ms=args.tick_ms,
                               heartbeat_tick=args.heartbeat_tick, election_tick=args.election_tick,
                               seed=args.seed, consensus="stub" if args.stub else "real", log_level=args.log_level)
        dn.up()
        s = dn.spec
        print(f"devnet up: {s.nodes} nodes in {s.dir}, ports from {s.base_port}, hub admin {s.hub_admin_port()}")
        for i in range(s.nodes):
            print(f"  node{i}: address={s.addresses[i]} consensus={s.consensus_port(i)} "
                  f"network={s.network_port(i)} controller={s.controller_port(i)} metrics={s.metrics_port(i)}")
        print(f"logs: {s.dir}/logs/  (`devnet --dir {args.dir} logs -f`); watch: `devnet --dir {args.dir} watch`")
        return 0
    dn = open_devnet(args.dir)
    node = getattr(args, "node", None)
    if node is not None and node >= dn.spec.nodes:
        raise DevnetError(f"no node {node}: this devnet has nodes 0..{dn.spec.nodes - 1}")
    if args.cmd == "status":
        st = dn.status()
        print(dump_json(st) if args.json else render(st))
        return 0
    if args.cmd in ("kill", "stop", "start", "wipe"):
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
        done = dn.stop_controller(args.node, kill=True)
        print(f"node{args.node}: controller {'killed' if done else 'was not running'}")
        return 0 if done else 1
    if args.cmd == "start-controller":
        print(f"node{args.node}: controller pid {dn.start_controller(args.node)}")
        return 0
    if args.cmd == "partition":
        groups = parse_groups(args.groups, dn.spec.nodes)
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
        names = [k for k, v in stopped.items() if v]
        print(f"stopped: {', '.join(names) if names else 'nothing was running'}; state kept in {dn.spec.dir} "
              f"(`devnet --dir {args.dir} up` resumes it)")
        return 0
    if args.cmd == "watch":
        try:
            watch(dn, args.duration, args.interval)
        except KeyboardInterrupt:
            pass
        return 0
    if args.cmd == "logs":
        try:
            logs(dn, args.names, args.follow, args.lines)
        except KeyboardInterrupt:
            pass
        return 0
    raise ValueError(f"unknown command {args.cmd}")
