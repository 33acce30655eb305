"""The client's X-Request-ID beside the server's request id in the prediction log.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Rows logged before this revision carried the client's id (when it sent one) as their
    # request_id; they stay as they are.
    op.add_column("prediction_log", sa.Column("client_request_id", sa.String(64)))


def downgrade() -> None:
    with op.batch_alter_table("prediction_log") as batch:
        batch.drop_column("client_request_id")
