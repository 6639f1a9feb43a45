"""Filter nodes: one ``file`` child, data never changed (see :class:`cowbackup.block.node.FilterNode`).

* :mod:`~cowbackup.block.filters.cbw` -- ``copy-before-write``: saves old data to the backup target
  before a write reaches the source.
* :mod:`~cowbackup.block.filters.fault` -- ``fault-inject``: fails or stalls scripted requests, for tests.
"""
