"""Create the index tables: patients, studies, series, instances, jobs, SRs, outbox, audit.

Revision ID: 0001
Revises: (none)
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('audit_events',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('occurred_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('entity', sa.String(length=16), nullable=False),
    sa.Column('entity_id', sa.Integer(), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('from_state', sa.String(length=24), nullable=False),
    sa.Column('to_state', sa.String(length=24), nullable=False),
    sa.Column('actor', sa.String(length=128), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_audit_events_study_instance_uid'), ['study_instance_uid'], unique=False)

    op.create_table('patients',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=False),
    sa.Column('issuer_of_patient_id', sa.String(length=64), nullable=False),
    sa.Column('patient_hash', sa.String(length=16), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('patient_id', 'issuer_of_patient_id')
    )
    op.create_table('studies',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('patient_fk', sa.Integer(), nullable=False),
    sa.Column('patient_name', sa.String(length=324), nullable=False),
    sa.Column('study_date', sa.String(length=8), nullable=False),
    sa.Column('study_time', sa.String(length=16), nullable=False),
    sa.Column('accession_number', sa.String(length=16), nullable=False),
    sa.Column('study_description', sa.String(length=64), nullable=False),
    sa.Column('state', sa.Enum('receiving', 'queued', 'running', 'reported', 'sent', 'skipped', 'failed', name='studystate', native_enum=False, length=24), nullable=False),
    sa.Column('state_reason', sa.Text(), nullable=False),
    sa.Column('stable_deadline', sa.DateTime(timezone=True), nullable=True),
    sa.Column('first_received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_received_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('instance_count', sa.Integer(), nullable=False),
    sa.Column('frontal_sop_instance_uid', sa.String(length=64), nullable=True),
    sa.Column('frontal_reason', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['patient_fk'], ['patients.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('study_instance_uid')
    )
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_studies_patient_fk'), ['patient_fk'], unique=False)
        batch_op.create_index('ix_studies_state_deadline', ['state', 'stable_deadline'], unique=False)

    op.create_table('report_jobs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('study_fk', sa.Integer(), nullable=False),
    sa.Column('state', sa.Enum('queued', 'running', 'done', 'failed', name='jobstate', native_enum=False, length=24), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('lease_owner', sa.String(length=128), nullable=False),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('error', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['study_fk'], ['studies.id'], ),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('report_jobs', schema=None) as batch_op:
        batch_op.create_index('ix_report_jobs_state', ['state', 'lease_expires_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_report_jobs_study_fk'), ['study_fk'], unique=False)

    op.create_table('series',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('study_fk', sa.Integer(), nullable=False),
    sa.Column('modality', sa.String(length=16), nullable=False),
    sa.Column('body_part_examined', sa.String(length=64), nullable=False),
    sa.Column('series_description', sa.String(length=64), nullable=False),
    sa.Column('series_number', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['study_fk'], ['studies.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('series_instance_uid')
    )
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_series_study_fk'), ['study_fk'], unique=False)

    op.create_table('instances',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('series_fk', sa.Integer(), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('transfer_syntax_uid', sa.String(length=64), nullable=False),
    sa.Column('instance_number', sa.Integer(), nullable=True),
    sa.Column('view_position', sa.String(length=16), nullable=False),
    sa.Column('view_code_meaning', sa.String(length=64), nullable=False),
    sa.Column('view_code_value', sa.String(length=16), nullable=False),
    sa.Column('image_laterality', sa.String(length=4), nullable=False),
    sa.Column('image_comments', sa.Text(), nullable=False),
    sa.Column('file_path', sa.String(length=255), nullable=False),
    sa.Column('file_size', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('calling_ae_title', sa.String(length=16), nullable=False),
    sa.Column('received_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['series_fk'], ['series.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sop_instance_uid')
    )
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_instances_series_fk'), ['series_fk'], unique=False)

    op.create_table('structured_reports',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_class_uid', sa.String(length=64), nullable=False),
    sa.Column('study_fk', sa.Integer(), nullable=False),
    sa.Column('job_fk', sa.Integer(), nullable=False),
    sa.Column('sr_class', sa.String(length=24), nullable=False),
    sa.Column('prior_study_instance_uid', sa.String(length=64), nullable=True),
    sa.Column('predecessor_sop_instance_uid', sa.String(length=64), nullable=True),
    sa.Column('file_path', sa.String(length=255), nullable=False),
    sa.Column('model_name', sa.String(length=128), nullable=False),
    sa.Column('checkpoint_sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['job_fk'], ['report_jobs.id'], ),
    sa.ForeignKeyConstraint(['study_fk'], ['studies.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('sop_instance_uid')
    )
    with op.batch_alter_table('structured_reports', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_structured_reports_job_fk'), ['job_fk'], unique=False)
        batch_op.create_index(batch_op.f('ix_structured_reports_study_fk'), ['study_fk'], unique=False)

    op.create_table('outbox',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('structured_report_fk', sa.Integer(), nullable=False),
    sa.Column('destination', sa.String(length=64), nullable=False),
    sa.Column('state', sa.Enum('pending', 'sending', 'sent', 'failed', name='outboxstate', native_enum=False, length=24), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('lease_owner', sa.String(length=128), nullable=False),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_status', sa.Integer(), nullable=True),
    sa.Column('last_error', sa.Text(), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['structured_report_fk'], ['structured_reports.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('structured_report_fk', 'destination')
    )
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.create_index('ix_outbox_state_next', ['state', 'next_attempt_at'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('outbox', schema=None) as batch_op:
        batch_op.drop_index('ix_outbox_state_next')

    op.drop_table('outbox')
    with op.batch_alter_table('structured_reports', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_structured_reports_study_fk'))
        batch_op.drop_index(batch_op.f('ix_structured_reports_job_fk'))

    op.drop_table('structured_reports')
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_instances_series_fk'))

    op.drop_table('instances')
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_series_study_fk'))

    op.drop_table('series')
    with op.batch_alter_table('report_jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_report_jobs_study_fk'))
        batch_op.drop_index('ix_report_jobs_state')

    op.drop_table('report_jobs')
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_index('ix_studies_state_deadline')
        batch_op.drop_index(batch_op.f('ix_studies_patient_fk'))

    op.drop_table('studies')
    op.drop_table('patients')
    with op.batch_alter_table('audit_events', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_audit_events_study_instance_uid'))

    op.drop_table('audit_events')
