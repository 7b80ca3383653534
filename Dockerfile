# ttaserve server image.
#   docker build -t ttaserve .                                   # CPU (default)
#   docker build -t ttaserve:cuda --build-arg TORCH_INDEX=cu128 --build-arg EXTRAS=gpu .
#   docker run -p 8001:8001 -p 8002:8002 -v "$PWD/models:/models:ro" ttaserve
# The install steps are the README's and scripts/setup.sh's: torch first, pinned, then the
# package from pyproject.toml (a test checks that they agree).
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

# Same pin as scripts/setup.sh (TTASERVE_TORCH); the wheel comes from PyTorch's index for the
# variant: cpu, or a CUDA build such as cu128 (it bundles the CUDA runtime; the host needs
# the NVIDIA driver and container toolkit).
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=cpu
ARG EXTRAS=""

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin ttaserve \
    && mkdir -p /models /state \
    && chown ttaserve:ttaserve /state

WORKDIR /opt/ttaserve
# torch first and pinned: an open range would pull the multi-GB CUDA build from PyPI.
RUN pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_INDEX}" \
        "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY ttaserve ./ttaserve
# The package is this source tree (its version is the commit); its dependencies are the
# ranges in pyproject.toml, as for every pip install of ttaserve.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".${EXTRAS:+[$EXTRAS]}"
COPY deploy/docker-entrypoint.sh /usr/local/bin/ttaserve-entrypoint

# The non-root user created above, by number so that Kubernetes' runAsNonRoot can check it.
USER 10001:10001
# 8001 gRPC (inference, control, health, reflection); 8002 /metrics and the dashboard.
EXPOSE 8001 8002
VOLUME ["/models", "/state"]
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-m", "ttaserve.healthcheck", "127.0.0.1:8001"]
ENTRYPOINT ["ttaserve-entrypoint"]
