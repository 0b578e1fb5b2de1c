#!/usr/bin/env python3
"""grpc-health-probe: a Python stand-in for grpc-ecosystem's probe (v0.4.x).

Owns the command that container images and Kubernetes liveness checks run as
`grpc-health-probe -addr=localhost:50001` (and under the old name
`grpc_health_probe`): it calls grpc.health.v1.Health/Check once and reports
through the exit code, with the same flags, messages (on stderr) and codes as
the Go probe:

    0 SERVING, 1 invalid arguments, 2 connection failure, 3 RPC failure,
    4 answered but not SERVING.

Flags follow Go's `flag` package: `-addr x`, `-addr=x`, `--addr=x`; boolean
flags take no separate value (`-v`, `-gzip=true`); parsing stops at the first
non-flag argument or `--`. Durations are Go durations (`1s`, `500ms`, `1m30s`).

Plaintext only: the CITA-Cloud services serve plaintext gRPC on localhost, so
-tls, -tls-*, -alts and -spiffe are refused with exit code 1 and a message
saying so, instead of silently probing without the requested security.

It must never need the generated protobuf package: the two tiny health
messages are encoded by hand, so the probe works from any Python with grpcio.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field

VERSION = "0.1.0"
PROG = "grpc-health-probe"

STATUS_SERVING = 0
STATUS_INVALID_ARGUMENTS = 1
STATUS_CONNECTION_FAILURE = 2
STATUS_RPC_FAILURE = 3
STATUS_UNHEALTHY = 4

# grpc.health.v1.HealthCheckResponse.ServingStatus names, as the Go probe prints them
SERVING_STATUS = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}

CHECK_METHOD = "/grpc.health.v1.Health/Check"

STRING_FLAGS = ("addr", "service", "user-agent", "tls-ca-cert", "tls-client-cert", "tls-client-key",
                "tls-server-name")
DURATION_FLAGS = ("connect-timeout", "rpc-timeout")
BOOL_FLAGS = ("tls", "tls-no-verify", "alts", "v", "version", "gzip", "spiffe")
LIST_FLAGS = ("rpc-header",)
# Security modes this probe cannot provide; refusing beats probing insecurely.
UNSUPPORTED = ("tls", "tls-no-verify", "tls-ca-cert", "tls-client-cert", "tls-client-key", "tls-server-name",
               "alts", "spiffe")

USAGE = """Usage of grpc-health-probe:
  -addr string
    \t(required) tcp host:port to connect
  -alts
    \tuse ALTS (not supported by this probe)
  -connect-timeout duration
    \ttimeout for establishing connection (default 1s)
  -gzip
    \tuse GZIPCompressor for requests and GZIPDecompressor for response (default: false)
  -rpc-header value
    \tadditional RPC headers in 'name: value' format. May specify more than one via multiple flags.
  -rpc-timeout duration
    \ttimeout for health check rpc (default 1s)
  -service string
    \tservice name to check (default: "")
  -spiffe
    \tuse SPIFFE to obtain mTLS credentials (not supported by this probe)
  -tls
    \tuse TLS (not supported by this probe: plaintext only)
  -tls-ca-cert / -tls-client-cert / -tls-client-key / -tls-server-name / -tls-no-verify string
    \t(not supported by this probe)
  -user-agent string
    \tuser-agent header value of health check requests (default "grpc_health_probe")
  -v\tverbose logs
  -version
    \tshow probe version and exit"""


class ArgError(Exception):
    """Invalid command line: exit code 1, as the Go probe (flag.ContinueOnError)."""


@dataclass
class Options:
    addr: str = ""
    service: str = ""
    user_agent: str = "grpc_health_probe"
    connect_timeout: float = 1.0
    rpc_timeout: float = 1.0
    rpc_headers: list[tuple[str, str]] = field(default_factory=list)
    verbose: bool = False
    version: bool = False
    gzip: bool = False
    unsupported: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------
# Go-compatible flag and duration handling
# --------------------------------------------------------------------------

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> float:
    """Go's time.ParseDuration, in seconds: '1s', '1.5s', '300ms', '1m30s', '0'."""
    s = text
    sign = 1.0
    if s[:1] in "+-" and s:
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    if s == "0":
        return 0.0
    if not s:
        raise ValueError(f"time: invalid duration {text!r}")
    total, pos = 0.0, 0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if not m:
            raise ValueError(f"time: invalid duration {text!r}")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    return sign * total


