"""The row TypedDicts (engine/domain/rows.py and beside their tables) list exactly the columns of their tables, so a column
added to a model without its row type (or a misspelt key in one) fails here, not in production."""

from __future__ import annotations

import pytest

from engine.domain import rows
from engine.outbound import context
from engine.outbound.mapping import CONTEXT_FIELDS, ITEM_FIELDS
from engine.outbound.outbox import DeliveryValues
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
    (DeliveryValues, models.Delivery),
]


@pytest.mark.parametrize(("row", "model"), CASES, ids=[r.__name__ for r, _m in CASES])
def test_row_type_lists_the_table_columns(row: type, model: type[models.Base]) -> None:
    columns = set(model.__table__.c.keys())
    assert set(row.__annotations__) == columns


CONTEXT_TYPES = {"study": context.StudyContext, "patient": context.PatientContext, "order": context.OrderContext,
                 "event": context.EventContext, "report": context.ReportContext, "engine": context.EngineContext,
                 "delivery": context.DeliveryContext}
ITEM_TYPES = {"study.series": context.SeriesContext, "instances": context.InstanceContext,
              "report.lines": context.ReportLine, "patient.identifiers": context.IdentifierContext}


def test_render_context_types_list_the_paths_mappings_may_read() -> None:
    """The outbound context's TypedDicts and the paths `radbridge check` accepts are the same."""
    assert set(context.RenderContext.__annotations__) == set(CONTEXT_FIELDS)
    for name, typ in CONTEXT_TYPES.items():
        assert set(typ.__annotations__) == set(CONTEXT_FIELDS[name]), name
    for name, typ in ITEM_TYPES.items():
        assert set(typ.__annotations__) == set(ITEM_FIELDS[name]), name
