"""Typed events decoded from the raw records the BPF programs send (layouts come from bpf/events.h)."""
