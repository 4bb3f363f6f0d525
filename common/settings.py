"""Service settings: one frozen dataclass parsed strictly from NITROCONV_* environment variables."""
from __future__ import annotations

import functools
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import InvalidOptions
from common.image.compress import parse_compression
from common.queue.tasknames import QUEUES
from common.registry.auth import Credentials
from common.registry.reference import parse_reference
from common.util.compression import Compression

PREFIX = "NITROCONV_"
ENVIRONMENTS = ("development", "test", "production")


def parse_bool(value: str) -> bool:
    """Strict boolean: a typo must fail at start-up, not silently mean False."""
    lowered = value.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise InvalidOptions(f"not a boolean: {value!r}")


def parse_int(value: str, *, minimum: int | None = None) -> int:
    try:
        parsed = int(value.strip())
    except ValueError:
        raise InvalidOptions(f"not an integer: {value!r}") from None
    if minimum is not None and parsed < minimum:
        raise InvalidOptions(f"{parsed} is below the minimum {minimum}")
    return parsed


def parse_addr(value: str) -> tuple[str, int]:
    """`host:port` (IPv6 hosts in brackets) into its parts."""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host:
        raise InvalidOptions(f"not host:port: {value!r}")
    return host.strip("[]"), parse_int(port, minimum=1)


def parse_list(value: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in value.split(",") if item.strip())


def parse_queues(value: str) -> tuple[str, ...]:
    """A worker's queues, each one we route to: a typo would otherwise leave a worker idle forever."""
    queues = tuple(dict.fromkeys(parse_list(value)))
    unknown = [q for q in queues if q not in QUEUES]
    if not queues or unknown:
        raise InvalidOptions(f"NITROCONV_WORKER_QUEUES must name some of {', '.join(QUEUES)}, got {value!r}")
    return queues


BOOT_CHECK_MODES = ("auto", "emulator", "plain")


def parse_boot_check_mode(value: str) -> str:
    mode = value.strip().lower()
    if mode not in BOOT_CHECK_MODES:
        raise InvalidOptions(f"NITROCONV_BOOT_CHECK_MODE must be one of {', '.join(BOOT_CHECK_MODES)}, got {value!r}")
    return mode


def emulator_installed(qemu: Path) -> bool:
    """The emulator's QEMU (`make setup` links it into the state dir) is there to run."""
    return os.access(qemu, os.X_OK) and qemu.is_file()


