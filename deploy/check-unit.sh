#!/usr/bin/env bash
# Static checks of the deployment artifacts in deploy/. Exits non-zero on any problem; never
# passes because a tool was missing (it installs it or fails, except promtool: see 6).
#
#   deploy/check-unit.sh
#
#  1. systemd-analyze verify ingestd.service: syntax, unknown keys, bad values, missing
#     binaries. Any output at all counts as a failure (verify exits 0 on mere warnings such
#     as "Unknown key"). verify insists that ExecStart's binary exists; on a machine where
#     /usr/local/bin/ingestd is not installed (a dev box, CI) it verifies a temporary copy in
#     which only that path is replaced by a stub script, and says so.
#  2. systemd-analyze security --offline=true --threshold=20: the overall exposure must be
#     <= 2.0 (the threshold is on the 0-100 scale, displayed /10). Offline mode analyses the
#     file without a running systemd. The figure is also parsed and compared here.
#  3. The unit's contract with the daemon (DESIGN.md): Type=notify, NotifyAccess=main,
#     WatchdogSec=30, Restart=on-failure, RestartPreventExitStatus=78, KillSignal=SIGTERM,
#     TimeoutStopSec > [service] shutdown_timeout_s, StateDirectory == [storage] root of the
#     example config, ExecStart/ExecReload as documented, AF_UNIX allowed (NOTIFY_SOCKET), no
#     IP address filter.
#  4. deploy/ingestd.sysusers parses (systemd-sysusers --dry-run into an empty root).
#  5. check-monitoring.py: structure of the alert rules, their tests and the dashboard.
#  6. promtool check rules + promtool test rules on the alerts, and promtool check rules on
#     the dashboard's queries. promtool comes from $PROMTOOL, PATH, or Debian's prometheus
#     package (downloaded with apt-get download and unpacked into a cache, not installed).
#     If it cannot be had, that is reported loudly; REQUIRE_PROMTOOL=1 makes it fatal.
#  7. grafana-dashboard.json parses (python3 -m json.tool); check-runtime.sh and
#     sandbox-probe.py parse.
#
# The runtime behaviour (the sandbox with the real libraries, sd_notify, reload, restart
# policy, watchdog) is tested by deploy/check-runtime.sh, which needs root.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
UNIT=$HERE/ingestd.service
CONFIG=$REPO/config/feeds.toml
EXPOSURE_MAX=2.0

fail=0
ok()   { printf 'ok    %s\n' "$*"; }
bad()  { printf 'FAIL  %s\n' "$*"; fail=1; }
warn() { printf 'WARN  %s\n' "$*"; }
die()  { printf 'check-unit: %s\n' "$*" >&2; exit 2; }

TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

is_root() { [ "$(id -u)" = 0 ]; }
apt_install() { # apt_install PACKAGE...: only as root with apt-get; else return 1
    is_root && command -v apt-get >/dev/null || return 1
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1 && return 0
    apt-get update -q >/dev/null 2>&1 || true
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1
}

command -v python3 >/dev/null || apt_install python3 || die "python3 is required"
if ! command -v systemd-analyze >/dev/null; then
    echo "systemd-analyze not found: installing the systemd package"
    apt_install systemd || die "systemd-analyze is missing and could not be installed (need root and apt-get): install systemd"
fi
command -v systemd-analyze >/dev/null || die "systemd-analyze still missing"
echo "using $(systemd-analyze --version | head -1)"

# --- 1. verify -----------------------------------------------------------------------------
VERIFY_DIR=$TMP/verify
mkdir -p "$VERIFY_DIR"
if [ -x /usr/local/bin/ingestd ]; then
    cp "$UNIT" "$VERIFY_DIR/ingestd.service"
    note="as is (/usr/local/bin/ingestd exists)"
else
    # verify checks that every Exec*= binary exists and is executable. Point the commands at
    # a stub with the same arguments; the count of replaced lines is checked so nothing else
    # can change unnoticed.
    stub=$TMP/bin/ingestd
    mkdir -p "$TMP/bin"
    printf '#!/bin/sh\nexit 0\n' > "$stub"
    chmod +x "$stub"
    sed "s#^\(Exec[A-Za-z]*=[-@:+!]*\)/usr/local/bin/ingestd #\1$stub #" "$UNIT" > "$VERIFY_DIR/ingestd.service"
    changed=$(diff "$UNIT" "$VERIFY_DIR/ingestd.service" | grep -c '^>' || true)
    expected=$(grep -c '^Exec[A-Za-z]*=.*/usr/local/bin/ingestd ' "$UNIT" || true)
    [ "$changed" = "$expected" ] && [ "$changed" -ge 1 ] \
        || bad "verify: stub substitution changed $changed lines, expected $expected"
    note="on a copy whose $changed Exec line(s) run a stub instead of the absent /usr/local/bin/ingestd"
