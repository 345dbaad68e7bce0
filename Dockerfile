# libra-node container image.
#
#   docker build -t libra-node .                                   CPU build of PyTorch (default)
#   docker build -t libra-node:cuda --build-arg TORCH_VARIANT=cu128 .   CUDA build
#
# TORCH_VARIANT names a PyTorch wheel index (cpu, cu126, cu128, ...). The CUDA wheels bring
# their own CUDA runtime, so the base image stays the same; run the CUDA image with
# `--gpus all` (NVIDIA Container Toolkit on the host). See docs/operations.md.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG TORCH_VARIANT=cpu
ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN groupadd --system --gid 10001 libra \
    && useradd --system --uid 10001 --gid libra --home-dir /var/lib/libra-node --shell /usr/sbin/nologin libra \
    && python -m venv /opt/venv \
    && pip install --no-cache-dir --index-url "https://download.pytorch.org/whl/${TORCH_VARIANT}" "torch==${TORCH_VERSION}"

WORKDIR /opt/libra-node
COPY pyproject.toml README.md ./
COPY node ./node
COPY libra_model ./libra_model
RUN pip install --no-cache-dir .

# The example configuration, with the store and index on the data volume.
COPY config/node.toml /etc/libra-node/node.toml
RUN sed -i 's|^data_dir = .*|data_dir = "/var/lib/libra-node"    # the data volume|' /etc/libra-node/node.toml \
    && mkdir -p /var/lib/libra-node \
    && chown libra:libra /var/lib/libra-node \
    && chmod 0700 /var/lib/libra-node

# The file store and the SQLite index; the configuration file (mount a folder with node.toml).
VOLUME ["/var/lib/libra-node", "/etc/libra-node"]

USER 10001:10001
EXPOSE 11112 11180

# The admin endpoint listens on 127.0.0.1:11180 inside the container by default; /healthz
# answers 503 until the database, store, listener and model are ready.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:11180/healthz', timeout=4)"]

ENTRYPOINT ["libra-node"]
CMD ["run", "--config", "/etc/libra-node/node.toml"]
