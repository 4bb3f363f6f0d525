# The API image (also runs `python -m common.store.bootstrap`). Build from the repository root:
#   docker build -f deploy/docker/api.Dockerfile -t nitroconv-api .
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
# Up to the dependencies this file is worker.Dockerfile's to the letter, so building the second image reuses
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
# The rest in one layer: .dockerignore lets through only the package and deploy/'s settings files. One
# instruction rather than one per directory: on a copying storage driver (vfs) each costs a full copy.
COPY . ./
RUN pip install --no-deps . \
 && useradd --system --uid 10001 --home-dir /var/lib/nitroconv nitroconv \
 && install -d -o nitroconv -g nitroconv /var/lib/nitroconv /var/lib/nitroconv/logs /var/lib/nitroconv/pids
USER nitroconv
EXPOSE 8080
CMD ["gunicorn", "-c", "deploy/gunicorn.conf.py", "--bind", "0.0.0.0:8080", "--access-logfile", "-", \
     "--error-logfile", "-", "--pid", "/tmp/api.pid", "api.app:create_app()"]
