"""Loading and attaching the bcc programs of bpf/ (the only package that imports bcc)."""
