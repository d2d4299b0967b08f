#!/usr/bin/env bash
# Base images built from Debian's packages, for machines where no image registry answers (Docker Hub, NGC):
#
#   bertserve-stand-in/python:3.11-bookworm   Debian 12 minbase + python3 (3.11), python3-venv, ca-certificates:
#                                             what python:3.11-slim-bookworm provides to the Dockerfile
#                                             (PYTHON_IMAGE; also CUDA_IMAGE for building the gpu target's Python
#                                             layer without CUDA)
#   bertserve-stand-in/prometheus:debian      that base + Debian's prometheus package (PROMETHEUS_IMAGE for
#                                             docker-compose.yml): same binary path semantics as prom/prometheus
#
# pip and apt inside builds on these bases must trust what pip on this machine trusts (a proxy's CA, say): the
# bundle pip is configured with (`pip config get global.cert`, else the system bundle) is copied into the base
# and named by PIP_CERT and SSL_CERT_FILE there.
#
# Cached: an image that exists is kept (FORCE=1 rebuilds); the root filesystem tarball is kept under
# build/container/. Needs root (mmdebstrap), apt and a running docker engine (scripts/container-engine.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
STATE=$PWD/build/container
PYTHON_IMAGE=${PYTHON_IMAGE:-bertserve-stand-in/python:3.11-bookworm}
PROMETHEUS_IMAGE=${PROMETHEUS_IMAGE:-bertserve-stand-in/prometheus:debian}
mkdir -p "$STATE"

have() { [ "${FORCE:-0}" != 1 ] && docker image inspect "$1" >/dev/null 2>&1; }

if ! have "$PYTHON_IMAGE"; then
  command -v mmdebstrap >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null
  ca=$(python3 -m pip config get global.cert 2>/dev/null || true)
  ca=${ca:-/etc/ssl/certs/ca-certificates.crt}
  rootfs=$STATE/python-bookworm.tar
  if [ ! -s "$rootfs" ] || [ "${FORCE:-0}" = 1 ]; then
    echo "stand-in-images: bootstrapping Debian bookworm + python3 (mmdebstrap)"
    mmdebstrap --quiet --format=tar --variant=minbase --include=python3,python3-venv,python-is-python3,ca-certificates \
      --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
      --customize-hook="mkdir -p \"\$1/usr/local/share/build-ca\" && cp '$ca' \"\$1/usr/local/share/build-ca/ca.crt\"" \
      bookworm "$rootfs.part"
    mv "$rootfs.part" "$rootfs"
  fi
  docker import \
    --change 'ENV PIP_CERT=/usr/local/share/build-ca/ca.crt' \
    --change 'ENV SSL_CERT_FILE=/usr/local/share/build-ca/ca.crt' \
    --change 'ENV LANG=C.UTF-8' \
    "$rootfs" "$PYTHON_IMAGE" >/dev/null
fi
echo "stand-in-images: $PYTHON_IMAGE $(docker image inspect --format '{{.Size}}' "$PYTHON_IMAGE" | numfmt --to=iec)"

if ! have "$PROMETHEUS_IMAGE"; then
  echo "stand-in-images: building $PROMETHEUS_IMAGE from Debian's prometheus package"
  if ! DOCKER_BUILDKIT=0 docker build --network host --build-arg BASE="$PYTHON_IMAGE" \
      -f deploy/docker/prometheus.Dockerfile -t "$PROMETHEUS_IMAGE" deploy/docker >"$STATE/prometheus-build.log" 2>&1
  then
    tail -n 30 "$STATE/prometheus-build.log"
    exit 1
  fi
fi
echo "stand-in-images: $PROMETHEUS_IMAGE $(docker image inspect --format '{{.Size}}' "$PROMETHEUS_IMAGE" | numfmt --to=iec)"
