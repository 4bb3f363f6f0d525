"""App use cases: create, read, list, update, delete, always within the caller's account."""
from __future__ import annotations

import uuid
from collections.abc import Mapping

from sqlalchemy import func, or_, select, true
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from api.schemas.common import group_ids
from common.errors import Conflict, NotFound, ValidationFailed
from common.store.models import App


def _settings_json(value: object) -> dict[str, object]:
    if not isinstance(value, Mapping):
        return {}
    return {k: (_settings_json(v) if isinstance(v, Mapping) else v) for k, v in value.items() if v is not None}


_CCM_FIELDS = ("isvprodid", "isvsvn", "mem_size", "threads", "allowed_domains", "advanced_settings",
               "certificate_policy", "signers", "group_id")


def _patched(current: Mapping[str, str], change: object) -> dict[str, str]:
    """A labels map after `change`: a map replaces it; CCM's PatchRequest adds, replaces or removes keys."""
    if isinstance(change, Mapping):
        return dict(change)
    result = dict(current)
    for op in change:  # type: ignore[attr-defined]
        key = str(op["path"])[1:]
        if not key:  # "/" with an object: each of its keys
            result.update({str(k): str(v) for k, v in op["value"].items()})
            continue
        if op["op"] == "remove":
            if key not in result:
                raise ValidationFailed("The request is invalid.", details={"fields": {"path": [f"no label {key}"]}})
            del result[key]
        else:
            result[key] = str(op["value"])
    return result


def create(session: Session, account_id: uuid.UUID, body: Mapping[str, object]) -> App:
    app = App(id=uuid.uuid4(), account_id=account_id, name=body["name"], description=body.get("description") or "",
              input_image_name=body.get("input_image_name"), output_image_name=body.get("output_image_name"),
              default_build_settings=_settings_json(body.get("default_build_settings")),
              auto_approve=bool(body.get("auto_approve")), labels=dict(body.get("labels") or {}),  # type: ignore[call-overload]
              custom_metadata=dict(body.get("custom_metadata") or {}),  # type: ignore[call-overload]
              **{key: body[key] for key in _CCM_FIELDS if key in body})
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
    if q.get("description"):
        filters.append(App.description == q["description"])
    if q.get("filter"):
        filters.append(App.group_id.in_(group_ids(str(q["filter"]))))
    if q.get("all_search"):
        needle = "%" + str(q["all_search"]).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        filters.append(or_(App.name.ilike(needle, escape="\\"), App.description.ilike(needle, escape="\\")))
    filtered = session.execute(select(func.count()).select_from(App).where(*filters)).scalar_one()
    columns = {"created_at": App.created_at, "updated_at": App.updated_at, "name": App.name}
    order = [columns[k].desc() if d == "DESC" else columns[k].asc()
             for k, _, d in (part.partition(":") for part in str(q.get("sort_by") or "created_at:ASC").split(","))]
    apps = session.execute(select(App).where(*filters).order_by(*order, App.id)
                           .limit(int(q["limit"])).offset(int(q["offset"]))).scalars().all()  # type: ignore[call-overload]
    return list(apps), total, filtered


def update(session: Session, account_id: uuid.UUID, app_id: uuid.UUID, body: Mapping[str, object]) -> App:
    app = get(session, account_id, app_id)
    for key in ("name", "description", "input_image_name", "output_image_name", "auto_approve"):
        if key in body:
            setattr(app, key, body[key] if key != "description" else (body[key] or ""))
    if "default_build_settings" in body:
        app.default_build_settings = _settings_json(body["default_build_settings"])
    for key in _CCM_FIELDS:
        if key in body:
            setattr(app, key, body[key])
    for key in ("labels", "custom_metadata"):
        if key in body:
            setattr(app, key, _patched(getattr(app, key), body[key]))
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


def label_counts(session: Session, account_id: uuid.UUID) -> list[dict[str, object]]:
    label = func.jsonb_each_text(App.labels).table_valued("key", "value").render_derived()
    rows = session.execute(select(label.c.key, label.c.value, func.count()).select_from(App).join(label, true())
                           .where(App.account_id == account_id).group_by(label.c.key, label.c.value)
                           .order_by(label.c.key, label.c.value)).all()
    return [{"key": k, "value": v, "count": n} for k, v, n in rows]
