"""`radbridge demo`: the engine on loopback, fed by a sender, with a readable account.

The whole flow on loopback: ADT and orders over MLLP into the store, a resend recognised as a
duplicate, images in with C-STORE (pynetdicom as the modality) whose patient name is misspelt,
reconciliation coercing it, and the ImagingStudy and ORU^R01 arriving at a stand-in EHR the demo
starts (engine/standin_ehr.py), with where to look in the admin API.
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
from engine.redaction import redact_url

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


def run_demo(keep: bool = False, serve: bool = False) -> int:
    """The scenario; with ``serve``, the engine and the stand-in EHR then stay up (their URLs and the
    token printed) until SIGINT or SIGTERM, and stop cleanly (exit 0 when the scenario went well)."""
    work = Path(tempfile.mkdtemp(prefix="radbridge-demo-"))
    try:
        return asyncio.run(_demo(work, serve=serve))
    finally:
        if keep:
            print(f"\nworking directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


async def _serve(engine: Any, ehr: Any, settings: Settings) -> None:
    """Print where everything listens, then wait for Ctrl-C or SIGTERM."""
    import signal

    from engine.connectors.dicom.channel import DicomConnector
    from engine.connectors.mllp.channel import MllpConnector
    http = f"http://127.0.0.1:{engine.http_port}"
    dicom = engine.connectors_of(DicomConnector)[0].port
    mllp = engine.connector("hl7-inbound", MllpConnector).port
    print(f"""
The demo keeps running until Ctrl-C (or SIGTERM):
  console          {http}/  (log in with the token demo-token)
  admin API        {http}/api/channels, /api/messages, /api/patients?identifier=100001 (Authorization: Bearer demo-token)
  FHIR             {http}/fhir/  (e.g. {http}/fhir/Patient?identifier=100001, same token)
  health, metrics  {http}/health, {http}/metrics
  MLLP inbound     127.0.0.1:{mllp}  (radbridge send hl7 FILE --to 127.0.0.1:{mllp})
  DICOM SCP        {settings.dicom.aet} at 127.0.0.1:{dicom}
  stand-in EHR     FHIR {ehr.fhir_base} (token ehr-token), MLLP results inbox {ehr.mllp_address}
  the CLI on this store: RADBRIDGE_DATABASE_URL={settings.database_url} radbridge messages list""", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    print("radbridge demo: stopping the engine and the stand-in EHR ...", flush=True)


async def _demo(work: Path, *, serve: bool = False) -> int:
    from engine.connectors.mllp.channel import MllpConnector
    from engine.runtime import Engine
    from engine.web.app import build_app
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
    s.dicom.port = 0
    s.dicom.stable_seconds = 2
    s.dicom.fsync = False  # a demo on a laptop; production keeps fsync on
    from engine.standin_ehr import StandInEHR
    ehr = StandInEHR(token="ehr-token").start()
    s.ehr.mllp, s.ehr.fhir_base, s.ehr.fhir_token = ehr.mllp_address, ehr.fhir_base, "ehr-token"
    engine = Engine(s, http_app=build_app)
    try:
        await engine.start()
    except BaseException:
        ehr.stop()
        raise
    try:
        port = engine.connector("hl7-inbound", MllpConnector).port
        print(f"RadBridge demo: engine on 127.0.0.1, MLLP port {port}, HTTP port {engine.http_port}, "
              f"store {redact_url(s.database_url)}\n")

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
        ok = await _images_and_results(engine, ehr, work, base)
        if serve:
            await _serve(engine, ehr, s)
        else:
            print(f"\nWhere to look next: {base}/channels, {base}/deliveries, /metrics; `radbridge messages list`, "
                  "`radbridge studies list`, `radbridge deliveries list` (token: demo-token). These URLs stop "
                  "with the demo: `radbridge demo --serve` keeps the engine and the stand-in EHR up.")
        return 0 if ok else 1
    finally:
        await engine.stop()
        ehr.stop()


async def _images_and_results(engine: Any, ehr: Any, work: Path, base: str) -> bool:
    """C-STORE two CT images for ACC2002 with the patient's name misspelt, then wait (bounded) for the
    study to become stable, be reconciled and reach the stand-in EHR."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid
    from pynetdicom import AE

    from engine.connectors.dicom.channel import DicomConnector
    port = engine.connectors_of(DicomConnector)[0].port
    study_uid, series_uid = generate_uid(), generate_uid()

    def send_images() -> list[int]:
        ae = AE(ae_title="DEMO_CT")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2")
        assoc = ae.associate("127.0.0.1", port, ae_title=engine.settings.dicom.aet)
        if not assoc.is_established:
            return []
        statuses = []
        try:
            for n in (1, 2):
                ds = pydicom.dcmread(str(get_testdata_file("CT_small.dcm")))
                ds.PatientID, ds.PatientName, ds.PatientBirthDate, ds.PatientSex = "200002", "MULLER^ZOE", "19800101", "F"
                ds.AccessionNumber, ds.StudyInstanceUID, ds.SeriesInstanceUID = "ACC2002", study_uid, series_uid
                ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
                ds.InstanceNumber = n
                status = assoc.send_c_store(ds)
                statuses.append(int(getattr(status, "Status", 0xFFFF)))
        finally:
            assoc.release()
        return statuses
    print("\n5. A CT modality (pynetdicom) sends two images for ACC2002 with the name typed as MULLER^ZOE")
    statuses = await asyncio.to_thread(send_images)
    print(f"     C-STORE statuses: {', '.join(f'0x{x:04X}' for x in statuses) or 'association refused'}")
    print(f"     waiting for the study to be stable ({engine.settings.dicom.stable_seconds:g} s without new "
          "images), reconciled and delivered ...")

    def delivered() -> bool:
        found = ehr.find("ImagingStudy", "urn:dicom:uid", f"urn:oid:{study_uid}")
        return bool(found) and any(study_uid in m for m in ehr.oru_messages())
    ok = await asyncio.to_thread(ehr.wait_for, delivered, 30.0)
    st = (await asyncio.to_thread(_get, f"{base}/studies?study_uid={study_uid}", "demo-token"))["studies"]
    if st:
        rec = st[0].get("reconciliation", {})
        print(f"\n6. GET /api/studies?study_uid=...: state {rec.get('state')}, matched by {rec.get('matched_by')}; "
              f"name in the stored headers now {st[0].get('patient', {}).get('name') or st[0].get('patient_name')}")
    if not ok:
        print("\n   The EHR did not receive the study within 30 s: see `radbridge deliveries list`.")
        return False
    [res] = ehr.find("ImagingStudy", "urn:dicom:uid", f"urn:oid:{study_uid}")
    oru = next(m for m in ehr.oru_messages() if study_uid in m)
    print(f"\n7. The stand-in EHR (FHIR at {ehr.fhir_base}, MLLP at {ehr.mllp_address}) received:")
    print(f"     ImagingStudy/{res['id']}: {res['status']}, {res['numberOfSeries']} series, "
          f"{res['numberOfInstances']} instances, subject {res['subject'].get('reference') or res['subject'].get('identifier')}, "
          f"accession {next((i['value'] for i in res['identifier'] if i.get('type')), '-')}")
    print("     ORU^R01:")
    for segment in oru.split("\r"):
        print(f"       {segment[:110]}")
    return True
