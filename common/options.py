"""Converter-option vocabularies shared by the API schema and the conversion pipeline."""
from __future__ import annotations

from common.errors import InvalidOptions

# The seed API's java_mode values. The enclave runs the image's own JVM either way; the mode is recorded
# in the Build and launch.json for the launcher and the operator.
JAVA_MODES = ("JAVA-ORACLE", "OPENJDK", "OPENJ9", "LIBERTY-JRE")


def check_java_mode(value: str | None) -> str | None:
    """`value` when it is None or a known mode; otherwise `InvalidOptions` naming the accepted values."""
    if value is not None and value not in JAVA_MODES:
        raise InvalidOptions(f"java_mode {value!r} is not one of {', '.join(JAVA_MODES)}",
                             details={"field": "java_mode", "allowed": list(JAVA_MODES)})
    return value
