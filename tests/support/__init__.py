"""Test helpers shared by the unit and integration tests (e.g. a real OTLP receiver)."""

__all__: list[str] = []
