# The shell script of the flake's `checks.cli`: the installed programs answer
# as a CITA-Cloud node expects. tests/test_packaging.py runs the same script
# against the pip-built venv (with free ports in CHECK_*_PORT), so it is
# exercised on every CI run.
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

  # What the node's StatefulSet runs (controller and network absent): it must
  # answer the liveness probe, keep its data under the working directory and
  # exit 0 on SIGTERM.
  grpc_port=''${CHECK_GRPC_PORT:-50001}
  mkdir -p check/data check/etc
  cat > check/etc/config.toml <<EOF
  [consensus_raft]
  node_addr = "7e29cd5aef9b02bba74019c444bdc13a4d3b1bad"
  grpc_listen_port = $grpc_port
  network_port = ''${CHECK_NETWORK_PORT:-50000}
  controller_port = ''${CHECK_CONTROLLER_PORT:-50004}
  enable_metrics = false
  EOF
  (cd check/data && exec consensus run -c ../etc/config.toml --stdout > ../consensus.log 2>&1) &
  pid=$!
  serving=
  for _ in $(seq 150); do
    if grpc-health-probe -addr=localhost:"$grpc_port" 2>/dev/null; then
      serving=1
      break
    fi
    sleep 0.2
  done
  if [ -z "$serving" ]; then
    echo "consensus did not answer grpc-health-probe within 30 s:" >&2
    cat check/consensus.log >&2
    kill "$pid" 2>/dev/null || true
    exit 1
  fi
  kill -TERM "$pid"
  wait "$pid" || { echo "consensus did not exit 0 on SIGTERM:" >&2; cat check/consensus.log >&2; exit 1; }
  test -d check/data/raft-data-dir

  touch "$out"
''
