# Prometheus from Debian's package, for machines where prom/prometheus cannot be pulled (no registry reachable).
# Runs like the upstream image as docker-compose.yml uses it: /usr/bin/prometheus is the entrypoint, the compose
# file passes --config.file and --storage.tsdb.path=/prometheus, it runs as nobody (65534), and wget serves the
# compose health check.
#
#   docker build --network host --build-arg BASE=bertserve-stand-in/python:3.11-bookworm \
#     -f deploy/docker/prometheus.Dockerfile -t bertserve-stand-in/prometheus:debian deploy/docker
ARG BASE=debian:bookworm-slim
FROM ${BASE}
# The distribution release pins the package versions (Prometheus 2.42 in bookworm): DL3008 does not apply.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends prometheus wget \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /prometheus \
 && chown 65534:65534 /prometheus
USER 65534:65534
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/usr/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
