# The worker image (Celery worker, beat and Flower). Build from the repository root:
#   docker build -f deploy/docker/worker.Dockerfile -t nitroconv-worker .
# The kernel blobs are not in the image: mount the AWS blobs (/usr/share/nitro_enclaves/blobs on a Nitro
# host) or the dev blobs of `make blobs` there. `--build-arg BOOT_CHECK=1` adds QEMU for NITROCONV_BOOT_CHECK.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS runtime
# The exec shim and the launcher: static and reproducible (deploy/runtime/Makefile).
RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      gcc libc6-dev make binutils && rm -rf /var/lib/apt/lists/*
COPY worker/runtime /src/worker/runtime
COPY deploy/runtime/Makefile /src/deploy/runtime/Makefile
RUN make -C /src/deploy/runtime RUNTIME=/opt/nitroconv/runtime

FROM ${BASE}
ARG BOOT_CHECK=0
# A venv, not the base's site-packages: works on python:*-slim and on a Debian python3 base alike
# (whose interpreter is marked externally managed, PEP 668).
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PATH=/opt/nitroconv/venv/bin:$PATH \
    NITROCONV_STATE_DIR=/var/lib/nitroconv NITROCONV_RUNTIME_DIR=/opt/nitroconv/runtime \
    NITROCONV_BLOBS_DIR=/usr/share/nitro_enclaves/blobs
RUN if [ "$BOOT_CHECK" = 1 ]; then apt-get update -q \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-system-x86 \
      && rm -rf /var/lib/apt/lists/*; fi
WORKDIR /opt/nitroconv
# The dependencies first, in a layer of their own: a change to the code (or README) reinstalls only nitroconv.
COPY setup.cfg ./
RUN python3 -m venv /opt/nitroconv/venv && python3 -c "import configparser; \
      c = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=('#',)); c.read('setup.cfg'); \
      print(c['options']['install_requires'].strip())" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt
COPY pyproject.toml README.md ./
COPY api api
COPY common common
COPY worker worker
COPY deploy/flowerconfig.py deploy/
COPY --from=runtime /opt/nitroconv/runtime /opt/nitroconv/runtime
RUN pip install --no-deps . \
 && useradd --system --uid 10001 --home-dir /var/lib/nitroconv nitroconv \
 && install -d -o nitroconv -g nitroconv /var/lib/nitroconv
USER nitroconv
EXPOSE 9108
CMD ["celery", "-A", "worker.celery_app", "worker", "-Q", "convert,maintenance", "-c", "1", \
     "-n", "conv@%h", "--without-gossip", "-l", "info"]
