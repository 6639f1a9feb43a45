"""``cowbackup daemon``: qemu-storage-daemon's command line, for the options we support.

::

    cowbackup daemon \\
        --blockdev driver=file,node-name=disk,filename=disk.img \\
        --nbd-server addr.type=unix,addr.path=/run/nbd.sock \\
        --export type=nbd,id=exp0,node-name=disk,name=disk,writable=on \\
        --chardev socket,id=mon0,path=/run/qmp.sock,server=on,wait=off --monitor chardev=mon0 \\
        --pidfile /run/cowbackup.pid

Options (each repeatable unless said; each argument a QEMU ``key=value`` list or a JSON object, see
:mod:`cowbackup.cli.keyval`), processed in command-line order as QEMU does:

``--object [qom-type=]tls-creds-x509,id=I,dir=D[,endpoint=client|server][,verify-peer=on|off]``
                                    ``object-add``: x509 credentials for ``tls-creds`` below and for
                                    ``nbd`` nodes (:mod:`cowbackup.block.objects`)
``--blockdev [driver=]D,...``       ``blockdev-add``
``--nbd-server addr.type=unix,addr.path=P`` | ``addr.type=inet,addr.host=H,addr.port=N``
                                    ``nbd-server-start`` (once); ``tls-creds`` the id of an object with
                                    ``endpoint=server`` (or a credentials directory), ``max-connections``
                                    (0: unlimited)
``--export [type=]nbd,id=I,node-name=N[,name=E][,writable=on|off][,description=T]``
                                    ``block-export-add``
``--chardev socket,id=I,path=P,server=on[,wait=on|off]``
                                    a Unix socket for a monitor; ``wait`` is accepted but we never block
                                    for a client; only server mode on a path is supported
``--monitor [chardev=]I[,mode=control]``  a QMP monitor on that socket (mode 0600)
``--pidfile PATH``                  written (mode 0600, locked) once start-up is complete; removed on exit

A bad option is one line on stderr (``cowbackup: --OPTION ARG: message``, QEMU's message where it has one)
and exit status 1; whatever was already set up is torn down first.  SIGTERM, SIGINT or QMP ``quit``: the
jobs are cancelled, the exports and their clients dropped, the nodes flushed and closed, the sockets and
the pidfile removed, and the exit status is 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from cowbackup import __version__
from cowbackup.block.errors import BlockError
from cowbackup.block.options import Options
from cowbackup.cli.errors import EXIT_FAILED, EXIT_OK
from cowbackup.cli.keyval import KeyvalError, parse_option
from cowbackup.daemon import Daemon
from cowbackup.jobs.job import JobError
from cowbackup.qmp.server import QMPServer

log = logging.getLogger(__name__)

#: Options that take an argument, and the implied key of their first parameter (QEMU's).
_OPTIONS: dict[str, str | None] = {
    "blockdev": "driver",
    "chardev": "backend",
    "export": "type",
    "monitor": "chardev",
    "nbd-server": None,
    "object": "qom-type",
    "pidfile": None,
}


class OptionError(Exception):
    """A command-line option that cannot be used; printed as one line, exit status 1."""


# ---------------------------------------------------------------------------------- argument scanning


def add_parser(sub: Any) -> None:
    # QEMU-style options, repeatable and ordered, which argparse cannot express: the subcommand takes every
    # remaining argument as it is ("+" as the prefix means no argument looks like an option to argparse)
    # and scan() below reads them like getopt_long.
    p = sub.add_parser(
        "daemon",
        help="run as qemu-storage-daemon (backup subset): --blockdev, --nbd-server, --export, --monitor",
        description=__doc__,
        add_help=False,
        prefix_chars="+",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("daemon_args", nargs="*", metavar="OPTION")
    p.set_defaults(func=run, daemon_parser=p)


@dataclass
class Invocation:
    """The scanned command line: ``(option, argument)`` pairs in order, and the pidfile."""

    options: list[tuple[str, str]] = field(default_factory=list)
    pidfile: str | None = None
    help: bool = False
    version: bool = False


def scan(argv: Sequence[str]) -> Invocation:
    """Split ``argv`` like getopt_long (``--opt ARG`` or ``--opt=ARG``); OptionError as QEMU words it."""
    inv = Invocation()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if arg in ("-h", "--help"):
            inv.help = True
            continue
        if arg in ("-V", "--version"):
            inv.version = True
            continue
        if not arg.startswith("--"):
            raise OptionError(f"{arg}: Unexpected argument")
        name, eq, value = arg[2:].partition("=")
        if name not in _OPTIONS:
            raise OptionError(f"unrecognized option '--{name}'")
        if not eq:
            if i >= len(argv):
                raise OptionError(f"option '--{name}' requires an argument")
            value = argv[i]
            i += 1
        if name == "pidfile":
            inv.pidfile = value
        else:
            inv.options.append((name, value))
    return inv


# ---------------------------------------------------------------------------------- applying options


@dataclass
class Chardev:
    id: str
    path: str


@dataclass
class DaemonState:
    """What the running daemon holds besides the :class:`Daemon`: character devices and monitors."""

    daemon: Daemon
    stop: asyncio.Event
    chardevs: dict[str, Chardev] = field(default_factory=dict)
    #: The QMP server of every --monitor (None without one) and the task that turns ``quit`` into stop.
    qmp: QMPServer | None = None
    quit_watch: asyncio.Task[None] | None = None


def _max_connections(opts: Options) -> int:
    value = opts.raw("max-connections", 0)
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 32:
        raise BlockError("Parameter 'max-connections' expects uint32_t")
    return value


async def _nbd_server(state: DaemonState, options: dict[str, Any]) -> None:
    opts = Options(options)
    addr = opts.raw("addr")  # its members are checked by nbd_server_start
    tls_creds = opts.get_str("tls-creds", None)
    max_connections = _max_connections(opts)
    opts.finish()
    await state.daemon.nbd_server_start(addr, tls_creds, max_connections)


def _chardev(state: DaemonState, options: dict[str, Any]) -> None:
    opts = Options(options)
    backend = opts.get_str("backend", None)
    chardev_id = opts.get_str("id", None)
    if backend is None:
        raise BlockError("chardev: backend is missing")
    if backend != "socket":
        raise BlockError(f"'{backend}' is not a valid char driver name")
    if chardev_id is None:
        raise BlockError("chardev: no id specified")
    path = opts.get_str("path", None)
    server = opts.get_bool("server", False)
    opts.get_bool("wait", True)  # accepted; we never block start-up waiting for a client
    opts.finish()
    if path is None or not server:
        raise BlockError("only server=on sockets on a path are supported (path=P,server=on)")
    if chardev_id in state.chardevs:
        raise BlockError(f"attempt to add duplicate property '{chardev_id}' to object (type 'container')")
    state.chardevs[chardev_id] = Chardev(chardev_id, os.path.abspath(path))


async def _monitor(state: DaemonState, options: dict[str, Any]) -> None:
    opts = Options(options)
    chardev_id = opts.get_str("chardev")
    if opts.get_enum("mode", ("control", "readline"), "control") != "control":
        raise BlockError("Only QMP is supported")
    pretty = opts.get_bool("pretty", False)
    opts.get_str("id", None)
    opts.finish()
    chardev = state.chardevs.get(chardev_id)
    if chardev is None:
        raise BlockError(f'chardev "{chardev_id}" not found')
    await _start_qmp(state, chardev, pretty=pretty)


async def _start_qmp(state: DaemonState, chardev: Chardev, *, pretty: bool) -> None:
    """Serve QMP on the chardev's socket (mode 0600: the monitor is full control of the daemon).

    All monitors share one QMP server; its ``quit`` stops the daemon as SIGTERM does.
    """
    if pretty:
        raise BlockError("Parameter 'pretty' is not supported")
    if state.qmp is None:
        state.qmp = QMPServer(state.daemon)
        state.quit_watch = asyncio.create_task(_watch_quit(state.qmp, state.stop))
    await state.qmp.listen_unix(chardev.path)


async def _watch_quit(server: QMPServer, stop: asyncio.Event) -> None:
    await server.wait_shutdown()
    stop.set()


async def apply_option(state: DaemonState, name: str, value: str) -> None:
    """Carry out one option; BlockError / JobError / KeyvalError when it cannot be."""
    options = parse_option(value, _OPTIONS[name])
    if name == "blockdev":
        await state.daemon.blockdev_add(options)
    elif name == "nbd-server":
        await _nbd_server(state, options)
    elif name == "object":
        state.daemon.graph.objects.add(options)
    elif name == "export":
        await state.daemon.block_export_add(options)
    elif name == "chardev":
        _chardev(state, options)
    elif name == "monitor":
        await _monitor(state, options)
    else:  # pragma: no cover - scan() lets no other name through
        raise AssertionError(name)


# ---------------------------------------------------------------------------------- pidfile


class PidFile:
    """QEMU's pidfile: mode 0600, locked while we run (a second daemon is refused), removed at exit."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(path)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise OptionError(f"cannot create PID file: Could not create '{path}': {err.strerror}") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as err:
            os.close(fd)
            raise OptionError(
                f"cannot create PID file: Cannot lock pid file '{path}': {err.strerror}"
            ) from None
        self._fd: int | None = fd

    def remove(self) -> None:
        """Unlink and unlock; safe to call twice."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


# ---------------------------------------------------------------------------------- running


def run(args: argparse.Namespace) -> int:
    try:
        inv = scan(args.daemon_args)
    except OptionError as err:
        sys.stderr.write(f"cowbackup: {err}\n")
        return EXIT_FAILED
    if inv.help:
        args.daemon_parser.print_help()
        return EXIT_OK
    if inv.version:
        print(f"cowbackup {__version__}")
        return EXIT_OK
    return asyncio.run(serve(inv))


async def serve(inv: Invocation) -> int:
    """Set up every option in order, write the pidfile, and run until a signal or QMP ``quit``."""
    loop = asyncio.get_running_loop()
    state = DaemonState(Daemon(), asyncio.Event())
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, state.stop.set)
    pidfile: PidFile | None = None
    code = EXIT_OK
    try:
        for name, value in inv.options:
            try:
                await apply_option(state, name, value)
            except (BlockError, JobError, KeyvalError) as err:
                raise OptionError(f"--{name} {value}: {err}") from None
            except OSError as err:
                raise OptionError(f"--{name} {value}: {err.strerror or err}") from None
        if inv.pidfile is not None:
            pidfile = PidFile(inv.pidfile)
        log.info("ready")
        await state.stop.wait()
    except OptionError as err:
        sys.stderr.write(f"cowbackup: {err}\n")
        code = EXIT_FAILED
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await _shutdown(state)
        if pidfile is not None:
            pidfile.remove()
    return code


async def _shutdown(state: DaemonState) -> None:
    """Close the monitors (removing their sockets), then the daemon: NBD server, jobs, nodes."""
    try:
        if state.quit_watch is not None:
            state.quit_watch.cancel()
        if state.qmp is not None:
            await state.qmp.close()
    finally:
        await state.daemon.close()
