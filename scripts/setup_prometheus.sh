#!/usr/bin/env bash
# Install a real `prometheus` server binary for tests/test_prometheus.py (Debian's
# package, apt-get). Safe to run again; does nothing when prometheus is already there.
#
# Never fails its caller: when it cannot install (not root, no apt-get, no network),
# it prints one line saying why and exits 0; the test then skips with a reason.
#
# Debian's package ships a service (systemd unit and /etc/init.d/prometheus) that its
# postinst starts through deb-systemd-invoke / invoke-rc.d, listening on :9090, plus a
# recommended prometheus-node-exporter (:9100). Neither is wanted here: the test runs
# its own prometheus on a free port. So: --no-install-recommends, and, unless the
# machine already has one (Docker images do), a temporary /usr/sbin/policy-rc.d that
# answers 101 ("action not allowed") so invoke-rc.d starts nothing; it is removed
# again afterwards. Without systemd (containers) deb-systemd-invoke does nothing
# anyway. If a prometheus service still ended up running, it is stopped through its
# init script.
set -uo pipefail

have_prometheus() {
  command -v prometheus >/dev/null 2>&1 || [ -x /usr/bin/prometheus ]
}

if have_prometheus; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "setup_prometheus: not root, cannot apt-get install prometheus (tests/test_prometheus.py will skip)"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "setup_prometheus: no apt-get on this machine, prometheus not installed (tests/test_prometheus.py will skip)"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
POLICY=/usr/sbin/policy-rc.d
OWN_POLICY=0
if [ ! -e "$POLICY" ]; then
  printf '#!/bin/sh\n# setup_prometheus.sh: start no service while installing\nexit 101\n' >"$POLICY"
  chmod 755 "$POLICY"
  OWN_POLICY=1
fi
cleanup() {
  if [ "$OWN_POLICY" = 1 ]; then rm -f "$POLICY"; fi
}
trap cleanup EXIT

install() {
  apt-get install -y -q --no-install-recommends prometheus >/tmp/setup_prometheus.log 2>&1
}

if ! install; then
  # Usually a fresh image without package lists: fetch them once, then try again.
  if apt-get update -q >>/tmp/setup_prometheus.log 2>&1 && install; then
    :
  else
    echo "setup_prometheus: apt-get install prometheus failed, see /tmp/setup_prometheus.log ($(tail -n 1 /tmp/setup_prometheus.log)) (tests/test_prometheus.py will skip)"
    exit 0
  fi
fi

# A service the postinst may have started after all (a real init system, no policy):
# stop it so nothing keeps holding :9090.
if [ -x /etc/init.d/prometheus ] && /etc/init.d/prometheus status >/dev/null 2>&1; then
  /etc/init.d/prometheus stop >/dev/null 2>&1 || true
fi
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  systemctl disable --now prometheus >/dev/null 2>&1 || true
fi

if have_prometheus; then
  echo "setup_prometheus: $(prometheus --version 2>&1 | head -n 1)"
else
  echo "setup_prometheus: package installed but no prometheus binary found (tests/test_prometheus.py will skip)"
fi
exit 0
