"""What a run produces: frozen records (no torch inside), rules -> findings, JSON schemas."""
