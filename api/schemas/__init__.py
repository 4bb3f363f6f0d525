"""Marshmallow schemas: the API's request and response contracts (not ORM mirrors)."""
