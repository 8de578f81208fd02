"""messages: whole MSH-10 / MSH-3 / MSH-4, and a content digest for duplicate detection

Duplicate detection compared the first 64 characters of MSH-10 (v2.7+ allows 199), so two distinct
messages sharing them were re-ACKed as duplicates and dropped. The columns now hold the whole
values, and content_digest (Message.content_digest(): the message without MSH-7) tells a resend
from a reused control ID. Rows from before have no digest and keep matching as before.

Revision ID: 0013
Revises: 0010
Create Date: 2026-12-07 02:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0013'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.alter_column('control_id', existing_type=sa.String(64), type_=sa.String(199))
        batch_op.alter_column('sending_app', existing_type=sa.String(64), type_=sa.String(227))
        batch_op.alter_column('sending_facility', existing_type=sa.String(64), type_=sa.String(227))
        batch_op.add_column(sa.Column('content_digest', sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('messages', schema=None) as batch_op:
        batch_op.drop_column('content_digest')
        batch_op.alter_column('sending_facility', existing_type=sa.String(227), type_=sa.String(64))
        batch_op.alter_column('sending_app', existing_type=sa.String(227), type_=sa.String(64))
        batch_op.alter_column('control_id', existing_type=sa.String(199), type_=sa.String(64))
