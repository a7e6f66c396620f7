#!/usr/bin/env bash
# Runs the same load scenarios against tether, Mosquitto and (when installed) rumqttd, back to
# back, and prints the ratios (tether / Mosquitto, tether / rumqttd). The brokers are started by
# hand on loopback ports, a fresh process for every run, and stopped by pid afterwards; nothing
# is installed or left running.
#
#   benches/compare.sh                 # everything, median of 3 runs (~10 minutes)
#   REPEAT=1 benches/compare.sh        # one run each (~4 minutes)
#   ONLY="fan-in latency" benches/compare.sh
#   CLIENTS=100000 ONLY=connections benches/compare.sh   # the scale test (README, "Scale test")
#
# Environment: REPEAT (3), DURATION (seconds of publishing per throughput run, 2),
# CLIENTS (idle connections, 10000), SESSIONS (1000), PER_SESSION (10), ONLY (groups among
# fan-in pairs fan-out slow-consumer latency cpu connections sessions tls-fan-in tls-connections
# acl), IDLE (seconds the connections group idles, 5), OUT (raw RESULT lines,
# $CARGO_TARGET_DIR/compare/results.txt), TETHER (binary, $CARGO_TARGET_DIR/release/tether;
# CARGO_TARGET_DIR defaults to target), TETHER_PERSISTENCE (false, as benches/mosquitto.conf;
# tether always gets a fresh, empty data directory per run), RUMQTTD (binary,
# ~/.cargo/bin/rumqttd; `cargo install rumqttd@0.20.0`; its column is left out when absent).
# Needs /usr/sbin/mosquitto (Mosquitto 2.0).
set -euo pipefail
cd "$(dirname "$0")/.."

REPEAT=${REPEAT:-3}
DURATION=${DURATION:-2}
CLIENTS=${CLIENTS:-10000}
SESSIONS=${SESSIONS:-1000}
PER_SESSION=${PER_SESSION:-10}
ONLY=${ONLY:-"fan-in pairs fan-out slow-consumer latency cpu connections sessions tls-fan-in tls-connections acl"}
IDLE=${IDLE:-5}
TARGET=${CARGO_TARGET_DIR:-target}
OUT=${OUT:-$TARGET/compare/results.txt}
MOSQUITTO=${MOSQUITTO:-/usr/sbin/mosquitto}
RUMQTTD=${RUMQTTD:-$HOME/.cargo/bin/rumqttd}
# The tether binary to measure (another build can be compared with the same load generator).
BUILD_TETHER=${TETHER:+no}
TETHER=${TETHER:-$TARGET/release/tether}
# Mosquitto runs with `persistence false`; tether matches it unless told otherwise. Either way
# it gets an empty data directory for every run: a store left by an earlier run would be
# restored (thousands of persistent sessions from the connections group) and skew the next.
TETHER_PERSISTENCE=${TETHER_PERSISTENCE:-false}
TETHER_ADDR=127.0.0.1:18884
MOSQ_ADDR=127.0.0.1:18883 # must match benches/mosquitto.conf
RUMQTTD_ADDR=127.0.0.1:18885  # 3.1.1; must match benches/rumqttd.toml
RUMQTTD_ADDR5=127.0.0.1:18886 # 5.0

# 10,000 connections need more descriptors than the usual 1024, in the brokers and here.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt $((CLIENTS + 100)) ]; then
  echo "compare: ulimit -n is $(ulimit -n) (hard limit $(ulimit -Hn)), below $CLIENTS connections: raise the hard limit (as root: ulimit -Hn $((CLIENTS + 1000)) before running this; see README, \"Scale test\")" >&2
  exit 1
fi

echo "== building (release)" >&2
[ "$BUILD_TETHER" = no ] || cargo build --release --quiet
# "Executable benches/load.rs (TARGET/release/deps/load-HASH)", TARGET relative or absolute.
LOAD=$(cargo bench --bench load --no-run 2>&1 | sed -n 's/.*(\(.*release\/deps\/load-[0-9a-f]*\)).*/\1/p' | tail -1)
[ -x "$LOAD" ] || { echo "compare: load generator not found" >&2; exit 1; }
mkdir -p "$(dirname "$OUT")"
: >"$OUT"
LOGDIR=$(dirname "$OUT")

