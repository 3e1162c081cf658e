"""Report -> text: rich rendering and one formatter per machine-readable format."""
