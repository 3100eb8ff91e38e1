"""Storage: the NVMe block store, atomic file writes, host-memory probes."""
