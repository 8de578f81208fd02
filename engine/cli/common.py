"""What every `radbridge` subcommand shares: reading the settings and opening the store."""

from __future__ import annotations

import argparse
from pathlib import Path

from sqlalchemy.engine import make_url

from engine.config import Settings, load_settings
from engine.errors import RadBridgeError
from engine.store import migrate
from engine.store.db import Database, open_database


class NoDatabase(RadBridgeError):
    """The configured SQLite database does not exist: only `radbridge run` creates it (a command run
    from the wrong directory would otherwise leave an empty var/ behind and show nothing)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(
            f"no database at {path.absolute()}: the engine creates it when it first starts "
            "(`radbridge run`, or scripts/run from the RadBridge directory); run this command from the "
            "directory the engine runs in, or point --config, RADBRIDGE_STORAGE_DIR or RADBRIDGE_DATABASE_URL "
            "at its store")


def settings_of(args: argparse.Namespace) -> Settings:
    """The settings named by --config (or the default file), with the environment's overrides."""
    return load_settings(Path(args.config) if args.config else None)


def require_database(settings: Settings) -> None:
    """Raise NoDatabase when the configured database is an SQLite file that does not exist yet
    (a server database is the server's to have or not: connecting says so)."""
    url = make_url(settings.database_url)
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:" \
            and not Path(url.database).exists():
        raise NoDatabase(Path(url.database))


def open_db(settings: Settings, *, create: bool = False) -> Database:
    """The configured database, migrated to the current schema. Unless ``create``, an SQLite file
    that does not exist is an error (NoDatabase), not created."""
    if not create:
        require_database(settings)
    db = open_database(settings.database_url, sqlite_synchronous=settings.database.sqlite_synchronous)
    migrate.upgrade(db)
    return db
