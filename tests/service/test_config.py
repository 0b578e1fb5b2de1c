"""Loading [consensus_raft]: every key with its default, both node_addr
forms, the old data-dir key names, and one clear message per kind of bad
input."""
import pytest

import consensus
from consensus import ConfigError, load_config

ADDR = "7e29cd5aef9b02bba74019c444bdc13a4d3b1bad"


def write(tmp_path, body: str, name="config.toml"):
    p = tmp_path / name
    p.write_text(body)
    return str(p)


def test_defaults_match_the_original(tmp_path):
    cfg = load_config(write(tmp_path, f'[consensus_raft]\nnode_addr = "{ADDR}"\n'))
    assert (cfg.grpc_listen_port, cfg.network_port, cfg.controller_port) == (50001, 50000, 50004)
    assert cfg.log_level == "info" and cfg.log_to_stdout is False
    assert (cfg.log_dir, cfg.log_file_name) == ("logs", "consensus-service.log")
    assert (cfg.log_rotate_size, cfg.log_rotate_keep, cfg.log_rotate_compress) == (134217728, 5, False)
    assert (cfg.tick_interval_in_millis, cfg.heartbeat_tick, cfg.election_tick) == (200, 15, 50)
    assert cfg.check_quorum is False
    assert cfg.raft_data_path == "raft-data-dir"
    assert (cfg.enable_metrics, cfg.metrics_port) == (True, 60001)
    assert cfg.metrics_buckets == [0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 25, 50, 75, 100, 250, 500]
    assert cfg.node_address == bytes.fromhex(ADDR)


def test_every_key_is_read(tmp_path):
    body = f"""[consensus_raft]
node_addr = "0x{ADDR}"
grpc_listen_port = 1
network_port = 2
controller_port = 3
log_level = "DEBUG"
log_to_stdout = true
log_dir = "d"
log_file_name = "f.log"
log_rotate_size = 10
log_rotate_keep = 2
log_rotate_compress = true
tick_interval_in_millis = 50
heartbeat_tick = 2
election_tick = 10
check_quorum = true
pre_vote = false
raft_data_path = "rd"
enable_metrics = false
metrics_port = 4
metrics_buckets = [1, 2.5]
"""
    cfg = load_config(write(tmp_path, body))
    assert (cfg.grpc_listen_port, cfg.network_port, cfg.controller_port, cfg.metrics_port) == (1, 2, 3, 4)
    assert cfg.log_level == "debug" and cfg.log_to_stdout and cfg.log_rotate_compress
    assert (cfg.log_dir, cfg.log_file_name, cfg.log_rotate_size, cfg.log_rotate_keep) == ("d", "f.log", 10, 2)
    assert (cfg.tick_interval_in_millis, cfg.heartbeat_tick, cfg.election_tick) == (50, 2, 10)
    assert cfg.check_quorum and not cfg.pre_vote and not cfg.enable_metrics
    assert cfg.raft_data_path == "rd" and cfg.metrics_buckets == [1.0, 2.5]


@pytest.mark.parametrize("old", ["raft_data_dir", "wal_path"])
def test_old_data_dir_key_names(tmp_path, old):
    cfg = load_config(write(tmp_path, f'[consensus_raft]\nnode_addr = "{ADDR}"\n{old} = "olddir"\n'))
    assert cfg.raft_data_path == "olddir"


@pytest.mark.parametrize("content", [ADDR, ADDR + "\n", "0x" + ADDR + "\n", "  " + ADDR.upper() + " \r\n"])
def test_node_addr_as_file(tmp_path, content):
    (tmp_path / "node_address").write_text(content)
    cfg = load_config(write(tmp_path, f'[consensus_raft]\nnode_addr = "{tmp_path / "node_address"}"\n'))
    assert cfg.node_address == bytes.fromhex(ADDR)


