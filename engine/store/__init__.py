"""The index: SQLAlchemy 2 models, database set-up and migrations (SQLite WAL or PostgreSQL)."""
