"""msgpack-RPC framing and message shapes, without I/O.

This module knows bytes and messages, nothing about sockets, tasks or
threads: the trio server, the trio client and the blocking CLI client all
drive the same :class:`RpcConnection`, and every byte-level case is a plain
unit test. It imports only :mod:`msgpack`, so the CLI pays nothing for trio.

Rules of the module
===================

1. **Wire format.** Messages are msgpack arrays sent back to back on a
   stream, with no framing of their own (msgpack values are self-delimiting)::

       request       [0, msgid, method, params]
       response      [1, msgid, error, result]
       notification  [2, method, params]

   ``msgid`` is an unsigned 32-bit integer chosen by the requester;
   ``method`` is a str; ``params`` is ``[]`` or ``[{named args}]`` (one map
   with str keys); ``error`` is nil or a map with str ``code`` and str
   ``message`` and optionally more keys.

2. **Feeding and pulling.** :meth:`RpcConnection.receive_data` buffers bytes
   (``b""`` means end of stream); :meth:`RpcConnection.next_event` returns one
   event at a time, or :data:`NEED_DATA` when the bytes so far hold no
   complete message. Pulling one event at a time (as in h11) means a fatal
   error in the middle of a chunk never hides the good messages before it.

3. **Two kinds of errors.**

   * A message that decodes and is an array with a valid type tag, but has
     the wrong fields, is *answerable*: the stream is still in sync, so it
     comes out as an :class:`InvalidMessage` event carrying the msgid (when
     the message has one) and an :class:`RpcError`. The server answers it
     with ``bad_request``; the connection goes on.
   * Anything else is *fatal*: bytes that are not msgpack, a value that is
     not an array, an unknown type tag, a msgid that is not a uint32, a
     message over the size limit. :meth:`next_event` raises
     :class:`ProtocolError` and keeps raising it on every later call (the
     connection is dead, as in h11's ERROR state). If the head of the broken
     message still shows a request msgid, ``ProtocolError.msgid`` has it so
     the server can send one last error response before closing.

   ``next_event`` raises nothing but :class:`ProtocolError`, whatever the
   input; that is a property test.

4. **Size limit.** One message may be at most ``max_message_bytes`` encoded
   bytes. The decoder is never handed more than that many bytes of one
   message, so an endless or enormous frame costs at most the limit in
   buffered bytes before it is rejected with ``too_large``. The decoded
   Python objects can be far larger than the bytes (an array of a million empty
   arrays is about 64 bytes per element), so a server also sets
   ``max_elements``: no array or map may declare more, and every container is
   counted as it completes, so decoding stops with ``too_large`` as soon as the
   message holds more in all; ``max_depth`` answers deeper nesting with
   ``bad_request`` (the message decoded whole, the stream is in sync).

5. **Encoding** is the ``encode_*`` functions; they never fail on values the
   decoder produced, and they turn pydantic models, paths, sets and enums
   into plain msgpack data so handlers can return them directly.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final, NoReturn

import msgpack

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MSGID_MAX",
    "NEED_DATA",
    "ConnectionClosed",
    "ErrorCode",
    "Event",
    "InvalidMessage",
    "MessageKind",
    "Notification",
    "Packed",
    "ProtocolError",
    "Request",
    "Response",
    "RpcConnection",
    "RpcError",
    "encode_error",
    "encode_notification",
    "encode_request",
    "encode_response",
    "pack_value",
]

DEFAULT_MAX_MESSAGE_BYTES: Final = 1 << 20
# The unpacker's first buffer; it doubles as a longer message needs, up to the limit.
_INITIAL_BUFFER: Final = 16 * 1024
MSGID_MAX: Final = (1 << 32) - 1

# A request head is at most: array header (1) + type (1) + uint32 msgid (5).
# 16 bytes is plenty to read the msgid of a message we cannot decode whole.
_HEAD_BYTES: Final = 16


class ErrorCode(enum.StrEnum):
    """The ``code`` of an error object. docs/protocol.md says when each occurs."""

    BAD_REQUEST = "bad_request"  # the message or its params have the wrong shape
    UNKNOWN_METHOD = "unknown_method"
    NOT_FOUND = "not_found"  # a named tenant, worker, partition or pid does not exist
    INVALID_STATE = "invalid_state"  # e.g. start a tenant that is already running
    PERMISSION_DENIED = "permission_denied"
    TOO_LARGE = "too_large"  # a request or its result is over the message size limit
    OVERLOADED = "overloaded"  # the daemon holds all the requests its limits allow; retry
    CONFIG_INVALID = "config_invalid"  # carries "problems": [...]
    BACKEND_ERROR = "backend_error"  # the partition backend / OS refused
    INTERNAL = "internal"  # a bug in the daemon; the message is the exception text


class MessageKind(enum.IntEnum):
    REQUEST = 0
    RESPONSE = 1
    NOTIFICATION = 2


class RpcError(Exception):
    """An error object, raised by handlers on the server and by clients on an error response.

    ``code`` is an :class:`ErrorCode`, or a plain str when a newer daemon sent
    a code this client does not know yet. ``data`` holds any extra keys of the
    error object (``problems`` for ``config_invalid``).
    """

    def __init__(self, code: ErrorCode | str, message: str, **data: Any) -> None:
        super().__init__(message)
        try:
            self.code: ErrorCode | str = ErrorCode(code)
        except ValueError:
            self.code = str(code)
        self.message = message
        self.data: dict[str, Any] = data

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    def __repr__(self) -> str:
        extra = "".join(f", {k}={v!r}" for k, v in self.data.items())
        return f"{type(self).__name__}({str(self.code)!r}, {self.message!r}{extra})"

    def to_wire(self) -> dict[str, Any]:
        """The error object as sent: ``{"code", "message", **data}``."""
        wire = dict(self.data)
        # code and message win over same-named data keys: they are the contract.
        wire["code"] = str(self.code)
        wire["message"] = self.message
        return wire

    @classmethod
    def from_wire(cls, obj: Mapping[str, Any]) -> RpcError:
        """Build from a validated error object (see ``_check_error_object``)."""
        data = {k: v for k, v in obj.items() if k not in ("code", "message")}
        return cls(obj["code"], obj["message"], **data)


class ProtocolError(RpcError):
    """The peer broke the protocol so badly that the connection must be closed.

    ``msgid`` is the request id read from the head of the broken message, if
    it had one, so that one last error response can be sent; ``kind`` is its
    type tag if readable.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        msgid: int | None = None,
        kind: MessageKind | None = None,
    ) -> None:
        super().__init__(code, message)
        self.msgid = msgid
        self.kind = kind


