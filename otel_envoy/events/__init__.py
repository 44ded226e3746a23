"""Typed events decoded from the raw records the BPF programs send (layouts come from bpf/events.h), and
recordings of those records with their user-space context."""
