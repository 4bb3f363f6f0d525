"""SQLAlchemy models: accounts, users, apps, builds, tasks and the build event history."""
from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


def _uuid_pk() -> Mapped[uuid.UUID]:
    return mapped_column(UUID(as_uuid=True), primary_key=True, default=uuid.uuid4)


def _created() -> Mapped[datetime]:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class Account(Base):
    __tablename__ = "accounts"
    id: Mapped[uuid.UUID] = _uuid_pk()
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    created_at: Mapped[datetime] = _created()
    # CCM's Account fields (migration 0008), recorded and returned.
    node_enrollment: Mapped[dict[str, object]] = mapped_column(
        JSONB, nullable=False, server_default=text("'{\"attestation_enforcement_disabled_insecure\": false}'::jsonb"))
    component: Mapped[str] = mapped_column(String(32), nullable=False, server_default=text("'DEFAULT'"))
    custom_logo: Mapped[str | None] = mapped_column(Text)
    # Migration 0009: recorded and returned; this service has no groups or Azure CVMs to apply them to.
    default_group_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    marketplace_group_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    azure_cvm_pcr_priority: Mapped[list[int] | None] = mapped_column(JSONB)
    # Migration 0011: CCM's account_status (Active / Deactivated); a deactivated account keeps its data.
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("true"))


class User(Base):
    __tablename__ = "users"
    id: Mapped[uuid.UUID] = _uuid_pk()
    email: Mapped[str] = mapped_column(String(320), nullable=False, unique=True)  # stored lower-cased
    password_hash: Mapped[str] = mapped_column(String(255), nullable=False)
    created_at: Mapped[datetime] = _created()
    first_name: Mapped[str | None] = mapped_column(String(255))  # migration 0009
    last_name: Mapped[str | None] = mapped_column(String(255))


class Membership(Base):
    """A user's role in an account (READER, WRITER, MANAGER)."""

    __tablename__ = "memberships"
    user_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("users.id", ondelete="CASCADE"), primary_key=True)
    account_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("accounts.id", ondelete="CASCADE"), primary_key=True)
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    created_at: Mapped[datetime] = _created()
    # Migration 0011: CCM's user_account_status DISABLED, for this account only.
    disabled: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))


class Session(Base):
    """A signed-in session (CCM's): the bearer token carries only its id (migration 0007)."""

    __tablename__ = "sessions"
    id: Mapped[uuid.UUID] = _uuid_pk()
    user_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("users.id", ondelete="CASCADE"), nullable=False, index=True)
    account_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("accounts.id", ondelete="SET NULL"), nullable=True)
    created_at: Mapped[datetime] = _created()
    token_expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False, index=True)


class App(Base):
    __tablename__ = "apps"
    __table_args__ = (UniqueConstraint("account_id", "name", name="uq_apps_account_name"),)
    id: Mapped[uuid.UUID] = _uuid_pk()
    account_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False, index=True)
    name: Mapped[str] = mapped_column(String(255), nullable=False)
    description: Mapped[str] = mapped_column(Text, nullable=False, default="")
    input_image_name: Mapped[str | None] = mapped_column(Text)
    output_image_name: Mapped[str | None] = mapped_column(Text)
    default_build_settings: Mapped[dict[str, object]] = mapped_column(JSONB, nullable=False, default=dict)
    auto_approve: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now())
    # CCM's App fields (migration 0008), recorded and returned; builds size themselves from default_build_settings.
    isvprodid: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    isvsvn: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    mem_size: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("2048"))
    threads: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("2"))
    allowed_domains: Mapped[list[str]] = mapped_column(JSONB, nullable=False, server_default=text("'[]'::jsonb"))
    labels: Mapped[dict[str, str]] = mapped_column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    custom_metadata: Mapped[dict[str, str]] = mapped_column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    advanced_settings: Mapped[dict[str, object]] = mapped_column(JSONB, nullable=False,
                                                                 server_default=text("'{}'::jsonb"))
    # Migration 0009: recorded and returned (no certificates are issued here, and there are no groups).
    certificate_policy: Mapped[dict[str, object] | None] = mapped_column(JSONB)
    signers: Mapped[list[dict[str, object]]] = mapped_column(JSONB, nullable=False, server_default=text("'[]'::jsonb"))
    group_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))


