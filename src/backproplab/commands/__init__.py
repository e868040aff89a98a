"""Command groups: every module here is found by cli.py and adds its parsers (register) and handlers (COMMANDS)."""