# ---------------------------------------------------------------------------
# Events


@dataclass(frozen=True, slots=True)
class Request:
    msgid: int
    method: str
    params: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Notification:
    method: str
    params: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Response:
    msgid: int
    error: RpcError | None
    result: Any


@dataclass(frozen=True, slots=True)
class InvalidMessage:
    """A message that decoded but has the wrong fields; the stream is still in sync.

    ``msgid`` is set when the message is a request or response with a usable
    id: a server answers a request's with ``error`` (code ``bad_request``), a
    client fails the matching call with it.
    """

    kind: MessageKind
    msgid: int | None
    error: RpcError


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """The peer ended the stream; ``partial`` if it stopped in the middle of a message."""

    partial: bool


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()

Event = Request | Notification | Response | InvalidMessage | ConnectionClosed


# ---------------------------------------------------------------------------
# Encoding


def _default(obj: Any) -> Any:
    """Turn the richer values handlers like to return into plain msgpack data.

    Duck-typed on ``model_dump`` so this module does not import pydantic
    (the CLI imports it and must start fast).
    """
    model_dump = getattr(obj, "model_dump", None)
    if callable(model_dump):
        return model_dump(mode="json")
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj) if all(isinstance(x, str) for x in obj) else list(obj)
    if isinstance(obj, enum.Enum):
        return obj.value
    raise TypeError(f"cannot encode {type(obj).__name__} as msgpack")


def _pack(message: list[Any]) -> bytes:
    # use_bin_type: bytes go out as msgpack bin and str as str, so a peer can
    # tell them apart (the old "raw" encoding could not).
    packed: bytes = msgpack.packb(message, use_bin_type=True, default=_default)
    return packed


