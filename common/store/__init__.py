"""The service's records in Postgres: engine and migrations, models, builds, accounts, passwords, status machines,
sealed registry credentials, and the bootstrap (`python -m common.store.bootstrap`)."""
