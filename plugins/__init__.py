"""Example plugins for mms.py: pass one with --plugin plugins.NAME."""
