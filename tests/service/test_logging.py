"""Log lines shaped like the original's slog output, routing to stdout or a
size-rotated (optionally gzipped) file, and the level filter."""
import gzip
import io
import logging
import re

from consensus import Config, ctx, setup_logging

LINE = re.compile(r"^[A-Z][a-z]{2} [ 0-9]\d \d\d:\d\d:\d\d\.\d{3} (TRCE|DEBG|INFO|WARN|ERRO|CRIT) .+, module: \S+:\d+$")


def test_line_shape_with_context():
    buf = io.StringIO()
    setup_logging(Config(log_level="info"), True, None, None, stream=buf)
    logging.getLogger("consensus.client").info("controller grpc addr: %s", "http://127.0.0.1:50004",
                                                extra=ctx(tag="controller"))
    line = buf.getvalue().strip()
    assert LINE.match(line), line
    assert " INFO controller grpc addr: http://127.0.0.1:50004, tag: controller, module: consensus::client::" in line


def test_level_filter():
    buf = io.StringIO()
    setup_logging(Config(log_level="warning"), True, None, None, stream=buf)
    log = logging.getLogger("consensus")
    log.info("hidden")
    log.warning("shown")
    out = buf.getvalue()
    assert "hidden" not in out and " WARN shown" in out


def test_raft_logger_is_routed_too():
    buf = io.StringIO()
    setup_logging(Config(log_level="debug"), True, None, None, stream=buf)
    logging.getLogger("raft.core").debug("became leader term=7 index=120")
    assert " DEBG became leader term=7 index=120, module: raft::core::" in buf.getvalue()


def test_file_logging_with_cli_override_and_rotation(tmp_path):
    cfg = Config(log_dir=str(tmp_path / "ignored"), log_rotate_size=300, log_rotate_keep=2)
    handler = setup_logging(cfg, False, str(tmp_path / "logs"), "c.log")
    log = logging.getLogger("consensus")
    for i in range(40):
        log.info("line %d of the rotation test", i)
    handler.flush()
    files = sorted(p.name for p in (tmp_path / "logs").iterdir())
    assert files == ["c.log", "c.log.1", "c.log.2"], files
    assert not (tmp_path / "ignored").exists()
    assert "line 39 " in (tmp_path / "logs" / "c.log").read_text()


def test_rotated_files_are_gzipped_when_configured(tmp_path):
    cfg = Config(log_dir=str(tmp_path), log_file_name="g.log", log_rotate_size=200, log_rotate_keep=3,
                 log_rotate_compress=True)
    handler = setup_logging(cfg, False, None, None)
    log = logging.getLogger("consensus")
    for i in range(30):
        log.info("compressed line %d", i)
    handler.flush()
    rotated = tmp_path / "g.log.1.gz"
    assert rotated.exists(), sorted(p.name for p in tmp_path.iterdir())
    text = gzip.decompress(rotated.read_bytes()).decode()
    assert "compressed line" in text
    assert len(list(tmp_path.glob("g.log.*.gz"))) <= 3
