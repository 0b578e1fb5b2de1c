# The shell script of the flake's `checks.cli`: the installed programs answer
# as a CITA-Cloud node expects. tests/test_packaging.py runs the same script
# against the pip-built venv, so it is exercised on every CI run.
{ gitRev }:
''
  set -eu
  consensus -V | grep -qx 'consensus_raft [0-9.]*'
  consensus git | grep -qxF 'git version: ${gitRev}'
  consensus git | grep -q '^homepage: https://'
  consensus run --help | grep -q -- '--stdout'
  # Nothing listens on port 1: the probe must report a connection failure (2).
  for probe in grpc-health-probe grpc_health_probe; do
    rc=0
    "$probe" -addr=127.0.0.1:1 -connect-timeout=200ms 2>/dev/null || rc=$?
    test "$rc" -eq 2
  done
  rc=0
  grpc-health-probe 2>/dev/null || rc=$?
  test "$rc" -eq 1
  touch "$out"
''
