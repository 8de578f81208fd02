"""index the columns that refer to messages

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23 13:10:08.501913
"""
from __future__ import annotations

from alembic import op
from sqlalchemy import Text  # noqa: F401 - autogenerate renders JSONB(astext_type=Text())

import engine.store.types  # noqa: F401 - UTCDateTime columns

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_messages_duplicate_of'), ['duplicate_of'], unique=False)

    with op.batch_alter_table('order_status_history', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_order_status_history_message_id'), ['message_id'], unique=False)

    with op.batch_alter_table('patient_history', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_patient_history_message_id'), ['message_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('patient_history', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_patient_history_message_id'))

    with op.batch_alter_table('order_status_history', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_order_status_history_message_id'))

    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_messages_duplicate_of'))

