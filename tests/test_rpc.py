"""Sans-I/O tests of the msgpack-RPC layer: bytes in, events out, no sockets."""

from __future__ import annotations

import enum
from pathlib import PurePosixPath
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from supervisord_qnx.control.rpc import (
    MSGID_MAX,
    NEED_DATA,
    ConnectionClosed,
    ErrorCode,
    InvalidMessage,
    MessageKind,
    Notification,
    ProtocolError,
    Request,
    Response,
    RpcConnection,
    RpcError,
    encode_error,
    encode_notification,
    encode_request,
    encode_response,
)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def feed(data: bytes, limit: int = 1 << 20) -> list[Any]:
    conn = RpcConnection(limit)
    conn.receive_data(data)
    return list(conn.events())


def fatal(data: bytes, limit: int = 1 << 20) -> ProtocolError:
    conn = RpcConnection(limit)
    conn.receive_data(data)
    with pytest.raises(ProtocolError) as info:
        list(conn.events())
    return info.value


# -- well-formed traffic ----------------------------------------------------


def test_ping_bytes_match_the_protocol_document() -> None:
    assert encode_request(1, "ping").hex(" ") == "94 00 01 a4 70 69 6e 67 90"
    assert encode_response(1, "pong").hex(" ") == "94 01 01 c0 a4 70 6f 6e 67"


def test_request_round_trip_with_and_without_params() -> None:
    data = encode_request(7, "status") + encode_request(8, "status", {"tenant": "web"})
    assert feed(data) == [Request(7, "status", {}), Request(8, "status", {"tenant": "web"})]


def test_explicit_empty_map_is_accepted_as_no_params() -> None:
    assert feed(pack([0, 1, "ping", [{}]])) == [Request(1, "ping", {})]


def test_notification_and_response_round_trip() -> None:
    data = encode_notification("event", {"tenant": "a"}) + encode_response(3, [1, 2])
    assert feed(data) == [Notification("event", {"tenant": "a"}), Response(3, None, [1, 2])]


def test_error_response_carries_code_message_and_extra_data() -> None:
    err = RpcError(ErrorCode.CONFIG_INVALID, "2 problems", problems=["a", "b"])
    [event] = feed(encode_error(9, err))
    assert isinstance(event, Response) and event.msgid == 9 and event.result is None
    assert event.error is not None
    assert event.error.code is ErrorCode.CONFIG_INVALID
    assert event.error.message == "2 problems"
    assert event.error.data == {"problems": ["a", "b"]}


def test_unknown_error_code_from_a_newer_peer_is_kept_as_text() -> None:
    [event] = feed(pack([1, 1, {"code": "quota_exceeded", "message": "m"}, None]))
    assert isinstance(event, Response) and event.error is not None
    assert event.error.code == "quota_exceeded"


def test_encode_error_drops_unencodable_extra_data_instead_of_failing() -> None:
    [event] = feed(encode_error(1, RpcError(ErrorCode.INTERNAL, "boom", thing=object())))
    assert isinstance(event, Response) and event.error is not None
    assert event.error.message == "boom" and event.error.data == {}


def test_results_may_be_models_paths_sets_and_enums() -> None:
    class Color(enum.Enum):
        RED = "red"

    class Model:
        def model_dump(self, mode: str) -> dict[str, str]:
            assert mode == "json"
            return {"a": "b"}

    result = {"m": Model(), "p": PurePosixPath("/x"), "s": {"b", "a"}, "e": Color.RED}
    [event] = feed(encode_response(1, result))
    assert isinstance(event, Response)
    assert event.result == {"m": {"a": "b"}, "p": "/x", "s": ["a", "b"], "e": "red"}
    with pytest.raises(TypeError):
        encode_response(1, object())


def test_messages_split_byte_by_byte() -> None:
    parts = [encode_request(1, "a", {"x": "é" * 40}), encode_notification("n"), encode_response(2)]
    data = b"".join(parts)
    boundaries = {len(parts[0]), len(parts[0]) + len(parts[1]), len(data)}
    conn = RpcConnection()
    events: list[Any] = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        events.extend(conn.events())
        assert conn.mid_frame == (i + 1 not in boundaries)
    assert events == [
        Request(1, "a", {"x": "é" * 40}),
        Notification("n", {}),
        Response(2, None, None),
    ]


