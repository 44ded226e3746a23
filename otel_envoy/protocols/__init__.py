"""Passive parsers for the protocols seen on Envoy's connections (TLS handshake observation)."""
