"""Which calling AE titles a DICOM channel accepts, and from which addresses.

``allowed_calling_aets`` lists titles; ``calling_ae_hosts`` ties titles to the addresses or networks
they may call from. A title must pass both where both are set. An association that does not is
refused with A-ASSOCIATE-RJ (rejected permanent, service user, "calling AE title not recognized"):
the peer learns no more than that, the log says why.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from engine.channels import DicomOptions

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped  # an IPv4 peer on a dual-stack socket
    return address


@dataclass(frozen=True)
class CallingPeers:
    allowed_titles: frozenset[str]  # empty: any title (as far as this list goes)
    hosts: dict[str, tuple[Network, ...]]  # empty: any address

    @classmethod
    def of(cls, opts: DicomOptions) -> CallingPeers:
        return cls(frozenset(t.strip() for t in opts.allowed_calling_aets),
                   {title.strip(): tuple(ipaddress.ip_network(a, strict=False) for a in addresses)
                    for title, addresses in opts.calling_ae_hosts.items()})

    @property
    def restricted(self) -> bool:
        return bool(self.allowed_titles or self.hosts)

    def refusal(self, calling_aet: str, address: str) -> str | None:
        """Why an association from ``calling_aet`` at ``address`` is refused; None: it is not."""
        title = calling_aet.strip()
        if self.allowed_titles and title not in self.allowed_titles:
            return "not listed in allowed_calling_aets"
        if not self.hosts:
            return None
        networks = self.hosts.get(title)
        if networks is None:
            return "not listed in calling_ae_hosts"
        peer = _address(address)
        if peer is None or not any(peer in n for n in networks):
            return f"address {address} is not allowed for {title} in calling_ae_hosts"
        return None
