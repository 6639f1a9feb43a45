"""QMP, QEMU's monitor protocol: the sans-I/O stream splitter, the asyncio server, and the commands."""