def test_many_messages_in_one_chunk() -> None:
    data = b"".join(encode_request(i, "ping") for i in range(1000))
    assert [e.msgid for e in feed(data)] == list(range(1000))


def test_need_data_then_end_of_stream() -> None:
    conn = RpcConnection()
    assert conn.next_event() is NEED_DATA
    conn.receive_data(encode_request(1, "ping")[:3])
    assert conn.next_event() is NEED_DATA and conn.mid_frame
    conn.receive_data(b"")
    assert conn.next_event() == ConnectionClosed(partial=True)
    assert conn.next_event() is NEED_DATA  # reported once
    clean = RpcConnection()
    clean.receive_data(encode_request(1, "ping"))
    clean.receive_data(b"")
    assert list(clean.events()) == [Request(1, "ping", {}), ConnectionClosed(partial=False)]


def test_encode_request_refuses_non_uint32_msgid() -> None:
    with pytest.raises(ValueError):
        encode_request(MSGID_MAX + 1, "ping")
    with pytest.raises(ValueError):
        encode_request(-1, "ping")


# -- malformed messages ----------------------------------------------------

# Decodes, has a valid type tag and a usable msgid: answered, stream goes on.
ANSWERABLE = [
    pytest.param([0, 5, 42, []], MessageKind.REQUEST, 5, id="method-not-str"),
    pytest.param([0, 5, "m", None], MessageKind.REQUEST, 5, id="params-nil"),
    pytest.param([0, 5, "m", {"a": 1}], MessageKind.REQUEST, 5, id="params-bare-map"),
    pytest.param([0, 5, "m", [1]], MessageKind.REQUEST, 5, id="params-array-of-int"),
    pytest.param([0, 5, "m", [{}, {}]], MessageKind.REQUEST, 5, id="params-two-maps"),
    pytest.param([0, 5, "m", [{"a": 1}, 2]], MessageKind.REQUEST, 5, id="params-map-and-more"),
    pytest.param([0, 5, "m", [{b"a": 1}]], MessageKind.REQUEST, 5, id="params-bytes-key"),
    pytest.param([0, 5, "m"], MessageKind.REQUEST, 5, id="request-too-short"),
    pytest.param([0, 5, "m", [], 1], MessageKind.REQUEST, 5, id="request-too-long"),
    pytest.param([1, 5, "oops", None], MessageKind.RESPONSE, 5, id="error-not-map"),
    pytest.param([1, 5, {"code": "x"}, None], MessageKind.RESPONSE, 5, id="error-no-message"),
    pytest.param([1, 5, {"code": 1, "message": "m"}, None], MessageKind.RESPONSE, 5, id="code-int"),
    pytest.param([1, 5, None], MessageKind.RESPONSE, 5, id="response-too-short"),
    pytest.param([2, 7, []], MessageKind.NOTIFICATION, None, id="notification-method-int"),
    pytest.param([2, "n"], MessageKind.NOTIFICATION, None, id="notification-too-short"),
    pytest.param([2, "n", [], 1], MessageKind.NOTIFICATION, None, id="notification-too-long"),
    pytest.param([2, "n", "x"], MessageKind.NOTIFICATION, None, id="notification-params-str"),
]


@pytest.mark.parametrize(("message", "kind", "msgid"), ANSWERABLE)
def test_answerable_malformed_message(message: Any, kind: MessageKind, msgid: int | None) -> None:
    # Followed by a good request: the stream must still be in sync.
    events = feed(pack(message) + encode_request(99, "ping"))
    assert len(events) == 2
    bad, good = events
    assert isinstance(bad, InvalidMessage)
    assert (bad.kind, bad.msgid) == (kind, msgid)
    assert bad.error.code is ErrorCode.BAD_REQUEST and bad.error.message
    assert good == Request(99, "ping", {})


