"""One exception type for bad user input: the CLI prints its one-line message and exits with code 2."""

__all__ = ["UserError", "EXIT_USER_ERROR"]

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A problem with the user's input, stated in one line that names the problem and the fix."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
