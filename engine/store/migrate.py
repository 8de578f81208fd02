"""Schema migrations with Alembic, run by the engine at start and by `radbridge check`."""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from engine.store.db import Database

_HERE = Path(__file__).parent
log = logging.getLogger(__name__)


def alembic_config() -> Config:
    cfg = Config(str(_HERE / "alembic.ini"))
    cfg.set_main_option("script_location", str(_HERE / "migrations"))
    return cfg


def upgrade(db: Database, revision: str = "head") -> None:
    """Migrate to ``revision``; one INFO line when the schema changed (Alembic's own lines, one per
    step, are INFO on the "alembic" logger, which `radbridge run` shows only with --verbose)."""
    cfg = alembic_config()
    with db.writer.begin() as conn:
        before = MigrationContext.configure(conn).get_current_revision()
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
        after = MigrationContext.configure(conn).get_current_revision()
    if before is None and after is not None:
        log.info("database schema created (revision %s)", after)
    elif after != before:
        log.info("database schema upgraded from revision %s to %s", before, after)


def current_revision(db: Database) -> str | None:
    with db.reader.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()
