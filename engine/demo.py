"""`radbridge demo`: the engine on loopback, fed by a sender, with a readable account.

Today it shows the inbound HL7 half: ADT and orders over MLLP into the store, a merge, a resend
that is recognised as a duplicate, and what the admin API answers. The DICOM, reconciliation and
EHR-delivery steps join it as those parts land.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

from engine.config import Settings
from engine.connectors.mllp.client import MLLPClient

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "tests" / "samples"
STEPS = [
    ("adt_a01.hl7", "ADT^A01 registers John Smith (MRN 100001, GENHOSP) with an SSN and an enterprise ID"),
    ("orm_o01.hl7", "ORM^O01 NW orders a chest X-ray, accession ACC1001"),
    ("omi_o23.hl7", "OMI^O23 orders a CT for Zoë Müller (UTF-8), who has no ADT yet"),
    ("adt_a08.hl7", "ADT^A08 changes John's family name and clears his phone"),
    ("adt_a08.hl7", "the same A08 again, as a sender does when an ACK is late"),
    ("orm_o01_cancel.hl7", "ORM^O01 CA cancels the chest X-ray"),
]


def _get(url: str, token: str) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback URL we built
        return json.loads(resp.read())


def run_demo(keep: bool = False) -> int:
    work = Path(tempfile.mkdtemp(prefix="radbridge-demo-"))
    try:
        return asyncio.run(_demo(work))
    finally:
        if keep:
            print(f"\nworking directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


async def _demo(work: Path) -> int:
    from engine.runtime import Engine
    if not (REPO / "channels").is_dir() or not SAMPLES.is_dir():
        print("radbridge demo needs the repository checkout (channels/, mappings/, tests/samples/)")
        return 1
    s = Settings()
    s.storage.dir = str(work / "var")
    s.channels_dir, s.mappings_dir = str(REPO / "channels"), str(REPO / "mappings")
    s.mllp.port = 0
    s.http.port = 0
    s.http.tokens = ["demo-token"]
    s.retention.enabled = False
    engine = Engine(s)
    await engine.start()
    try:
        port = engine.listeners["hl7-inbound"].server.port
        print(f"RadBridge demo: engine on 127.0.0.1, MLLP port {port}, HTTP port {engine.http_port}, "
              f"store {s.database_url}\n")

        def send_all() -> None:
            with MLLPClient("127.0.0.1", port) as client:
                for name, what in STEPS:
                    reply = client.send((SAMPLES / name).read_bytes()).decode("utf-8", "replace")
                    msa = next(seg for seg in reply.split("\r") if seg.startswith("MSA"))
                    print(f"  -> {what}\n     ACK: {msa}")
        print("1. A sender on loopback sends six messages over MLLP:")
        await asyncio.to_thread(send_all)

        base = f"http://127.0.0.1:{engine.http_port}/api"

        def show() -> None:
            p = _get(f"{base}/patients?identifier=100001", "demo-token")["patients"][0]
            print(f"\n2. GET /api/patients?identifier=100001\n     {p['name']['family']}, {p['name']['given']}; "
                  f"born {p['birth_date']}; identifiers: "
                  + ", ".join(f"{i['value']}^{i['issuer']} ({i['type']})" for i in p["identifiers"]))
            o = _get(f"{base}/orders?accession=ACC1001", "demo-token")["orders"][0]
            print(f"\n3. GET /api/orders?accession=ACC1001\n     {o['procedure']['text']}: status {o['status']}; "
                  "history: " + " -> ".join(f"{h['control']}:{h['to']}" for h in o["history"]))
            z = _get(f"{base}/orders?accession=ACC2002", "demo-token")["orders"][0]
            print(f"     ACC2002 {z['modality']} at station {z['station_aet']}, scheduled {z['scheduled_at']}")
            msgs = _get(f"{base}/messages?limit=10", "demo-token")["messages"]
            print("\n4. GET /api/messages (newest first)")
            for m in msgs:
                print(f"     #{m['id']} {m['type']:8} {m['control_id']:8} {m['status']:10} ACK {m['ack_code']}")
        await asyncio.to_thread(show)
        print("\nWhere to look next: /api/channels, /metrics, `radbridge messages list`. "
              "(DICOM, reconciliation and delivery to the EHR are not in this demo yet.)")
    finally:
        await engine.stop()
    return 0
