"""HTTP routes, one blueprint per resource: parse with a schema, call one service, dump with a schema."""
