"""HTTP API: Flask app factory, blueprints, schemas, auth and the error envelope."""