def format_duration(seconds: float) -> str:
    """Go's Duration.String() for the values a probe prints: '1s', '1.5s', '300ms', '1m30s'."""
    if seconds == 0:
        return "0s"
    sign = "-" if seconds < 0 else ""
    seconds = abs(seconds)
    if seconds < 1:
        for unit, scale in (("ms", 1e-3), ("µs", 1e-6), ("ns", 1e-9)):
            if seconds >= scale:
                return f"{sign}{_trim(seconds / scale)}{unit}"
        return f"{sign}{_trim(seconds / 1e-9)}ns"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    out = ""
    if hours:
        out += f"{int(hours)}h"
    if hours or minutes:
        out += f"{int(minutes)}m"
    return f"{sign}{out}{_trim(secs)}s"


def _trim(value: float) -> str:
    text = f"{value:.9f}".rstrip("0").rstrip(".")
    return text or "0"


def _parse_bool(name: str, value: str) -> bool:
    # strconv.ParseBool's accepted spellings
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False"):
        return False
    raise ArgError(f'invalid boolean value "{value}" for -{name}: parse error')


def parse_args(argv: list[str]) -> Options:
    """Parse like Go's flag.FlagSet.Parse; raises ArgError with Go's message."""
    opts = Options()
    args = list(argv)
    while args:
        arg = args[0]
        if len(arg) < 2 or arg[0] != "-":
            break  # first non-flag argument ends flag parsing
        if arg == "--":
            args.pop(0)
            break
        body = arg[2:] if arg.startswith("--") else arg[1:]
        if not body or body[0] in "-=":
            raise ArgError(f"bad flag syntax: {arg}")
        args.pop(0)
        name, has_value, value = body.partition("=")
        if name in ("h", "help"):
            raise ArgError("help requested")
        if name in BOOL_FLAGS:
            flag_on = _parse_bool(name, value) if has_value else True
            if name in UNSUPPORTED:
                if flag_on:
                    opts.unsupported.append(name)
            elif name == "v":
                opts.verbose = flag_on
            elif name == "version":
                opts.version = flag_on
            elif name == "gzip":
                opts.gzip = flag_on
            continue
        if name not in STRING_FLAGS + DURATION_FLAGS + LIST_FLAGS:
            raise ArgError(f"flag provided but not defined: -{name}")
        if not has_value:
            if not args:
                raise ArgError(f"flag needs an argument: -{name}")
            value = args.pop(0)
        if name in DURATION_FLAGS:
            try:
                seconds = parse_duration(value)
            except ValueError:
                raise ArgError(f'invalid value "{value}" for flag -{name}: parse error') from None
            if name == "connect-timeout":
                opts.connect_timeout = seconds
            else:
                opts.rpc_timeout = seconds
        elif name == "rpc-header":
            key, sep, header_value = value.partition(":")
            if not sep:
                raise ArgError(f"invalid value \"{value}\" for flag -rpc-header: "
                               f"invalid RPC header, expected 'key: value', got \"{value}\"")
            opts.rpc_headers.append((key.lower(), header_value.lstrip()))
        elif name in UNSUPPORTED:
            opts.unsupported.append(name)
        elif name == "addr":
            opts.addr = value
        elif name == "service":
            opts.service = value
        elif name == "user-agent":
            opts.user_agent = value
    return opts


def validate(opts: Options) -> None:
    """The Go probe's argument checks, in its order, plus the refusal of TLS/ALTS/SPIFFE."""
    if opts.unsupported:
        names = ", ".join(f"-{n}" for n in opts.unsupported)
        raise ArgError(f"{names}: not supported by this grpc-health-probe (Python, plaintext only); "
                       "the consensus service serves plaintext gRPC, probe it without TLS flags")
    if not opts.addr:
        raise ArgError("-addr not specified")
    if opts.connect_timeout <= 0:
        raise ArgError(f"-connect-timeout must be greater than zero (specified: "
                       f"{format_duration(opts.connect_timeout)})")
    if opts.rpc_timeout <= 0:
        raise ArgError(f"-rpc-timeout must be greater than zero (specified: {format_duration(opts.rpc_timeout)})")


