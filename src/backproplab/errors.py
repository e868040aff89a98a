"""The one exception type a user sees: the CLI prints its message on one line, exit 2."""


class UserError(Exception):
    pass
