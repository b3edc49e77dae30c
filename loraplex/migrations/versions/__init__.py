"""Alembic revisions, one branch per component."""
