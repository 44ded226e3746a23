"""Facts about the traced Envoy processes: /proc, sock_diag (their listening sockets), the admin API."""
