"""SQLAlchemy async storage: tables, migrations, repositories, the group-commit audit writer."""
