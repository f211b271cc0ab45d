"""The one exception the worker turns into a refusal."""


class MediaError(ValueError):
    """Input we refuse: the message is the reason, shown to the user (the
    refused item's index travels beside it, in the call's ErrorInfo), so it
    names the problem and never holds a traceback."""