fi
verify_out=$(systemd-analyze verify "$VERIFY_DIR/ingestd.service" 2>&1) && verify_rc=0 || verify_rc=$?
if [ "$verify_rc" = 0 ] && [ -z "$verify_out" ]; then
    ok "systemd-analyze verify: clean ($note)"
else
    bad "systemd-analyze verify (rc=$verify_rc, $note):"
    printf '      %s\n' "$verify_out"
fi

# --- 2. security -----------------------------------------------------------------------------
sec_out=$(systemd-analyze security --offline=true --threshold=20 --no-pager "$UNIT" 2>&1) && sec_rc=0 || sec_rc=$?
exposure=$(printf '%s\n' "$sec_out" | sed -n 's/.*Overall exposure level for ingestd.service: \([0-9.]*\).*/\1/p' | tail -1)
if [ -z "$exposure" ]; then
    bad "systemd-analyze security: no exposure figure in its output (rc=$sec_rc):"
    printf '      %s\n' "$sec_out" | tail -20
elif [ "$sec_rc" != 0 ] || ! awk -v e="$exposure" -v m="$EXPOSURE_MAX" 'BEGIN { exit !(e + 0 <= m + 0) }'; then
    bad "systemd-analyze security: exposure $exposure > $EXPOSURE_MAX (rc=$sec_rc); the items that cost exposure:"
    printf '%s\n' "$sec_out" | grep '✗' | sed 's/^/      /'
else
    ok "systemd-analyze security --offline: exposure $exposure <= $EXPOSURE_MAX (threshold 20: rc=0)"
    printf '%s\n' "$sec_out" | grep '✗' | sed 's/  */ /g; s/^/        remaining: /'
fi

# --- 3. the unit's contract with the daemon ----------------------------------------------------
# Effective value of a [Service]/[Unit] key = its last assignment (empty resets lists).
val() { awk -F= -v k="$1" '$1 == k { v = substr($0, length(k) + 2) } END { print v }' "$UNIT"; }
expect() { # expect KEY VALUE
    local got; got=$(val "$1")
    if [ "$got" = "$2" ]; then ok "$1=$2"; else bad "$1 is '$got', expected '$2'"; fi
}
expect Type notify
expect NotifyAccess main
expect WatchdogSec 30
expect Restart on-failure
expect RestartPreventExitStatus 78
expect KillSignal SIGTERM
expect StateDirectory ingestd
expect ConfigurationDirectory ingestd
expect ExecStart "/usr/local/bin/ingestd --config /etc/ingestd/feeds.toml"
grep -qx 'ExecReload=/bin/kill -HUP \$MAINPID' "$UNIT" && ok 'ExecReload sends SIGHUP to $MAINPID' \
    || bad 'no ExecReload=/bin/kill -HUP $MAINPID'
grep -q '^ExecStartPre=' "$UNIT" && bad "ExecStartPre= fails outside RestartPreventExitStatus (restart loop on exit 78)"
case " $(val RestrictAddressFamilies) " in
    *" AF_UNIX "*) ok "RestrictAddressFamilies keeps AF_UNIX (NOTIFY_SOCKET)";;
    *) bad "RestrictAddressFamilies must include AF_UNIX for sd_notify";;
esac
grep -Eq '^IP(Address(Allow|Deny))=' "$UNIT" && bad "IPAddressDeny/Allow would cut the exchanges off"
python3 - "$UNIT" "$CONFIG" <<'EOF' || fail=1
import re, sys
unit, config = open(sys.argv[1]).read(), sys.argv[2]
try:
    import tomllib
    cfg = tomllib.load(open(config, "rb"))
except ImportError:  # python < 3.11: read the two keys by hand
    text = open(config).read()
    cfg = {"storage": {"root": re.search(r'^root\s*=\s*"([^"]*)"', text, re.M).group(1)},
           "service": {}}
    m = re.search(r'^shutdown_timeout_s\s*=\s*([0-9.]+)', text, re.M)
    if m:
        cfg["service"]["shutdown_timeout_s"] = float(m.group(1))
def last(key):
    vals = re.findall(rf"^{key}=(.*)$", unit, re.M)
    return vals[-1] if vals else None
def seconds(v):
    total = 0.0
    for n, u in re.findall(r"([0-9.]+)\s*(min|ms|s|m|h)?", v):
        total += float(n) * {"ms": 0.001, "s": 1, "": 1, "min": 60, "m": 60, "h": 3600}[u or ""]
    return total
rc = 0
root = cfg["storage"]["root"]
state = "/var/lib/" + (last("StateDirectory") or "")
if root == state:
    print(f"ok    example config storage.root = {root} = StateDirectory")
else:
    print(f"FAIL  example config storage.root {root!r} != StateDirectory path {state!r}"); rc = 1
