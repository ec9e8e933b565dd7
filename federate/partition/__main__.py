"""python -m federate.partition <cache> [partition=...]: the clients' label distribution (federate/partition/plot.py)."""
from .plot import cli

cli()
