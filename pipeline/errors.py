"""The one exception type that means "the user must fix something" (exit code 2)."""


class UserError(Exception):
    """Bad input or config. The message is one line saying what is wrong and how to fix it.

    The entry point catches it, prints ``error: <message>`` to stderr without a traceback and
    exits with code 2. Raise it before anything in an existing run_dir is changed.
    """