# TLS groups: one ECDSA P-256 certificate for both brokers (made here with openssl), tether
# with a [listener] tls table, Mosquitto with the same listener plus certfile/keyfile, and the
# load generator trusting the CA. The acl group compares tether with an ACL of 1,000 rules
# against tether without one.
TETHER_ARGS=()
MOSQ_CONF=benches/mosquitto.conf
LOAD_EXTRA=()
ALL_BROKERS="tether mosquitto"
if [ -x "$RUMQTTD" ]; then
  ALL_BROKERS="tether mosquitto rumqttd"
else
  echo "compare: no rumqttd at $RUMQTTD (cargo install rumqttd@0.20.0): its column is left out" >&2
fi
BROKERS=$ALL_BROKERS
TLS=$LOGDIR/tls
make_tls() {
  [ -f "$TLS/server.pem" ] && return 0
  mkdir -p "$TLS"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj "/CN=compare CA" -keyout "$TLS/ca.key" -out "$TLS/ca.pem" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj "/CN=localhost" \
    -keyout "$TLS/server.key" -out "$TLS/server.csr" 2>/dev/null
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >"$TLS/ext"
  openssl x509 -req -in "$TLS/server.csr" -CA "$TLS/ca.pem" -CAkey "$TLS/ca.key" \
    -CAcreateserial -days 2 -extfile "$TLS/ext" -out "$TLS/server.pem" 2>/dev/null
  # Mosquitto started as root drops to its own user, which must be able to read the key
  # (a throw-away key for loopback benchmarks).
  chmod 644 "$TLS/server.key"
  printf '[listener]\ntls = { cert = "%s", key = "%s" }\n' "$TLS/server.pem" "$TLS/server.key" >"$TLS/tether.toml"
  { cat benches/mosquitto.conf
    printf 'certfile %s\nkeyfile %s\n' "$TLS/server.pem" "$TLS/server.key"; } >"$TLS/mosquitto.conf"
}
make_acl() { # 1,000 rules, all of which apply to the load clients (anonymous), the one
  # that grants their topics last: every check walks the whole list (the worst case for a
  # linear scan; per-user sections would leave a client only its own few rules)
  local f=$LOGDIR/acl
  {
    echo "topic deny load/forbidden/#"
    for i in $(seq 998); do printf 'topic readwrite fleet/%d/#\n' "$i"; done
    echo "topic readwrite load/#"
  } >"$f"
  printf '[auth]\nacl_file = "%s"\n' "$f" >"$LOGDIR/tether-acl.toml"
}

