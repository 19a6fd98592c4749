"""The QMP server: QEMU's monitor protocol over a unix or TCP socket, driven by asyncio.

Theory of operation. ``QMPServer.start()`` binds the listening socket (so errors surface in the
caller) and runs an asyncio loop in a daemon thread. Each client gets a ``_Session``:

* a *reader* task feeds bytes to the sans-IO ``QMPDecoder`` (``codec.py``). Out-of-band
  requests (``exec-oob``, once the client enabled the ``oob`` capability) are dispatched at once;
  everything else, parse errors included, goes through a small per-client queue so replies keep
  request order. A full queue stops the reader, which is the back-pressure QEMU applies too.
* a *dispatcher* task takes requests off that queue and runs them one at a time under a lock
  shared by every client: in-band commands are serialised across the whole server, as in QEMU's
  monitor. Plain-function handlers run in a worker thread so a slow command never blocks the
  loop (events and OOB commands keep flowing); coroutine handlers run on the loop.

Output is never awaited per client: replies and events are written into the transport, and a
client whose unread output passes ``OUTPUT_LIMIT`` is dropped, so a stuck or vanished client never
blocks the server or the others. A client that has not negotiated capabilities within
``NEGOTIATION_TIMEOUT`` is dropped, and when every slot is taken a new client takes the slot of
the oldest one still negotiating: connections that never negotiate cannot lock management out.

A TCP listener on an address other than loopback needs TLS (``tls``) unless ``insecure`` is
set: a QMP client controls the machine (``migrate exec:`` runs a shell command). Events go to every client that finished capabilities
negotiation. ``close()`` is idempotent, flushes what it can, and removes the unix socket file.

A handler that must act only after its reply went out (``quit``) calls ``call_after_reply(fn)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import itertools
import json
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from enum import Enum
from typing import Any, Final

from livemig import __version__, threads
from livemig.errors import LivemigError, UsageError
from livemig.qmp.codec import (
    MAX_MESSAGE_SIZE,
    NEED_DATA,
    Message,
    Overflow,
    ParseFailure,
    QMPDecoder,
    encode_message,
)
from livemig.qmp.commands import Command, CommandRegistry, QMPError

logger = logging.getLogger(__name__)

#: The QEMU whose monitor livemig's is: its greeting and query-version say so (QEMU 10.0.2,
#: Debian's bookworm-backports build, the reference of docs/qmp-conformance.md).
QEMU_VERSION = (10, 0, 2)
#: Requests one client may have queued before we stop reading from it (QEMU: 8).
REQUEST_QUEUE_LEN = 8
#: Unread output per client beyond which the client is considered stuck and dropped.
OUTPUT_LIMIT = 8 << 20
#: Default number of simultaneous clients.
MAX_CLIENTS = 16
LISTEN_BACKLOG = 100  # asyncio's own default
TLS_HANDSHAKE_TIMEOUT = 10.0  # a client that stalls its TLS handshake is dropped
#: Seconds a client may take to send qmp_capabilities before it is dropped (QEMU has no limit;
#: sixteen idle connections then locked every other client out).
NEGOTIATION_TIMEOUT = 10.0
#: How long close() waits for clients' output to drain and the loop thread to stop.
CLOSE_TIMEOUT = 2.0

_MISSING = object()
_after_reply: contextvars.ContextVar[list[Callable[[], Any]] | None] = contextvars.ContextVar(
    "livemig_qmp_after_reply", default=None
)


def call_after_reply(fn: Callable[[], Any]) -> None:
    """From inside a command handler: run ``fn`` (in its own thread) once the reply is sent."""
    pending = _after_reply.get()
    if pending is None:
        raise LivemigError("call_after_reply() used outside a QMP command handler")
    pending.append(fn)


def is_loopback(host: str) -> bool:
    """Whether a listening address is reachable from this host only."""
    import ipaddress

    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def check_exposure(address: str, tls: bool, insecure: bool = False) -> None:
    """Refuse a QMP TCP listener beyond loopback without TLS, unless told it is meant."""
    kind, where = parse_qmp_address(address)
    if kind == "tcp" and not tls and not insecure and not is_loopback(where[0]):
        raise UsageError(
            f"QMP on {address} would let anyone who reaches {where[0]} control this machine "
            "(migrate exec: runs a shell command) with no authentication: listen on loopback, "
            "give TLS credentials (--tls-creds), or accept the risk with --qmp-insecure"
        )


def parse_qmp_address(uri: str) -> tuple[str, Any]:
    """Parse ``unix:PATH`` or ``tcp:HOST:PORT`` into ``("unix", path)`` / ``("tcp", (h, p))``."""
    kind, sep, rest = uri.partition(":")
    if not sep or not rest:
        raise UsageError(f"QMP address {uri!r}: expected unix:PATH or tcp:HOST:PORT")
    if kind == "unix":
        return "unix", rest
    if kind == "tcp":
        host, sep, port_text = rest.rpartition(":")
        if not sep or not port_text.isdigit() or int(port_text) > 65535:
            raise UsageError(f"QMP address {uri!r}: expected tcp:HOST:PORT with a numeric port")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        return "tcp", (host or "127.0.0.1", int(port_text))
    raise UsageError(f"QMP address {uri!r}: unknown scheme {kind!r} (use unix: or tcp:)")


class SessionState(Enum):
    """A client connection's life, with QMP's two protocol modes."""

    NEGOTIATING = "capabilities-negotiation"
    COMMAND = "command-mode"
    CLOSING = "closing"


# Ends a session's dispatcher. Not None: a client's JSON ``null`` is a request too (QEMU:
# "QMP input must be a JSON object"), and as None it stopped every later reply.
_STOP: Final = object()


class _ParseErrorRequest:
    """A queued parse failure, so its error reply keeps its place among the replies."""

    def __init__(self, desc: str) -> None:
        self.desc = desc


class _Session:
    """One connected client."""

    def __init__(
        self,
        server: QMPServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        number: int,
    ) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        self.number = number
        self.state = SessionState.NEGOTIATING
        self.oob = False
        self.log = logger.getChild(f"client{number}")
        self.queue: asyncio.Queue[Any] = asyncio.Queue(REQUEST_QUEUE_LEN)
        self.oob_tasks: set[asyncio.Task[None]] = set()
        self.decoder = QMPDecoder(server.max_message_size)

    # --- output ---------------------------------------------------------------------------------

    def send(self, obj: Any) -> None:
        """Queue one message to the client without ever waiting on it."""
        self.send_bytes(encode_message(obj))

    def send_bytes(self, data: bytes) -> None:
        if self.state is SessionState.CLOSING or self.writer.is_closing():
            return
        self.writer.write(data)
        backlog = self.writer.transport.get_write_buffer_size()
        if backlog > OUTPUT_LIMIT:
            self.log.warning("client does not read its output (%d bytes queued): dropping", backlog)
            self.abort()

    def abort(self) -> None:
        self.state = SessionState.CLOSING
        self.writer.transport.abort()

    # --- tasks ----------------------------------------------------------------------------------

    async def run(self) -> None:
        self.send(self.server.greeting())
        dispatcher = asyncio.create_task(self._dispatch_loop())
        loop = asyncio.get_running_loop()
        deadline = loop.call_later(self.server.negotiation_timeout, self._negotiation_expired)
        try:
            await self._read_loop()
        except (ConnectionError, OSError) as exc:
            self.log.info("connection lost: %s", exc)
        finally:
            deadline.cancel()
            # Let the command being run finish (commands are never cut in half), then stop.
            if not dispatcher.done():
                self._put_nowait_stop(dispatcher)
            try:
                await dispatcher
            except asyncio.CancelledError:
                pass
            for task in list(self.oob_tasks):
                task.cancel()
            await self._close_transport()

    def _negotiation_expired(self) -> None:
        if self.state is SessionState.NEGOTIATING:
            self.drop(f"no qmp_capabilities within {self.server.negotiation_timeout:g} s")

    def drop(self, why: str) -> None:
        """Say why, then close: a client that kept a slot without negotiating."""
        self.log.warning("dropping client: %s", why)
        self.send({"error": {"class": "GenericError", "desc": f"connection closed: {why}"}})
        self.state = SessionState.CLOSING
        self.writer.close()

    def _put_nowait_stop(self, dispatcher: asyncio.Task[None]) -> None:
        try:
            self.queue.put_nowait(_STOP)
        except asyncio.QueueFull:
            # The client is gone: requests it left queued need not run.
            dispatcher.cancel()

    async def _close_transport(self) -> None:
        self.state = SessionState.CLOSING
        if not self.writer.is_closing():
            self.writer.close()
        try:
            await asyncio.wait_for(self.writer.wait_closed(), CLOSE_TIMEOUT)
        except (TimeoutError, ConnectionError, OSError):
            self.writer.transport.abort()
        self.log.debug("closed")

    async def _read_loop(self) -> None:
        while self.state is not SessionState.CLOSING:
            data = await self.reader.read(65536)
            self.decoder.receive_data(data)
            while (event := self.decoder.next_event()) is not NEED_DATA:
                if isinstance(event, Message):
                    await self._accept(event.value)
                elif isinstance(event, ParseFailure):
                    self.log.info("malformed input at offset %d: %s", event.offset, event.desc)
                    await self.queue.put(_ParseErrorRequest(event.desc))
                elif isinstance(event, Overflow):
                    self.log.warning("%s (at offset %d)", event.desc, event.offset)
                    self.send({"error": {"class": "GenericError", "desc": event.desc}})
                    return
                else:  # END
                    return

    async def _accept(self, request: Any) -> None:
        if self.oob and isinstance(request, dict) and "exec-oob" in request:
            task = asyncio.create_task(self._execute_and_reply(request, oob=True))
            self.oob_tasks.add(task)
            task.add_done_callback(self.oob_tasks.discard)
        else:
            await self.queue.put(request)

    async def _dispatch_loop(self) -> None:
        while True:
            request = await self.queue.get()
            if request is _STOP:
                return
            async with self.server.command_lock:
                await self._execute_and_reply(request, oob=False)

    async def _execute_and_reply(self, request: Any, oob: bool) -> None:
        after: list[Callable[[], Any]] = []
        reply = await self._execute(request, oob, after)
        if reply is not None:
            try:
                data = encode_message(reply)
            except (TypeError, ValueError) as exc:
                self.log.error("reply is not JSON-serialisable: %s", exc)
                err = QMPError("GenericError", f"internal error: reply not serialisable: {exc}")
                fixed = {"error": err.to_qmp()}
                if "id" in reply:
                    fixed["id"] = reply["id"]
                try:
                    data = encode_message(fixed)
                except (TypeError, ValueError):
                    # the id itself: an error the client can read beats a dispatcher that died
                    # here, after which the session never replied again
                    del fixed["id"]
                    data = encode_message(fixed)
            self.send_bytes(data)
        if after:
            await self._drain_quietly()
            threads.Thread(target=_run_all, args=(after,), daemon=True).start()

    async def _drain_quietly(self) -> None:
        try:
            await asyncio.wait_for(self.writer.drain(), CLOSE_TIMEOUT)
        except (TimeoutError, ConnectionError, OSError):
            pass

    # --- one request ----------------------------------------------------------------------------

    async def _execute(
        self, request: Any, oob: bool, after: list[Callable[[], Any]]
    ) -> dict[str, Any] | None:
        if isinstance(request, _ParseErrorRequest):
            return {"error": {"class": "GenericError", "desc": request.desc}}
        if not isinstance(request, dict):
            return {"error": {"class": "GenericError", "desc": "QMP input must be a JSON object"}}
        req_id = request.get("id", _MISSING)
        try:
            result = await self._run_command(request, oob, after)
            reply: dict[str, Any] = {"return": {} if result is None else result}
        except QMPError as exc:
            reply = {"error": exc.to_qmp()}
        if req_id is not _MISSING:
            reply["id"] = req_id
        return reply

    async def _run_command(
        self, request: dict[str, Any], oob: bool, after: list[Callable[[], Any]]
    ) -> Any:
        name = self._check_request(request)
        arguments = request.get("arguments", {})
        negotiating = self.state is SessionState.NEGOTIATING
        command = self.server.registry.get(name)
        if negotiating and name != "qmp_capabilities":
            raise QMPError(
                "CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'"
            )
        if command is None:
            raise QMPError("CommandNotFound", f"The command {name} has not been found")
        if oob and not command.allow_oob:
            raise QMPError("GenericError", f"The command {name} does not support OOB")
        kwargs = command.parse_arguments(arguments)
        if name == "qmp_capabilities":
            return self._negotiate(kwargs.get("enable", []))
        self.log.debug("executing %s %s", name, json.dumps(arguments)[:200])
        return await self._call_handler(command, kwargs, after)

    def _check_request(self, request: dict[str, Any]) -> str:
        # QEMU's qmp_dispatch_check_obj, message for message.
        exec_key = None
        for key, value in request.items():
            if key == "execute" or (key == "exec-oob" and self.oob):
                if not isinstance(value, str):
                    raise QMPError("GenericError", f"QMP input member '{key}' must be a string")
                if exec_key is not None:
                    # QEMU walks a hash table, whose order puts exec-oob first whatever the
                    # request's order: its message is always this one
                    raise QMPError(
                        "GenericError", "QMP input member 'execute' clashes with 'exec-oob'"
                    )
                exec_key = key
            elif key == "arguments":
                if not isinstance(value, dict):
                    raise QMPError("GenericError", "QMP input member 'arguments' must be an object")
            elif key != "id":
                raise QMPError("GenericError", f"QMP input member '{key}' is unexpected")
        if exec_key is None:
            raise QMPError("GenericError", "QMP input lacks member 'execute'")
        return request[exec_key]

    def _negotiate(self, enable: list[str]) -> dict[str, Any]:
        if self.state is not SessionState.NEGOTIATING:
            raise QMPError(
                "CommandNotFound", "Capabilities negotiation is already complete, command ignored"
            )
        self.oob = "oob" in enable
        self.state = SessionState.COMMAND
        self.log.debug("negotiated (oob=%s)", self.oob)
        return {}

    async def _call_handler(
        self, command: Command, kwargs: dict[str, Any], after: list[Callable[[], Any]]
    ) -> Any:
        ctx = contextvars.copy_context()
        ctx.run(_after_reply.set, after)
        try:
            if command.is_async:
                return await asyncio.create_task(command.handler(**kwargs), context=ctx)
            call = functools.partial(ctx.run, command.handler, **kwargs)
            return await asyncio.get_running_loop().run_in_executor(self.server.executor, call)
        except QMPError:
            raise
        except LivemigError as exc:
            raise QMPError("GenericError", str(exc)) from exc
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A bug in a handler must not take the monitor down; log it whole, report it short.
            self.log.exception("command %s failed unexpectedly", command.name)
            raise QMPError(
                "GenericError", f"internal error in '{command.name}': {type(exc).__name__}: {exc}"
            ) from exc


def _run_all(callbacks: list[Callable[[], Any]]) -> None:
    for fn in callbacks:
        try:
            fn()
        except Exception:
            logger.exception("after-reply action %r failed", fn)


def _event_message(now: float, name: str, data: dict[str, Any] | None) -> bytes:
    """An event as QEMU sends it, stamped ``now`` (``time.time()``)."""
    seconds = int(now)
    msg: dict[str, Any] = {
        "timestamp": {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)},
        "event": name,
    }
    if data is not None:
        msg["data"] = data
    return encode_message(msg)


class QMPServer:
    """A QMP monitor listening on ``unix:PATH`` or ``tcp:HOST:PORT`` (see module docstring)."""

    def __init__(
        self,
        address: str,
        registry: CommandRegistry,
        version: tuple[int, int, int] = QEMU_VERSION,
        package: str | None = None,
        max_clients: int = MAX_CLIENTS,
        max_message_size: int = MAX_MESSAGE_SIZE,
        tls: Any = None,
        insecure: bool = False,
        negotiation_timeout: float = NEGOTIATION_TIMEOUT,
    ) -> None:
        self._kind, self._where = parse_qmp_address(address)
        if self._kind == "tcp" and tls is None and not insecure and not is_loopback(self._where[0]):
            raise UsageError(
                f"QMP on {address} would let anyone who reaches {self._where[0]} control this "
                "machine (migrate exec: runs a shell command) with no authentication: listen "
                "on loopback, give TLS credentials (--tls-creds), or accept the risk with "
                "--qmp-insecure"
            )
        self.negotiation_timeout = negotiation_timeout
        # livemig.transport.tls.TLSCreds (endpoint server): clients must present a certificate
        # signed by its CA; one without is dropped during the handshake, before any command.
        self.tls = tls
        self.registry = registry
        self.version = version
        self.package = package if package is not None else f"livemig {__version__}"
        self.max_clients = max_clients
        self.max_message_size = max_message_size
        self.executor = ThreadPoolExecutor(
            max_workers=4, thread_name_prefix="qmp-cmd",
            initializer=lambda: threads.set_native_name(threading.current_thread().name),
        )  # fmt: skip
        self.command_lock: asyncio.Lock  # created on the loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._sessions: set[_Session] = set()
        self._session_tasks: set[asyncio.Task[None]] = set()
        self._numbers = itertools.count(1)
        self._address: str | None = None
        self._socket_inode: tuple[int, int] | None = None
        self._closed = False
        self._close_lock = threading.Lock()
        self._held: list[tuple[float, str, Any]] | None = None  # queued by ``events_held``
        self._hold_depth = 0
        self._hold_lock = threading.Lock()

    # --- public API -----------------------------------------------------------------------------

    @property
    def address(self) -> str:
        """The bound address as a URI (a tcp port 0 is replaced by the real port)."""
        if self._address is None:
            raise LivemigError("QMP server not started")
        return self._address

    @property
    def client_count(self) -> int:
        """Clients connected right now."""
        return len(self._sessions)

    def greeting(self) -> dict[str, Any]:
        """The banner QEMU sends on connect."""
        major, minor, micro = self.version
        return {
            "QMP": {
                "version": {
                    "qemu": {"micro": micro, "minor": minor, "major": major},
                    "package": self.package,
                },
                "capabilities": ["oob"],
            }
        }

    def start(self) -> None:
        """Bind and start serving; returns once clients can connect."""
        if self._thread is not None or self._closed:
            raise LivemigError("QMP server already started or closed")
        sock = self._bind()
        loop = asyncio.new_event_loop()
        loop.set_exception_handler(_log_loop_exception)
        self._loop = loop
        started: asyncio.Future[None] = loop.create_future()
        self._thread = threads.Thread(
            target=self._run_loop, args=(sock, started), name="qmp-server", daemon=True
        )
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(_wait(started), loop).result(CLOSE_TIMEOUT * 5)
        except Exception as exc:
            self.close()
            raise LivemigError(f"QMP server on {self._describe()} failed to start: {exc}") from exc

    def emit_event(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Broadcast an event to every negotiated client; safe from any thread."""
        if name not in self.registry.events:
            # query-qmp-schema lists exactly the declared events: an undeclared one is a bug
            logger.error("event %s is not declared (CommandRegistry.add_event)", name)
        now = time.time()
        with self._hold_lock:
            if self._held is not None:
                # encoded when sent: the JSON costs as much as the rest (cold, in a downtime)
                self._held.append((now, name, None if data is None else dict(data)))
                return
        self._post(_event_message(now, name, data))

    @contextlib.contextmanager
    def events_held(self) -> Iterator[None]:
        """Events emitted inside the block are queued, each with the time it was emitted,
        and sent in order when the block ends (nested blocks: when the outermost ends).

        What QEMU's monitor does while a thread holds the BQL, as its migration thread does
        through a downtime: the events raised meanwhile go out once the main loop runs again.
        Here the loop thread woke for each one and took the interpreter lock from the thread
        in the downtime (~50 us an event, three events in a post-copy switch)."""
        with self._hold_lock:
            self._hold_depth += 1
            if self._held is None:
                self._held = []
        try:
            yield
        finally:
            with self._hold_lock:
                self._hold_depth -= 1
                held = self._held if self._hold_depth == 0 else None
                if held is not None:
                    self._held = None
            if held:
                self._post(b"".join(_event_message(*ev) for ev in held))

    def _post(self, payload: bytes) -> None:
        loop = self._loop
        if loop is None or self._closed:
            logger.debug("events dropped: server not running")
            return
        try:
            loop.call_soon_threadsafe(self._broadcast, payload)
        except RuntimeError:
            logger.debug("events dropped: loop closed")

    def close(self) -> None:
        """Disconnect every client, stop listening, remove the socket file. Idempotent.

        Output already queued (say, a SHUTDOWN event) is flushed first. A command handler must
        not call this directly (it would wait for its own command): use ``call_after_reply``.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            fut = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
            if threading.current_thread() is not thread:
                try:
                    fut.result(CLOSE_TIMEOUT * 2)
                except Exception as exc:
                    logger.warning("QMP server shutdown incomplete: %s", exc)
                thread.join(CLOSE_TIMEOUT)
        self.executor.shutdown(wait=False, cancel_futures=True)
        self._remove_socket_file()

    def __enter__(self) -> QMPServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ------------------------------------------------------------------------------

    def _describe(self) -> str:
        if self._kind == "unix":
            return f"unix:{self._where}"
        return f"tcp:{self._where[0]}:{self._where[1]}"

    def _bind(self) -> socket.socket:
        try:
            if self._kind == "unix":
                sock = self._bind_unix(self._where)
            else:
                sock = self._bind_tcp(*self._where)
        except OSError as exc:
            raise UsageError(f"cannot listen for QMP on {self._describe()}: {exc}") from exc
        # Listen now, not when the event loop gets to it: a client that sees the socket file
        # may connect at once (libvirt and the benchmarks wait for the file, as for QEMU's),
        # and until listen() it is refused. Its connection now waits in the backlog.
        try:
            sock.listen(LISTEN_BACKLOG)
        except OSError as exc:
            sock.close()
            raise UsageError(f"cannot listen for QMP on {self._describe()}: {exc}") from exc
        return sock

    def _bind_unix(self, path: str) -> socket.socket:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(st.st_mode):
                raise UsageError(f"cannot listen for QMP on unix:{path}: not a socket, not removed")
            os.unlink(path)  # a stale socket from an earlier run, as QEMU does
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Bound under a temporary name and renamed into place once listening: a client that
        # connects the moment the file appears (libvirt and the benchmarks wait for it) was
        # refused when it came between bind() and listen() (seen on a loaded host).
        tmp = f"{path}.{os.getpid()}~"
        staged = len(os.fsencode(tmp)) < 108  # sun_path's size
        try:
            sock.bind(tmp if staged else path)
            # Nobody can connect before listen(), so tightening the mode here leaves no window.
            os.chmod(tmp if staged else path, 0o600)
            if staged:
                sock.listen(LISTEN_BACKLOG)
                os.rename(tmp, path)
            st = os.stat(path)
            self._socket_inode = (st.st_dev, st.st_ino)
        except BaseException:
            sock.close()
            if staged:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise
        self._address = f"unix:{path}"
        return sock

    def _bind_tcp(self, host: str, port: int) -> socket.socket:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(sockaddr)
        except BaseException:
            sock.close()
            raise
        bound_host, bound_port = sock.getsockname()[:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        self._address = f"tcp:{shown}:{bound_port}"
        return sock

    def _run_loop(self, sock: socket.socket, started: asyncio.Future[None]) -> None:
        loop = self._loop
        assert loop is not None
        asyncio.set_event_loop(loop)
        loop.create_task(self._serve(sock, started))
        try:
            loop.run_forever()
        finally:
            try:
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()

    async def _serve(self, sock: socket.socket, started: asyncio.Future[None]) -> None:
        self.command_lock = asyncio.Lock()
        try:
            tls: dict[str, Any] = {}
            if self.tls is not None:
                tls = {"ssl": self.tls.context, "ssl_handshake_timeout": TLS_HANDSHAKE_TIMEOUT}
            if self._kind == "unix":
                self._server = await asyncio.start_unix_server(self._on_client, sock=sock, **tls)
            else:
                self._server = await asyncio.start_server(self._on_client, sock=sock, **tls)
        except Exception as exc:
            sock.close()
            started.set_exception(exc)
            return
        started.set_result(None)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._closed:
            writer.close()
            return
        if len(self._sessions) >= self.max_clients:
            # a slot held by a client that never negotiated goes to the newcomer
            waiting = [s for s in self._sessions if s.state is SessionState.NEGOTIATING]
            if waiting:
                oldest = min(waiting, key=lambda s: s.number)
                oldest.drop(f"all {self.max_clients} client slots taken and this client has "
                            "not negotiated: its slot goes to a new client")  # fmt: skip
                self._sessions.discard(oldest)
            else:
                desc = f"too many QMP clients (limit {self.max_clients}); connection refused"
                logger.warning(desc)
                writer.write(encode_message({"error": {"class": "GenericError", "desc": desc}}))
                writer.close()
                return
        session = _Session(self, reader, writer, next(self._numbers))
        session.log.debug("connected from %r", writer.get_extra_info("peername"))
        self._sessions.add(session)
        task = asyncio.current_task()
        if task is not None:
            self._session_tasks.add(task)
        try:
            await session.run()
        finally:
            self._sessions.discard(session)
            if task is not None:
                self._session_tasks.discard(task)

    def _broadcast(self, payload: bytes) -> None:
        for session in list(self._sessions):
            if session.state is SessionState.COMMAND:
                session.send_bytes(payload)

    async def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for session in list(self._sessions):
            session.state = SessionState.CLOSING
            if not session.writer.is_closing():
                session.writer.close()  # flushes what is already queued
        tasks = list(self._session_tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT)
            for task in pending:
                task.cancel()
            for session in list(self._sessions):
                session.writer.transport.abort()
        loop = asyncio.get_running_loop()
        loop.call_soon(loop.stop)

    def _remove_socket_file(self) -> None:
        if self._kind != "unix" or self._socket_inode is None:
            return
        path = self._where
        try:
            st = os.lstat(path)
            # Only remove the socket we created, not one a later server put in its place.
            if (st.st_dev, st.st_ino) == self._socket_inode:
                os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            logger.warning("cannot remove QMP socket %s: %s", path, exc)


async def _wait(fut: asyncio.Future[None]) -> None:
    await fut


def _log_loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    logger.error("QMP event loop: %s", context.get("message"), exc_info=context.get("exception"))
