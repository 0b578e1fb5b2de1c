"""deploy/: the Prometheus alerting rules are valid and fire as their unit
tests say (`promtool`, from Debian's prometheus package: .ci/run installs
it), and the Grafana dashboard is well-formed. That every metric they name
exists on a live node is checked in tests/integration/test_operator.py."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy" / "prometheus" / "consensus_raft_alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "consensus_raft_alerts_test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "consensus_raft.json"

# PromQL words that look like metric names but are functions, keywords or labels
_NOT_METRICS = {"by", "on", "and", "or", "unless", "without", "ignoring", "group_left", "group_right", "bool",
                "le", "job", "instance", "peer", "state", "outcome", "direction", "method", "leader_id",
                "__name__", "offset"}


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool is missing: install Debian's `prometheus` package (apt-get install prometheus); "
                    ".ci/run does this on CI machines")
    return path


def rule_exprs() -> list[str]:
    # the rules file is YAML; its expressions are the `expr:` values (one line or a folded block)
    text = RULES.read_text()
    exprs = []
    for m in re.finditer(r"^\s+expr: (>-\n((?:\s{10,}.*\n)+)|.*)$", text, re.M):
        exprs.append(" ".join(m.group(2).split()) if m.group(2) else m.group(1))
    return exprs


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dash["panels"] for t in p.get("targets", [])] + \
        [v["definition"] for v in dash["templating"]["list"] if v.get("definition")]


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects by name (not `{__name__=~...}` regexes)."""
    expr = re.sub(r'"[^"]*"', '""', expr)          # label values
    expr = re.sub(r"\{[^}]*\}", "{}", expr)         # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)          # ranges
    words = set(re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", expr))
    return {w for w in words if w not in _NOT_METRICS and ("_" in w)}


def referenced_metrics() -> set[str]:
    names = set()
    for e in rule_exprs() + dashboard_exprs():
        names |= metric_names(e)
    return names


def test_rules_are_valid():
    proc = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 9 rules found" in proc.stdout


def test_rules_fire_as_their_unit_tests_say():
    proc = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_broken_rule_is_caught(tmp_path):
    # the check above can fail: a rule with a PromQL syntax error does not pass
    bad = tmp_path / "bad.yml"
    bad.write_text(RULES.read_text().replace("consensus_raft_stuck == 1", "consensus_raft_stuck == == 1"))
    proc = subprocess.run([promtool(), "check", "rules", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0


def test_every_alert_the_issue_asks_for_exists():
    names = set(re.findall(r"alert: (\w+)", RULES.read_text()))
    assert {"ConsensusRaftNoLeader", "ConsensusRaftCommitIndexStalled", "ConsensusRaftFollowerLagging",
            "ConsensusRaftWalFsyncSlow", "ConsensusRaftControllerUnreachable"} <= names


def test_dashboard_is_grafana_json():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 30
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in dash["panels"]:
        assert p["targets"] and all(t["expr"] and t["refId"] for t in p["targets"]), p["title"]
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource", "job", "instance"}


def test_metric_names_are_extracted():
    # the live-node check relies on this parser: it must find names and skip functions and labels
    got = metric_names('histogram_quantile(0.99, sum by (instance, le) (rate(consensus_raft_wal_fsync_ms_bucket'
                       '{job=~"$job", instance=~"a_b"}[5m]))) > 100 and on (instance) process_open_fds == 0')
    assert got == {"consensus_raft_wal_fsync_ms_bucket", "process_open_fds"}
    refs = referenced_metrics()
    assert {"consensus_raft_peer_lag_entries", "consensus_raft_controller_reachable",
            "consensus_raft_wal_fsync_ms_bucket", "process_cpu_seconds_total"} <= refs
