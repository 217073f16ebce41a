"""Checkpoint files: reading and writing weights in the layouts the ecosystem uses."""
