"""Scripted transcripts: tests/testdata/*.txt hold commands and the exact messages and states
they must produce, so a classic scenario reads as documentation and any change of
behaviour shows up as a diff.

Format: a line `> command args` runs a command; the lines after it, up to the next
command, are its expected output. Lines starting with `#` are comments (kept as is).
Run `UPDATE_TRANSCRIPTS=1 pytest tests/test_raft_transcripts.py` to rewrite the expected
output after an intended change (and review the diff).

Commands:
  nodes 1 2 3 [key=value ...]   a fresh network of voters (Config overrides, e.g. pre_vote=true)
  campaign N | propose N data | transfer N TO | tick K [N ...]
  isolate N | cut A B | drop A B | recover
  conf-change N add 4 remove 2 [transition=explicit]
  compact N                      N snapshots its applied state and compacts its log
  add-node N                     an empty node joins the network (not the config)
  status [N ...]                 role, term, commit, applied, last index, voters
  log N                          the entries in N's log as term/index
Every delivered message is printed as `from->to Type field=value ...`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cita_raft_pb import eraftpb_pb2 as pb
from raft import StateRole
from tests.raft_harness import Network, conf_change

DATA = Path(__file__).parent / "testdata"
FILES = sorted(DATA.glob("*.txt"))


def fmt_entry(e: pb.Entry) -> str:
    s = f"{e.term}/{e.index}"
    if e.entry_type == pb.EntryConfChangeV2:
        cc = pb.ConfChangeV2.FromString(e.data)
        if not cc.changes:
            return s + ":leave-joint"
        names = {pb.AddNode: "add", pb.RemoveNode: "remove", pb.AddLearnerNode: "learner"}
        return s + ":cc(" + ",".join(f"{names[c.change_type]} {c.node_id}" for c in cc.changes) + ")"
    if e.data:
        return s + ":" + e.data.decode(errors="replace")
    return s


def fmt_msg(m: pb.Message) -> str:
    parts = [f"{getattr(m, 'from')}->{m.to} {pb.MessageType.Name(m.msg_type)} term={m.term}"]
    for name in ("log_term", "index", "commit", "commit_term", "reject_hint", "request_snapshot"):
        v = getattr(m, name)
        if v:
            parts.append(f"{name}={v}")
    if m.reject:
        parts.append("reject")
    if m.entries:
        parts.append("entries=[" + " ".join(fmt_entry(e) for e in m.entries) + "]")
    if m.HasField("snapshot") and m.snapshot.metadata.index:
        md = m.snapshot.metadata
        parts.append(f"snapshot={md.term}/{md.index} voters={list(md.conf_state.voters)}")
    if m.context:
        parts.append(f"context={m.context.decode()}")
    return " ".join(parts)


def fmt_status(net: Network, nid: int) -> str:
    r = net.nodes[nid].raft
    cfg = r.prs.conf
    voters = sorted(cfg.incoming)
    extra = f" outgoing={sorted(cfg.outgoing)}" if cfg.outgoing else ""
    return (
        f"{nid}: {r.state.name} term={r.term} vote={r.vote} leader={r.leader_id} commit={r.log.committed} "
        f"applied={r.log.applied} last={r.log.last_index()} voters={voters}{extra}"
    )


class Runner:
    def __init__(self) -> None:
        self.net: Network | None = None
        self.out: list[str] = []
        self.roles: dict[int, tuple[StateRole, int]] = {}

    def _deliver(self, m: pb.Message) -> None:
        self.out.append(fmt_msg(m))

    def _role_changes(self) -> None:
        for nid, n in sorted(self.net.nodes.items()):
            now = (n.raft.state, n.raft.term)
            if self.roles.get(nid) != now:
                if nid in self.roles:
                    self.out.append(f"# {nid} is {now[0].name} at term {now[1]}")
                self.roles[nid] = now

    def run(self, line: str) -> list[str]:
        self.out = []
        args = line.split()
        cmd, rest = args[0], args[1:]
        net = self.net
        if cmd == "nodes":
            ids = [int(a) for a in rest if "=" not in a]
            cfg = {}
            for a in rest:
                if "=" in a:
                    k, v = a.split("=")
                    cfg[k] = v == "true" if v in ("true", "false") else int(v)
            self.net = Network(ids, **cfg)
            self.net.on_deliver = self._deliver
            self.roles = {}
            self._role_changes()
            return self.out
        if cmd == "campaign":
            net.campaign(int(rest[0]))
        elif cmd == "propose":
            try:
                net.propose(int(rest[0]), rest[1].encode())
            except Exception as e:  # noqa: BLE001 - printed as part of the transcript
                self.out.append(f"error: {type(e).__name__}")
        elif cmd == "transfer":
            net.nodes[int(rest[0])].raw.transfer_leader(int(rest[1]))
            net.settle()
        elif cmd == "tick":
            k = int(rest[0])
            nodes = [int(a) for a in rest[1:]] or None
            net.tick(k, nodes=nodes)
        elif cmd == "isolate":
            net.isolate(int(rest[0]))
        elif cmd == "cut":
            net.cut(int(rest[0]), int(rest[1]))
        elif cmd == "drop":
            net.drop(int(rest[0]), int(rest[1]))
        elif cmd == "recover":
            net.recover()
        elif cmd == "add-node":
            net.add_node(int(rest[0]))
            self.roles[int(rest[0])] = (StateRole.Follower, 0)
        elif cmd == "compact":
            snap = net.compact(int(rest[0]))
            self.out.append(f"snapshot {snap.metadata.term}/{snap.metadata.index}")
        elif cmd == "conf-change":
            nid = int(rest[0])
            changes = []
            transition = pb.Auto
            it = iter(rest[1:])
            for kind in it:
                if kind.startswith("transition="):
                    transition = {"auto": pb.Auto, "implicit": pb.Implicit, "explicit": pb.Explicit}[kind.split("=")[1]]
                    continue
                changes.append((kind, int(next(it))))
            net.nodes[nid].raw.propose_conf_change(conf_change(*changes, transition=transition))
            net.settle()
        elif cmd == "status":
            ids = [int(a) for a in rest] or sorted(net.nodes)
            self.out.extend(fmt_status(net, i) for i in ids)
        elif cmd == "log":
            r = net.nodes[int(rest[0])].raft
            lg = r.log
            ents = lg.slice(lg.first_index(), lg.last_index() + 1)
            self.out.append(" ".join(fmt_entry(e) for e in ents) or "(empty)")
        else:
            raise ValueError(f"unknown transcript command {cmd!r}")
        self._role_changes()
        return self.out


def parse(text: str) -> list[tuple[str, list[str], list[str]]]:
    """[(command, expected output lines, comment lines before it)]. Lines starting with `##`
    (and everything before the first command) are comments; blank lines end an output."""
    blocks: list[tuple[str, list[str], list[str]]] = []
    comments: list[str] = []
    for line in text.splitlines():
        if line.startswith("> "):
            blocks.append((line[2:].strip(), [], comments))
            comments = []
        elif line.startswith("##") or not blocks:
            comments.append(line)
        elif line.strip():
            if comments:
                raise ValueError(f"output line after a comment, before any command: {line!r}")
            blocks[-1][1].append(line)
    return blocks


def render(blocks: list[tuple[str, list[str], list[str]]]) -> str:
    lines: list[str] = []
    for cmd, out, comments in blocks:
        lines.extend(comments)
        lines.append(f"> {cmd}")
        lines.extend(out)
        lines.append("")
    return "\n".join(lines)


def run_file(path: Path) -> tuple[str, str]:
    """(expected text, actual text), both rendered the same way."""
    blocks = parse(path.read_text())
    runner = Runner()
    actual = [(cmd, runner.run(cmd), comments) for cmd, _out, comments in blocks]
    return render(blocks), render(actual)


def test_transcript_files_exist():
    assert len(FILES) >= 4, "the classic scenarios should be in tests/testdata"


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_transcript(path: Path):
    expected, actual = run_file(path)
    if os.environ.get("UPDATE_TRANSCRIPTS"):
        path.write_text(actual)
        return
    assert actual == expected, f"transcript {path.name} differs; rerun with UPDATE_TRANSCRIPTS=1 and review the diff"