@dataclass(frozen=True)
class Settings:
    api_addr: str = "127.0.0.1:8080"
    registry_addr: str = "127.0.0.1:5000"
    flower_addr: str = "127.0.0.1:5555"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/nitroconv"
    redis_url: str = "redis://127.0.0.1:6379/0"
    state_dir: Path = Path(".state")
    workers: int = 1
    blobs_dir: Path = Path(".state/blobs")
    admin_email: str = "admin@nitroconv.local"
    admin_password: str = field(default="", repr=False)
    secret_key: bytes = field(default=b"", repr=False)
    insecure_registries: frozenset[str] = frozenset({"127.0.0.1:5000"})
    token_ttl_seconds: int = 3600
    session_max_seconds: int = 86400  # a session ends this long after sign-in, however often it is refreshed
    token_issuer: str = "nitroconv"
    token_audience: str = "nitroconv-api"
    # Conversion time limits; the broker visibility timeout must stay above the hard limit.
    soft_time_limit: int = 1800
    time_limit: int = 1900
    visibility_timeout: int = 7200
    lease_seconds: int = 90
    requeue_after_seconds: int = 300
    sweep_interval_seconds: int = 30
    max_attempts: int = 3
    max_wait_seconds: int = 600
    # A deploy's cold shutdown waits this long for running conversions before requeueing them.
    soft_shutdown_timeout: int = 30
    # Pool children are recycled after this many conversions, or after a conversion that left them above
    # this RSS (MiB). Not after every conversion: Celery hands the next task to a replacement child late
    # (seconds, celery#9588); no image code runs in a child.
    worker_max_tasks_per_child: int = 100
    worker_max_memory_per_child_mib: int = 1024
    # Uncompressed bytes one image may inflate to (all layers): a gzip bomb stops here, not at a full disk.
    max_image_bytes: int = 8 << 30
    flower_basic_auth: str = field(default="", repr=False)
    # Boot every converted EIF under QEMU before pushing it. `from_env` turns it on where the emulator is
    # installed (`emulator_installed`) unless NITROCONV_BOOT_CHECK says otherwise: there the check verifies
    # the PCRs too, for ~5 s of CPU a conversion; plain QEMU alone checks less and costs more, so it is
    # never the default.
    boot_check: bool = False
    boot_check_timeout: int = 120
    # Where the boot check boots: `emulator` loads the EIF with QEMU's nitro-enclave machine (its own
    # EIF loader, NSM and vsock: PCRs and heartbeat checked), `plain` boots the EIF's kernel and ramdisks
    # with -kernel/-initrd (the fallback for hosts that cannot build the emulator), `auto` the emulator when
    # it is installed, else plain (logged, and recorded in the Build's boot_check).
    boot_check_mode: str = "auto"
    # The emulator's QEMU built by `make setup` (deploy/emulator), with the nitro-enclave machine.
    emulator_qemu: Path = Path(".state/emulator/qemu-system-x86_64")
    # The exec shim and launcher built by `make runtime` (deploy/runtime/Makefile).
    runtime_dir: Path = Path(".state/runtime")
    # EIF signing (EIF.md §4.2): PEM paths, both or neither; checked again before every build, since a
    # certificate valid at start-up can expire while the service runs.
    signing_key: Path | None = None
    signing_cert: Path | None = None
    # PEM bundle appended to an image's trust store when a build asks for add_ccm_ca_certificates.
    ca_bundle: Path | None = None
    # The root attestation documents must chain to, instead of the pinned AWS Nitro Enclaves Root G1 (another
    # partition's): a PEM path and the SHA-256 of its DER, both or neither (a root is trusted by its pin).
    attestation_root: Path | None = None
    attestation_root_sha256: str = ""

    # The image converted images are layered on (a registry reference), e.g. the operator's image with
    # nitro-cli for /enclave/run to start; empty: the output has only the enclave layer.
    output_base_image: str = ""
    # The output layer's compression: `gzip` (every client) or `zstd` (smaller and faster to make, for
    # registries and clients that accept it; Docker 20.10 cannot pull zstd layers).
    output_compression: Compression = Compression.GZIP
    # The blob cache of each worker host (<state>/cache/blobs): least recently used blobs are evicted
    # beyond this many bytes; 0 keeps everything.
    cache_max_bytes: int = 20 << 30

    # Abuse limits (RELIABILITY.md §E). `production` refuses private and loopback registries unless
    # they are in insecure_registries; link-local and cloud metadata addresses are refused always.
    env: str = "development"
    max_request_bytes: int = 1 << 20  # a conversion request is a few KiB
    max_queued_per_account: int = 50  # conversions not yet ended, per account
    rate_limit_per_minute: int = 600  # API requests per caller (user, account) and minute; 0 turns it off

    # Observability: `json` or `text` log lines (default json in production, text elsewhere), and
    # the port each worker serves Prometheus metrics on (0: none; one port per worker instance on a host).
    log_format: str = "text"
    worker_metrics_port: int = 0
    # The queues a worker consumes (a queue per host class): Nitro hosts `convert`, others
    # may run only `maintenance`; the API consumes none.
    worker_queues: tuple[str, ...] = QUEUES
    # Registry credentials of the local CLI commands (convert-local, fetch-eif, run-local), from
    # NITROCONV_{INPUT,OUTPUT}_{USER,PASSWORD}; the service takes credentials with each request instead.
    input_credentials: Credentials | None = field(default=None, repr=False)
    output_credentials: Credentials | None = field(default=None, repr=False)

    @property
    def api_host_port(self) -> tuple[str, int]:
        return parse_addr(self.api_addr)

    @classmethod
    def from_env(cls, environ: Mapping[str, str], prefix: str = PREFIX) -> Settings:
        """Build settings from an environment mapping; unset keys keep their defaults."""

        def get(name: str) -> str | None:
            value = environ.get(prefix + name)
            return value if value not in (None, "") else None

        state_dir = Path(get("STATE_DIR") or ".state").resolve()
        registry_addr = get("REGISTRY_ADDR") or cls.registry_addr
        parse_addr(registry_addr)
        insecure = get("INSECURE_REGISTRIES")
        emulator_qemu = Path(get("EMULATOR_QEMU") or state_dir / "emulator" / "qemu-system-x86_64")
        values: dict[str, object] = {
            "api_addr": get("API_ADDR") or cls.api_addr,
            "registry_addr": registry_addr,
            "flower_addr": get("FLOWER_ADDR") or cls.flower_addr,
            "database_url": get("DATABASE_URL") or cls.database_url,
            "redis_url": get("REDIS_URL") or cls.redis_url,
            "state_dir": state_dir,
            "workers": parse_int(get("WORKERS") or "1", minimum=1),
            "blobs_dir": Path(get("BLOBS_DIR") or state_dir / "blobs"),
            "runtime_dir": Path(get("RUNTIME_DIR") or state_dir / "runtime"),
            "emulator_qemu": emulator_qemu,
            "admin_email": get("ADMIN_EMAIL") or cls.admin_email,
            "admin_password": get("ADMIN_PASSWORD") or "",
            "insecure_registries": frozenset(parse_list(insecure) if insecure else (registry_addr,)),
            "flower_basic_auth": get("FLOWER_BASIC_AUTH") or "",
        }
        for name in ("token_ttl_seconds", "session_max_seconds", "soft_time_limit", "time_limit", "visibility_timeout",
                     "lease_seconds", "requeue_after_seconds", "sweep_interval_seconds", "max_attempts",
                     "max_wait_seconds", "boot_check_timeout", "soft_shutdown_timeout", "max_image_bytes",
                     "worker_max_tasks_per_child", "worker_max_memory_per_child_mib"):
            raw = get(name.upper())
            if raw is not None:
                values[name] = parse_int(raw, minimum=1)
        boot_check = get("BOOT_CHECK")
        values["boot_check"] = (parse_bool(boot_check) if boot_check is not None
                                else emulator_installed(emulator_qemu))
        mode = get("BOOT_CHECK_MODE")
        if mode is not None:
            values["boot_check_mode"] = parse_boot_check_mode(mode)
        for name in ("signing_key", "signing_cert", "ca_bundle", "attestation_root"):
            raw = get(name.upper())
            if raw is not None:
                values[name] = Path(raw)
        compression = get("OUTPUT_COMPRESSION")
        if compression is not None:
            values["output_compression"] = parse_compression(compression)
        base = (get("OUTPUT_BASE_IMAGE") or "").strip()
        if base:
            parse_reference(base)  # a typo fails at start-up, not in every conversion
            values["output_base_image"] = base
        env = (get("ENV") or cls.env).strip().lower()
        if env not in ENVIRONMENTS:
            raise InvalidOptions(f"NITROCONV_ENV must be one of {', '.join(ENVIRONMENTS)}, got {env!r}")
        values["env"] = env
        for name in ("max_request_bytes", "max_queued_per_account"):
            raw = get(name.upper())
            if raw is not None:
                values[name] = parse_int(raw, minimum=1)
        rate = get("RATE_LIMIT_PER_MINUTE")
        if rate is not None:
            values["rate_limit_per_minute"] = parse_int(rate, minimum=0)
        log_format = (get("LOG_FORMAT") or ("json" if env == "production" else "text")).strip().lower()
        if log_format not in ("json", "text"):
            raise InvalidOptions(f"NITROCONV_LOG_FORMAT must be json or text, got {log_format!r}")
        values["log_format"] = log_format
        cache_max = get("CACHE_MAX_BYTES")
        if cache_max is not None:
            values["cache_max_bytes"] = parse_int(cache_max, minimum=0)
        queues = get("WORKER_QUEUES")
        if queues is not None:
            values["worker_queues"] = parse_queues(queues)
        metrics_port = get("WORKER_METRICS_PORT")
        if metrics_port is not None:
            values["worker_metrics_port"] = parse_int(metrics_port, minimum=0)
        root_pin = get("ATTESTATION_ROOT_SHA256")
        if root_pin is not None:
            values["attestation_root_sha256"] = root_pin.strip().lower()
        values["input_credentials"] = _credentials(environ, prefix + "INPUT_")
        values["output_credentials"] = _credentials(environ, prefix + "OUTPUT_")
        secret = get("SECRET_KEY")
        values["secret_key"] = secret.encode() if secret else b""
        settings = cls(**values)  # type: ignore[arg-type]
        settings.check()
        return settings

    def check(self) -> None:
        """Cross-field rules that would otherwise fail late and confusingly."""
        for addr in (self.api_addr, self.flower_addr, self.registry_addr):
            parse_addr(addr)
        if not self.soft_time_limit < self.time_limit < self.visibility_timeout:
            raise InvalidOptions("need soft_time_limit < time_limit < visibility_timeout "
                                 "(a conversion outliving the visibility timeout is delivered twice)")
        if self.boot_check and self.boot_check_timeout >= self.soft_time_limit:
            raise InvalidOptions("need boot_check_timeout < soft_time_limit (the boot check runs inside the "
                                 "conversion's time limit)")
        if (self.signing_key is None) != (self.signing_cert is None):
            raise InvalidOptions("NITROCONV_SIGNING_KEY and NITROCONV_SIGNING_CERT must be set together")
        if (self.attestation_root is None) != (not self.attestation_root_sha256):
            raise InvalidOptions("NITROCONV_ATTESTATION_ROOT and NITROCONV_ATTESTATION_ROOT_SHA256 must be set "
                                 "together")
        if self.attestation_root_sha256 and not re.fullmatch(r"[0-9a-f]{64}", self.attestation_root_sha256):
            raise InvalidOptions("NITROCONV_ATTESTATION_ROOT_SHA256 must be 64 hex digits (SHA-256 of the DER)")

    def with_secret(self) -> Settings:
        """These settings with a secret key: the configured one, else one persisted in the state dir."""
        if self.secret_key:
            return self
        from dataclasses import replace

        return replace(self, secret_key=load_or_create_secret(self.state_dir / "secret_key"))


