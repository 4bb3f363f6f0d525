# The API image (also runs `python -m common.bootstrap`). Build from the repository root:
#   docker build -f deploy/docker/api.Dockerfile -t nitroconv-api .
ARG BASE=python:3.11-slim-bookworm
FROM ${BASE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    NITROCONV_STATE_DIR=/var/lib/nitroconv NITROCONV_API_ADDR=0.0.0.0:8080
WORKDIR /opt/nitroconv
COPY setup.cfg pyproject.toml ./
COPY api api
COPY common common
COPY worker worker
COPY deploy/gunicorn.conf.py deploy/flowerconfig.py deploy/
RUN pip install . \
 && useradd --system --uid 10001 --home-dir /var/lib/nitroconv nitroconv \
 && install -d -o nitroconv -g nitroconv /var/lib/nitroconv /var/lib/nitroconv/logs /var/lib/nitroconv/pids
USER nitroconv
EXPOSE 8080
CMD ["gunicorn", "-c", "deploy/gunicorn.conf.py", "--bind", "0.0.0.0:8080", "--access-logfile", "-", \
     "--error-logfile", "-", "--pid", "/tmp/api.pid", "api.app:create_app()"]