BROKER_PID=
start_broker() { # tether | tetheracl | mosquitto | rumqttd
  if [ "$1" = tether ] || [ "$1" = tetheracl ]; then
    local args=("${TETHER_ARGS[@]}")
    [ "$1" = tetheracl ] && args=(-c "$LOGDIR/tether-acl.toml")
    rm -rf "$LOGDIR/tether-data"
    # Log level warn: Mosquitto is configured to log only warnings and errors too. The
    # connection limit (listener.max_connections, 10,000 by default) above the client count:
    # the connections group's publishers connect after the idle clients.
    TETHER_LOG__LEVEL=warn TETHER_PERSISTENCE__ENABLED=$TETHER_PERSISTENCE \
      TETHER_LISTENER__MAX_CONNECTIONS=$((CLIENTS + 1000)) \
      "$TETHER" "${args[@]}" -d "$LOGDIR/tether-data" -b "$TETHER_ADDR" >>"$LOGDIR/tether.log" 2>&1 &
    BROKER_PID=$!
    PORT=${TETHER_ADDR##*:}
  elif [ "$1" = rumqttd ]; then
    "$RUMQTTD" -q -c benches/rumqttd.toml >>"$LOGDIR/rumqttd.log" 2>&1 &
    BROKER_PID=$!
    PORT=${RUMQTTD_ADDR##*:}
  else
    "$MOSQUITTO" -c "$MOSQ_CONF" >>"$LOGDIR/mosquitto.log" 2>&1 &
    BROKER_PID=$!
    PORT=${MOSQ_ADDR##*:}
  fi
  for _ in $(seq 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "compare: $1 did not start" >&2
  stop_broker
  exit 1
}

stop_broker() {
  if [ -n "$BROKER_PID" ]; then
    kill -TERM "$BROKER_PID" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$BROKER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$BROKER_PID" 2>/dev/null || true
    wait "$BROKER_PID" 2>/dev/null || true
    BROKER_PID=
  fi
}
trap stop_broker EXIT

# value KEY LINE: the value of KEY=... in a RESULT line.
value() { sed -n "s/.* $1=\([^ ]*\).*/\1/p" <<<"$2"; }

# run NAME KEY ARGS...: REPEAT runs per broker (fresh broker each); keeps the run with the
# median KEY as RES_tether / RES_mosquitto.
run() {
  local name=$1 key=$2
  shift 2
  for b in $BROKERS; do
    local addr=$TETHER_ADDR extra=()
    [ $b = mosquitto ] && addr=$MOSQ_ADDR
    if [ $b = rumqttd ]; then
      # One listener per protocol version; rumqttd refuses Keep Alive 0 (idle clients never
      # ping, so an hour).
      addr=$RUMQTTD_ADDR
      [[ " $* " == *" --proto 5 "* ]] && addr=$RUMQTTD_ADDR5
      extra=(--keep-alive 3600)
    fi
    local lines=()
    for _ in $(seq "$REPEAT"); do
      start_broker $b
      local line
      line=$("$LOAD" --bench "$@" "${LOAD_EXTRA[@]}" "${extra[@]}" --addr "$addr" --pid "$BROKER_PID" --label "$b" 2>>"$LOGDIR/load-stderr.log" | grep '^RESULT' || true)
      stop_broker
      [ -n "$line" ] || line="RESULT label=$b failed=1"
      echo "$name $line" >>"$OUT"
      lines+=("$line")
    done
    local med
    med=$(for l in "${lines[@]}"; do echo "$(value "$key" "$l" | sed 's/^$/0/') $l"; done | sort -g | sed -n "$(((${#lines[@]} + 1) / 2))p" | cut -d' ' -f2-)
    printf -v "RES_$b" '%s' "$med"
  done
}

ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b + 0 > 0 && a != "") printf "%.2f", a / b; else printf "-" }'; }
# Lower is better (latency, time): Mosquitto / tether.
inv_ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 > 0 && b != "") printf "%.2f", b / a; else printf "-" }'; }
acc() { echo "$(value lost "$1")/$(value dup "$1")/$(value reordered "$1")"; }
has_rumqttd() { [[ " $BROKERS " == *" rumqttd "* ]]; }
# A figure, or n/a when the run failed or does not report it (rumqttd cannot do everything).
fig() { local v; v=$(value "$1" "$2"); echo "${v:-n/a}"; }

echo "== $(date -u +%FT%TZ) $(nproc) cores, load average: $(cut -d' ' -f1-3 /proc/loadavg), repeat $REPEAT" | tee -a "$OUT"
header() {
  if has_rumqttd; then
    printf '%-28s %12s %12s %7s %12s %7s %6s  %-14s %-14s %-14s\n' scenario tether mosquitto t/m \
      rumqttd t/r goal "t lost/dup/ord" "m lost/dup/ord" "r lost/dup/ord"
  else
    printf '%-28s %12s %12s %7s %6s  %-16s %-16s\n' scenario tether mosquitto ratio goal "t lost/dup/ord" "m lost/dup/ord"
  fi
}
header

