"""The row TypedDicts (engine/domain/rows.py and beside their tables) list exactly the columns of their tables, so a column
added to a model without its row type (or a misspelt key in one) fails here, not in production."""

from __future__ import annotations

import pytest

from engine.domain import rows
from engine.reconciliation.queue import QueueRow
from engine.store import models

CASES = [
    (rows.PatientRow, models.Patient),
    (rows.IdentifierRow, models.PatientIdentifier),
    (rows.OrderRow, models.Order),
    (rows.StudyRow, models.Study),
    (rows.SeriesRow, models.Series),
    (rows.InstanceRow, models.Instance),
    (rows.MessageValues, models.Message),
    (QueueRow, models.ReconcileJob),
]


@pytest.mark.parametrize(("row", "model"), CASES, ids=[r.__name__ for r, _m in CASES])
def test_row_type_lists_the_table_columns(row: type, model: type[models.Base]) -> None:
    columns = set(model.__table__.c.keys())
    assert set(row.__annotations__) == columns
