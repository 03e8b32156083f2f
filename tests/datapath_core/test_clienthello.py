"""The ClientHello parser, fed real hellos from Python's ssl module and crafted bad ones."""

from __future__ import annotations

import dataclasses
import itertools
import ssl
import struct
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.clienthello import (
    BadClientHello,
    ClientHelloError,
    ClientHelloInfo,
    ClientHelloParser,
    HelloReason,
    Incomplete,
    NotTls,
)

MESH_SNI = "payments.shop.8443.aws-use1.gcp-euw1.meshfed"


def real_hello(
    server_hostname: str | None,
    alpn: list[str] | None = None,
    max_version: ssl.TLSVersion | None = None,
) -> bytes:
    """The bytes OpenSSL sends first, captured through memory BIOs (no socket)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if max_version is not None:
        ctx.maximum_version = max_version
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=server_hostname)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


HELLO_H2 = real_hello(MESH_SNI, ["h2"])
HELLO_NO_SNI = real_hello(None, ["h2", "http/1.1"])
HELLO_TLS12 = real_hello("legacy.example", max_version=ssl.TLSVersion.TLSv1_2)
REAL = [HELLO_H2, HELLO_NO_SNI, HELLO_TLS12]


def outcome(chunks: typing.Iterable[bytes], max_bytes: int = 16384) -> object:
    """Feed chunks; the final result, or the error reason (for split-invariance)."""
    parser = ClientHelloParser(max_bytes)
    result: object = Incomplete(0)
    try:
        for chunk in chunks:
            result = parser.feed(chunk)
            if isinstance(result, ClientHelloInfo):
                break
    except ClientHelloError as e:
        return (type(e).__name__, e.reason)
    return result


def rerecord(hello: bytes, size: int) -> bytes:
    """The same handshake message, carried in records of at most ``size`` bytes."""
    assert hello[0] == 22
    body = hello[5:]
    out = bytearray()
    for i in range(0, len(body), size):
        frag = body[i : i + size]
        out += bytes([22, 3, 1]) + struct.pack(">H", len(frag)) + frag
    return bytes(out)


def build_hello(extensions: list[tuple[int, bytes]] | None, *, session_id: bytes = b"") -> bytes:
    """A minimal hand-built ClientHello record with the given raw extensions."""
    body = b"\x03\x03" + b"\x11" * 32 + bytes([len(session_id)]) + session_id
    body += b"\x00\x02\x13\x01" + b"\x01\x00"
    if extensions is not None:
        exts = b"".join(struct.pack(">HH", t, len(d)) + d for t, d in extensions)
        body += struct.pack(">H", len(exts)) + exts
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + struct.pack(">H", len(hs)) + hs


def sni_ext(*entries: tuple[int, bytes]) -> tuple[int, bytes]:
    names = b"".join(bytes([t]) + struct.pack(">H", len(n)) + n for t, n in entries)
    return 0, struct.pack(">H", len(names)) + names


# -- real hellos ---------------------------------------------------------------


def test_real_tls13_hello_with_sni_and_alpn() -> None:
    info = ClientHelloParser().feed(HELLO_H2)
    assert isinstance(info, ClientHelloInfo)
    assert info.sni == MESH_SNI
    assert info.alpn == ("h2",)
    assert 0x0304 in info.supported_versions
    assert info.legacy_version == 0x0303
    assert info.raw == HELLO_H2
    assert info.hello_end == len(HELLO_H2)
    assert info.require_sni() == MESH_SNI


def test_real_hello_without_sni_parses_but_cannot_be_routed() -> None:
    info = ClientHelloParser().feed(HELLO_NO_SNI)
    assert isinstance(info, ClientHelloInfo)
    assert info.sni is None
    assert info.alpn == ("h2", "http/1.1")
    with pytest.raises(BadClientHello) as e:
        info.require_sni()
    assert e.value.reason == "no_sni"


def test_real_tls12_only_hello_has_no_supported_versions() -> None:
    info = ClientHelloParser().feed(HELLO_TLS12)
    assert isinstance(info, ClientHelloInfo)
    assert info.sni == "legacy.example"
    assert info.supported_versions == ()


@pytest.mark.parametrize("hello", REAL, ids=["h2", "no_sni", "tls12"])
def test_byte_by_byte_is_incomplete_until_the_last_byte(hello: bytes) -> None:
    parser = ClientHelloParser()
    for i in range(len(hello) - 1):
        assert parser.feed(hello[i : i + 1]) == Incomplete(i + 1)
    info = parser.feed(hello[-1:])
    assert isinstance(info, ClientHelloInfo)
    assert info == ClientHelloParser().feed(hello)


@pytest.mark.parametrize("hello", REAL, ids=["h2", "no_sni", "tls12"])
def test_every_two_way_split_gives_the_same_info(hello: bytes) -> None:
    whole = ClientHelloParser().feed(hello)
    for cut in range(len(hello) + 1):
        assert outcome([hello[:cut], hello[cut:]]) == whole


@given(st.lists(st.integers(min_value=0, max_value=len(HELLO_H2)), max_size=12))
def test_arbitrary_splits_give_the_same_info(cuts: list[int]) -> None:
    points = [0, *sorted(cuts), len(HELLO_H2)]
    chunks = [HELLO_H2[a:b] for a, b in itertools.pairwise(points)]
    assert outcome(chunks) == ClientHelloParser().feed(HELLO_H2)


@given(st.integers(min_value=1, max_value=600))
def test_hello_spread_over_several_records(size: int) -> None:
    wire = rerecord(HELLO_H2, size)
    info = outcome([wire])
    assert isinstance(info, ClientHelloInfo)
    assert info.sni == MESH_SNI
    assert info.raw == wire
    # and byte by byte too
    assert outcome([wire[i : i + 1] for i in range(len(wire))]) == info


def test_bytes_after_the_hello_are_kept_for_replay() -> None:
    extra = b"\x14\x03\x03\x00\x01\x01" + b"\x17\x03\x03\x00\x05early"
    info = ClientHelloParser().feed(HELLO_H2 + extra)
    assert isinstance(info, ClientHelloInfo)
    assert info.raw == HELLO_H2 + extra
    assert info.hello_end == len(HELLO_H2)


def test_truncated_hello_is_incomplete_not_an_error() -> None:
    assert ClientHelloParser().feed(HELLO_H2[:-1]) == Incomplete(len(HELLO_H2) - 1)


def test_feeding_after_the_result_is_a_caller_bug() -> None:
    parser = ClientHelloParser()
    parser.feed(HELLO_H2)
    with pytest.raises(RuntimeError):
        parser.feed(b"x")


# -- not TLS -------------------------------------------------------------------


def test_plain_http_is_refused_on_the_first_byte() -> None:
    parser = ClientHelloParser()
    with pytest.raises(NotTls) as e:
        parser.feed(b"G")
    assert e.value.reason == "not_tls"
    # sticky
    with pytest.raises(NotTls):
        parser.feed(b"ET / HTTP/1.1\r\n")


def test_sslv2_compatible_hello_is_refused() -> None:
    sslv2 = bytes.fromhex("802e0103010015000000100700c0030080010080060040040080020080")
    with pytest.raises(NotTls) as e:
        ClientHelloParser().feed(sslv2)
    assert e.value.reason == "sslv2"


def test_handshake_byte_then_other_protocol_is_not_tls() -> None:
    with pytest.raises(NotTls) as e:
        ClientHelloParser().feed(b"\x16\x00")
    assert e.value.reason == "not_tls"


# -- bad hellos ----------------------------------------------------------------


def test_oversize_hello_refused_as_soon_as_its_length_is_known() -> None:
    parser = ClientHelloParser(max_bytes=256)
    # Record header says 512 bytes: too big before a single byte of it arrives.
    with pytest.raises(BadClientHello) as e:
        parser.feed(HELLO_H2[:5])
    assert e.value.reason == "too_large"


def test_handshake_length_beyond_the_budget_is_too_large() -> None:
    # A 200-byte record announcing a 2^24-1 byte ClientHello.
    hs = b"\x01\xff\xff\xff" + b"\x00" * 196
    with pytest.raises(BadClientHello) as e:
        ClientHelloParser().feed(b"\x16\x03\x01\x00\xc8" + hs)
    assert e.value.reason == "too_large"


def test_many_small_records_cannot_exceed_the_budget() -> None:
    wire = rerecord(HELLO_H2, 1)  # 6 bytes per handshake byte
    assert len(wire) > 2048
    assert outcome([wire], max_bytes=2048) == ("BadClientHello", "too_large")


@pytest.mark.parametrize(
    ("wire", "reason"),
    [
        (b"\x16\x03\x04\x00\x05", "bad_record_version"),
        (b"\x16\x03\x00\x00\x05", "bad_record_version"),
        (b"\x16\x03\x01\x00\x00", "malformed"),  # zero-length handshake record
        (b"\x16\x03\x01\x40\x01", "malformed"),  # record over 2^14
        (b"\x16\x03\x01\x00\x04\x02\x00\x00\x30", "not_client_hello"),
        (b"\x16\x03\x01\x00\x04\x01\x00\x00\x05", "malformed"),  # hello too short
    ],
)
def test_bad_record_or_handshake_headers(wire: bytes, reason: str) -> None:
    assert outcome([wire]) == ("BadClientHello", reason)


def test_second_record_of_another_type_is_malformed() -> None:
    wire = rerecord(HELLO_H2, 100)
    wire = wire[:105] + b"\x17" + wire[106:]
    assert outcome([wire]) == ("BadClientHello", "malformed")


def test_record_carrying_more_than_the_hello_is_malformed() -> None:
    hello = build_hello([sni_ext((0, MESH_SNI.encode()))])
    hs = hello[5:] + b"\x00"
    wire = b"\x16\x03\x01" + struct.pack(">H", len(hs)) + hs
    assert outcome([wire]) == ("BadClientHello", "malformed")


def test_lying_cipher_suites_length_is_malformed() -> None:
    hello = bytearray(HELLO_H2)
    # record(5) handshake(4) version(2) random(32) session id (1 + n)
    sid_len = hello[5 + 4 + 2 + 32]
    at = 5 + 4 + 2 + 32 + 1 + sid_len
    hello[at : at + 2] = b"\xff\xfe"
    assert outcome([bytes(hello)]) == ("BadClientHello", "malformed")


def test_built_hello_parses() -> None:
    info = outcome([build_hello([sni_ext((0, b"a.example"))])])
    assert isinstance(info, ClientHelloInfo)
    assert info.sni == "a.example"


def test_hello_without_extensions_has_no_sni() -> None:
    info = outcome([build_hello(None)])
    assert isinstance(info, ClientHelloInfo)
    assert info.sni is None


@pytest.mark.parametrize(
    ("extensions", "reason"),
    [
        ([sni_ext((0, b"a.example")), sni_ext((0, b"b.example"))], "duplicate_extension"),
        ([(16, b"\x00\x03\x02h2"), (16, b"\x00\x03\x02h2")], "duplicate_extension"),
        ([sni_ext((0, b"a.example"), (0, b"b.example"))], "bad_sni"),
        ([sni_ext((0, b"a.example"), (1, b"b.example"))], "bad_sni"),
        ([sni_ext((1, b"a.example"))], "bad_sni"),
        ([sni_ext((0, b""))], "bad_sni"),
        ([sni_ext((0, b"a.example\x00.evil"))], "bad_sni"),
        ([sni_ext((0, b"a example"))], "bad_sni"),
        ([sni_ext((0, "ä.example".encode()))], "bad_sni"),
        ([sni_ext((0, b"a" * 254))], "bad_sni"),
        ([(0, b"")], "bad_sni"),
        ([(0, b"\x00\x10\x00\x00\x03abc")], "bad_sni"),  # list length lies
        ([(16, b"\x00\x00")], "malformed"),  # empty ALPN list
        ([(16, b"\x00\x01\x00")], "malformed"),  # empty protocol name
        ([(16, b"\x00\x05\x08h2")], "malformed"),  # name length lies
        ([(43, b"\x03\x03\x04\x03")], "malformed"),  # odd length
        ([(43, b"\x00")], "malformed"),
        ([(43, b"\x02\x03\x04\x00")], "malformed"),  # trailing byte
    ],
)
def test_bad_extensions(extensions: list[tuple[int, bytes]], reason: str) -> None:
    assert outcome([build_hello(extensions)]) == ("BadClientHello", reason)


def test_long_session_id_is_malformed() -> None:
    assert outcome([build_hello([], session_id=b"s" * 33)]) == ("BadClientHello", "malformed")


def test_extension_block_length_lies() -> None:
    hello = bytearray(build_hello([sni_ext((0, b"a.example"))]))
    ext_len_at = 5 + 4 + 2 + 32 + 1 + 4 + 2
    hello[ext_len_at : ext_len_at + 2] = b"\x00\x40"
    assert outcome([bytes(hello)]) == ("BadClientHello", "malformed")


# -- fuzzing -------------------------------------------------------------------

mutations = st.lists(
    st.tuples(
        st.sampled_from(["flip", "set", "delete", "insert"]),
        st.integers(min_value=0, max_value=len(HELLO_H2) - 1),
        st.integers(min_value=0, max_value=255),
    ),
    min_size=1,
    max_size=6,
)


def mutate(hello: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    b = bytearray(hello)
    for op, pos, val in ops:
        pos %= max(len(b), 1)
        if op == "flip" and b:
            b[pos] ^= 1 << (val % 8)
        elif op == "set" and b:
            b[pos] = val
        elif op == "delete" and b:
            del b[pos]
        else:
            b.insert(pos, val)
    return bytes(b)


@settings(max_examples=400)
@given(st.sampled_from(REAL), mutations, st.integers(min_value=1, max_value=64))
def test_mutated_hellos_give_typed_outcomes_independent_of_splitting(
    hello: bytes, ops: list[tuple[str, int, int]], step: int
) -> None:
    wire = mutate(hello, ops)
    whole = outcome([wire])
    assert isinstance(whole, Incomplete | ClientHelloInfo | tuple)
    if isinstance(whole, tuple):
        assert whole[1] in typing.get_args(HelloReason)
    chunked = outcome([wire[i : i + step] for i in range(0, len(wire), step)])
    if isinstance(whole, Incomplete):
        assert isinstance(chunked, Incomplete)
    elif isinstance(whole, ClientHelloInfo):
        # Whole-feeding also hands over bytes after the hello; the hello is the same.
        assert isinstance(chunked, ClientHelloInfo)
        assert chunked.hello_end == whole.hello_end
        assert chunked.raw[: chunked.hello_end] == whole.raw[: whole.hello_end]
        assert dataclasses.replace(chunked, raw=whole.raw) == whole
    else:
        assert chunked == whole


@given(st.binary(max_size=2000))
def test_random_bytes_give_typed_outcomes(junk: bytes) -> None:
    result = outcome([b"\x16\x03\x01" + junk])
    assert isinstance(result, Incomplete | ClientHelloInfo | tuple)
    if isinstance(result, tuple):
        assert result[1] in typing.get_args(HelloReason)
