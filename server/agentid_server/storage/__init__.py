"""SQLAlchemy async storage: tables, Alembic migrations, repositories, the group-commit audit writer."""