@dataclass(frozen=True)
class ClientSettings:
    """The service client commands' own configuration (`nitroconv login`, `convert`, `builds`, ...): where the
    service is and how to sign in. Apart from `Settings` on purpose: a client runs where the service's settings
    may be absent or meant for another host, and must not fail on them."""

    url: str  # the service's base URL
    token: str | None = field(default=None, repr=False)  # an access token, instead of the one saved by login
    session_file: Path = Path("session.json")  # where `login` saves the URL and tokens

    @classmethod
    def from_env(cls, environ: Mapping[str, str], prefix: str = PREFIX) -> ClientSettings:
        return cls(
            url=environ.get(prefix + "URL") or f"http://{environ.get(prefix + 'API_ADDR', Settings.api_addr)}",
            token=environ.get(prefix + "TOKEN"),
            session_file=Path(environ.get(prefix + "CLIENT_CONFIG", Path.home() / ".config" / "nitroconv" / "session.json")),
        )


def _credentials(environ: Mapping[str, str], prefix: str) -> Credentials | None:
    """`<prefix>USER` and `<prefix>PASSWORD`; either alone is a user with an empty password or the reverse."""
    user, password = environ.get(prefix + "USER"), environ.get(prefix + "PASSWORD")
    if user is None and password is None:
        return None
    return Credentials(user or "", password or "")


def load_or_create_secret(path: Path) -> bytes:
    """Read the key file, creating it (0600, atomically) on first use so every process agrees."""
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(secrets.token_urlsafe(48).encode())
    try:
        # link() fails if another process won the race; then everyone reads the winner's key.
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_bytes().strip()


@functools.cache
def get_settings() -> Settings:
    """Process-wide settings from os.environ, read once on first use (never at import)."""
    return Settings.from_env(os.environ).with_secret()