def _params_field(params: Mapping[str, Any] | None) -> list[Any]:
    return [dict(params)] if params else []


def encode_request(msgid: int, method: str, params: Mapping[str, Any] | None = None) -> bytes:
    if not 0 <= msgid <= MSGID_MAX:
        raise ValueError(f"msgid must be a uint32, got {msgid}")
    return _pack([MessageKind.REQUEST.value, msgid, method, _params_field(params)])


@dataclass(frozen=True, slots=True)
class Packed:
    """A result already encoded as one msgpack value (by ``pack_value`` pieces): sent as
    it is, for a hot method that keeps its answer's bytes (control/statusrows.py)."""

    data: bytes


def pack_value(value: Any) -> bytes:
    """One value as ``encode_response`` would encode it inside a message."""
    return _pack(value)


def encode_response(msgid: int, result: Any = None) -> bytes:
    """A success response. Raises ``TypeError`` if ``result`` cannot be encoded."""
    if isinstance(result, Packed):
        # The message with a nil result is the same bytes up to that last nil (0xc0).
        return _pack([MessageKind.RESPONSE.value, msgid, None, None])[:-1] + result.data
    return _pack([MessageKind.RESPONSE.value, msgid, None, result])


def encode_error(msgid: int, error: RpcError) -> bytes:
    """An error response; extra ``error.data`` that cannot be encoded is dropped, not fatal."""
    try:
        return _pack([MessageKind.RESPONSE.value, msgid, error.to_wire(), None])
    except (TypeError, ValueError, OverflowError):
        bare = {"code": str(error.code), "message": error.message}
        return _pack([MessageKind.RESPONSE.value, msgid, bare, None])


def encode_notification(method: str, params: Mapping[str, Any] | None = None) -> bytes:
    return _pack([MessageKind.NOTIFICATION.value, method, _params_field(params)])


# ---------------------------------------------------------------------------
# Decoding


def _is_int(value: object) -> bool:
    # msgpack has a separate bool type; Python's bool is an int subclass.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_uint32(value: object) -> bool:
    return _is_int(value) and 0 <= value <= MSGID_MAX  # type: ignore[operator]


def _bad(kind: MessageKind, msgid: int | None, message: str) -> InvalidMessage:
    return InvalidMessage(kind, msgid, RpcError(ErrorCode.BAD_REQUEST, message))


def _check_params(params: object) -> dict[str, Any] | str:
    """The named-args map, or a description of what is wrong with ``params``."""
    if not isinstance(params, list):
        return f"params must be an array ([] or [{{...}}]), got {type(params).__name__}"
    if not params:
        return {}
    if len(params) != 1 or not isinstance(params[0], dict):
        return "params must be [] or a one-element array holding a map of named arguments"
    args = params[0]
    for key in args:
        if not isinstance(key, str):
            return f"named argument keys must be strings, got {type(key).__name__}"
    return args


def _check_error_object(error: object) -> str | None:
    if not isinstance(error, dict):
        return f"error must be nil or a map, got {type(error).__name__}"
    if not isinstance(error.get("code"), str) or not isinstance(error.get("message"), str):
        return 'error map must have str "code" and str "message"'
    return None


