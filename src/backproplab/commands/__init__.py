"""Command groups registered by cli.py (see COMMAND_MODULES there)."""