# row LABEL KEY GOAL hi|lo [ACC]: one table line from RES_tether, RES_mosquitto (and
# RES_rumqttd). hi: more is better, ratio tether / other; lo: less is better, other / tether.
# ACC: the last columns (default lost/dup/reordered of each run; "-" for none).
row() {
  local label=$1 key=$2 goal=$3 kind=$4 accs=${5:-acc}
  local t m r f=ratio
  t=$(fig "$key" "$RES_tether")
  m=$(fig "$key" "$RES_mosquitto")
  [ "$kind" = lo ] && f=inv_ratio
  local at="" am="" ar=""
  if [ "$accs" = acc ]; then at=$(acc "$RES_tether") am=$(acc "$RES_mosquitto"); fi
  if [ "$accs" = conn ]; then
    at="$(value connected "$RES_tether") conn" am="$(value connected "$RES_mosquitto") conn"
  fi
  if has_rumqttd; then
    r=$(fig "$key" "$RES_rumqttd")
    if [ "$accs" = acc ]; then ar=$(acc "$RES_rumqttd"); fi
    if [ "$accs" = conn ]; then ar="$(fig connected "$RES_rumqttd") conn"; fi
    printf '%-28s %12s %12s %7s %12s %7s %6s  %-14s %-14s %-14s\n' "$label" "$t" "$m" \
      "$($f "${t/n\/a/}" "${m/n\/a/}")" "$r" "$($f "${t/n\/a/}" "${r/n\/a/}")" "$goal" "$at" "$am" "$ar"
  else
    printf '%-28s %12s %12s %7s %6s  %-16s %-16s\n' "$label" "$t" "$m" \
      "$($f "${t/n\/a/}" "${m/n\/a/}")" "$goal" "$at" "$am"
  fi
}

throughput() { # group scenario-args goal
  local group=$1 args=$2 goal=$3
  for proto in 3 5; do
    for qos in 0 1 2; do
      # shellcheck disable=SC2086
      run "$group" msgs_per_s $args --proto $proto --qos $qos --duration "$DURATION"
      row "$group v$proto q$qos msg/s" msgs_per_s ">=$goal" hi
    done
  done
}

