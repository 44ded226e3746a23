"""Facts about the traced Envoy processes: /proc, the ELF binary, the admin API."""
