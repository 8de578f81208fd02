"""The connector types this engine knows, by the name channel files give under ``connector: type``.

Adding a connector type is one module with a ``Connector`` subclass and one line here."""

from __future__ import annotations

from collections.abc import Mapping

from engine.channels import ConnectorSpec
from engine.connectors.base import Connector
from engine.connectors.dicom.channel import DicomConnector
from engine.connectors.dicom_forward import ForwardConnector
from engine.connectors.fhir import FhirConnector
from engine.connectors.file import FileConnector
from engine.connectors.mllp.channel import MllpConnector
from engine.connectors.outbound import OutboundConnector

CONNECTOR_TYPES: dict[str, type[Connector]] = {}


def register(cls: type[Connector]) -> type[Connector]:
    name = cls.spec.name
    if name in CONNECTOR_TYPES and CONNECTOR_TYPES[name] is not cls:
        raise ValueError(f"connector type {name!r} is already registered by {CONNECTOR_TYPES[name].__name__}")
    CONNECTOR_TYPES[name] = cls
    return cls


for _cls in (MllpConnector, DicomConnector, FhirConnector, OutboundConnector, FileConnector, ForwardConnector):
    register(_cls)


def connector_specs() -> Mapping[str, ConnectorSpec]:
    """What the channel parser needs of every registered type."""
    return {name: cls.spec for name, cls in CONNECTOR_TYPES.items()}
