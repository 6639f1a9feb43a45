"""cowbackup: live, point-in-time backups of block devices that are being written to.

The package follows QEMU's layering: ``block`` (nodes, drivers, filters, dirty bitmaps, the copy engine),
``jobs`` (the job state machine and the backup job), ``cli`` (the ``cowbackup`` command) and ``daemon``
(the composition root that owns the event loop's state).
"""

__version__ = "0.1.0"
