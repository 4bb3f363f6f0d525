"""Small helpers with no domain: whole-file writes, a bounded memo, exact reads, hashing off-thread."""
