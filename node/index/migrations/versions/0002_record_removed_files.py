"""Record when retention removed an instance's or an SR's file from the store.

Revision ID: 0002_removed_files
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002_removed_files'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('removed_at', sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table('structured_reports', schema=None) as batch_op:
        batch_op.add_column(sa.Column('removed_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('structured_reports', schema=None) as batch_op:
        batch_op.drop_column('removed_at')
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_column('removed_at')
