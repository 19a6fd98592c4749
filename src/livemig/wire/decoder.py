"""Sans-IO decoder of the main migration stream: feed bytes, get events.

Theory of operation. Input chunks are kept as immutable ``bytes`` (a mutable buffer is copied
once on entry), so events can hold views into them without copies and stay valid for as long as
they are referenced. ``_buf`` is the chunk being parsed, ``_pos`` the read position in it,
``_base`` the absolute stream offset of ``_buf[0]``. Each ``_parse_*`` method reads one whole
record starting at ``_pos`` and only commits ``_pos`` once the record is complete; a record that
runs past the buffered bytes raises ``_Need(total)`` and is parsed again once ``total`` bytes are
buffered (the tail is then joined with the next chunks; its size is capped by
``max_record_size``, so no length field can make us buffer an unchecked amount).

The parser is a small state machine: ``header`` -> ``config`` -> ``top`` (section/command type
bytes) -> inside a RAM section ``ram`` (record words until EOS) -> ``footer`` -> ``top``; after
EOF ``after_eof`` (VMDESCRIPTION or the end) -> ``done``. Runs of PAGE|CONTINUE and
ZERO|CONTINUE records are recognised with numpy over the whole buffered run (records of fixed
stride), and returned as one ``RamPages`` / ``RamZeroPages`` event.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from livemig.errors import StreamError
from livemig.vmstate import VMStateDescription, VMStateTruncated
from livemig.wire import constants as C
from livemig.wire import events as E
from livemig.wire.xsections import BUILTIN_LAYOUTS

_BE16 = struct.Struct(">H")
_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")
_SECTION_HEAD = struct.Struct(">BI")
_CMD_HEAD = struct.Struct(">BHH")

# A run of page records is looked at in windows that grow, so a short run costs little.
_FIRST_WINDOW = 32
_MAX_BATCH = 1 << 14


class UnknownLayoutError(StreamError):
    """A device section whose field layout is unknown (no description, no vmdesc entry)."""


class _Need(Exception):
    """Raised inside a parse step: ``total`` bytes from the record start are needed."""

    def __init__(self, total: int, what: str) -> None:
        self.total = total
        self.what = what


class Decoder:
    """Incremental decoder of a QEMU migration stream (see ``livemig.wire`` for the API)."""

    def __init__(
        self,
        *,
        with_header: bool = True,
        page_size: int = C.TARGET_PAGE_SIZE,
        capabilities: frozenset[str] | set[str] | tuple[str, ...] = (),
        block_page_sizes: Mapping[str, int] | None = None,
        host_page_size: int = C.TARGET_PAGE_SIZE,
        block_sizes: Mapping[str, int] | None = None,
        devices: Mapping[str, VMStateDescription] | None = None,
        vmdesc: Mapping[str, Any] | None = None,
        max_record_size: int = 32 << 20,
        section_footers: bool = True,
        start_offset: int = 0,
        sections: Mapping[int, str] | None = None,
        stop_at_eof: bool = False,
    ) -> None:
        self.page_size = page_size
        self._page_mask = page_size - 1
        self.capabilities = frozenset(capabilities)
        self._block_page_sizes = dict(block_page_sizes or {})
        self._host_page_size = host_page_size
        self.block_sizes: dict[str, int] = dict(block_sizes or {})
        self._devices: dict[str, VMStateDescription] = {**BUILTIN_LAYOUTS, **(devices or {})}
        self._vmdesc_devices: dict[tuple[str, int], VMStateDescription] = {}
        self._has_vmdesc = vmdesc is not None
        if vmdesc is not None:
            from livemig.wire.vmdesc import descriptions_from_vmdesc

            self._vmdesc_devices = descriptions_from_vmdesc(vmdesc)
        self.max_record_size = max_record_size
        self.section_footers = section_footers
        self._buf: bytes = b""
        self._pos = 0
        self._base = start_offset
        self._pending: list[tuple[bytes, int]] = []  # (chunk, first unread byte)
        self._pending_len = 0
        self._eof = False
        self._need = 0  # bytes from _pos needed before trying again
        self._need_what = ""
        self._with_header = with_header
        self._state = "header" if with_header else "top"
        # section_id -> idstr of STARTed sections; a COLO checkpoint continues the ``ram``
        # section of the migration that set replication up (``sections``)
        self._sections: dict[int, str] = dict(sections or {})
        # a COLO checkpoint's parts end at EOF: what follows is the caller's (``unparsed``)
        self._stop_at_eof = stop_at_eof
        self._open_section: int | None = None
        self.last_block: str | None = None
        self._setup: dict[str, Any] | None = None  # partial block list (mapped-ram skips)
        self._skip_to: int | None = None

    # -- input ----------------------------------------------------------------------------

    @property
    def offset(self) -> int:
        """Absolute stream offset of the next unparsed byte."""
        return self._base + self._pos

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add input; ``b""`` means the end of input."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise StreamError("data received after end of input", self._base + len(self._buf))
        chunk = data if isinstance(data, bytes) else bytes(data)
        self._pending.append((chunk, 0))
        self._pending_len += len(chunk)

    @property
    def finished(self) -> bool:
        """True when the stream ended cleanly (after EOF, or after VMDESCRIPTION)."""
        return self._state == "done"

    def set_block_sizes(self, sizes: Mapping[str, int]) -> None:
        """Tell the decoder the RAM blocks (used lengths) it may see pages for."""
        self.block_sizes.update(sizes)

    def _available(self) -> int:
        return len(self._buf) - self._pos + self._pending_len

    def _fill(self, need: int) -> bool:
        """Make ``need`` bytes from ``_pos`` contiguous in ``_buf``; False if not buffered.

        Received chunks are used in place. A record that straddles two chunks is joined from
        the old chunk's tail and only as many bytes of the next as it needs; the rest of that
        chunk stays where it is (``_pending`` holds ``(chunk, start)``), so no byte of page data
        is copied twice.
        """
        have = len(self._buf) - self._pos
        if have >= need:
            return True
        if have + self._pending_len < need:
            return False
        if have == 0:
            chunk, start = self._pending[0]
            if len(chunk) - start >= need:
                # Common case: switch chunks without copying anything.
                self._base += len(self._buf) - start
                self._buf = chunk
                self._pos = start
                self._pending.pop(0)
                self._pending_len -= len(chunk) - start
                return True
        parts = [self._buf[self._pos :]]
        got = have
        while got < need:
            chunk, start = self._pending[0]
            take = min(need - got, len(chunk) - start)
            parts.append(chunk[start : start + take])
            got += take
            self._pending_len -= take
            if start + take == len(chunk):
                self._pending.pop(0)
            else:
                self._pending[0] = (chunk, start + take)
        self._base += self._pos
        self._buf = b"".join(parts)
        self._pos = 0
        return True

    # -- output ---------------------------------------------------------------------------

    def next_event(self) -> E.Event | E._NeedData:
        """The next event, or ``NEED_DATA``; raises ``StreamError`` on malformed input."""
        while True:
            if self._state == "done":
                if self._available() and not self._stop_at_eof:
                    raise StreamError("trailing bytes after the end of the stream", self.offset)
                return E.NEED_DATA
            if self._skip_to is not None:
                if not self._skip():
                    return E.NEED_DATA
                continue
            if self._available() == 0 and (self._eof or self._state == "after_eof"):
                # A clean end: after EOF, or at a record boundary of a headerless stream
                # (a package or a postcopy recovery channel ends without EOF).
                if self._eof and (self._state == "after_eof" or self._headerless_end()):
                    self._state = "done"
                    return E.NEED_DATA
                if self._state == "after_eof":
                    return E.NEED_DATA
            want = max(self._need, 1)
            if not self._fill(want):
                if self._eof:
                    self._truncated()
                return E.NEED_DATA
            try:
                event = self._step()
            except _Need as need:
                if need.total > self.max_record_size:
                    raise StreamError(
                        f"{need.what} needs {need.total} bytes, more than the "
                        f"{self.max_record_size}-byte limit for one record",
                        self.offset,
                    ) from None
                self._need, self._need_what = need.total, need.what
                if not self._fill(need.total):
                    if self._eof:
                        self._truncated()
                    return E.NEED_DATA
                continue
            self._need = 0
            if event is not None:
                return event

    def unparsed(self) -> bytes:
        """Take the bytes received but not parsed (after EOF with ``stop_at_eof``: what
        follows the stream part, e.g. the next COLO message)."""
        rest = b"".join([self._buf[self._pos :], *(c[s:] for c, s in self._pending)])
        self._base = self.offset + len(rest)  # they are the caller's now
        self._buf, self._pos, self._pending, self._pending_len = b"", 0, [], 0
        return rest

    def events(self) -> list[E.Event]:
        """All events decodable from the input so far."""
        out: list[E.Event] = []
        while True:
            ev = self.next_event()
            if ev is E.NEED_DATA:
                return out
            out.append(ev)  # type: ignore[arg-type]

    def _headerless_end(self) -> bool:
        return not self._with_header and self._state == "top"

    def _truncated(self) -> None:
        if self._state == "header" and self._available() == 0:
            raise StreamError("empty stream: expected the QEVM header", self.offset)
        if self._state in ("top", "config") and self._available() == 0:
            raise StreamError(
                "stream ended before EOF (expected a section, command or EOF)", self.offset
            )
        what = self._need_what or "the next record"
        raise StreamError(
            f"stream truncated: {what} needs {max(self._need, 1)} bytes, "
            f"only {self._available()} left",
            self.offset,
        )

    def _skip(self) -> bool:
        assert self._skip_to is not None
        while self.offset < self._skip_to:
            have = len(self._buf) - self._pos
            if have == 0:
                if not self._pending:
                    if self._eof:
                        raise StreamError(
                            f"stream truncated inside the mapped-ram region ending at "
                            f"{self._skip_to}",
                            self.offset,
                        )
                    return False
                self._fill(1)
                continue
            self._pos += min(have, self._skip_to - self.offset)
        self._skip_to = None
        return True

    # -- parse steps ----------------------------------------------------------------------

    def _err(self, msg: str, at: int = 0) -> StreamError:
        return StreamError(msg, self._base + self._pos + at)

    def _have(self, n: int, what: str) -> None:
        if len(self._buf) - self._pos < n:
            raise _Need(n, what)

    def _step(self) -> E.Event | None:
        state = self._state
        if state == "ram":
            return self._parse_ram()
        if state == "top" or state == "config":
            return self._parse_top()
        if state == "footer":
            return self._parse_footer()
        if state == "header":
            return self._parse_header()
        if state == "setup":
            return self._parse_setup_blocks()
        if state == "after_eof":
            return self._parse_after_eof()
        raise AssertionError(state)

    def _parse_header(self) -> E.Event:
        self._have(8, "the QEVM header")
        magic, version = struct.unpack_from(">II", self._buf, self._pos)
        if magic != C.QEVM_MAGIC:
            raise self._err(f"bad magic 0x{magic:08x}, expected 0x{C.QEVM_MAGIC:08x} ('QEVM')")
        if version != C.QEVM_VERSION:
            raise self._err(f"unsupported stream version {version}, expected 3", 4)
        self._pos += 8
        self._state = "config"
        return E.Header(version)

    def _cstr(self, at: int, what: str) -> tuple[str, int]:
        """Read a counted string at ``_pos + at``; returns (text, bytes used)."""
        self._have(at + 1, what)
        n = self._buf[self._pos + at]
        self._have(at + 1 + n, what)
        raw = self._buf[self._pos + at + 1 : self._pos + at + 1 + n]
        try:
            return raw.decode("utf-8"), 1 + n
        except UnicodeDecodeError:
            raise self._err(f"{what} {raw!r} is not valid text", at) from None

    def _parse_top(self) -> E.Event | None:
        self._have(1, "a section type byte")
        kind = self._buf[self._pos]
        first = self._state == "config"
        self._state = "top"
        if kind == C.QEMU_VM_CONFIGURATION and first:
            self._state = "config"  # reparsed as a whole if incomplete
            ev = self._parse_configuration()
            self._state = "top"
            return ev
        if kind in (C.QEMU_VM_SECTION_START, C.QEMU_VM_SECTION_FULL):
            return self._parse_section_start(kind)
        if kind in (C.QEMU_VM_SECTION_PART, C.QEMU_VM_SECTION_END):
            self._have(5, "a section header")
            sid = _BE32.unpack_from(self._buf, self._pos + 1)[0]
            idstr = self._sections.get(sid)
            if idstr is None:
                raise self._err(f"section id {sid} was never started", 1)
            if idstr != C.RAM_IDSTR:
                raise UnknownLayoutError(
                    f"iterative section {idstr!r} has no known layout", self.offset
                )
            self._pos += 5
            self._open_section = sid
            self._state = "ram"
            if kind == C.QEMU_VM_SECTION_PART:
                return E.SectionPart(sid)
            return E.SectionEnd(sid)
        if kind == C.QEMU_VM_COMMAND:
            return self._parse_command()
        if kind == C.QEMU_VM_EOF:
            self._pos += 1
            self._state = "done" if self._stop_at_eof else "after_eof"
            return E.Eof()
        raise self._err(
            f"unknown section type byte 0x{kind:02x} (expected a section, command or EOF)"
        )

    def _parse_configuration(self) -> E.Event:
        self._have(5, "the configuration section")
        n = _BE32.unpack_from(self._buf, self._pos + 1)[0]
        if n > 255:
            raise self._err(f"machine type name length {n} is implausible (max 255)", 1)
        self._have(5 + n, "the machine type name")
        raw = self._buf[self._pos + 5 : self._pos + 5 + n]
        try:
            machine = raw.decode("ascii")
        except UnicodeDecodeError:
            raise self._err(f"machine type {raw!r} is not valid text", 5) from None
        at = 5 + n
        caps: tuple[str, ...] | None = None
        bits: int | None = None
        uuid: bytes | None = None
        while True:
            # A subsection needs its type byte and name visible to be recognised.
            if len(self._buf) - self._pos < at + 2 and not self._eof:
                raise _Need(at + 2, "the configuration section")
            if len(self._buf) - self._pos < at + 1 or self._buf[self._pos + at] != 0x05:
                break
            name, used = self._cstr(at + 1, "configuration subsection name")
            if not name.startswith("configuration"):
                break
            start = at
            at += 1 + used
            self._have(at + 4, f"subsection {name!r}")
            version = _BE32.unpack_from(self._buf, self._pos + at)[0]
            if version != 1:
                raise self._err(f"subsection {name!r} version {version}, expected 1", at)
            at += 4
            if name == "configuration/target-page-bits":
                self._have(at + 4, name)
                bits = _BE32.unpack_from(self._buf, self._pos + at)[0]
                at += 4
            elif name == "configuration/capabilities":
                self._have(at + 4, name)
                count = _BE32.unpack_from(self._buf, self._pos + at)[0]
                if count > 64:
                    raise self._err(f"{count} capabilities is implausible", at)
                at += 4
                names = []
                for _ in range(count):
                    cap, used = self._cstr(at, "capability name")
                    names.append(cap)
                    at += used
                caps = tuple(names)
            elif name == "configuration/uuid":
                self._have(at + 16, name)
                uuid = bytes(self._buf[self._pos + at : self._pos + at + 16])
                at += 16
            else:
                raise self._err(f"unknown configuration subsection {name!r}", start)
        self._pos += at
        # Enforced capabilities announced by the source change the block list layout.
        self.capabilities |= frozenset(caps or ())
        return E.Configuration(machine, caps, bits, uuid)

    def _parse_section_start(self, kind: int) -> E.Event:
        self._have(6, "a section header")
        sid = _BE32.unpack_from(self._buf, self._pos + 1)[0]
        idstr, used = self._cstr(5, "section idstr")
        at = 5 + used
        self._have(at + 8, "a section header")
        instance_id, version_id = struct.unpack_from(">II", self._buf, self._pos + at)
        at += 8
        if kind == C.QEMU_VM_SECTION_START:
            if idstr != C.RAM_IDSTR:
                raise UnknownLayoutError(
                    f"iterative section {idstr!r} has no known layout", self.offset
                )
            if version_id != C.RAM_VERSION:
                raise self._err(f"ram section version {version_id}, expected 4", at - 4)
            self._pos += at
            self._sections[sid] = idstr
            self._open_section = sid
            self._state = "ram"
            return E.SectionStart(sid, idstr, instance_id, version_id)
        vmsd = self._vmdesc_devices.get((idstr, instance_id)) or self._devices.get(idstr)
        if vmsd is None:
            # without a vmdesc, say why it may be missing: a stream cut short has lost it
            why = (
                "not in the stream's vmdesc trailer"
                if self._has_vmdesc
                else "the stream has no vmdesc trailer to describe it (a stream cut short loses "
                "its trailer; QEMU writes none after a post-copy switch)"
            )
            raise UnknownLayoutError(
                f"device section {idstr!r} instance {instance_id}: no field layout known: {why}",
                self.offset,
            )
        payload = memoryview(self._buf)[self._pos + at :]
        try:
            state, end = vmsd.decode(payload, 0, version_id, base=self.offset + at)
        except VMStateTruncated as exc:
            if self._eof:
                raise
            raise _Need(len(self._buf) - self._pos + 1, f"device section {idstr!r}") from exc
        end += at
        if self.section_footers:
            avail = len(self._buf) - self._pos
            short = avail < end + 5 or (
                self._buf[self._pos + end] == C.QEMU_VM_SUBSECTION and avail < end + 2 + 255 + 4
            )
            if short and not self._eof:
                # Not enough to see the footer, or maybe a subsection cut short.
                raise _Need(max(avail + 1, end + 5), f"device section {idstr!r}")
            self._check_footer(end, sid, f"device section {idstr!r}")
            end += 5
        self._pos += end
        return E.SectionFull(sid, idstr, instance_id, version_id, state)

    def _check_footer(self, at: int, sid: int, what: str) -> None:
        self._have(at + 5, f"the footer of {what}")
        kind = self._buf[self._pos + at]
        if kind != C.QEMU_VM_SECTION_FOOTER:
            raise self._err(
                f"{what} (id {sid}): expected section footer 0x7e, found 0x{kind:02x}", at
            )
        got = _BE32.unpack_from(self._buf, self._pos + at + 1)[0]
        if got != sid:
            raise self._err(f"{what}: footer names section {got}, expected {sid}", at)

    def _parse_footer(self) -> E.Event:
        sid = self._open_section
        assert sid is not None
        self._check_footer(0, sid, "section")
        self._pos += 5
        self._open_section = None
        self._state = "top"
        return E.SectionFooter(sid)

    def _parse_after_eof(self) -> E.Event | None:
        if len(self._buf) - self._pos < 1:
            raise _Need(1, "VMDESCRIPTION")
        kind = self._buf[self._pos]
        if kind != C.QEMU_VM_VMDESCRIPTION:
            raise self._err(f"expected VMDESCRIPTION (0x06) or the end after EOF, got 0x{kind:02x}")
        self._have(5, "the VMDESCRIPTION length")
        n = _BE32.unpack_from(self._buf, self._pos + 1)[0]
        self._have(5 + n, "the VMDESCRIPTION JSON")
        raw = self._buf[self._pos + 5 : self._pos + 5 + n]
        try:
            desc = json.loads(raw)
        except (UnicodeDecodeError, ValueError) as exc:
            raise self._err(f"VMDESCRIPTION is not valid JSON: {exc}", 5) from None
        if not isinstance(desc, dict):
            raise self._err("VMDESCRIPTION JSON is not an object", 5)
        self._pos += 5 + n
        self._state = "done"
        return E.VMDescription(desc)

    # -- commands -------------------------------------------------------------------------

    def _parse_command(self) -> E.Event:
        self._have(5, "a command header")
        _, cmd, length = _CMD_HEAD.unpack_from(self._buf, self._pos)
        self._have(5 + length, f"command {cmd} payload")
        p = self._pos + 5
        buf = self._buf

        def fixed(n: int, name: str) -> None:
            if length != n:
                raise self._err(f"command {name}: length {length}, expected {n}", 3)

        ev: E.Event
        extra = 0
        if cmd == C.Command.OPEN_RETURN_PATH:
            fixed(0, "OPEN_RETURN_PATH")
            ev = E.OpenReturnPath()
        elif cmd == C.Command.PING:
            fixed(4, "PING")
            ev = E.Ping(_BE32.unpack_from(buf, p)[0])
        elif cmd == C.Command.POSTCOPY_ADVISE:
            if length == 0:
                ev = E.PostcopyAdvise()
            else:
                fixed(16, "POSTCOPY_ADVISE")
                ev = E.PostcopyAdvise(*struct.unpack_from(">QQ", buf, p))
        elif cmd == C.Command.POSTCOPY_LISTEN:
            fixed(0, "POSTCOPY_LISTEN")
            ev = E.PostcopyListen()
        elif cmd == C.Command.POSTCOPY_RUN:
            fixed(0, "POSTCOPY_RUN")
            ev = E.PostcopyRun()
        elif cmd == C.Command.POSTCOPY_RAM_DISCARD:
            ev = self._parse_discard(length)
        elif cmd == C.Command.PACKAGED:
            fixed(4, "PACKAGED")
            n = _BE32.unpack_from(buf, p)[0]
            if n > C.MAX_PACKAGED_SIZE:
                raise self._err(f"PACKAGED length {n} above QEMU's limit of 16 MiB", 5)
            self._have(9 + n, "the PACKAGED stream")
            ev = E.Packaged(memoryview(buf)[p + 4 : p + 4 + n])
            extra = n
        elif cmd == C.Command.ENABLE_COLO:
            fixed(0, "ENABLE_COLO")
            ev = E.EnableColo()
        elif cmd == C.Command.POSTCOPY_RESUME:
            fixed(0, "POSTCOPY_RESUME")
            ev = E.PostcopyResume()
        elif cmd == C.Command.RECV_BITMAP:
            if length < 1:
                raise self._err("command RECV_BITMAP without a block name", 3)
            name, used = self._cstr(5, "RECV_BITMAP block name")
            if used != length:
                raise self._err(f"command RECV_BITMAP: length {length}, name needs {used}", 3)
            ev = E.RecvBitmap(name)
        elif cmd == C.Command.SWITCHOVER_START:
            fixed(0, "SWITCHOVER_START")
            ev = E.SwitchoverStart()
        else:
            raise self._err(f"unknown command number {cmd}", 1)
        self._pos += 5 + length + extra
        return ev

    def _parse_discard(self, length: int) -> E.Event:
        if length < 3:
            raise self._err(f"POSTCOPY_RAM_DISCARD length {length} too short", 3)
        version = self._buf[self._pos + 5]
        if version != 0:
            raise self._err(f"POSTCOPY_RAM_DISCARD version {version}, expected 0", 5)
        name, used = self._cstr(6, "discard block name")
        at = 6 + used
        if at + 1 > 5 + length or self._buf[self._pos + at] != 0:
            raise self._err("POSTCOPY_RAM_DISCARD: missing NUL after the block name", at)
        at += 1
        rest = 5 + length - at
        if rest % 16:
            raise self._err(f"POSTCOPY_RAM_DISCARD: {rest} range bytes, not a multiple of 16", 3)
        words = struct.unpack_from(f">{rest // 8}Q", self._buf, self._pos + at)
        ranges = tuple(zip(words[0::2], words[1::2], strict=True))
        size = self.block_sizes.get(name)
        for start, ln in ranges:
            if size is not None and start + ln > size:
                raise self._err(f"discard range {start:#x}+{ln:#x} outside block {name!r}", at)
        return E.PostcopyRamDiscard(name, ranges)

    # -- RAM ------------------------------------------------------------------------------

    def _parse_ram(self) -> E.Event | None:
        buf = self._buf
        p = self._pos
        self._have(8, "a RAM record word")
        word = _BE64.unpack_from(buf, p)[0]
        flags = word & C.RAM_FLAGS_MASK
        offset = word & ~self._page_mask
        if flags == C.RAM_SAVE_FLAG_PAGE | C.RAM_SAVE_FLAG_CONTINUE:
            return self._page_run(p, None)
        if flags == C.RAM_SAVE_FLAG_ZERO | C.RAM_SAVE_FLAG_CONTINUE:
            return self._zero_run(p, None)
        if flags == C.RAM_SAVE_FLAG_EOS:
            self._pos += 8
            self._state = "footer" if self.section_footers else "top"
            return E.RamEos()
        if flags == C.RAM_SAVE_FLAG_MEM_SIZE:
            self._pos += 8
            if offset == 0:
                return E.RamSetup(0, ())
            self._setup = {"total": offset, "blocks": []}
            self._state = "setup"
            return None
        if flags == C.RAM_SAVE_FLAG_MULTIFD_FLUSH:
            self._pos += 8
            return E.RamMultifdFlush()
        if flags == C.RAM_SAVE_FLAG_HOOK:
            self._pos += 8
            return E.RamHook()
        kind = flags & ~C.RAM_SAVE_FLAG_CONTINUE
        if kind not in (
            C.RAM_SAVE_FLAG_ZERO,
            C.RAM_SAVE_FLAG_PAGE,
            C.RAM_SAVE_FLAG_XBZRLE,
            C.RAM_SAVE_FLAG_COMPRESS_PAGE,
        ):
            raise self._err(f"RAM record word 0x{word:016x}: invalid flag combination 0x{flags:x}")
        if flags & C.RAM_SAVE_FLAG_CONTINUE:
            block = self._continue_block()
            at = 8
        else:
            block, used = self._cstr(8, "RAM block name")
            if self.block_sizes and block not in self.block_sizes:
                raise self._err(f"page for unknown RAM block {block!r}", 8)
            at = 8 + used
        self._check_offset(block, offset)
        if kind == C.RAM_SAVE_FLAG_PAGE:
            self.last_block = block
            return self._page_run(p, (block, at))
        if kind == C.RAM_SAVE_FLAG_ZERO:
            self.last_block = block
            return self._zero_run(p, (block, at))
        if kind == C.RAM_SAVE_FLAG_XBZRLE:
            self._have(at + 3, "an XBZRLE header")
            if buf[p + at] != C.ENCODING_FLAG_XBZRLE:
                raise self._err(f"XBZRLE encoding flag 0x{buf[p + at]:02x}, expected 0x01", at)
            n = _BE16.unpack_from(buf, p + at + 1)[0]
            if n > self.page_size:
                raise self._err(f"XBZRLE length {n} larger than a page", at + 1)
            self._have(at + 3 + n, "XBZRLE data")
            self.last_block = block
            self._pos += at + 3 + n
            return E.RamXbzrlePage(block, offset, memoryview(buf)[p + at + 3 : p + at + 3 + n])
        self._have(at + 4, "a compressed page length")
        n = _BE32.unpack_from(buf, p + at)[0]
        if n > 2 * self.page_size + 64:
            raise self._err(f"compressed page length {n} is larger than any page can need", at)
        self._have(at + 4 + n, "compressed page data")
        self.last_block = block
        self._pos += at + 4 + n
        return E.RamCompressedPage(block, offset, memoryview(buf)[p + at + 4 : p + at + 4 + n])

    def _continue_block(self) -> str:
        if self.last_block is None:
            raise self._err("CONTINUE flag on the first page record (no block named yet)")
        return self.last_block

    def _check_offset(self, block: str, offset: int) -> None:
        size = self.block_sizes.get(block)
        if size is not None and offset + self.page_size > size:
            raise self._err(
                f"page offset 0x{offset:x} outside RAM block {block!r} of {size:#x} bytes"
            )

    def _run_length(self, p: int, stride: int, flags: int, extra_zero: bool) -> int:
        """How many records of ``stride`` bytes with ``flags`` start at ``p`` (all buffered)."""
        buf = self._buf
        avail = (len(buf) - p) // stride
        n = 0
        window = _FIRST_WINDOW
        while n < avail and n < _MAX_BATCH:
            k = min(window, avail - n, _MAX_BATCH - n)
            start = p + n * stride
            words = np.ndarray((k,), ">u8", buf, start, (stride,))
            ok = (words & C.RAM_FLAGS_MASK) == flags
            if extra_zero:
                ok &= np.ndarray((k,), np.uint8, buf, start + 8, (stride,)) == 0
            bad = np.flatnonzero(~ok)
            if len(bad):
                return n + int(bad[0])
            n += k
            window *= 4
        return n

    def _offsets(self, p: int, n: int, stride: int, block: str) -> np.ndarray:
        words = np.ndarray((n,), ">u8", self._buf, p, (stride,))
        offsets = (words & ~np.uint64(self._page_mask)).astype(np.uint64)
        size = self.block_sizes.get(block)
        if size is not None and n and int(offsets.max()) + self.page_size > size:
            i = int(np.flatnonzero(offsets + np.uint64(self.page_size) > np.uint64(size))[0])
            raise StreamError(
                f"page offset 0x{int(offsets[i]):x} outside RAM block {block!r} of {size:#x} bytes",
                self._base + p + i * stride,
            )
        return offsets

    def _page_run(self, p: int, first: tuple[str, int] | None) -> E.Event:
        ps = self.page_size
        stride = 8 + ps
        buf = self._buf
        if first is not None:
            # A record naming its block is returned alone (its stride differs from the run
            # behind it, and joining them would copy); the run comes with the next call.
            block, at = first
            self._have(at + ps, "page data")
            offsets = np.array([_BE64.unpack_from(buf, p)[0] & ~self._page_mask], np.uint64)
            self._pos = p + at + ps
            return E.RamPages(block, offsets, np.ndarray((1, ps), np.uint8, buf, p + at))
        block = self._continue_block()
        n = self._run_length(p, stride, C.RAM_SAVE_FLAG_PAGE | C.RAM_SAVE_FLAG_CONTINUE, False)
        if n == 0:
            raise _Need(stride, "a page record")
        offsets = self._offsets(p, n, stride, block)
        data = np.ndarray((n, ps), np.uint8, buf, p + 8, (stride, 1))
        self._pos = p + n * stride
        return E.RamPages(block, offsets, data)

    def _zero_run(self, p: int, first: tuple[str, int] | None) -> E.Event:
        stride = 9
        buf = self._buf
        if first is None:
            block = self._continue_block()
            self._have(9, "a zero page record")
            fill = buf[p + 8]
            if fill != 0:
                self._pos = p + 9
                return E.RamZeroPages(block, self._offsets(p, 1, 9, block), fill)
            start, lead = p, None
        else:
            block, at = first
            self._have(at + 1, "a zero page record")
            fill = buf[p + at]
            lead = np.array([_BE64.unpack_from(buf, p)[0] & ~self._page_mask], np.uint64)
            start = p + at + 1
            if fill != 0:
                self._pos = start
                return E.RamZeroPages(block, lead, fill)
        n = self._run_length(start, stride, C.RAM_SAVE_FLAG_ZERO | C.RAM_SAVE_FLAG_CONTINUE, True)
        offsets = self._offsets(start, n, stride, block)
        if lead is not None:
            offsets = np.concatenate([lead, offsets])
        self._pos = start + n * stride
        return E.RamZeroPages(block, offsets, 0)

    def _parse_setup_blocks(self) -> E.Event | None:
        setup = self._setup
        assert setup is not None
        blocks: list[E.RamBlockInfo] = setup["blocks"]
        total: int = setup["total"]
        listed = sum(b.used_length for b in blocks)
        name, used = self._cstr(0, "RAM block idstr")
        at = used
        self._have(at + 8, "a RAM block length")
        length = _BE64.unpack_from(self._buf, self._pos + at)[0]
        at += 8
        page_size = mr_addr = None
        mapped = None
        if C.CAP_POSTCOPY_RAM in self.capabilities and (
            self._block_page_sizes.get(name, self._host_page_size) != self._host_page_size
        ):
            self._have(at + 8, "a RAM block page size")
            page_size = _BE64.unpack_from(self._buf, self._pos + at)[0]
            at += 8
        if C.CAP_X_IGNORE_SHARED in self.capabilities:
            self._have(at + 8, "a RAM block mr_addr")
            mr_addr = _BE64.unpack_from(self._buf, self._pos + at)[0]
            at += 8
        if C.CAP_MAPPED_RAM in self.capabilities:
            self._have(at + 28, "a mapped-ram header")
            mapped = struct.unpack_from(">IQQQ", self._buf, self._pos + at)
            if mapped[0] != 1:
                raise self._err(f"mapped-ram header version {mapped[0]}, expected 1", at)
            at += 28
        if length > total - listed:
            raise self._err(f"RAM block {name!r} length {length:#x} exceeds MEM_SIZE {total:#x}")
        blocks.append(E.RamBlockInfo(name, length, page_size, mr_addr, mapped))
        self._pos += at
        if mapped is not None and mapped[3]:
            # The stream continues after the block's page region (file offsets).
            target = mapped[3] + length
            if target < self.offset:
                raise self._err(f"mapped-ram region of {name!r} ends before this point")
            self._skip_to = target
        if listed + length < total:
            return None
        self._setup = None
        self._state = "ram"
        self.block_sizes.update({b.idstr: b.used_length for b in blocks})
        return E.RamSetup(total, tuple(blocks))
