#!/usr/bin/env bash
# Instructions per request under callgrind (user space, loopmux only),
# which do not move with the machine's noise: an http listener in front of
# a keep-alive origin on loopback, a new client connection per request
# (the client sends Connection: close, as a legacy app does). A warm-up,
# then the counters are zeroed and N requests counted. Run by hand:
#
#   benches/callgrind.sh BIN [BIN2 ...]      (N=2000 WARMUP=200 ROUNDS=2)
#   MODE=forward benches/callgrind.sh ...    a forward listener instead:
#       absolute-form requests (as HTTP_PROXY makes clients send them)
#
# Several binaries are measured interleaved, ROUNDS times, so a before and
# after come from one run. Needs valgrind (callgrind_control) and python3.
set -euo pipefail
[ "$#" -ge 1 ] || { echo "usage: $0 BIN [BIN2 ...]" >&2; exit 64; }
N=${N:-2000}
WARMUP=${WARMUP:-200}
ROUNDS=${ROUNDS:-2}
MODE=${MODE:-http}
WORK=$(mktemp -d /tmp/loopmux-callgrind.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# A keep-alive HTTP/1.1 origin: "ok\n" with a Content-Length.
ORIGIN_PORT=$(free_port)
cat > "$WORK/origin.py" <<'EOF'
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "3")
        self.end_headers()
        self.wfile.write(b"ok\n")
    def log_message(self, *a):
        pass
ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
EOF
python3 "$WORK/origin.py" "$ORIGIN_PORT" &
PIDS+=($!)

# N requests, each on a new connection; exits non-zero if one fails.
cat > "$WORK/load.py" <<'EOF'
import socket, sys
port, n, target = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
req = b"GET " + target.encode() + b" HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n"
for i in range(n):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(req)
    got = b""
    while True:
        b = s.recv(65536)
        if not b:
            break
        got += b
    s.close()
    if not got.startswith(b"HTTP/1.1 200") or not got.endswith(b"ok\n"):
        sys.exit(f"request {i}: {got[:200]!r}")
EOF

measure() {
    local bin=$1 port cfg pid out target
    port=$(free_port)
    cfg="$WORK/loopmux-$port.toml"
    if [ "$MODE" = forward ]; then
        printf '[[listener]]\nname = "bench"\nbind = "127.0.0.1:%s"\nmode = "forward"\nallow = ["127.0.0.1:%s"]\n\n[forward_defaults]\nmax_connections = 8\n' \
            "$port" "$ORIGIN_PORT" > "$cfg"
        target="http://127.0.0.1:$ORIGIN_PORT/"
    else
        printf '[[listener]]\nname = "bench"\nbind = "127.0.0.1:%s"\nupstream = "origin"\n\n[[upstream]]\nname = "origin"\nendpoints = ["127.0.0.1:%s"]\nmax_connections = 8\n' \
            "$port" "$ORIGIN_PORT" > "$cfg"
        target=/
    fi
    out="$WORK/cg-$port"
    valgrind --tool=callgrind --callgrind-out-file="$out.%p" "$bin" run --config "$cfg" >/dev/null 2>"$WORK/vg-$port.log" &
    pid=$!
    PIDS+=("$pid")
    for _ in $(seq 1 300); do
        python3 -c "import socket; socket.create_connection(('127.0.0.1', $port), timeout=1).close()" 2>/dev/null && break
        sleep 0.1
    done
    python3 "$WORK/load.py" "$port" "$WARMUP" "$target"
    callgrind_control -z "$pid" >/dev/null 2>&1
    python3 "$WORK/load.py" "$port" "$N" "$target"
    callgrind_control -d "$pid" >/dev/null 2>&1
    kill -INT "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    # The dump after zeroing holds only the N requests.
    local ir
    ir=$(for f in "$out".*; do grep -h '^summary:' "$f" 2>/dev/null; done | awk '{print $2}' | sort -n | tail -1)
    echo $(( ir / N ))
}

printf '| round | binary (%s listener) | instructions per request |\n|---|---|---|\n' "$MODE"
for r in $(seq 1 "$ROUNDS"); do
    for bin in "$@"; do
        printf '| %s | %s | %s |\n' "$r" "$bin" "$(measure "$bin")"
    done
done
