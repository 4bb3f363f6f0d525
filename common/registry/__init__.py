"""Talking to OCI/Docker registries: references, digests, manifests, the client with its auth, retries and host
policy, and the verified local blob cache."""