for group in $ONLY; do
  case $group in
  fan-in) throughput fan-in "fan-in --publishers 8" 3 ;;
  pairs) throughput pairs "pairs --publishers 16" 3 ;;
  fan-out) throughput fan-out "fan-out --subscribers 50" 8 ;;
  # Fan-in to one healthy subscriber with one stuck subscriber (never reads its socket) on
  # the same filter: the healthy one's delivered rate and loss.
  slow-consumer) throughput slow-consumer "fan-in --publishers 8 --stuck 1" 3 ;;
  latency)
    for proto in 3 5; do
      for qos in 0 1; do
        run latency p99_us latency --rate 5000 --duration 4 --proto $proto --qos $qos
        for q in p50_us p99_us p999_us; do
          row "latency v$proto q$qos $q" $q "$([ $q = p99_us ] && echo '>=1' || echo '')" lo
        done
      done
    done
    ;;
  cpu)
    run cpu msgs_per_cpu_s fan-in --publishers 8 --qos 1 --rate 20000 --duration 5
    row "cpu fan-in q1 20k msg/cpu-s" msgs_per_cpu_s ">=1" hi
    ;;
  connections)
    # CLIENTS idle connections (persistent session, one subscription each), spread over
    # loopback source addresses past 20,000; then IDLE seconds of nothing; then one QoS 1
    # message to each client's topic.
    run connections rss_per_conn_b connections --clients "$CLIENTS" --qos 1 --idle "$IDLE"
    row "connections RSS B/conn" rss_per_conn_b "<=1536" lo conn
    row "connections accept s" secs ">=1" lo -
    row "connections setup p99 ms" setup_p99_ms "" lo -
    row "connections cpu us/conn" cpu_us_per_conn ">=1" lo -
    row "connections idle cpu %" idle_cpu_pct "" lo -
    row "connections deliver-all s" deliver_s "" lo -
    ;;
  sessions)
    run sessions secs sessions --clients "$SESSIONS" --count "$PER_SESSION" --qos 1
    row "sessions drain s" secs ">=1" lo
    ;;
  tls-fan-in | tls-connections)
    make_tls
    # rumqttd: not compared over TLS (its listener would need its own TLS table).
    BROKERS="tether mosquitto"
    TETHER_ARGS=(-c "$TLS/tether.toml") MOSQ_CONF=$TLS/mosquitto.conf LOAD_EXTRA=(--tls-ca "$TLS/ca.pem")
    if [ $group = tls-fan-in ]; then
      for proto in 3 5; do
        run tls-fan-in msgs_per_s fan-in --publishers 8 --proto $proto --qos 1 --duration "$DURATION"
        printf '%-26s %12s %12s %7s %6s  %-16s %-16s\n' "tls-fan-in v$proto q1 msg/s" \
          "$(value msgs_per_s "$RES_tether")" "$(value msgs_per_s "$RES_mosquitto")" \
          "$(ratio "$(value msgs_per_s "$RES_tether")" "$(value msgs_per_s "$RES_mosquitto")")" \
          ">=3" "$(acc "$RES_tether")" "$(acc "$RES_mosquitto")"
      done
    else
      # Connection rate: TLS handshake, CONNECT, SUBSCRIBE for each of TLS_CLIENTS clients.
      run tls-connections secs connections --clients "${TLS_CLIENTS:-2000}" --qos 1
      for b in tether mosquitto; do
        r=RES_$b
        printf -v "RATE_$b" '%s' "$(awk -v n="$(value connected "${!r}")" -v s="$(value secs "${!r}")" 'BEGIN { if (s > 0) printf "%.0f", n / s }')"
      done
      printf '%-26s %12s %12s %7s %6s\n' "tls-connections conn/s" "$RATE_tether" "$RATE_mosquitto" \
        "$(ratio "$RATE_tether" "$RATE_mosquitto")" ">=1"
      # Broker CPU per connection (handshake, CONNECT, SUBSCRIBE): less sensitive than the rate
      # to whatever else the two shared cores are doing.
      for b in tether mosquitto; do
        r=RES_$b
        printf -v "CPU_$b" '%s' "$(awk -v n="$(value connected "${!r}")" -v c="$(value broker_cpu_s "${!r}")" 'BEGIN { if (n > 0) printf "%.0f", c * 1e6 / n }')"
      done
      printf '%-26s %12s %12s %7s %6s\n' "tls-connections cpu us/conn" "$CPU_tether" "$CPU_mosquitto" \
        "$(inv_ratio "$CPU_tether" "$CPU_mosquitto")" ">=1"
    fi
    TETHER_ARGS=() MOSQ_CONF=benches/mosquitto.conf LOAD_EXTRA=() BROKERS=$ALL_BROKERS
    ;;
  acl)
    make_acl
    BROKERS="tetheracl tether"
    for proto in 3 5; do
      run acl msgs_per_s fan-in --publishers 8 --proto $proto --qos 1 --duration "$DURATION"
      printf '%-26s %12s %12s %7s %6s  %-16s %-16s\n' "acl-1000 v$proto q1 msg/s" \
        "$(value msgs_per_s "$RES_tetheracl")" "$(value msgs_per_s "$RES_tether")" \
        "$(ratio "$(value msgs_per_s "$RES_tetheracl")" "$(value msgs_per_s "$RES_tether")")" \
        ">=0.9" "$(acc "$RES_tetheracl")" "$(acc "$RES_tether")"
    done
    # Broker CPU per message at a fixed rate: steadier than saturated throughput on two
    # shared cores, where a 10% difference is within run-to-run noise.
    run acl msgs_per_cpu_s fan-in --publishers 8 --qos 1 --rate 100000 --duration 4
    printf '%-26s %12s %12s %7s %6s  %-16s %-16s\n' "acl-1000 q1 msg/cpu-s @100k" \
      "$(value msgs_per_cpu_s "$RES_tetheracl")" "$(value msgs_per_cpu_s "$RES_tether")" \
      "$(ratio "$(value msgs_per_cpu_s "$RES_tetheracl")" "$(value msgs_per_cpu_s "$RES_tether")")" \
      ">=0.9" "$(acc "$RES_tetheracl")" "$(acc "$RES_tether")"
    BROKERS=$ALL_BROKERS
    ;;
  *) echo "compare: unknown group $group" >&2 ;;
  esac
done
echo "(acl rows: tether with a 1,000-rule ACL / tether without one)"
echo "(ratios t/m, t/r: tether / Mosquitto and tether / rumqttd for msg/s and CPU efficiency; the other broker's / tether's for latency, times, RSS and CPU per connection, so >= 1 means tether is at least as good; n/a: the broker could not run it; raw lines in $OUT)"
