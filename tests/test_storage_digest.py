"""A received file is read once when small: its digest and header come from those bytes."""

from __future__ import annotations

import io
from pathlib import Path

from engine.connectors.dicom.scp import READ_WHOLE_BYTES, read_small
from engine.dicom.headers import read_header
from engine.storage.base import digest_bytes
from engine.storage.local import LocalStorage
from tests.dicomutil import make_instance


def test_small_files_are_read_whole_and_larger_ones_are_not(tmp_path: Path) -> None:
    exact, over = tmp_path / "exact", tmp_path / "over"
    exact.write_bytes(b"x" * READ_WHOLE_BYTES)
    over.write_bytes(b"x" * (READ_WHOLE_BYTES + 1))
    assert read_small(exact) == b"x" * READ_WHOLE_BYTES
    assert read_small(over) is None
    assert read_small(tmp_path / "gone") is None  # then read where it was before, and fails there


def test_digest_and_header_from_the_bytes_are_those_from_the_file(tmp_path: Path) -> None:
    obj = make_instance(tmp_path / "in" / "ct.dcm")
    data = read_small(obj.path)
    assert data is not None
    assert digest_bytes(data) == LocalStorage(tmp_path / "store").digest(obj.path)
    kwargs = {"command_sop_class": None, "command_sop_instance": obj.sop_uid, "transfer_syntax": None}
    assert read_header(io.BytesIO(data), **kwargs) == read_header(obj.path, **kwargs)