# --------------------------------------------------------------------------
# grpc.health.v1 messages, hand-encoded (proto3: field 1 only)
# --------------------------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_request(service: str) -> bytes:
    """HealthCheckRequest{service = 1}; an empty string is the default and is omitted."""
    raw = service.encode()
    return b"\x0a" + _varint(len(raw)) + raw if raw else b""


def decode_status(data: bytes) -> int:
    """HealthCheckResponse.status (field 1, varint); unknown fields are skipped."""
    status, pos = 0, 0

    def read_varint() -> int:
        nonlocal pos
        shift = result = 0
        while True:
            if pos >= len(data):
                raise ValueError("truncated HealthCheckResponse")
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return result

    while pos < len(data):
        key = read_varint()
        field_number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value = read_varint()
            if field_number == 1:
                status = value
        elif wire_type == 1:
            pos += 8
        elif wire_type == 2:
            pos += read_varint()
        elif wire_type == 5:
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wire_type} in HealthCheckResponse")
    return status


# --------------------------------------------------------------------------
# The probe
# --------------------------------------------------------------------------


def _log(message: str) -> None:
    # Go's log package writes to stderr, one line per message
    print(message, file=sys.stderr, flush=True)


def probe(opts: Options) -> int:
    """Connect within connect_timeout, call Check within rpc_timeout, map the outcome to an exit code."""
    import grpc  # deferred: argument errors and -version need no grpc import

    if opts.verbose:
        _log("parsed options:")
        _log(f"> addr={opts.addr} conn_timeout={format_duration(opts.connect_timeout)} "
             f"rpc_timeout={format_duration(opts.rpc_timeout)}")
        if opts.rpc_headers:
            _log(f"> headers: {opts.rpc_headers}")
        _log("> tls=false")
        _log("> alts=false")
        _log("> spiffe=false")
        _log("establishing connection")
    channel_options = [("grpc.primary_user_agent", opts.user_agent)]
    compression = grpc.Compression.Gzip if opts.gzip else None
    with grpc.insecure_channel(opts.addr, options=channel_options, compression=compression) as channel:
        # Like the Go probe's blocking dial: keep trying until the connect timeout.
        try:
            grpc.channel_ready_future(channel).result(timeout=opts.connect_timeout)
        except grpc.FutureTimeoutError:
            _log(f'timeout: failed to connect service "{opts.addr}" within {format_duration(opts.connect_timeout)}')
            return STATUS_CONNECTION_FAILURE
        if opts.verbose:
            _log("connection established")
        check = channel.unary_unary(CHECK_METHOD, request_serializer=None, response_deserializer=None)
        try:
            reply = check(encode_request(opts.service), timeout=opts.rpc_timeout,
                          metadata=opts.rpc_headers or None)
        except grpc.RpcError as err:
            code = err.code() if hasattr(err, "code") else None
            details = err.details() if hasattr(err, "details") else str(err)
            if code == grpc.StatusCode.UNIMPLEMENTED:
                _log("error: this server does not implement the grpc health protocol "
                     f"(grpc.health.v1.Health): {details}")
            elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
                _log(f"timeout: health rpc did not complete within {format_duration(opts.rpc_timeout)}")
            else:
                name = code.name if code is not None else "Unknown"
                _log(f"error: health rpc failed: rpc error: code = {name} desc = {details}")
            return STATUS_RPC_FAILURE
    try:
        status = decode_status(reply)
    except ValueError as err:
        _log(f"error: health rpc failed: {err}")
        return STATUS_RPC_FAILURE
    status_name = SERVING_STATUS.get(status, str(status))
    if status != 1:
        _log(f'service unhealthy (responded with "{status_name}")')
        return STATUS_UNHEALTHY
    _log(f"status: {status_name}")
    return STATUS_SERVING


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts = parse_args(argv)
        if opts.version:
            print(f"{VERSION}; Python grpc-health-probe of consensus_raft")
            return 0
        validate(opts)
    except ArgError as err:
        message = str(err)
        if message.startswith(("flag ", "bad flag", "invalid ")):
            # a flag-parsing error: Go's flag package prints it, then the usage
            _log(f"{message}\n{USAGE}")
        elif message == "help requested":
            _log(USAGE)
        else:
            _log(f"error: {message}")
        return STATUS_INVALID_ARGUMENTS
    try:
        return probe(opts)
    except KeyboardInterrupt:
        _log("cancellation received (signal: interrupt)")
        return STATUS_RPC_FAILURE


if __name__ == "__main__":
    sys.exit(main())
