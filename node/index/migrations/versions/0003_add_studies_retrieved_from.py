"""Add studies.retrieved_from: the query source a prior study was retrieved from.

Revision ID: 0003
Revises: 0002_removed_files
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002_removed_files'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('retrieved_from', sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_column('retrieved_from')
