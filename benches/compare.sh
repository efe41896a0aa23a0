#!/usr/bin/env bash
# Comparative load benchmark, run by hand (not by CI):
#   loopmux vs HAProxy (http-reuse always, maxconn 8; nbthread 2 as
#   "haproxy", 1 as "haproxy1") vs nginx (keepalive 8; 2 workers as "nginx",
#   1 as "nginx1"), and loopmux at its default (one runtime thread per core) and
#   at one thread ("loopmux1")
# in front of the same local nginx origin, each driven by the same load:
# a new client connection per request (wrk -H 'Connection: close'),
# 16 concurrent, interleaved over several rounds. Loopback only.
#
#   benches/compare.sh [rounds] [seconds]      (needs: nginx haproxy wrk)
#   BASELINE=/path/to/older/loopmux benches/compare.sh ...
#       adds that binary as "baseline", same config, interleaved: before/after
#       figures for a change from one run.
#
# Prints: requests/s, p99, proxy CPU ms per 1,000 requests (utime+stime from
# /proc), and the connections the origin accepted during the run.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-3}
SECS=${2:-10}
CONC=16
for t in nginx haproxy wrk; do
    command -v "$t" >/dev/null || { echo "missing $t: apt-get install nginx-light haproxy wrk" >&2; exit 1; }
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

ORIGIN=127.0.0.1:19100
STATUS=127.0.0.1:19101
NGINX_MODULES=/usr/share/nginx/modules-available
mkdir -p "$WORK"/{origin,nginx}

cat > "$WORK/origin.conf" <<CONF
daemon off; worker_processes 1; pid $WORK/origin.pid; error_log $WORK/origin.err;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/origin; proxy_temp_path $WORK/origin;
  fastcgi_temp_path $WORK/origin; uwsgi_temp_path $WORK/origin; scgi_temp_path $WORK/origin;
  keepalive_requests 10000000; keepalive_timeout 300s;
  server { listen $ORIGIN; location / { return 200 "ok\n"; } }
  server { listen $STATUS; location / { stub_status; } }
}
CONF
cat > "$WORK/loopmux.toml" <<CONF
[[listener]]
name = "bench"
bind = "127.0.0.1:19200"
upstream = "origin"
[[upstream]]
name = "origin"
endpoints = ["$ORIGIN"]
max_connections = 8
CONF
cat > "$WORK/haproxy.cfg" <<CONF
global
  nbthread 2
  maxconn 8000
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
frontend fe
  bind 127.0.0.1:19201
  default_backend be
backend be
  http-reuse always
  server origin $ORIGIN maxconn 8
CONF
cat > "$WORK/nginx.conf" <<CONF
daemon off; worker_processes 2; pid $WORK/nginx.pid; error_log $WORK/nginx.err;
events { worker_connections 8192; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx; proxy_temp_path $WORK/nginx;
  fastcgi_temp_path $WORK/nginx; uwsgi_temp_path $WORK/nginx; scgi_temp_path $WORK/nginx;
  upstream origin { server $ORIGIN; keepalive 8; keepalive_requests 10000000; }
  server {
    listen 127.0.0.1:19202;
    location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection ""; }
  }
}
CONF

# Each peer at each reasonable thread setting for this machine, so the
# comparison can be read against the peer's best one: HAProxy nbthread 1
# and 2, nginx 1 and 2 workers.
sed -e 's/nbthread 2/nbthread 1/' -e 's/127.0.0.1:19201/127.0.0.1:19204/' "$WORK/haproxy.cfg" > "$WORK/haproxy1.cfg"
sed -e 's/worker_processes 2/worker_processes 1/' -e 's/127.0.0.1:19202/127.0.0.1:19205/' \
    -e "s|$WORK/nginx.pid|$WORK/nginx1.pid|" "$WORK/nginx.conf" > "$WORK/nginx1.conf"

nginx -c "$WORK/origin.conf" -e "$WORK/origin.err" & PIDS+=($!)
"$BIN" run --config "$WORK/loopmux.toml" 2>"$WORK/loopmux.log" & PIDS+=($!); LMX=$!
# loopmux at each thread count too: its default (one per core) above, one
# runtime thread here (process.threads = 1).
{ cat "$WORK/loopmux.toml"; printf '[process]\nthreads = 1\n'; } |
    sed 's/127.0.0.1:19200/127.0.0.1:19206/' > "$WORK/loopmux1.toml"
"$BIN" run --config "$WORK/loopmux1.toml" 2>"$WORK/loopmux1.log" & PIDS+=($!); LMX1=$!
NAMES="loopmux loopmux1 haproxy haproxy1 nginx nginx1"
if [ -n "${BASELINE:-}" ]; then
    sed 's/127.0.0.1:19200/127.0.0.1:19203/' "$WORK/loopmux.toml" > "$WORK/baseline.toml"
    "$BASELINE" run --config "$WORK/baseline.toml" 2>"$WORK/baseline.log" & PIDS+=($!); BASE=$!
    NAMES="loopmux loopmux1 baseline haproxy haproxy1 nginx nginx1"
fi
haproxy -f "$WORK/haproxy.cfg" -db >"$WORK/haproxy.log" 2>&1 & PIDS+=($!); HAP=$!
nginx -c "$WORK/nginx.conf" -e "$WORK/nginx.err" & PIDS+=($!); NGX=$!
haproxy -f "$WORK/haproxy1.cfg" -db >"$WORK/haproxy1.log" 2>&1 & PIDS+=($!); HAP1=$!
nginx -c "$WORK/nginx1.conf" -e "$WORK/nginx1.err" & PIDS+=($!); NGX1=$!
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

declare -A PORT=([loopmux]=19200 [haproxy]=19201 [nginx]=19202 [baseline]=19203 [haproxy1]=19204 [nginx1]=19205 [loopmux1]=19206)
declare -A PID=([loopmux]=$LMX [haproxy]=$HAP [nginx]=$NGX [baseline]=${BASE:-0} [haproxy1]=$HAP1 [nginx1]=$NGX1 [loopmux1]=$LMX1)
RESULTS="$WORK/results"
: > "$RESULTS"
for name in $NAMES; do   # warm-up, not counted
    wrk -t2 -c$CONC -d2s -H 'Connection: close' "http://127.0.0.1:${PORT[$name]}/" >/dev/null
done
for round in $(seq 1 "$ROUNDS"); do
    for name in $NAMES; do
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
        echo "$name $round $rps $p99 $cpu $conns ${errs:-}" >> "$RESULTS"
    done
done

printf '\n%-8s | %5s | %10s | %9s | %16s | %15s | %s\n' proxy round "req/s" p99 "CPU ms/1k req" "origin conns" errors
printf -- '---------|-------|------------|-----------|------------------|-----------------|-------\n'
while read -r name round rps p99 cpu conns errs; do
    printf '%-8s | %5s | %10s | %9s | %16s | %15s | %s\n' "$name" "$round" "$rps" "$p99" "$cpu" "$conns" "${errs:-}"
done < "$RESULTS"
echo
echo "median over rounds:"
for name in $NAMES; do
    awk -v n="$name" '$1==n {print $3, $5}' "$RESULTS" | sort -n | awk -v n="$name" '{r[NR]=$1; c[NR]=$2} END {m=int((NR+1)/2); printf "  %-8s %10s req/s  %s CPU ms/1k req\n", n, r[m], c[m]}'
done
