"""NBD: the sans-I/O protocol core and, on top of it, the asyncio server and client.

The protocol core does no I/O (h11 style, STYLE #11):

* :mod:`~cowbackup.nbd.constants` - every constant of the spec, named as the spec names it;
* :mod:`~cowbackup.nbd.wire` - one ``struct.Struct`` per wire layout;
* :mod:`~cowbackup.nbd.errors` - the error tree;
* :mod:`~cowbackup.nbd.events` - what the cores return from ``next_event()``;
* :mod:`~cowbackup.nbd.server` - :class:`~cowbackup.nbd.server.ServerProtocol`, with
  :mod:`~cowbackup.nbd.exports`, :mod:`~cowbackup.nbd.meta` and :mod:`~cowbackup.nbd.replies`;
* :mod:`~cowbackup.nbd.client` - :class:`~cowbackup.nbd.client.ClientProtocol`.

Nothing is imported here, so importing one module never drags in the others.
"""
