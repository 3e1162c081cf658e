"""Trained sample models that ship with bn-inspect."""
