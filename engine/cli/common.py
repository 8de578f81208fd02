"""What every `radbridge` subcommand shares: reading the settings and opening the store."""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.config import Settings, load_settings
from engine.store import migrate
from engine.store.db import Database, open_database


def settings_of(args: argparse.Namespace) -> Settings:
    """The settings named by --config (or the default file), with the environment's overrides."""
    return load_settings(Path(args.config) if args.config else None)


def open_db(settings: Settings) -> Database:
    """The configured database, migrated to the current schema."""
    db = open_database(settings.database_url)
    migrate.upgrade(db)
    return db
