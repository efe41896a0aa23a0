#!/usr/bin/env bash
# Comparative load benchmark, run by hand (not by CI): loopmux against
# HAProxy and nginx in front of the same local nginx origin, each at every
# reasonable thread setting for this machine, interleaved in one run:
#
#   loopmux   loopmux's default config (process.threads = 1)
#   loopmux2  process.threads = 2
#   haproxy1  nbthread 1          haproxy2  nbthread 2
#   nginx1    worker_processes 1  nginx2    worker_processes 2
#
# Three upstream kinds, each its own table:
#   h1   plain HTTP/1.1 (http-reuse always / keepalive 32 / max_connections 8)
#   h2   HTTP/2 without TLS (prior knowledge) to an h2c origin: loopmux and
#        HAProxy (nginx cannot speak HTTP/2 upstream)
#   tls  HTTP/1.1 over TLS 1.3, certificate verified against a CA made for
#        the run
#
# The load is a legacy app's: a new client connection per request
# (wrk -H 'Connection: close'), 16 concurrent. Loopback only.
#
#   benches/compare.sh [rounds] [seconds] [kinds]   (needs: nginx haproxy wrk openssl)
#       kinds: any of h1 h2 tls (default: all three)
#   BASELINE=/path/to/older/loopmux benches/compare.sh ...
#       adds that binary as "baseline" to the h1 table, same config,
#       interleaved: before/after figures for a change from one run.
#
# Prints per round: requests/s, p99, proxy CPU ms per 1,000 requests
# (utime+stime from /proc, workers included), and the connections the
# origin accepted during the run; then medians, and loopmux's default
# against each peer's best setting in the same run (best = least CPU per
# request).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
SECS=${2:-10}
KINDS=${3:-"h1 h2 tls"}
CONC=16
for t in nginx haproxy wrk openssl; do
    command -v "$t" >/dev/null || { echo "missing $t: apt-get install nginx-light haproxy wrk openssl" >&2; exit 1; }
done
cargo build --release --quiet
BIN=$PWD/target/release/loopmux
WORK=$(mktemp -d /tmp/loopmux-compare.XXXXXX)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

STATUS=127.0.0.1:19101
mkdir -p "$WORK"/{origin,nginx1,nginx2}

# A CA and a certificate for localhost, made for this run.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=bench-ca -keyout "$WORK/ca.key" -out "$WORK/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -subj /CN=localhost -keyout "$WORK/origin.key" -out "$WORK/origin.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost\nbasicConstraints=CA:FALSE\n' > "$WORK/ext"
openssl x509 -req -in "$WORK/origin.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" \
    -CAcreateserial -days 2 -extfile "$WORK/ext" -out "$WORK/origin.pem" 2>/dev/null

# The origin: one nginx worker, three listeners (h1, h2c, TLS), and
# stub_status for its accepted-connection count.
cat > "$WORK/origin.conf" <<CONF
daemon off; worker_processes 1; pid $WORK/origin.pid; error_log $WORK/origin.err;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/origin; proxy_temp_path $WORK/origin;
  fastcgi_temp_path $WORK/origin; uwsgi_temp_path $WORK/origin; scgi_temp_path $WORK/origin;
  keepalive_requests 10000000; keepalive_timeout 300s;
  server { listen 127.0.0.1:19100; location / { return 200 "ok\n"; } }
  server { listen 127.0.0.1:19110 http2; location / { return 200 "ok\n"; } }
  server {
    listen 127.0.0.1:19120 ssl;
    ssl_certificate $WORK/origin.pem; ssl_certificate_key $WORK/origin.key;
    ssl_protocols TLSv1.3;
    location / { return 200 "ok\n"; }
  }
  server { listen $STATUS; location / { stub_status; } }
}
CONF
nginx -c "$WORK/origin.conf" -e "$WORK/origin.err" & PIDS+=($!)

