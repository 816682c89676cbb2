"""``python -m kvtune``: the CLI, as ``torchrun -m kvtune ...`` starts it on every rank."""

from kvtune.cli import app

app(prog_name="kvtune")
