#!/usr/bin/env bash
# System tools the deploy tests use: Prometheus (prometheus + promtool) from Debian.
# Best effort: without root or a package registry the tests that need them skip and say why.
set -u
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then exit 0; fi
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  export DEBIAN_FRONTEND=noninteractive
  (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus) >/tmp/apt-prometheus.log 2>&1 \
    || echo "warning: could not install prometheus (see /tmp/apt-prometheus.log); its tests will skip"
  # the Debian package starts a daemon on :9090 where systemd/init runs; the tests start their own
  pkill -x prometheus 2>/dev/null || true
fi
exit 0
