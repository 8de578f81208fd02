"""patients.address: the patient's address (HL7 PID-11, FHIR Patient.address) as one JSON object

street, other (designation), city, state, postal_code, country, type; NULL when none is known.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-07 05:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0017'
down_revision = '0016'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('patients', sa.Column('address', sa.JSON().with_variant(postgresql.JSONB(astext_type=sa.Text()),
                                                                           'postgresql'), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('patients') as batch:  # SQLite before 3.35 has no DROP COLUMN
        batch.drop_column('address')