# Cannot be answered or resynchronized: ProtocolError, with msgid when readable.
FATAL = [
    pytest.param(b"\xc1", None, id="reserved-byte"),
    pytest.param(pack(5), None, id="int"),
    pytest.param(pack("ping"), None, id="str"),
    pytest.param(pack({"a": 1}), None, id="map"),
    pytest.param(pack([]), None, id="empty-array"),
    pytest.param(pack([3, 1, "m", []]), None, id="type-3"),
    pytest.param(pack(["0", 1, "m", []]), None, id="type-str"),
    pytest.param(pack([True, 1, "m", []]), None, id="type-bool"),
    pytest.param(pack([None]), None, id="type-nil"),
    pytest.param(pack([0, "1", "m", []]), None, id="msgid-str"),
    pytest.param(pack([0, None, "m", []]), None, id="msgid-nil"),
    pytest.param(pack([0, 1.0, "m", []]), None, id="msgid-float"),
    pytest.param(pack([0, True, "m", []]), None, id="msgid-bool"),
    pytest.param(pack([0, -1, "m", []]), None, id="msgid-negative"),
    pytest.param(pack([0, 1 << 32, "m", []]), None, id="msgid-over-uint32"),
    pytest.param(pack([1, -5, None, None]), None, id="response-msgid-negative"),
    pytest.param(pack([0]), None, id="request-without-msgid"),
    pytest.param(pack([1]), None, id="response-without-msgid"),
    # The decoder refuses these, but the head still shows the msgid.
    pytest.param(b"\x94\x00\x07\xa2\xff\xfe\x90", 7, id="method-invalid-utf8"),
    pytest.param(pack([0, 7, "m", [{1: 2}]]), 7, id="params-int-key"),
    pytest.param(b"\x94\x00\x07\xa1m\x91" + b"\x91" * 5000 + b"\x90", 7, id="nested-too-deep"),
]


@pytest.mark.parametrize(("data", "msgid"), FATAL)
def test_fatal_malformed_message(data: bytes, msgid: int | None) -> None:
    conn = RpcConnection()
    conn.receive_data(encode_request(1, "first") + data + encode_request(2, "never"))
    # Messages before the broken one are not lost...
    assert conn.next_event() == Request(1, "first", {})
    with pytest.raises(ProtocolError) as info:
        conn.next_event()
    error = info.value
    assert error.code is ErrorCode.BAD_REQUEST and error.message
    assert error.msgid == msgid
    # ...and nothing after it is trusted: the connection stays broken.
    assert conn.broken
    conn.receive_data(encode_request(3, "ping"))
    with pytest.raises(ProtocolError):
        conn.next_event()


# -- size limit ------------------------------------------------------------


def request_of_size(size: int, msgid: int = 9) -> bytes:
    """A request encoding to exactly ``size`` bytes."""
    base = len(encode_request(msgid, "echo", {"s": ""}))
    for pad in range(size - base, 0, -1):  # str headers grow with the length
        data = encode_request(msgid, "echo", {"s": "x" * pad})
        if len(data) == size:
            return data
    raise AssertionError(size)


def test_messages_of_exactly_the_limit_pass_back_to_back() -> None:
    data = request_of_size(1024)
    events = feed(data * 3, limit=1024)
    assert [type(e) for e in events] == [Request] * 3


def test_one_byte_over_the_limit_is_too_large_with_msgid() -> None:
    error = fatal(request_of_size(1025, msgid=77), limit=1024)
    assert error.code is ErrorCode.TOO_LARGE and error.msgid == 77
    assert error.kind is MessageKind.REQUEST
    assert "1024-byte" in error.message


def test_oversized_frame_is_rejected_without_buffering_it_all() -> None:
    conn = RpcConnection(4096)
    conn.receive_data(b"\x94\x00\x05\xa4echo\x91\x81\xa1s\xdb\x00\x10\x00\x00")  # 1 MiB str
    chunk = b"x" * 1000
    for _ in range(100):
        conn.receive_data(chunk)
        try:
            assert conn.next_event() is NEED_DATA
        except ProtocolError as exc:
            assert exc.code is ErrorCode.TOO_LARGE and exc.msgid == 5
            break
        assert conn.buffered_bytes <= 4096 + len(chunk)
    else:
        pytest.fail("a 1 MiB frame was accepted under a 4 KiB limit")
    assert conn.buffered_bytes <= 4096 + len(chunk)


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(b"\xdd\xff\xff\xff\xff", id="array32"),
        pytest.param(b"\xdf\xff\xff\xff\xff", id="map32"),
        pytest.param(b"\x94\x00\x03\xa1m\x91\xdc\xff\xff", id="array16-in-request"),
    ],
)
def test_declared_length_over_the_limit_fails_at_once(header: bytes) -> None:
    error = fatal(header, limit=1024)
    assert error.code is ErrorCode.TOO_LARGE


def test_garbage_without_msgid_over_the_limit() -> None:
    error = fatal(b"\xdb\x00\x10\x00\x00" + b"x" * 5000, limit=1024)
    assert error.code is ErrorCode.TOO_LARGE and error.msgid is None


