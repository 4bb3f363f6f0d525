"""The conversion engine and the service's shared core, one package per domain (imports go one way, setup.cfg):
store (Postgres records) > settings > enclave (EIF) | queue > image | registry > util. No Flask, no api or worker code."""
