#!/usr/bin/env bash
# System tools some tests use, from Debian: Prometheus (prometheus + promtool: deploy tests), wrk (load tests) and
# chromium (the offline /docs test opens the page in a headless browser).
#
# Best effort: without root or a package registry the tests that need a tool skip and say why. Runs as root on a
# fresh CI machine (.ci/run -> make test).
#
# Nothing already running is touched. The Prometheus package would start a daemon on :9090 where an init system
# runs; instead of killing it afterwards (a `pkill -x prometheus` also kills every other Prometheus on the
# machine), a policy-rc.d that answers 101 ("action forbidden") stops the package's maintainer scripts from
# starting any service during this install. The tests start their own Prometheus.
set -u

missing=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
command -v wrk >/dev/null || missing+=(wrk)
command -v chromium >/dev/null || command -v chromium-browser >/dev/null || missing+=(chromium)
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
  echo "note: not root or no apt-get: ${missing[*]} not installed; the tests that need them will skip"
  exit 0
fi

export DEBIAN_FRONTEND=noninteractive
log=/tmp/apt-test-deps.log
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
  # invoke-rc.d asks this script before starting a service; 101 = forbidden. Removed again below.
  printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && own_policy=1
fi
trap '[ "$own_policy" = 1 ] && rm -f "$policy"' EXIT

apt-get update -qq >"$log" 2>&1 || echo "warning: apt-get update failed (see $log)"
for package in "${missing[@]}"; do
  # one package at a time: a missing one (e.g. no chromium for this architecture) does not block the others
  apt-get install -y -qq --no-install-recommends "$package" >>"$log" 2>&1 \
    || echo "warning: could not install $package (see $log); the tests that need it will skip"
done
exit 0
