"""``python -m adaprune.cli``."""

from .app import app

app(prog_name="adaprune")
