#!/usr/bin/env bash
# A container engine for the image and compose tests (and for building where no registry is reachable):
#   - Docker: `docker info` works already, or (as root, with apt) Debian's docker.io is installed and dockerd is
#     started with no default bridge, no iptables rules and no masquerading. Containers then use host networking
#     or networks the tests create on this machine; nothing is routed off it.
#   - Docker Compose v2, the Compose-spec implementation users run as `docker compose`: the CLI plugin when the
#     machine has it, else Debian trixie's docker-compose package (a static binary) unpacked into
#     build/container/ (bookworm's docker-compose 1.29 rejects the Compose spec's top-level `name:`). The trixie
#     package list is private to this script; the system's apt configuration is not touched.
# Idempotent and best effort, like scripts/test-deps.sh: without root or apt the container tests skip and say why
# (unless BERTSERVE_REQUIRE_CONTAINERS=1, as in CI, where they fail). Prints what it found.
set -u
cd "$(dirname "$0")/.."
STATE=$PWD/build/container
mkdir -p "$STATE"
log=$STATE/setup.log
root=0
[ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && root=1

engine_up() { timeout 10 docker info >/dev/null 2>&1; }

if ! engine_up; then
  if [ "$root" = 1 ] && ! command -v dockerd >/dev/null; then
    echo "container-engine: installing docker.io"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends docker.io >>"$log" 2>&1 \
      || { apt-get update -qq >>"$log" 2>&1 && DEBIAN_FRONTEND=noninteractive \
           apt-get install -y -qq --no-install-recommends docker.io >>"$log" 2>&1; } \
      || echo "container-engine: warning: could not install docker.io (see $log)"
  fi
  if [ "$root" = 1 ] && command -v dockerd >/dev/null && ! pgrep -x dockerd >/dev/null; then
    echo "container-engine: starting dockerd (no bridge, no iptables, no masquerading)"
    nohup dockerd --bridge=none --iptables=false --ip-masq=false >"$STATE/dockerd.log" 2>&1 &
  fi
  for _ in $(seq 60); do engine_up && break; sleep 0.5; done
fi
if engine_up; then
  echo "container-engine: docker $(docker version --format '{{.Server.Version}}' 2>/dev/null)"
else
  echo "container-engine: no docker engine; the container tests will skip"
  exit 0
fi

if docker compose version >/dev/null 2>&1; then
  echo "container-engine: $(docker compose version)"
elif [ -x "$STATE/docker-compose" ]; then
  echo "container-engine: $("$STATE/docker-compose" version)"
else
  apt_dir=$STATE/apt
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/debs"
  uri=$(apt-get indextargets --format '$(REPO_URI)' 2>/dev/null | grep -v -- '-security' | head -n1)
  uri=${uri:-http://deb.debian.org/debian/}
  echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] ${uri%/} trixie main" >"$apt_dir/sources.list"
  opts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o Dir::Etc::sourceparts=/nonexistent
        -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache::archives=$apt_dir/archives" -o APT::Sandbox::User=root)
  if apt-get -qq "${opts[@]}" update >>"$log" 2>&1 \
     && (cd "$apt_dir/debs" && apt-get -qq "${opts[@]}" download docker-compose >>"$log" 2>&1); then
    dpkg-deb --fsys-tarfile "$apt_dir"/debs/docker-compose_*.deb \
      | tar -xO ./usr/libexec/docker/cli-plugins/docker-compose >"$STATE/docker-compose.part" \
      && chmod +x "$STATE/docker-compose.part" && mv "$STATE/docker-compose.part" "$STATE/docker-compose"
  fi
  if [ -x "$STATE/docker-compose" ]; then
    echo "container-engine: $("$STATE/docker-compose" version) (Debian trixie, $STATE/docker-compose)"
  else
    echo "container-engine: warning: no Docker Compose v2 (see $log); the compose test will skip"
  fi
fi
exit 0
