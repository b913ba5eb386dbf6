"""CLI commands, one module each; dsv3_export/cli.py registers each in one line."""
