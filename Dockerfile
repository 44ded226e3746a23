# otel-envoy daemon image. bcc comes from Debian (python3-bpfcc): the PyPI project named "bcc" is unrelated,
# so the venv is created with --system-site-packages and bcc is never pip-installed.
# Run it privileged with the host's pid namespace, tracefs/debugfs/bpffs and kernel headers mounted
# (see docker-compose.yml).
FROM debian:12-slim

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3-bpfcc bpfcc-tools linux-headers-amd64 python3-venv ca-certificates binutils \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/otel-envoy
# README* also matches nothing harmlessly: pyproject.toml is always there.
COPY pyproject.toml README* ./
COPY otel_envoy ./otel_envoy
COPY bpf ./bpf

RUN python3 -m venv --system-site-packages /opt/venv \
 && /opt/venv/bin/pip install --upgrade pip \
 && /opt/venv/bin/pip install . \
 && OTEL_ENVOY_BPF_DIR=/opt/otel-envoy/bpf /opt/venv/bin/python -c "import bcc, otel_envoy.events.decode"

ENV PATH=/opt/venv/bin:$PATH \
    OTEL_ENVOY_BPF_DIR=/opt/otel-envoy/bpf
ENTRYPOINT ["otel-envoy"]
CMD ["--help"]
