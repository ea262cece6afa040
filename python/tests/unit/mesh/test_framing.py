"""Frames and records."""

from __future__ import annotations

import pytest
from keel.mesh.errors import LocalProtocolError, RemoteProtocolError
from keel.mesh.framing import FrameReader, RecordType, decode_record, encode_frame, encode_record


def test_frames_in_any_chunking() -> None:
    stream = encode_frame(b"one") + encode_frame(b"two" * 100) + encode_frame(b"3")
    for size in (1, 2, 3, 7, len(stream)):
        reader = FrameReader()
        got = []
        for i in range(0, len(stream), size):
            reader.feed(stream[i : i + size])
            while (frame := reader.next_frame()) is not None:
                got.append(frame)
        assert got == [b"one", b"two" * 100, b"3"]
        before_eof = reader.eof
        reader.feed(b"")
        assert (before_eof, reader.eof) == (False, True)
        assert reader.next_frame() is None


def test_frames_fed_before_any_is_taken() -> None:
    """Chunks fed one after another, frames cut across them, then taken all at once."""
    stream = encode_frame(b"a" * 300) + encode_frame(b"b") + encode_frame(b"c" * 70)
    for size in (1, 5, 299, 301, 303):
        reader = FrameReader()
        for i in range(0, len(stream), size):
            reader.feed(stream[i : i + size])
        assert reader.buffered == len(stream)
        got = []
        while (frame := reader.next_frame()) is not None:
            got.append(bytes(frame))
        assert got == [b"a" * 300, b"b", b"c" * 70]
        assert reader.buffered == 0


def test_a_frame_whole_in_one_chunk_is_a_view_of_it() -> None:
    reader = FrameReader()
    reader.feed(encode_frame(b"whole") + encode_frame(b"cut")[:3])
    whole = reader.next_frame()
    assert isinstance(whole, memoryview)
    assert bytes(whole) == b"whole"
    assert reader.next_frame() is None
    reader.feed(b"ut" + encode_frame(b"next"))
    assert reader.next_frame() == b"cut"
    assert reader.next_frame() == b"next"
    assert reader.next_frame() is None


def test_a_frame_cut_across_chunks_is_a_view_of_a_buffer_let_go_of() -> None:
    """The gathered frame is handed out as it is (no second copy); the reader gathers the
    next one in a new buffer, so the view handed out stays as it was."""
    reader = FrameReader()
    reader.feed(encode_frame(b"first") + encode_frame(b"second")[:4])
    assert reader.next_frame() == b"first"
    assert reader.next_frame() is None
    reader.feed(b"cond" + encode_frame(b"third")[:3])
    second = reader.next_frame()
    assert isinstance(second, memoryview)
    assert second.readonly
    assert reader.next_frame() is None
    reader.feed(b"hird")
    third = reader.next_frame()
    assert (bytes(second), third) == (b"second", b"third")
    assert reader.buffered == 0


def test_a_bad_length_cut_across_chunks_is_refused_once_whole() -> None:
    reader = FrameReader(max_frame_size=100)
    reader.feed(b"\x00")
    assert reader.next_frame() is None
    reader.feed(b"\x65" + b"x" * 10)
    with pytest.raises(RemoteProtocolError, match="101 bytes exceeds the maximum of 100"):
        reader.next_frame()


def test_encode_frame_bounds() -> None:
    assert encode_frame(b"x" * 65535)[:2] == b"\xff\xff"
    with pytest.raises(LocalProtocolError, match=r"outside 1\.\.65535"):
        encode_frame(b"x" * 65536)
    with pytest.raises(LocalProtocolError):
        encode_frame(b"")
    with pytest.raises(LocalProtocolError, match=r"outside 1\.\.100"):
        encode_frame(b"x" * 101, max_frame_size=100)


def test_bad_lengths() -> None:
    reader = FrameReader(max_frame_size=100)
    reader.feed(b"\x00\x65")
    with pytest.raises(RemoteProtocolError, match="101 bytes exceeds the maximum of 100"):
        reader.next_frame()
    zero = FrameReader()
    zero.feed(b"\x00\x00rest")
    with pytest.raises(RemoteProtocolError, match="zero-length"):
        zero.next_frame()
    with pytest.raises(LocalProtocolError):
        FrameReader(max_frame_size=70000)


def test_eof_inside_a_frame_or_its_length() -> None:
    for partial in (b"\x00", b"\x00\x05abc"):
        reader = FrameReader()
        reader.feed(partial)
        assert reader.next_frame() is None
        reader.feed(b"")
        with pytest.raises(RemoteProtocolError, match="middle of a frame"):
            reader.next_frame()
    after = FrameReader()
    after.feed(b"")
    after.feed(b"")
    with pytest.raises(LocalProtocolError, match="after EOF"):
        after.feed(b"x")


def test_records() -> None:
    assert decode_record(encode_record(RecordType.DATA, b"abc")) == (RecordType.DATA, b"abc")
    assert decode_record(encode_record(RecordType.KEEPALIVE)) == (RecordType.KEEPALIVE, b"")
    assert encode_record(RecordType.CLOSE, b"bye") == b"\x04bye"
    with pytest.raises(RemoteProtocolError, match="empty"):
        decode_record(b"")
    with pytest.raises(RemoteProtocolError, match="unknown transport record type 0x09"):
        decode_record(b"\x09")
    with pytest.raises(RemoteProtocolError, match="REKEY record with a body"):
        decode_record(b"\x03x")
    with pytest.raises(RemoteProtocolError, match="reason too long"):
        decode_record(b"\x04" + b"x" * 257)
