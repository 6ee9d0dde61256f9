"""Which failures a retry can fix, and which ones it cannot.

Orchestrators (the Prefect tasks in ``flows/``) retry a failed stage after a pause. That
helps with a flaky host or a worker that died; it only delays the message when the machine
is offline, a gated repository refuses the request, a file is not there, or the input is
wrong. :func:`is_permanent` tells the two apart, so such errors fail at once and the run's
final message is the error's own (which says what to do).

The error types that several stages raise live here too, at the bottom of the package: every
module may import this one, and it imports no other module of ``pipeline``.
"""

from __future__ import annotations

from storage_schema.writer import StoreError

#: HTTP statuses that mean "ask again later" (timeouts, rate limits, server errors).
TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
#: HTTP statuses that mean "this request will never succeed as it is" (auth, gated, gone).
PERMANENT_STATUS = frozenset({400, 401, 403, 404, 410})


class PermanentError(Exception):
    """A failure that retrying the same call cannot fix; the message says what to change."""


class SourceError(PermanentError, ValueError):
    """A source that cannot be resolved or read (bad path, no url/caption column, ...)."""


class SourceUnavailableError(SourceError):
    """The source needs the internet (or a local metadata copy) and neither is available."""


class SourceAccessError(SourceError):
    """The host refused (401/403/404): a gated or private repo, a missing token, a wrong name. Not transient."""


class DownloadError(PermanentError, RuntimeError):
    """A download that cannot start or finish as asked; the message says why and what to do.

    Permanent: each cause (wrong or changed url list, every url failed, too many failed)
    needs a person to look; retrying the same call at once would fail the same way.
    """


class EncoderLoadError(PermanentError, RuntimeError):
    """An encoder name/folder could not be resolved or its weights could not be loaded."""


def http_status(exc: BaseException) -> int | None:
    """The HTTP status an exception carries (urllib's ``code``, requests/httpx's ``response.status_code``)."""
    code = getattr(exc, "code", None)
    if isinstance(code, int) and 100 <= code < 600:
        return code
    code = getattr(getattr(exc, "response", None), "status_code", None)
    return code if isinstance(code, int) else None


def _chain(exc: BaseException) -> list[BaseException]:
    # __context__ even under `raise ... from None`: that hides the cause from tracebacks, but a
    # wrapped hub/HTTP error is still what tells a 503 (retry) from a 403 (don't).
    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and all(e is not s for s in seen):
        seen.append(e)
        e = e.__cause__ or e.__context__
    return seen


def _is_timeout(exc: BaseException) -> bool:
    # TimeoutError (socket, urllib) or an HTTP client's own (httpx.ReadTimeout, requests' ConnectTimeout, ...).
    return isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__


# PermanentError's subclasses: SourceError (a bad path or columns, or metadata that needs a network
# the machine lacks), DownloadError, EncoderLoadError (weights not there or refused), the stages' own.
# StoreError (a missing or damaged store) comes from storage_schema, which cannot know this module.
_PERMANENT_TYPES = (PermanentError, StoreError)


def is_permanent(exc: BaseException) -> bool:
    """True when retrying cannot help: a permanent error type or a 4xx status, and no transient cause.

    The whole cause chain is read: a metadata fetch that ended in HTTP 503 or a socket
    timeout is transient even when it surfaces as a SourceError; an HTTP 401/403/404 is
    permanent whatever wraps it.
    """
    chain = _chain(exc)
    statuses = [s for e in chain if (s := http_status(e)) is not None]
    if any(s in TRANSIENT_STATUS for s in statuses):
        return False
    if any(s in PERMANENT_STATUS for s in statuses):
        return True
    if any(_is_timeout(e) for e in chain[1:]):
        return False  # a timeout underneath a wrapper: the host may answer next time
    return isinstance(exc, _PERMANENT_TYPES)