declare -A PORT PID KIND
# loopmux NAME KIND PORT THREADS UPSTREAM-LINES
loopmux() {
    local name=$1 kind=$2 port=$3 threads=$4 up=$5 bin=${6:-$BIN}
    {
        printf '[[listener]]\nname = "bench"\nbind = "127.0.0.1:%s"\nupstream = "origin"\n' "$port"
        printf '[[upstream]]\nname = "origin"\n%s\n' "$up"
        [ "$threads" = default ] || printf '[process]\nthreads = %s\n' "$threads"
    } > "$WORK/$name.toml"
    "$bin" run --config "$WORK/$name.toml" 2>"$WORK/$name.log" & PIDS+=($!)
    PORT[$name]=$port; PID[$name]=$!; KIND[$name]=$kind
}
# haproxy NAME KIND PORT NBTHREAD SERVER-LINE
haproxy_() {
    local name=$1 kind=$2 port=$3 threads=$4 server=$5
    cat > "$WORK/$name.cfg" <<CONF
global
  nbthread $threads
  maxconn 8000
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
frontend fe
  bind 127.0.0.1:$port
  default_backend be
backend be
  http-reuse always
  $server
CONF
    haproxy -f "$WORK/$name.cfg" -db >"$WORK/$name.log" 2>&1 & PIDS+=($!)
    PORT[$name]=$port; PID[$name]=$!; KIND[$name]=$kind
}
# nginx_ NAME KIND PORT WORKERS UPSTREAM-BLOCK LOCATION-LINES
nginx_() {
    local name=$1 kind=$2 port=$3 workers=$4 upstream=$5 location=$6
    mkdir -p "$WORK/$name"
    cat > "$WORK/$name.conf" <<CONF
daemon off; worker_processes $workers; pid $WORK/$name.pid; error_log $WORK/$name.err;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $WORK/$name; proxy_temp_path $WORK/$name;
  fastcgi_temp_path $WORK/$name; uwsgi_temp_path $WORK/$name; scgi_temp_path $WORK/$name;
  $upstream
  server {
    listen 127.0.0.1:$port;
    location / { $location proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF
    nginx -c "$WORK/$name.conf" -e "$WORK/$name.err" & PIDS+=($!)
    PORT[$name]=$port; PID[$name]=$!; KIND[$name]=$kind
}

# nginx keeps up to 32 idle origin connections per worker, more than the
# 16 concurrent clients: with fewer (8, the others' cap) it closed and
# reopened an origin connection for most requests, its worst case, not its
# best. nginx has no cap on open upstream connections either way.
NAMES=()
for kind in $KINDS; do
    case $kind in
    h1)
        up='endpoints = ["127.0.0.1:19100"]
max_connections = 8'
        loopmux loopmux h1 19200 default "$up"
        loopmux loopmux2 h1 19206 2 "$up"
        NAMES+=(loopmux loopmux2)
        if [ -n "${BASELINE:-}" ]; then
            loopmux baseline h1 19203 default "$up" "$BASELINE"
            NAMES+=(baseline)
        fi
        haproxy_ haproxy1 h1 19204 1 "server origin 127.0.0.1:19100 maxconn 8"
        haproxy_ haproxy2 h1 19201 2 "server origin 127.0.0.1:19100 maxconn 8"
        ups='upstream origin { server 127.0.0.1:19100; keepalive 32; keepalive_requests 10000000; }'
        nginx_ nginx1 h1 19205 1 "$ups" "proxy_pass http://origin;"
        nginx_ nginx2 h1 19202 2 "$ups" "proxy_pass http://origin;"
        NAMES+=(haproxy1 haproxy2 nginx1 nginx2)
        ;;
    h2)
        # Two connections carry every stream; HAProxy opens what it needs.
        up='endpoints = ["127.0.0.1:19110"]
protocol = "http2"
max_connections = 2'
        loopmux loopmux-h2 h2 19210 default "$up"
        loopmux loopmux2-h2 h2 19213 2 "$up"
        haproxy_ haproxy1-h2 h2 19211 1 "server origin 127.0.0.1:19110 proto h2"
        haproxy_ haproxy2-h2 h2 19212 2 "server origin 127.0.0.1:19110 proto h2"
        NAMES+=(loopmux-h2 loopmux2-h2 haproxy1-h2 haproxy2-h2)
        ;;
    tls)
        up="endpoints = [\"127.0.0.1:19120\"]
max_connections = 8
tls = { server_name = \"localhost\", ca_file = \"$WORK/ca.pem\" }"
        loopmux loopmux-tls tls 19220 default "$up"
        loopmux loopmux2-tls tls 19225 2 "$up"
        srv="server origin 127.0.0.1:19120 maxconn 8 ssl verify required ca-file $WORK/ca.pem sni str(localhost) verifyhost localhost"
        haproxy_ haproxy1-tls tls 19221 1 "$srv"
        haproxy_ haproxy2-tls tls 19222 2 "$srv"
        ups='upstream origin_tls { server 127.0.0.1:19120; keepalive 32; keepalive_requests 10000000; }'
        loc="proxy_pass https://origin_tls; proxy_ssl_verify on; proxy_ssl_trusted_certificate $WORK/ca.pem; proxy_ssl_name localhost; proxy_ssl_server_name on; proxy_ssl_session_reuse on; proxy_ssl_protocols TLSv1.3;"
        nginx_ nginx1-tls tls 19223 1 "$ups" "$loc"
        nginx_ nginx2-tls tls 19224 2 "$ups" "$loc"
        NAMES+=(loopmux-tls loopmux2-tls haproxy1-tls haproxy2-tls nginx1-tls nginx2-tls)
        ;;
    *) echo "unknown kind $kind (h1 h2 tls)" >&2; exit 64 ;;
    esac
done
sleep 1

