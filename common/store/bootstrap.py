"""`python -m common.store.bootstrap`: create the database if missing, migrate to head, ensure the admin."""
from __future__ import annotations

import sys

from common.settings import get_settings
from common.store.accounts import ensure_admin
from common.store.engine import create_database_if_missing, migrate, session_scope


def main() -> int:
    settings = get_settings()
    if create_database_if_missing(settings.database_url):
        print("created database", file=sys.stderr)
    migrate(settings.database_url)
    if not settings.admin_password:
        print("NITROCONV_ADMIN_PASSWORD is not set; no bootstrap admin ensured", file=sys.stderr)
        return 0
    with session_scope(settings.database_url) as session:
        ensure_admin(session, settings.admin_email, settings.admin_password)
    print(f"admin {settings.admin_email} ensured", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
