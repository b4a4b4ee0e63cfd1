"""PostgreSQL access: the asyncio bridge, migrations, queries and notifications."""