def test_node_addr_inline_with_0x_and_spaces(tmp_path):
    cfg = load_config(write(tmp_path, f'[consensus_raft]\nnode_addr = " 0x{ADDR} "\n'))
    assert cfg.node_address == bytes.fromhex(ADDR)


def test_unknown_keys_are_collected_for_one_warning(tmp_path):
    cfg = load_config(write(tmp_path, f'[consensus_raft]\nnode_addr = "{ADDR}"\nfoo = 1\nbar = "x"\n'
                                      '[other_service]\nx = 1\n'))
    assert cfg.unknown_keys == ["foo", "bar"]


@pytest.mark.parametrize("body,expected", [
    ('[other]\nx = 1\n', "missing section [consensus_raft]"),
    ('[consensus_raft\nnode_addr = "x"\n', "TOML syntax error"),
    ('[consensus_raft]\ngrpc_listen_port = 1\n', "[consensus_raft].node_addr: missing"),
    (f'[consensus_raft]\nnode_addr = "{ADDR}"\ngrpc_listen_port = "50001"\n',
     "[consensus_raft].grpc_listen_port: expected an integer"),
    (f'[consensus_raft]\nnode_addr = "{ADDR}"\ncheck_quorum = 1\n', "[consensus_raft].check_quorum: expected true or false"),
    (f'[consensus_raft]\nnode_addr = "{ADDR}"\nlog_level = 3\n', "[consensus_raft].log_level: expected a string"),
    (f'[consensus_raft]\nnode_addr = "{ADDR}"\nlog_level = "loud"\n', "[consensus_raft].log_level: unknown level"),
    ('[consensus_raft]\nnode_addr = "zz29cd5aef9b02bba74019c444bdc13a4d3b1bad"\n', "node_addr: not a hex address"),
    ('[consensus_raft]\nnode_addr = "7e29cd"\n', "node_addr: address must be 20 bytes (40 hex digits), got 3 bytes"),
    ('[consensus_raft]\nnode_addr = "/nonexistent/node_address"\n', "node_addr: address file not found"),
    (f'[consensus_raft]\nnode_addr = "{ADDR}"\nheartbeat_tick = 50\nelection_tick = 50\n',
     "heartbeat_tick: must be less than election_tick (50 >= 50)"),
    (f'[consensus_raft]\nnode_addr = "{ADDR}"\nmetrics_port = 70000\n', "metrics_port: not a TCP port"),
    (f'[consensus_raft]\nnode_addr = "{ADDR}"\nmetrics_buckets = [2, 1]\n', "strictly increasing"),
    (f'[consensus_raft]\nnode_addr = "{ADDR}"\nelection_tick = -1\n', "must not be negative"),
    ('consensus_raft = 3\n', "consensus_raft must be a table"),
])
def test_bad_input_gives_one_line_naming_file_key_and_problem(tmp_path, body, expected):
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert expected in msg, msg
    assert msg.startswith(path), msg
    assert "\n" not in msg


def test_bad_hex_in_address_file_names_the_file(tmp_path):
    (tmp_path / "node_address").write_text("nothex\n")
    path = write(tmp_path, f'[consensus_raft]\nnode_addr = "{tmp_path / "node_address"}"\n')
    with pytest.raises(ConfigError, match="file .*node_address.*not a hex address"):
        load_config(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "nope.toml"))


def test_example_config_loads():
    import os
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cwd = os.getcwd()
    os.chdir(here)
    try:
        cfg = load_config("example/config.toml")
    finally:
        os.chdir(cwd)
    assert cfg.node_address == bytes.fromhex(ADDR)
    assert consensus.Config().metrics_port == cfg.metrics_port


def test_node_addr_naming_a_directory_says_so(tmp_path):
    """Hardening I, defect 7: it said 'address file not found' (failed on f99da45)."""
    d = tmp_path / "node_address"
    d.mkdir()
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, f'[consensus_raft]\nnode_addr = "{d}"\n'))
    assert f"node_addr: {d} is a directory, not a file holding the node's hex address" in str(e.value)
