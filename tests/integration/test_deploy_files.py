"""deploy/: the compose file, the Dockerfiles and the systemd units hold together (no engine or compose needed)."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from common.settings import Settings
from tests.fixtures.require import skip_or_fail

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
_VAR = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?][^}]*)?\}")


def _substituted(text: str, values: dict[str, str]) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}` with `values`, else the default."""
    def one(match: re.Match[str]) -> str:
        name, whole = match.group(1), match.group(0)
        if name in values:
            return values[name]
        default = re.match(r"\$\{[A-Z0-9_]+:?-([^}]*)\}", whole)
        if default is None:
            raise AssertionError(f"{name} has no default and is not in nitroconv.env.example")
        return default.group(1)

    return _VAR.sub(one, text)


def _example_env() -> dict[str, str]:
    lines = (DEPLOY / "nitroconv.env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))


def test_deploy_compose_file_is_complete_and_its_settings_parse():
    compose = yaml.safe_load(_substituted((DEPLOY / "compose.yaml").read_text(), _example_env()))
    services = compose["services"]
    assert set(services) == {"postgres", "redis", "registry", "bootstrap", "api", "worker", "beat", "flower"}
    redis = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in redis and "--maxmemory-policy noeviction" in redis
    for name, service in services.items():
        build = service.get("build")
        if build:
            assert (DEPLOY / build["context"] / build["dockerfile"]).is_file(), name
        image = service.get("image", "")
        if image.startswith("nitroconv-"):  # our images: built by some service of this file
            assert any(s.get("image") == image and s.get("build") for s in services.values()), name
        for dep in service.get("depends_on", {}):
            assert dep in services, (name, dep)
    # Every nitroconv service's environment is one the settings parser accepts.
    for name in ("bootstrap", "api", "worker", "beat", "flower"):
        env = {k: str(v) for k, v in services[name]["environment"].items()}
        settings = Settings.from_env(env)
        assert settings.env == "production" and settings.log_format == "json"
    assert Settings.from_env({k: str(v) for k, v in services["worker"]["environment"].items()}
                             ).worker_metrics_port == 9108
    assert "--conf=deploy/flowerconfig.py" in services["flower"]["command"]
    assert services["worker"]["command"][:4] == ["python", "-m", "worker", "-Q"]


def test_deploy_dockerfiles_copy_only_what_exists():
    for dockerfile in sorted((DEPLOY / "docker").glob("*.Dockerfile")):
        text = dockerfile.read_text()
        assert re.search(r"^ARG BASE=\S+", text, re.M), dockerfile.name  # a local base can be swapped in
        for line in re.findall(r"^COPY (?!--from)(.+)$", text, re.M):
            *sources, _ = line.split()
            for source in sources:
                assert (REPO / source).exists(), (dockerfile.name, source)


def test_deploy_systemd_units_verify(tmp_path: Path):
    if shutil.which("systemd-analyze") is None:
        skip_or_fail("systemd-analyze is not installed")
    venv = REPO / ".venv"
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        # ExecStart must exist to verify: point the unit at this checkout's venv; instance 01 of a template.
        name = unit.name.replace("@.service", "@01.service")
        (tmp_path / name).write_text(unit.read_text().replace("/opt/nitroconv/venv", str(venv)))
        done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / name)],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0 and done.stderr.strip() == "", (name, done.stderr)
    env = dict(line.split("=", 1) for line in (DEPLOY / "systemd" / "worker.env").read_text().splitlines()
               if line and not line.startswith("#"))
    settings = Settings.from_env({**env, "NITROCONV_WORKER_METRICS_PORT": "9101"})
    assert settings.blobs_dir == Path("/usr/share/nitro_enclaves/blobs") and settings.worker_metrics_port == 9101


def test_deploy_every_variable_is_documented():
    readme = (REPO / "README.md").read_text()
    reference = readme.split("## Configuration reference", 1)[1].split("\n## ", 1)[0]
    texts = [p.read_text() for p in [DEPLOY / "compose.yaml", DEPLOY / "nitroconv.env.example",
                                      DEPLOY / "systemd" / "worker.env", REPO / "common" / "settings.py"]]
    used = set(re.findall(r"NITROCONV_[A-Z0-9_]*[A-Z0-9]", "\n".join(texts)))
    compose_only = {"NITROCONV_DB_PASSWORD", "NITROCONV_HOST_BLOBS", "NITROCONV_API_PORT", "NITROCONV_FLOWER_PORT",
                    "NITROCONV_REGISTRY_PORT"}
    # settings.py builds most names from field names: NITROCONV_ + FIELD.upper().
    fields = {f"NITROCONV_{name.upper()}" for name in Settings.__dataclass_fields__} - {
        "NITROCONV_TOKEN_ISSUER", "NITROCONV_TOKEN_AUDIENCE",  # fixed, not read from the environment
        # read as NITROCONV_INPUT_USER/_PASSWORD and NITROCONV_OUTPUT_USER/_PASSWORD
        "NITROCONV_INPUT_CREDENTIALS", "NITROCONV_OUTPUT_CREDENTIALS"}
    missing = sorted(v for v in (used | fields) - compose_only if v not in reference
                     and not any(part in reference for part in _spelled_short(v)))
    assert missing == [], missing
    for name in compose_only:
        assert name in (DEPLOY / "compose.yaml").read_text() + (DEPLOY / "nitroconv.env.example").read_text()