def test_limit_below_64_is_refused() -> None:
    with pytest.raises(ValueError):
        RpcConnection(10)


# -- properties ------------------------------------------------------------

json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
named_params = st.dictionaries(st.text(max_size=12), json_like, max_size=5)


@settings(max_examples=100, deadline=None)
@given(
    msgid=st.integers(0, MSGID_MAX),
    method=st.text(max_size=30),
    params=named_params,
    cuts=st.lists(st.integers(0, 400), max_size=5),
)
def test_request_round_trip(
    msgid: int, method: str, params: dict[str, Any], cuts: list[int]
) -> None:
    data = encode_request(msgid, method, params) + encode_notification(method, params)
    conn = RpcConnection()
    events: list[Any] = []
    last = 0
    for cut in [*sorted(c for c in set(cuts) if 0 < c < len(data)), len(data)]:
        conn.receive_data(data[last:cut])
        last = cut
        events.extend(conn.events())
    assert events == [Request(msgid, method, params), Notification(method, params)]


@settings(max_examples=100, deadline=None)
@given(msgid=st.integers(0, MSGID_MAX), result=json_like, code=st.sampled_from(ErrorCode))
def test_response_round_trip(msgid: int, result: Any, code: ErrorCode) -> None:
    events = feed(encode_response(msgid, result) + encode_error(msgid, RpcError(code, "m", x=1)))
    assert events[0] == Response(msgid, None, result)
    error = events[1].error
    assert (error.code, error.message, error.data) == (code, "m", {"x": 1})


@settings(max_examples=200, deadline=None)
@given(
    chunks=st.lists(
        st.binary(max_size=64)
        | st.builds(pack, json_like)
        | st.builds(lambda m, p: pack([0, m, "x", p]), json_like, json_like)
        | st.sampled_from([b"\x94\x00", b"\x93\x02", b"\xdb\xff\xff\xff\xff", b"\xdd\x00"]),
        max_size=8,
    ),
    eof=st.booleans(),
)
def test_garbage_never_raises_anything_but_protocol_error(chunks: list[bytes], eof: bool) -> None:
    conn = RpcConnection(256)
    for chunk in [*chunks, b""] if eof else chunks:
        conn.receive_data(chunk)
        try:
            for event in conn.events():
                assert isinstance(
                    event, Request | Notification | Response | InvalidMessage | ConnectionClosed
                )
        except ProtocolError as exc:
            assert exc.code in (ErrorCode.BAD_REQUEST, ErrorCode.TOO_LARGE)
            assert exc.msgid is None or isinstance(exc.msgid, int)
            break
        assert conn.buffered_bytes <= 256 + len(chunk)


# -- pinned by surviving mutants of `make mutate` (docs/testing.md) --------------------
#
# The tests above check kinds and codes; these pin the exact words an operator or a
# client author reads, the boundaries, and the head tracking that recovers a msgid.

EXACT_ANSWERABLE = [
    pytest.param([0, 5, 42, []], "method must be a string, got int", id="method-int"),
    pytest.param([0, 5, "m"], "a request has 4 elements, got 3", id="request-short"),
    pytest.param([1, 5, None], "a response has 4 elements, got 3", id="response-short"),
    pytest.param(
        [0, 5, "m", 3], "m: params must be an array ([] or [{...}]), got int", id="params-int"
    ),
    pytest.param(
        [0, 5, "m", [1]],
        "m: params must be [] or a one-element array holding a map of named arguments",
        id="params-array-of-int",
    ),
    pytest.param(
        [0, 5, "m", [{b"k": 1}]],
        "m: named argument keys must be strings, got bytes",
        id="params-bytes-key",
    ),
    pytest.param([1, 5, 3, None], "error must be nil or a map, got int", id="error-int"),
    pytest.param(
        [1, 5, {"code": 1, "message": "m"}, None],
        'error map must have str "code" and str "message"',
        id="error-code-int",
    ),
    pytest.param([2, 7, []], "method must be a string, got int", id="notification-method-int"),
    pytest.param([2, "n"], "a notification has 3 elements, got 2", id="notification-short"),
    pytest.param([0, 5], "a request has 4 elements, got 2", id="request-of-two"),
]


@pytest.mark.parametrize(("message", "text"), EXACT_ANSWERABLE)
def test_answerable_messages_say_exactly_what_is_wrong(message: Any, text: str) -> None:
    [bad] = feed(pack(message))
    assert isinstance(bad, InvalidMessage) and bad.error.message == text


