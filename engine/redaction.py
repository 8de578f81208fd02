"""Keeping secrets out of what the engine prints: URLs with their passwords masked, and a log filter
that masks every configured secret in case one reaches a log line anyway (an exception's text, a
driver's message). The sources are fixed where they are known; the filter is the second line."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
SECRET_QUERY_KEYS = frozenset({"token", "access_token", "api_key", "apikey", "key", "password", "secret", "sig",
                               "signature", "client_secret"})
MIN_SCRUBBED_LENGTH = 6  # shorter "secrets" would mask ordinary words in every line


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


class SecretScrubber(logging.Filter):
    """Masks the given secrets in each record's message and exception text (installed on handlers)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if len(s) >= MIN_SCRUBBED_LENGTH}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        if any(s in message for s in self.secrets):
            record.msg, record.args = scrub(message, self.secrets), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text and any(s in record.exc_text for s in self.secrets):
            record.exc_text = scrub(record.exc_text, self.secrets)
        return True


def scrub_logs(secrets: Iterable[str], logger: logging.Logger | None = None) -> None:
    """Install a SecretScrubber on every handler of ``logger`` (the root logger by default)."""
    scrubber = SecretScrubber(secrets)
    for handler in (logger or logging.getLogger()).handlers:
        handler.addFilter(scrubber)