drain = float(cfg.get("service", {}).get("shutdown_timeout_s", 10.0))
stop = seconds(last("TimeoutStopSec") or "90s")
if stop > drain:
    print(f"ok    TimeoutStopSec {stop:g}s > shutdown_timeout_s {drain:g}s")
else:
    print(f"FAIL  TimeoutStopSec {stop:g}s must exceed shutdown_timeout_s {drain:g}s"); rc = 1
sys.exit(rc)
EOF

# --- 4. sysusers ---------------------------------------------------------------------------------
if command -v systemd-sysusers >/dev/null; then
    mkdir -p "$TMP/sysroot/etc"
    if out=$(systemd-sysusers --root="$TMP/sysroot" --dry-run "$HERE/ingestd.sysusers" 2>&1) \
        && printf '%s\n' "$out" | grep -q "Creating user 'ingestd'"; then
        ok "ingestd.sysusers creates user and group ingestd"
    else
        bad "systemd-sysusers --dry-run ingestd.sysusers:"; printf '      %s\n' "$out"
    fi
else
    bad "systemd-sysusers missing (part of the systemd package)"
fi

# --- 5. monitoring structure -----------------------------------------------------------------
if ! python3 -c 'import yaml' 2>/dev/null; then
    apt_install python3-yaml || true
fi
python3 -c 'import yaml' 2>/dev/null || die "PyYAML missing for python3 (apt-get install python3-yaml / pip install pyyaml)"
# (pipefail: the pipeline fails if check-monitoring.py does)
if python3 "$HERE/check-monitoring.py" --emit-promql-rules "$TMP/dashboard-queries.yml" | sed 's/^/      /'; then
    ok "check-monitoring.py"
else
    bad "check-monitoring.py"
fi

# --- 6. promtool -------------------------------------------------------------------------------
find_promtool() {
    local cache=${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/ingestd-deploy
    for p in "${PROMTOOL:-}" "$(command -v promtool || true)" "$cache/promtool/usr/bin/promtool"; do
        [ -n "$p" ] && [ -x "$p" ] && { echo "$p"; return 0; }
    done
    command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || return 1
    mkdir -p "$cache/deb" && chmod 0755 "$cache" "$cache/deb"
    ( cd "$cache/deb" && { apt-get download -q prometheus >/dev/null 2>&1 \
        || { is_root && apt-get update -q >/dev/null 2>&1 && apt-get download -q prometheus >/dev/null 2>&1; }; } ) || return 1
    dpkg-deb -x "$(ls -t "$cache"/deb/prometheus_*.deb | head -1)" "$cache/promtool.tmp" || return 1
    mkdir -p "$cache/promtool/usr/bin"
    mv "$cache/promtool.tmp/usr/bin/promtool" "$cache/promtool/usr/bin/promtool"
    rm -rf "$cache/promtool.tmp" "$cache/deb"
    echo "$cache/promtool/usr/bin/promtool"
}
if PT=$(find_promtool); then
    echo "using $PT ($("$PT" --version 2>&1 | head -1))"
    run_pt() { # run_pt DESCRIPTION ARGS...
        local what=$1 out; shift
        if out=$("$PT" "$@" 2>&1); then ok "$what"; else bad "$what:"; printf '      %s\n' "$out"; fi
    }
    run_pt "promtool check rules prometheus-alerts.yml" check rules "$HERE/prometheus-alerts.yml"
    run_pt "promtool test rules prometheus-alerts.test.yml (every alert firing + quiet cases)" \
        test rules "$HERE/prometheus-alerts.test.yml"
    run_pt "promtool parses every dashboard query" check rules "$TMP/dashboard-queries.yml"
elif [ "${REQUIRE_PROMTOOL:-0}" = 1 ]; then
    bad "promtool unavailable (REQUIRE_PROMTOOL=1): set PROMTOOL=/path/to/promtool"
else
    warn "promtool unavailable: the alert rules were only checked structurally (step 5), not"
    warn "  parsed or unit-tested. Set PROMTOOL=/path/to/promtool or REQUIRE_PROMTOOL=1."
fi

# --- 7. parse the rest ---------------------------------------------------------------------------
if python3 -m json.tool "$HERE/grafana-dashboard.json" >/dev/null; then
    ok "grafana-dashboard.json is valid JSON"
else
    bad "grafana-dashboard.json is not valid JSON"
fi
bash -n "$HERE/check-runtime.sh" && ok "check-runtime.sh parses" || bad "check-runtime.sh has a syntax error"
python3 -c 'import ast, sys; ast.parse(open(sys.argv[1]).read())' "$HERE/sandbox-probe.py" \
    && ok "sandbox-probe.py parses" || bad "sandbox-probe.py has a syntax error"

echo
if [ "$fail" = 0 ]; then echo "check-unit: OK"; else echo "check-unit: FAILED"; fi
exit "$fail"