EXACT_FATAL = [
    pytest.param(b"\xc1", "not a valid msgpack message (FormatError)", id="reserved-byte"),
    pytest.param(pack(5), "expected a msgpack-RPC array, got int", id="int"),
    pytest.param(pack([7, 1]), "unknown message type 7 (expected 0, 1, 2)", id="type-7"),
    pytest.param(pack([0]), "msgid must be a uint32, got nothing", id="no-msgid"),
    pytest.param(pack([0, -1, "m", []]), "msgid must be a uint32, got -1", id="msgid-negative"),
    pytest.param(pack([0, "1", "m", []]), "msgid must be a uint32, got '1'", id="msgid-str-quoted"),
    pytest.param(pack([0, -1]), "msgid must be a uint32, got -1", id="two-elements-bad-msgid"),
    pytest.param(
        b"\x94\x00\x07\xa2\xff\xfe\x90",
        "not a valid msgpack message (UnicodeDecodeError: 'utf-8' codec can't decode byte "
        "0xff in position 0: invalid start byte)",
        id="decoder-error-with-text",
    ),
]


@pytest.mark.parametrize(("data", "text"), EXACT_FATAL)
def test_fatal_messages_say_exactly_what_is_wrong(data: bytes, text: str) -> None:
    error = fatal(data)
    assert (error.code, error.message) == (ErrorCode.BAD_REQUEST, text)


@pytest.mark.parametrize(
    ("data", "kind", "msgid"),
    [
        # A notification's second element is its method, never a msgid.
        pytest.param(b"\x93\x02\x05\xc1", None, None, id="notification"),
        # A request whose msgid is not a uint32: its kind is known, its id is not.
        pytest.param(b"\x94\x00\xff\xc1", MessageKind.REQUEST, None, id="negative-msgid"),
        pytest.param(b"\x94\x01\x09\xc1", MessageKind.RESPONSE, 9, id="response"),
    ],
)
def test_what_the_head_of_a_broken_message_tells(
    data: bytes, kind: MessageKind | None, msgid: int | None
) -> None:
    error = fatal(data)
    assert (error.kind, error.msgid) == (kind, msgid)


def test_a_declared_length_over_the_limit_says_so() -> None:
    error = fatal(b"\xdd\xff\xff\xff\xff", limit=1024)
    assert error.message == (
        "message over the 1024-byte size limit; send less per request (the connection is "
        "closed: the stream cannot be resynchronized)"
    )


def test_a_message_of_exactly_the_limit_passes_byte_by_byte() -> None:
    data = request_of_size(1024)
    conn = RpcConnection(1024)
    events: list[Any] = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        events.extend(conn.events())
    assert [type(e) for e in events] == [Request]


def test_the_largest_msgid_is_valid() -> None:
    assert feed(encode_request(MSGID_MAX, "ping")) == [Request(MSGID_MAX, "ping", {})]
    assert fatal(pack([0, MSGID_MAX + 1, "m", []])).message == (
        f"msgid must be a uint32, got {MSGID_MAX + 1}"
    )
    with pytest.raises(ValueError, match=f"msgid must be a uint32, got {MSGID_MAX + 1}"):
        encode_request(MSGID_MAX + 1, "ping")


def test_a_limit_of_64_is_the_smallest_accepted() -> None:
    assert RpcConnection(64).max_message_bytes == 64
    with pytest.raises(ValueError) as info:
        RpcConnection(63)
    assert str(info.value) == "max_message_bytes below 64 cannot carry even an error response"


def test_a_map_may_declare_up_to_half_the_limit_in_entries() -> None:
    # Each map entry takes at least two bytes (here an empty key and 0), so a map of
    # limit/2 entries can still fit a message: only more than that is refused at once.
    entries = 400
    params = b"\xde" + entries.to_bytes(2, "big") + b"\xa0\x00" * entries
    data = b"\x94\x00\x05\xa1m\x91" + params
    assert len(data) <= 1024
    assert feed(data, limit=1024) == [Request(5, "m", {"": 0})]


