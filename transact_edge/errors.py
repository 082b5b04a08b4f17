"""One exception family for problems the user can fix; only the CLI turns it into exit status 2."""


class UserError(Exception):
    """Bad input: a message of one line that says what is wrong and what is accepted. Characters that
    would break the line (newlines and other unprintable ones, which names read from a file may hold)
    are shown escaped."""

    def __init__(self, message: str):
        super().__init__("".join(c if c.isprintable() else repr(c)[1:-1] for c in str(message)))
