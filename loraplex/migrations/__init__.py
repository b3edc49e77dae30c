"""Alembic migrations of loraplex's database (see README.md here)."""
