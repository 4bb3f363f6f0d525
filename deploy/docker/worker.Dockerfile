# The worker image (Celery worker, beat and Flower). Build from the repository root:
#   docker build -f deploy/docker/worker.Dockerfile -t nitroconv-worker .
# The kernel blobs are not in the image: mount the AWS blobs (/usr/share/nitro_enclaves/blobs on a Nitro
# host) or the dev blobs of `make blobs` there. `--build-arg BOOT_CHECK=1` adds QEMU for NITROCONV_BOOT_CHECK.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS runtime
# The exec shim, netd and the launcher, by worker/runtime/Makefile with the zig pinned in setup.cfg (the `runtime`
# extra): the bytes of worker/runtime/SHA256SUMS, the same as `make setup` builds on any host, or no image.
RUN apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
      make binutils && rm -rf /var/lib/apt/lists/*
COPY setup.cfg /src/setup.cfg
RUN python3 -m venv /opt/zig && python3 -c "import configparser; \
      c = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=('#',)); c.read('/src/setup.cfg'); \
      print(c['options.extras_require']['runtime'].strip())" > /tmp/toolchain.txt \
 && /opt/zig/bin/pip install --no-cache-dir -r /tmp/toolchain.txt && rm /tmp/toolchain.txt
COPY worker/runtime /src/worker/runtime
RUN make -s -C /src/worker/runtime OUT=/src/out PYTHON=/opt/zig/bin/python check \
 && install -D -m 0755 -t /opt/nitroconv/runtime /src/out/run /src/out/shim /src/out/attestd /src/out/netd /src/out/egressd /src/out/egress

FROM ${BASE}
# Up to the dependencies this file is api.Dockerfile's to the letter, so building the second image reuses
# the first's layers (the same ENV for both: neither image minds the other's few settings).
# A venv, not the base's site-packages: works on python:*-slim and on a Debian python3 base alike
# (whose interpreter is marked externally managed, PEP 668).
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PATH=/opt/nitroconv/venv/bin:$PATH \
    NITROCONV_STATE_DIR=/var/lib/nitroconv NITROCONV_API_ADDR=0.0.0.0:8080 \
    NITROCONV_RUNTIME_DIR=/opt/nitroconv/runtime NITROCONV_BLOBS_DIR=/usr/share/nitro_enclaves/blobs
WORKDIR /opt/nitroconv
# The dependencies first, in a layer of their own: a change to the code (or README) reinstalls only nitroconv.
COPY setup.cfg ./
RUN python3 -m venv /opt/nitroconv/venv && python3 -c "import configparser; \
      c = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=('#',)); c.read('setup.cfg'); \
      print(c['options']['install_requires'].strip())" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt && rm /tmp/requirements.txt
# After the shared layers: a build argument is part of every later RUN's cache key.
ARG BOOT_CHECK=0
RUN if [ "$BOOT_CHECK" = 1 ]; then apt-get update -q \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends qemu-system-x86 \
      && rm -rf /var/lib/apt/lists/*; fi
COPY --from=runtime /opt/nitroconv/runtime /opt/nitroconv/runtime
# The rest in one layer: .dockerignore lets through only the package and deploy/'s settings files. One
# instruction rather than one per directory: on a copying storage driver (vfs) each costs a full copy.
COPY . ./
RUN pip install --no-deps . \
 && useradd --system --uid 10001 --home-dir /var/lib/nitroconv nitroconv \
 && install -d -o nitroconv -g nitroconv /var/lib/nitroconv
USER nitroconv
EXPOSE 9108
CMD ["python", "-m", "worker", "-Q", "convert,maintenance", "-c", "1", \
     "-n", "conv@%h", "--without-gossip", "-l", "info"]
