"""The pieces of scripts/bench: common set-up (common.py) and one module per group of rows."""
