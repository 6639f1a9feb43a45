"""The composition root: one event loop owning the block graph, the jobs and (later) the servers.

Everything a daemon session touches hangs off one :class:`Daemon`; the one-shot CLI runs an in-process
daemon through the same calls a QMP client makes, so both paths exercise the same engine.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from cowbackup.block.drivers import open_node
from cowbackup.block.graph import BlockGraph
from cowbackup.block.node import BlockNode
from cowbackup.jobs.backup import BackupJob, BackupParams, backup_job_create
from cowbackup.jobs.job import JobManager, JobTxn

log = logging.getLogger(__name__)


class Daemon:
    """Graph + jobs.  Create it inside a running event loop; call :meth:`close` to shut it down."""

    def __init__(self) -> None:
        self.graph = BlockGraph()
        self.jobs = JobManager()

    async def blockdev_add(self, options: Mapping[str, Any]) -> BlockNode:
        """``blockdev-add``: open a node (and its inline children) and add it to the graph."""
        return await open_node(self.graph, options)

    async def blockdev_del(self, node_name: str) -> None:
        await self.graph.remove(node_name)

    def blockdev_backup(self, params: BackupParams, txn: JobTxn | None = None) -> BackupJob:
        """``blockdev-backup``: validate, take the snapshot and start the job."""
        job = backup_job_create(self.graph, self.jobs, params, txn)
        job.start()
        return job

    async def close(self) -> None:
        """Cancel every job, then flush and close every node."""
        await self.jobs.cancel_all()
        await self.graph.close_all()
