"""One exception family for problems the user can fix; only the CLI turns it into exit status 2."""


class UserError(Exception):
    """Bad input: a message of one line that says what is wrong and what is accepted."""