def test_msgid_of_a_broken_message_is_found_whatever_came_before() -> None:
    good = encode_request(1, "a-method-name-longer-than-the-head")
    broken = b"\x94\x00\x07\xa2\xff\xfe\x90"  # msgid 7, then invalid UTF-8
    # The good message arrives in two chunks, so the broken one starts inside a later
    # chunk than the stream's first byte.
    conn = RpcConnection()
    conn.receive_data(good[:3])
    assert conn.next_event() is NEED_DATA
    conn.receive_data(good[3:] + broken)
    assert conn.next_event() == Request(1, "a-method-name-longer-than-the-head", {})
    with pytest.raises(ProtocolError) as info:
        conn.next_event()
    assert info.value.msgid == 7 and info.value.kind is MessageKind.REQUEST
    # Byte by byte: the head is assembled across many chunks.
    conn = RpcConnection()
    events: list[Any] = []
    with pytest.raises(ProtocolError) as info:
        for i in range(len(good + broken)):
            conn.receive_data((good + broken)[i : i + 1])
            events.extend(conn.events())
    assert events == [Request(1, "a-method-name-longer-than-the-head", {})]
    assert info.value.msgid == 7


def test_an_error_response_keeps_its_result_and_bytes_stay_bytes() -> None:
    [response] = feed(pack([1, 5, {"code": "x", "message": "m"}, "partial"]))
    assert isinstance(response, Response) and response.result == "partial"
    assert response.error is not None and response.error.args == ("m",)
    assert feed(encode_response(6, b"\xff\x00")) == [Response(6, None, b"\xff\x00")]


def test_nothing_after_the_end_of_stream_counts() -> None:
    conn = RpcConnection()
    conn.receive_data(b"")
    conn.receive_data(encode_request(1, "late"))
    assert list(conn.events()) == [ConnectionClosed(partial=False)]


def test_encoding_sets_and_refusing_the_unknown() -> None:
    names = {"f", "e", "d", "c", "b", "a"}  # sorted, not in hash order
    [response] = feed(encode_response(1, {"names": names, "mixed": {1, "x"}}))
    assert isinstance(response, Response)
    assert response.result["names"] == ["a", "b", "c", "d", "e", "f"]
    assert sorted(map(str, response.result["mixed"])) == ["1", "x"]
    with pytest.raises(TypeError, match="cannot encode object as msgpack"):
        encode_response(1, object())


def test_reprs_name_what_they_are() -> None:
    assert repr(NEED_DATA) == "NEED_DATA"
    assert repr(RpcError("x", "m", a=1, b=[2])) == "RpcError('x', 'm', a=1, b=[2])"


def test_an_error_whose_data_cannot_be_encoded_keeps_its_code() -> None:
    [response] = feed(encode_error(4, RpcError(ErrorCode.NOT_FOUND, "gone", thing=object())))
    assert isinstance(response, Response) and response.error is not None
    assert (response.error.code, response.error.message, response.error.data) == (
        ErrorCode.NOT_FOUND,
        "gone",
        {},
    )


# -- what a connection costs (docs/reliability.md, "Where the daemon's memory went")


def test_a_closed_connection_is_freed_without_the_cyclic_gc() -> None:
    """The server's connections count elements through the unpacker's hooks; hooks bound
    to the connection made a reference cycle, so each closed connection's decoder stayed
    allocated until a full collection: tens of MiB between two in the chaos soak."""
    import gc
    import weakref

    gc.disable()
    try:
        conn = RpcConnection(1 << 20, max_elements=1000, max_depth=32)
        conn.receive_data(pack([0, 1, "status", [{"tenant": "a", "n": [1, 2]}]]))
        assert isinstance(conn.next_event(), Request)
        gone = weakref.ref(conn)
        del conn
        assert gone() is None, "a connection outlived its last reference"
    finally:
        gc.enable()


def test_a_connection_does_not_reserve_a_whole_message_buffer() -> None:
    """The decoder's buffer grows with the messages; it is not the 1 MiB limit up front
    (every open control connection held 1 MiB before)."""
    import tracemalloc

    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        conns = [RpcConnection(1 << 20, max_elements=1000) for _ in range(8)]
        per_connection = (tracemalloc.get_traced_memory()[0] - before) / len(conns)
        # A message near the limit still decodes: the buffer grows to it.
        big = pack([0, 7, "set", [{"x": "x" * (900 << 10)}]])
        conns[0].receive_data(big)
        event = conns[0].next_event()
    finally:
        tracemalloc.stop()
    assert per_connection < 128 << 10, per_connection
    assert isinstance(event, Request) and len(event.params["x"]) == 900 << 10
