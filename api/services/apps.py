"""App use cases: create, read, list, update, delete, always within the caller's account."""
from __future__ import annotations

import uuid
from collections.abc import Mapping

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from common.errors import Conflict, NotFound
from common.models import App


def _settings_json(value: object) -> dict[str, object]:
    if not isinstance(value, Mapping):
        return {}
    return {k: (_settings_json(v) if isinstance(v, Mapping) else v) for k, v in value.items() if v is not None}


def create(session: Session, account_id: uuid.UUID, body: Mapping[str, object]) -> App:
    app = App(id=uuid.uuid4(), account_id=account_id, name=body["name"], description=body.get("description") or "",
              input_image_name=body.get("input_image_name"), output_image_name=body.get("output_image_name"),
              default_build_settings=_settings_json(body.get("default_build_settings")),
              auto_approve=bool(body.get("auto_approve")))
    session.add(app)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Conflict("an app with this name already exists in the account", code="app_exists") from None
    return app


def get(session: Session, account_id: uuid.UUID, app_id: uuid.UUID) -> App:
    app = session.execute(select(App).where(App.id == app_id, App.account_id == account_id)).scalar_one_or_none()
    if app is None:
        raise NotFound("no such app")
    return app


def list_apps(session: Session, account_id: uuid.UUID, q: Mapping[str, object]) -> tuple[list[App], int, int]:
    filters = [App.account_id == account_id]
    total = session.execute(select(func.count()).select_from(App).where(*filters)).scalar_one()
    if q.get("name"):
        filters.append(App.name == q["name"])
    filtered = session.execute(select(func.count()).select_from(App).where(*filters)).scalar_one()
    apps = session.execute(select(App).where(*filters).order_by(App.created_at, App.id)
                           .limit(int(q["limit"])).offset(int(q["offset"]))).scalars().all()  # type: ignore[call-overload]
    return list(apps), total, filtered


def update(session: Session, account_id: uuid.UUID, app_id: uuid.UUID, body: Mapping[str, object]) -> App:
    app = get(session, account_id, app_id)
    for key in ("name", "description", "input_image_name", "output_image_name", "auto_approve"):
        if key in body:
            setattr(app, key, body[key] if key != "description" else (body[key] or ""))
    if "default_build_settings" in body:
        app.default_build_settings = _settings_json(body["default_build_settings"])
    app.updated_at = func.now()
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Conflict("an app with this name already exists in the account", code="app_exists") from None
    session.refresh(app)
    return app


def delete(session: Session, account_id: uuid.UUID, app_id: uuid.UUID) -> None:
    session.delete(get(session, account_id, app_id))
    session.commit()