def _peek_head(head: bytes) -> tuple[MessageKind | None, int | None]:
    """Type tag and msgid from the first bytes of a message we cannot decode whole."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(head)
    try:
        if unpacker.read_array_header() < 2:
            return None, None
        tag = unpacker.unpack()
        if not _is_int(tag) or tag not in (MessageKind.REQUEST, MessageKind.RESPONSE):
            return None, None
        msgid = unpacker.unpack()
    except Exception:  # noqa: BLE001 - any decoder complaint about a fragment: no msgid
        # Anything the decoder says about a fragment just means "no msgid".
        return None, None
    if not _is_uint32(msgid):
        return MessageKind(tag), None
    return MessageKind(tag), msgid


class _TooManyElements(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(
            f"message holds more than {limit} arrays, maps and elements (the server's "
            f"max_elements); send less per request (the connection is closed)"
        )


class _ElementCounter:
    """The unpacker's hooks: count every container of the message being decoded and stop
    the decoding (``_TooManyElements``) once it holds more than ``limit`` in all."""

    __slots__ = ("count", "limit")

    def __init__(self, limit: int | None) -> None:
        self.count = 0
        self.limit = limit

    def _add(self, n: int) -> None:
        self.count += n
        assert self.limit is not None
        if self.count > self.limit:
            raise _TooManyElements(self.limit)

    def list_hook(self, value: list[Any]) -> list[Any]:
        self._add(len(value) + 1)
        return value

    def map_hook(self, value: dict[str, Any]) -> dict[str, Any]:
        self._add(2 * len(value) + 1)
        return value


def _deeper_than(message: object, limit: int) -> bool:
    """Whether arrays and maps nest more than ``limit`` deep (iterative: the message may
    be as deep as the decoder's own stack allows). Cheap: the message holds at most
    ``max_elements`` containers."""
    stack: list[tuple[object, int]] = [(message, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, list):
            children: Any = value
        elif isinstance(value, dict):
            children = value.values()
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


class RpcConnection:
    """One side of one connection: bytes in, events out.

    Both roles use it: a server gets ``Request`` and ``Notification`` events,
    a client gets ``Response`` and ``Notification``; each side decides what
    to do with kinds it does not expect.
    """

    def __init__(
        self,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        *,
        max_elements: int | None = None,
        max_depth: int | None = None,
    ) -> None:
        if max_message_bytes < 64:
            raise ValueError("max_message_bytes below 64 cannot carry even an error response")
        self.max_message_bytes = max_message_bytes
        # What decoding one message may build (rule 4): the server sets these, a client
        # trusts its daemon's answers (a big status is many elements).
        self.max_elements = max_elements
        self.max_depth = max_depth
        # Elements of the message being decoded so far, counted by the unpacker's hooks.
        self._counter = _ElementCounter(max_elements)
        self.last_elements = 0  # elements of the last message decoded
        self.last_bytes = 0  # its encoded size
        # raw=False: method names and error codes are text, so str must come
        # out as str; invalid UTF-8 is then a decode error (fatal), which is
        # right because the spec says strings are UTF-8.
        # strict_map_key=True (the default, kept on purpose): every map in the
        # protocol has str keys. Refusing other keys at decode time means a
        # handler never sees int/float keys, whose hashes are predictable
        # (dict-collision DoS), nor array keys, which are unhashable and would
        # make the decoder raise TypeError half-way through a message.
        # bytes keys are still let through by msgpack; _check_params refuses
        # them in named arguments.
        # max_buffer_size and the per-type lengths: a header declaring a
        # string or array longer than a whole message is rejected at once
        # instead of after a megabyte of waiting.
        limit = max_message_bytes
        # max_elements: no one array or map may declare more, and the hooks count every
        # container as it completes, so decoding stops (too_large) as soon as the
        # message holds more in all, before it can build a million empty lists.
        counted = max_elements is not None
        # The hooks are the counter's, not this object's: bound to self they would make
        # a cycle (connection -> unpacker -> hook -> connection) that only a full
        # collection of the cyclic GC frees, and every closed connection's unpacker buffer
        # stayed allocated until then (tens of MiB between two collections in the soak,
        # docs/reliability.md, "Where the daemon's memory went").
        counter = self._counter
        hooks: dict[str, Any] = (
            {"list_hook": counter.list_hook, "object_hook": counter.map_hook} if counted else {}
        )
        self._unpacker = msgpack.Unpacker(
            raw=False,
            strict_map_key=True,
            max_buffer_size=limit,
            # The C unpacker allocates its whole first buffer at once (1 MiB for this
            # limit by default) and grows it by doubling as a message needs: start small,
            # a request is usually a few dozen bytes.
            read_size=min(limit, _INITIAL_BUFFER),
            max_str_len=limit,
            max_bin_len=limit,
            max_array_len=min(limit, max_elements or limit),
            max_map_len=min(limit // 2, max_elements or limit),
            max_ext_len=limit,
            **hooks,
        )
        self._restarts = type(self._unpacker).__module__ == "msgpack.fallback"
        self._pending = bytearray()  # received, not yet handed to the unpacker
        self._fed = 0  # stream offset up to which bytes went to the unpacker
        self._msg_start = 0  # stream offset where the current (incomplete) message begins
        self._head = bytearray()  # up to _HEAD_BYTES of the current message, for msgids
        self._last_piece = b""  # the last bytes fed, to refill _head after a message ends
        self._last_piece_offset = 0
        self._eof = False
        self._closed_reported = False
        self._error: ProtocolError | None = None

    # -- state ---------------------------------------------------------------

    @property
    def mid_frame(self) -> bool:
        """True while part of a message has arrived and the rest has not.

        A server uses it to time out peers that stop half-way through a frame.
        """
        return bool(self._pending) or self._fed > self._msg_start

    @property
    def buffered_bytes(self) -> int:
        """Bytes of the current incomplete message held here; never above the limit + one chunk."""
        return len(self._pending) + (self._fed - self._msg_start)

    @property
    def broken(self) -> bool:
        return self._error is not None

    # -- input ---------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Add bytes from the peer; ``b""`` means the peer closed its side."""
        if self._error is not None or self._eof:
            return  # nothing after a fatal error or EOF can matter
        if data:
            self._pending += data
        else:
            self._eof = True

    def next_event(self) -> Event | _NeedData:
        """The next event, or ``NEED_DATA``. Raises only :class:`ProtocolError`."""
        if self._error is not None:
            raise self._error
        while True:
            try:
                message = self._unpacker.unpack()
            except msgpack.OutOfData:
                if self._restarts:
                    # msgpack's pure-Python decoder (QNX) parses an incomplete message
                    # again from its start on the next call, calling the hooks again; the
                    # C one resumes where it stopped, so its count must be kept.
                    self._counter.count = 0
                if self._feed_more():
                    continue
                if self._eof:
                    if self._closed_reported:
                        return NEED_DATA
                    self._closed_reported = True
                    return ConnectionClosed(partial=self.mid_frame)
                return NEED_DATA
            except ProtocolError:
                raise
            except _TooManyElements as exc:
                self._fail(ErrorCode.TOO_LARGE, str(exc))
            except Exception as exc:  # noqa: BLE001 - the C decoder's types are undocumented
                # The C decoder's exception types are not a documented
                # contract (ValueError, FormatError, StackError,
                # UnicodeDecodeError, ...). All mean "these bytes are not a
                # msgpack value we accept"; the stream cannot be resynced.
                self._fail_undecodable(exc)
            start = self._msg_start
            self._message_done()
            self.last_bytes = self._msg_start - start
            self.last_elements, self._counter.count = self._counter.count, 0
            if self.max_depth is not None and _deeper_than(message, self.max_depth):
                return self._too_deep(message)
            return self._classify(message)

    def events(self) -> Iterator[Event]:
        """All events available now (stops at ``NEED_DATA``; may raise ``ProtocolError``)."""
        while not isinstance(event := self.next_event(), _NeedData):
            yield event

    # -- internals -----------------------------------------------------------

    def _feed_more(self) -> bool:
        """Give the unpacker more of ``_pending``, never past the size limit of one message."""
        if not self._pending:
            return False
        room = self.max_message_bytes - (self._fed - self._msg_start)
        if room <= 0:
            self._fail(ErrorCode.TOO_LARGE, self._too_large_text())
        piece = bytes(self._pending[:room])
        del self._pending[:room]
        self._unpacker.feed(piece)
        if len(self._head) < _HEAD_BYTES:
            self._head += piece[: _HEAD_BYTES - len(self._head)]
        self._last_piece = piece
        self._last_piece_offset = self._fed
        self._fed += len(piece)
        return True

    def _message_done(self) -> None:
        # A message can only complete inside the piece fed last (the earlier
        # pieces ended in OutOfData), so the next message's head is there.
        self._msg_start = self._unpacker.tell()
        start = self._msg_start - self._last_piece_offset
        self._head = bytearray(self._last_piece[start : start + _HEAD_BYTES])

    def _too_large_text(self) -> str:
        return (
            f"message over the {self.max_message_bytes}-byte size limit; send less per "
            f"request (the connection is closed: the stream cannot be resynchronized)"
        )

    def _fail(self, code: ErrorCode, message: str, *, peek: bool = True) -> NoReturn:
        # peek: the message could not be decoded, so look for a msgid in its
        # first bytes. A message that decoded but is rejected whole has none
        # (that is why it is rejected), and _head already shows the next one.
        kind, msgid = _peek_head(bytes(self._head)) if peek else (None, None)
        self._error = ProtocolError(code, message, msgid=msgid, kind=kind)
        self._pending.clear()
        raise self._error

    def _fail_undecodable(self, exc: Exception) -> NoReturn:
        text = str(exc)
        if (
            isinstance(exc, ValueError)
            and ("exceeds max_array_len" in text or "exceeds max_map_len" in text)
            and self.max_elements is not None
            and self.max_elements < self.max_message_bytes // 2
        ):
            # An array or map header declaring more elements than a message may hold.
            self._fail(ErrorCode.TOO_LARGE, str(_TooManyElements(self.max_elements)))
        if isinstance(exc, ValueError) and "exceeds max_" in text:
            # msgpack's length checks ("4294967295 exceeds max_array_len(...)"):
            # a declared length that alone is more than a whole message.
            self._fail(ErrorCode.TOO_LARGE, self._too_large_text())
        detail = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
        self._fail(ErrorCode.BAD_REQUEST, f"not a valid msgpack message ({detail})")

    def _classify(self, message: object) -> Event:
        if not isinstance(message, list) or not message:
            self._fail(
                ErrorCode.BAD_REQUEST,
                f"expected a msgpack-RPC array, got {type(message).__name__}",
                peek=False,
            )
        tag = message[0]
        if not _is_int(tag) or tag not in (0, 1, 2):
            self._fail(
                ErrorCode.BAD_REQUEST,
                f"unknown message type {tag!r} (expected 0, 1, 2)",
                peek=False,
            )
        kind = MessageKind(tag)
        if kind is MessageKind.NOTIFICATION:
            return self._notification(message)
        if len(message) < 2 or not _is_uint32(message[1]):
            got = repr(message[1]) if len(message) >= 2 else "nothing"
            # Fatal, not answered: echoing an id that is not a uint32 would
            # put an invalid response on the wire.
            self._fail(ErrorCode.BAD_REQUEST, f"msgid must be a uint32, got {got}", peek=False)
        msgid: int = message[1]
        if len(message) != 4:
            return _bad(kind, msgid, f"a {kind.name.lower()} has 4 elements, got {len(message)}")
        if kind is MessageKind.REQUEST:
            method, params = message[2], message[3]
            if not isinstance(method, str):
                return _bad(kind, msgid, f"method must be a string, got {type(method).__name__}")
            args = _check_params(params)
            if isinstance(args, str):
                return _bad(kind, msgid, f"{method}: {args}")
            return Request(msgid, method, args)
        error, result = message[2], message[3]
        if error is None:
            return Response(msgid, None, result)
        problem = _check_error_object(error)
        if problem is not None:
            return _bad(kind, msgid, problem)
        return Response(msgid, RpcError.from_wire(error), result)

    def _too_deep(self, message: object) -> Event:
        """A whole message nested deeper than ``max_depth``: answerable, the stream is
        in sync (a request gets ``bad_request``; anything else is dropped)."""
        text = (
            f"the message is nested deeper than {self.max_depth} levels of arrays and maps "
            f"(the server's max_depth); send flatter data"
        )
        if (
            isinstance(message, list)
            and len(message) >= 2
            and message[0] == MessageKind.REQUEST
            and _is_uint32(message[1])
        ):
            return _bad(MessageKind.REQUEST, message[1], text)
        return _bad(MessageKind.NOTIFICATION, None, text)

    def _notification(self, message: list[Any]) -> Event:
        kind = MessageKind.NOTIFICATION
        if len(message) != 3:
            return _bad(kind, None, f"a notification has 3 elements, got {len(message)}")
        method, params = message[1], message[2]
        if not isinstance(method, str):
            return _bad(kind, None, f"method must be a string, got {type(method).__name__}")
        args = _check_params(params)
        if isinstance(args, str):
            return _bad(kind, None, f"{method}: {args}")
        return Notification(method, args)
