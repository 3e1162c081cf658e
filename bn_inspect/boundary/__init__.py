"""The one boundary untrusted files cross: one opener with its run manifest, one writer policy."""
