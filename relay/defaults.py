"""Every default and limit of relay in one place, read by the CLI, twistd options, docs and tests."""

KiB = 1024
MiB = 1024 * KiB

STATE_DIR = "relay-state"
TUNNEL_PORT = 7835
TUNNEL_ENDPOINT = f"tcp:{TUNNEL_PORT}"
ALPN = b"relay/1"

# Liveness: a PING every interval; a tunnel from which nothing at all arrived for
# interval * dead_after is dead (judge by what we receive: our own PING may sit
# behind a full send buffer).
HEARTBEAT_INTERVAL = 15.0
HEARTBEAT_DEAD_AFTER = 3

# Flow control (see docs/protocol.md).
INITIAL_WINDOW = 256 * KiB
MAX_WINDOW = 16 * MiB
# A window beyond this must be earned by the path's round trip: one stream needs at most
# STREAM_RATE_CEILING * min RTT in flight. Short paths stop at SHORT_PATH_WINDOW, which covers
# a busy host's scheduling gaps; more only queued bulk data in front of every other stream.
SHORT_PATH_WINDOW = 2 * MiB
STREAM_RATE_CEILING = 1_000_000_000  # bytes/s; one stream through CPython stays below it
WINDOW_BUDGET = 64 * MiB  # per tunnel: growth of all stream windows above INITIAL_WINDOW
MAX_DATA_PAYLOAD = 64 * KiB
MAX_CONTROL_PAYLOAD = 16 * KiB
MAX_STREAMS = 8192  # concurrent streams per tunnel
MAX_PENDING_CONTROL = 256 * KiB  # queued outbound control bytes before we call the peer dead

# Relay limits on what a stranger can make it allocate.
HANDSHAKE_TIMEOUT = 10.0  # TLS handshake + HELLO
MAX_UNAUTHENTICATED = 256
MAX_UNAUTHENTICATED_PER_IP = 16  # so one source cannot take every handshake slot
MAX_AGENTS = 1024
MAX_PORTS_PER_AGENT = 256
OPEN_TIMEOUT = 30.0  # the relay resets a stream whose OPEN the agent has not answered by then
DRAIN_TIMEOUT = 10.0  # SIGTERM: how long open streams may drain
AGENT_PORT_RANGE = (1024, 65535)

# Agent reconnection: exponential backoff with full jitter.
RECONNECT_INITIAL = 1.0
RECONNECT_MAX = 60.0
RECONNECT_FACTOR = 2.0
LISTEN_RETRY_INITIAL = 5.0  # refused public ports are asked for again
LISTEN_RETRY_MAX = 300.0

# State dir (relay init, relay agent-token).
CA_VALIDITY_DAYS = 3650
SERVER_CERT_VALIDITY_DAYS = 5 * 365
MAX_TOKEN_LENGTH = 512  # longer tokens are refused unread
