"""What the configuration exposes to other hosts, checked at start and by ``radbridge check``.

- ``[http] auth = "none"`` on a bind address other hosts can reach is an error: the engine does not
  start (anyone on the network could read and change patient data).
- A listener other hosts can reach without TLS is a warning, one per listener (HTTP, and each
  enabled channel with a port of its own): messages and patient data cross the network readable.

Loopback is 127.0.0.0/8, ::1 (and ::ffff:127.x.x.x) and the name ``localhost``; anything else,
including 0.0.0.0, :: and the empty address (every interface) and any other host name, is reachable.
"""

from __future__ import annotations

import ipaddress

from engine.channels import Channel
from engine.config import HTTPSettings, Settings
from engine.connectors.base import ListeningConnector
from engine.connectors.registry import CONNECTOR_TYPES
from engine.yamlfile import ConfigProblem


def is_loopback(host: str) -> bool:
    """True when only this machine can reach ``host`` (a bind address)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False  # a host name other than localhost (or "": every interface)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def listener_has_tls(listener_settings: Channel | HTTPSettings) -> bool:
    """Whether a listener (a channel with a port of its own, or the HTTP server) speaks TLS: its
    ``tls:`` block (a channel) or ``[http.tls]`` with a certificate."""
    if isinstance(listener_settings, HTTPSettings):
        return listener_settings.tls.enabled
    return listener_settings.tls is not None


def exposure_problems(settings: Settings, channels: list[Channel]) -> list[ConfigProblem]:
    """The refusal of auth "none" off loopback, and a warning per plain-text listener off loopback."""
    if is_loopback(settings.bind):
        return []
    problems: list[ConfigProblem] = []
    bind_file, bind_line, bind_field = settings.origin("bind")
    bind_said = f"bind {settings.bind or '(every interface)'}"
    if bind_field != "bind":
        bind_said += f" ({bind_field})"
    elif bind_line:
        bind_said += f" ({bind_file}:{bind_line})"
    if settings.http.auth == "none":
        problems.append(settings.problem(
            "http.auth", f'"none" on {bind_said}, which other hosts can reach: anyone on the network could read '
            'and change patient data. Use auth = "token", or bind to 127.0.0.1 (loopback) for local use'))
    plain = "without TLS: messages and patient data cross the network readable by anyone on the way"
    if not listener_has_tls(settings.http):
        problems.append(settings.problem(
            "bind", f"HTTP (/api/, /fhir/, /metrics, console) listens on {settings.bind or 'every interface'} "
            f"{plain}", severity="warning"))
    for ch in channels:
        if ch.enabled and issubclass(CONNECTOR_TYPES[ch.connector], ListeningConnector) \
                and not listener_has_tls(ch):
            problems.append(ConfigProblem(
                ch.file, ch.connector_line, "connector",
                f"channel {ch.name} listens on {bind_said} {plain}", severity="warning"))
    return problems
