"""Keeping secrets out of what the engine prints: URLs with their passwords masked, and a log filter
that masks every configured secret in case one reaches a log line anyway (an exception's text, a
driver's message). The sources are fixed where they are known; the filter is the second line."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
SECRET_QUERY_KEYS = frozenset({"token", "access_token", "api_key", "apikey", "key", "password", "secret", "sig",
                               "signature", "client_secret"})
MIN_SCRUBBED_LENGTH = 6  # shorter "secrets" would mask ordinary words in every line
# PostgreSQL's DETAIL line of an error quotes the row: "Key (value, issuer)=(MRN1, GENHOSP) already
# exists", "Failing row contains (...)": patient data in a log line unless log_patient_details is on
ROW_DETAIL = re.compile(r"^(DETAIL:\s*).+$", re.MULTILINE)
ROW_DETAIL_HIDDEN = r"\1(the row's values are hidden: log_patient_details = false)"


def redact_url(url: str) -> str:
    """``url`` as it may be shown: a password in it, and query values such as token=, become ***."""
    if not url:
        return url
    try:
        parts = urlsplit(url)
        userinfo, at, hostport = parts.netloc.rpartition("@")
    except ValueError:
        return "(a URL that cannot be parsed)"
    netloc = parts.netloc
    if at and ":" in userinfo:
        netloc = f"{userinfo.split(':', 1)[0]}:{MASK}@{hostport}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(k.lower() in SECRET_QUERY_KEYS for k, _v in pairs):
            query = urlencode([(k, MASK if k.lower() in SECRET_QUERY_KEYS else v) for k, v in pairs], safe="*|:/")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def scrub(text: str, secrets: Iterable[str]) -> str:
    for secret in secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    return text


class LogScrubber(logging.Filter):
    """Masks the given secrets in each record's message and exception text, and with ``hide_rows``
    the row values a database error quotes (installed on handlers)."""

    def __init__(self, secrets: Iterable[str], *, hide_rows: bool = True) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if len(s) >= MIN_SCRUBBED_LENGTH}, key=len, reverse=True)
        self.hide_rows = hide_rows

    def _clean(self, text: str) -> str:
        text = scrub(text, self.secrets)
        return ROW_DETAIL.sub(ROW_DETAIL_HIDDEN, text) if self.hide_rows and "DETAIL:" in text else text

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = self._clean(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self._clean(record.exc_text)
        return True


def scrub_logs(secrets: Iterable[str], logger: logging.Logger | None = None, *, hide_rows: bool = True) -> None:
    """Install a LogScrubber on every handler of ``logger`` (the root logger by default)."""
    scrubber = LogScrubber(secrets, hide_rows=hide_rows)
    for handler in (logger or logging.getLogger()).handlers:
        handler.addFilter(scrubber)
