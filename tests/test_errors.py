"""pipeline.errors: which failures a retry can fix."""

import io
import urllib.error

import pytest

from pipeline.errors import (
    DownloadError,
    EncoderLoadError,
    PermanentError,
    SourceAccessError,
    SourceError,
    SourceUnavailableError,
    is_permanent,
)
from storage_schema.writer import StoreError


def _http_error(code: int) -> urllib.error.HTTPError:
    return urllib.error.HTTPError("https://example.invalid/x", code, "status", {}, io.BytesIO())


def _wrapped(outer: type[Exception], inner: BaseException, hide: bool = False) -> Exception:
    """outer raised while handling inner, as the stages raise their own errors (`from err` or `from None`)."""
    try:
        try:
            raise inner
        except BaseException as err:
            if hide:
                raise outer("wrapped") from None
            raise outer("wrapped") from err
    except Exception as e:  # noqa: BLE001 - returned for the assertion
        return e


@pytest.mark.parametrize("hide", [False, True])
def test_http_status_under_a_wrapper_decides(hide):
    for code in (401, 403, 404):
        assert is_permanent(_wrapped(SourceUnavailableError, _http_error(code), hide)), code
    for code in (429, 500, 503):
        assert not is_permanent(_wrapped(SourceUnavailableError, _http_error(code), hide)), code
    # Even a generic wrapper: a 403 stays a 403.
    assert is_permanent(_wrapped(RuntimeError, _http_error(403), hide))


def test_types_and_timeouts():
    assert is_permanent(SourceUnavailableError("ECLIPSE_OFFLINE is set"))  # no network: raised with no cause
    assert is_permanent(SourceAccessError("gated")) and is_permanent(SourceError("no url column"))
    assert is_permanent(StoreError("no such store directory")) and is_permanent(EncoderLoadError("no weights"))
    assert is_permanent(DownloadError("different url list")) and is_permanent(PermanentError("x"))
    assert not is_permanent(_wrapped(SourceUnavailableError, TimeoutError("read timed out")))
    assert not is_permanent(RuntimeError("worker died")) and not is_permanent(OSError("disk hiccup"))