def _spelled_short(name: str) -> list[str]:
    """The README groups `NITROCONV_API_PROCESSES` / `_THREADS`: accept a group's `_SUFFIX` spelling."""
    parts = name.split("_")
    return [f"`_{'_'.join(parts[i:])}`" for i in range(2, len(parts))]


class _Recording(dict[str, str]):
    """An environment that notes every name read from it."""

    def __init__(self, values: dict[str, str] | None = None) -> None:
        super().__init__(values or {})
        self.read: set[str] = set()

    def get(self, key: str, default: object = None) -> object:  # type: ignore[override]
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> str:
        self.read.add(key)
        return super().__getitem__(key)


# Settings only the API, Flower or `make up` read: a Nitro worker host has no use for them.
NOT_FOR_WORKERS = {"NITROCONV_API_ADDR", "NITROCONV_ADMIN_EMAIL", "NITROCONV_ADMIN_PASSWORD", "NITROCONV_FLOWER_ADDR",
                   "NITROCONV_FLOWER_BASIC_AUTH", "NITROCONV_MAX_REQUEST_BYTES", "NITROCONV_MAX_QUEUED_PER_ACCOUNT",
                   "NITROCONV_RATE_LIMIT_PER_MINUTE", "NITROCONV_MAX_WAIT_SECONDS", "NITROCONV_TOKEN_TTL_SECONDS",
                   "NITROCONV_WORKERS", "NITROCONV_REGISTRY_ADDR", "NITROCONV_SESSION_MAX_SECONDS",
                   "NITROCONV_ATTESTATION_ROOT", "NITROCONV_ATTESTATION_ROOT_SHA256",
                   # the CLI's registry credentials (convert-local, fetch-eif, run-local): a worker takes each
                   # build's sealed credentials from its Build, never from its environment
                   "NITROCONV_INPUT_USER", "NITROCONV_INPUT_PASSWORD", "NITROCONV_OUTPUT_USER",
                   "NITROCONV_OUTPUT_PASSWORD"}


def test_deploy_systemd_env_file_matches_the_settings():
    """deploy/systemd/worker.env (the file the units name) and common/settings.py cannot drift apart: every
    name in it is one Settings reads and every setting Settings reads is in it (set, or commented out with its
    default), in the units, or one no worker reads; the values set parse and are the ones the settings hold."""
    units = {u.name: u.read_text() for u in (DEPLOY / "systemd").glob("*.service")}
    for name, text in units.items():
        assert "EnvironmentFile=/etc/nitroconv/worker.env" in text, name
    lines = (DEPLOY / "systemd" / "worker.env").read_text().splitlines()
    assigned = dict(line.split("=", 1) for line in lines if line and not line.startswith("#"))
    commented = dict(line[1:].split("=", 1) for line in lines if re.match(r"#NITROCONV_[A-Z0-9_]+=", line))
    from_units = set(re.findall(r"^Environment=(NITROCONV_[A-Z0-9_]+)=", "\n".join(units.values()), re.M))

    environ = _Recording(assigned)
    settings = Settings.from_env(environ)
    read = {name for name in environ.read if name.startswith("NITROCONV_")}
    assert set(assigned) - read == set(), "worker.env sets names Settings never reads"
    assert set(commented) - read == set(), "worker.env shows names Settings never reads"
    assert set(assigned) & set(commented) == set()
    unlisted = read - set(assigned) - set(commented) - from_units - NOT_FOR_WORKERS
    assert unlisted == set(), "settings a worker reads that worker.env neither sets nor shows"
    assert NOT_FOR_WORKERS <= read, "NOT_FOR_WORKERS names a setting that no longer exists"
    # What the units expand from the file is in it.
    for name, text in units.items():
        for var in re.findall(r"\$\{(NITROCONV_[A-Z0-9_]+)\}", text):
            assert var in assigned, (name, var)

    # The values set are the ones the settings hold; each commented value is the default.
    assert settings.env == "production" and settings.log_format == "json"
    assert settings.blobs_dir == Path(assigned["NITROCONV_BLOBS_DIR"])
    assert settings.runtime_dir == Path(assigned["NITROCONV_RUNTIME_DIR"])
    assert settings.state_dir == Path(assigned["NITROCONV_STATE_DIR"])
    assert settings.worker_queues == tuple(assigned["NITROCONV_WORKER_QUEUES"].split(","))
    assert settings.boot_check is False and settings.secret_key == assigned["NITROCONV_SECRET_KEY"].encode()
    defaults = Settings.from_env({})
    for name, value in commented.items():
        shown = Settings.from_env({name: value}) if value else defaults
        assert shown == defaults, f"worker.env shows {name}={value}, but the default differs"