class Build(Base):
    """One conversion request and its record. Status columns are written only by `common.store.builds`."""

    __tablename__ = "builds"
    __table_args__ = (
        UniqueConstraint("account_id", "idempotency_key", name="uq_builds_account_idempotency_key"),
        Index("ix_builds_account_created", "account_id", "created_at"),
        Index("ix_builds_conversion_state", "conversion_state"),
        Index("ix_builds_account_claimed", "account_id", "claimed_at"),
        Index("ix_builds_unfinished", "account_id", "conversion_state", "created_at",
              postgresql_where=text("conversion_state IN ('QUEUED', 'PULLING', 'BUILDING', 'MEASURING', 'PUSHING')")),
        Index("ix_builds_configs", "configs", postgresql_using="gin"),
        Index("ix_builds_queued_request", "app_id", "request_fingerprint",
              postgresql_where=text("conversion_state = 'QUEUED' AND waits_for IS NULL")),
        Index("ix_builds_waits_for", "waits_for", postgresql_where=text("waits_for IS NOT NULL")),
    )
    id: Mapped[uuid.UUID] = _uuid_pk()
    account_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False)
    app_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("apps.id", ondelete="CASCADE"), nullable=False, index=True)
    created_by: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_fingerprint: Mapped[str] = mapped_column(String(64), nullable=False)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now())

    # request
    input_image_name: Mapped[str] = mapped_column(Text, nullable=False)
    output_image_name: Mapped[str] = mapped_column(Text, nullable=False)
    input_username: Mapped[str | None] = mapped_column(Text)
    output_username: Mapped[str | None] = mapped_column(Text)
    input_credentials: Mapped[bytes | None] = mapped_column(LargeBinary)  # sealed, see common.store.sealing
    output_credentials: Mapped[bytes | None] = mapped_column(LargeBinary)
    converter_options: Mapped[dict[str, object]] = mapped_column(JSONB, nullable=False)
    cpu_count: Mapped[int] = mapped_column(Integer, nullable=False)
    # NULL while the worker has yet to size an omitted mem_size from the EIF (migration 0003).
    mem_size: Mapped[int | None] = mapped_column(BigInteger)
    enable_overlay_filesystem_persistence: Mapped[bool] = mapped_column(Boolean, nullable=False)

    # approval machine
    approval_status: Mapped[str] = mapped_column(String(16), nullable=False)
    approval_updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now())
    approval_reason: Mapped[str | None] = mapped_column(Text)
    pending_task_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))

    # conversion machine
    conversion_state: Mapped[str] = mapped_column(String(16), nullable=False)
    progress: Mapped[float] = mapped_column(Float, nullable=False, default=0.0)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    lease_owner: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    # The identical, not yet claimed build this one waits to be served by (migration 0012); it has no broker message.
    waits_for: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    # A requeued conversion's retry backoff, and when a worker last claimed it (fair claim, migration 0005).
    not_before: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    claimed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    # results
    input_digest: Mapped[str | None] = mapped_column(String(80))
    output_digest: Mapped[str | None] = mapped_column(String(80))
    output_size: Mapped[int | None] = mapped_column(BigInteger)
    eif_size: Mapped[int | None] = mapped_column(BigInteger)
    eif_sha256: Mapped[str | None] = mapped_column(String(64))
    pcr0: Mapped[str | None] = mapped_column(String(96))
    pcr1: Mapped[str | None] = mapped_column(String(96))
    pcr2: Mapped[str | None] = mapped_column(String(96))
    pcr8: Mapped[str | None] = mapped_column(String(96))
    exposed_ports: Mapped[list[list[object]]] = mapped_column(JSONB, nullable=False, default=list)
    warnings: Mapped[list[str]] = mapped_column(JSONB, nullable=False, default=list)
    docker_version: Mapped[str | None] = mapped_column(String(64))
    # The QEMU boot check's result (`BootResult.to_json()`), when the deployment runs it.
    boot_check: Mapped[dict[str, object] | None] = mapped_column(JSONB)
    # The earlier conversion this one reused (worker.pipeline.reuse); NULL when converted afresh (migration 0004).
    reused_from: Mapped[str | None] = mapped_column(String(200))
    # CCM's application configs attached to the build, by config id (migration 0009).
    configs: Mapped[dict[str, object]] = mapped_column(JSONB, nullable=False, server_default=text("'{}'::jsonb"))
    # The network policy the EIF was built with (common.enclave.network.resolve); null until it succeeded.
    network: Mapped[dict[str, object] | None] = mapped_column(JSONB)


class Task(Base):
    """A BUILD_WHITELIST approval task."""

    __tablename__ = "tasks"
    __table_args__ = (Index("ix_tasks_account_created", "account_id", "created_at"),)
    id: Mapped[uuid.UUID] = _uuid_pk()
    account_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("accounts.id", ondelete="CASCADE"), nullable=False)
    build_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("builds.id", ondelete="CASCADE"), nullable=False, unique=True)
    type: Mapped[str] = mapped_column(String(32), nullable=False, default="BUILD_WHITELIST")
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    requester_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    approver_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    approved_by_system: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    denial_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = _created()
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now())


class BuildEvent(Base):
    """One row per status transition of a build or its task: who, from, to, when, why."""

    __tablename__ = "build_events"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    build_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("builds.id", ondelete="CASCADE"), nullable=False, index=True)
    machine: Mapped[str] = mapped_column(String(16), nullable=False)  # conversion | approval | task
    from_state: Mapped[str] = mapped_column(String(16), nullable=False)
    to_state: Mapped[str] = mapped_column(String(16), nullable=False)
    actor: Mapped[str] = mapped_column(String(80), nullable=False)
    reason: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = _created()
