"""Database layer: settings, engine and pool, `get_db_session()`, embedded PostgreSQL, models, migrations."""
