"""Errors that carry their HTTP status and TGI's `error_type`; the Flask app turns them into JSON."""


class ServeError(Exception):
    status = 500
    error_type = "internal"

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class BadRequest(ServeError):
    status, error_type = 400, "bad_request"


class Forbidden(ServeError):
    status, error_type = 403, "forbidden"


class NotFound(ServeError):
    status, error_type = 404, "not_found"


class Conflict(ServeError):
    status, error_type = 409, "conflict"


class NotAcceptable(ServeError):
    status, error_type = 406, "not_acceptable"


class UnsupportedMediaType(ServeError):
    status, error_type = 415, "unsupported_media_type"


class ValidationError(ServeError):
    status, error_type = 422, "validation"


class GenerationError(ServeError):
    status, error_type = 424, "generation"


class NotReady(ServeError):
    status, error_type = 503, "healthcheck"


class Unavailable(ServeError):
    status, error_type = 503, "unavailable"


class Overloaded(ServeError):
    status, error_type = 429, "overloaded"


class ClientGone(Exception):
    """The client closed its connection before its answer was ready: nobody is left to answer."""


def not_finished(timeout: float) -> str:
    """What a request (or a batch line) that ran out of time is told."""
    return f"generation did not finish within {timeout:g} s"
