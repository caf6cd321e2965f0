"""Running compiled models: sessions, image spans, parity checks."""