accepts() { curl -s "http://$STATUS/" | awk 'NR==3 {print $1}'; }
# CPU ticks of a process and its children (nginx workers), by pid.
ticks() {
    local total=0 p
    for p in "$1" $(cat /proc/"$1"/task/*/children 2>/dev/null); do
        [ -r /proc/"$p"/stat ] || continue
        total=$((total + $(awk '{print $14 + $15}' /proc/"$p"/stat)))
    done
    echo "$total"
}
HZ=$(getconf CLK_TCK)

RESULTS="$WORK/results"
: > "$RESULTS"
for name in "${NAMES[@]}"; do   # warm-up, not counted; also proves each one answers
    out=$(wrk -t2 -c$CONC -d2s -H 'Connection: close' "http://127.0.0.1:${PORT[$name]}/")
    if grep -q 'Non-2xx' <<<"$out" || ! grep -q 'Requests/sec' <<<"$out"; then
        echo "$name does not answer 200:" >&2; echo "$out" >&2
        tail -5 "$WORK/$name.log" "$WORK/$name.err" 2>/dev/null >&2 || true
        exit 1
    fi
done
for round in $(seq 1 "$ROUNDS"); do
    for name in "${NAMES[@]}"; do
        a0=$(accepts); t0=$(ticks "${PID[$name]}")
        out=$(wrk -t2 -c$CONC -d"${SECS}s" --latency -H 'Connection: close' "http://127.0.0.1:${PORT[$name]}/")
        t1=$(ticks "${PID[$name]}"); a1=$(accepts)
        rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$out")
        total=$(awk '/requests in/ {print $1}' <<<"$out")
        p99=$(awk '$1=="99%" {print $2}' <<<"$out")
        errs=$(awk '/Non-2xx|Socket errors/ {printf "%s ", $0}' <<<"$out")
        # The stub_status request itself is one accepted connection.
        conns=$((a1 - a0 - 1))
        cpu=$(awk -v d=$((t1 - t0)) -v hz="$HZ" -v n="$total" 'BEGIN {printf "%.1f", d * 1000 / hz / n * 1000}')
        echo "${KIND[$name]} $name $round $rps $p99 $cpu $conns ${errs:-}" >> "$RESULTS"
    done
done

# wrk prints p99 with its unit (us, ms, s): milliseconds for comparing.
ms() { awk -v v="$1" 'BEGIN { if (v ~ /us$/) printf "%.2f", v / 1000; else if (v ~ /ms$/) printf "%.2f", v + 0; else if (v ~ /s$/) printf "%.2f", v * 1000; else print v }'; }

printf '\n%-5s | %-12s | %5s | %10s | %9s | %13s | %12s | %s\n' kind proxy round "req/s" p99 "CPU ms/1k req" "origin conns" errors
printf -- '------|--------------|-------|------------|-----------|---------------|--------------|-------\n'
while read -r kind name round rps p99 cpu conns errs; do
    printf '%-5s | %-12s | %5s | %10s | %9s | %13s | %12s | %s\n' "$kind" "$name" "$round" "$rps" "$p99" "$cpu" "$conns" "${errs:-}"
done < "$RESULTS"

# Medians over rounds per proxy: req/s, p99 (ms), CPU; the most origin
# connections any round saw.
MED="$WORK/medians"
: > "$MED"
for name in "${NAMES[@]}"; do
    kind=${KIND[$name]}
    rps=$(awk -v n="$name" '$2==n {print $4}' "$RESULTS" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}')
    p99=$(awk -v n="$name" '$2==n {print $5}' "$RESULTS" | while read -r v; do ms "$v"; echo; done | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}')
    cpu=$(awk -v n="$name" '$2==n {print $6}' "$RESULTS" | sort -g | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}')
    conns=$(awk -v n="$name" '$2==n {print $7}' "$RESULTS" | sort -g | tail -1)
    echo "$kind $name $rps $p99 $cpu $conns" >> "$MED"
done
echo
echo "medians over $ROUNDS rounds of ${SECS} s:"
printf '| kind | proxy | req/s | p99 ms | CPU ms per 1k req | origin conns (most in a round) |\n|---|---|---|---|---|---|\n'
while read -r kind name rps p99 cpu conns; do
    printf '| %s | %s | %s | %s | %s | %s |\n' "$kind" "$name" "$rps" "$p99" "$cpu" "$conns"
done < "$MED"

# loopmux's default against each peer's best setting (least CPU per
# request) of the same kind.
echo
echo "loopmux default vs each peer's best setting in this run (ratio = loopmux / peer):"
printf '| kind | peer (best) | req/s ratio | p99 ratio | CPU/request ratio |\n|---|---|---|---|---|\n'
for kind in $KINDS; do
    own=$([ "$kind" = h1 ] && echo loopmux || echo "loopmux-$kind")
    read -r _ _ lr lp lc _ < <(awk -v n="$own" '$2==n' "$MED")
    for peer in haproxy nginx; do
        best=$(awk -v k="$kind" -v p="$peer" '$1==k && index($2, p)==1' "$MED" | sort -k5,5g | head -1)
        [ -n "$best" ] || continue
        read -r _ bn br bp bc _ <<<"$best"
        awk -v k="$kind" -v n="$bn" -v lr="$lr" -v br="$br" -v lp="$lp" -v bp="$bp" -v lc="$lc" -v bc="$bc" \
            'BEGIN {printf "| %s | %s | %.2f | %.2f | %.2f |\n", k, n, lr / br, lp / bp, lc / bc}'
    done
done
