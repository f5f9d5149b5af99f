"""Media bytes the simulator's CDN serves: a real minimal MP4, a tiny JPEG, a silent MP3.

Everything is built in pure Python so the simulator has no dependencies. The MP4 is a structurally
valid ISO-BMFF file (ftyp, free, moov with one H.264 video track, mdat). Its single 16x16 frame is an
I_PCM macroblock, the one H.264 coding that needs no entropy coder, so the file is meant to be
decodable as well as parseable. The padding that brings a file up to the requested size sits at the
end of ``mdat``, after the sample: readers ignore it, and it is pseudo-random (seeded by the token)
so that a truncated, reordered or mixed-up download changes the file's hash.

:func:`walk_boxes` parses the box tree back; the tests use it, and so can anyone who wants to check
that a downloaded file is the one the simulator served.
"""

from __future__ import annotations

import functools
import hashlib
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field

#: Boxes whose payload is a list of child boxes (the ones this module writes).
CONTAINER_BOXES = frozenset({b"moov", b"trak", b"mdia", b"minf", b"dinf", b"stbl", b"edts", b"udta"})

_WIDTH = 16
_HEIGHT = 16
_MOVIE_TIMESCALE = 1000
_MEDIA_TIMESCALE = 30
# One frame shown for one second: the file is a placeholder, not a watchable clip.
_DURATION_MS = 1000
# The identity transform, as ISO-BMFF writes it (16.16 and 2.30 fixed point).
_MATRIX = struct.pack(">9I", 0x00010000, 0, 0, 0, 0x00010000, 0, 0, 0, 0x40000000)


# ---------------------------------------------------------------------------------------------
# ISO-BMFF writing
# ---------------------------------------------------------------------------------------------


def _box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def _full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return _box(kind, struct.pack(">I", (version << 24) | flags), *payload)


def _ftyp() -> bytes:
    # isom as the major brand, mp42 among the compatible ones: what ffmpeg writes for H.264 MP4.
    return _box(b"ftyp", b"isom", struct.pack(">I", 0x200), b"isom", b"iso2", b"avc1", b"mp41", b"mp42")


def _mvhd() -> bytes:
    return _full_box(
        b"mvhd",
        0,
        0,
        struct.pack(">IIII", 0, 0, _MOVIE_TIMESCALE, _DURATION_MS),
        struct.pack(">IH", 0x00010000, 0x0100),  # rate 1.0, volume 1.0
        bytes(10),  # reserved
        _MATRIX,
        bytes(24),  # pre_defined
        struct.pack(">I", 2),  # next_track_ID
    )


def _tkhd() -> bytes:
    # flags 3 = track enabled + used in the presentation.
    return _full_box(
        b"tkhd",
        0,
        3,
        struct.pack(">IIIII", 0, 0, 1, 0, _DURATION_MS),
        bytes(8),  # reserved
        struct.pack(">hhhH", 0, 0, 0, 0),  # layer, alternate_group, volume (0 for video), reserved
        _MATRIX,
        struct.pack(">II", _WIDTH << 16, _HEIGHT << 16),
    )


def _mdhd() -> bytes:
    # 0x55C4 is the packed ISO-639 code "und".
    return _full_box(
        b"mdhd", 0, 0, struct.pack(">IIIIHH", 0, 0, _MEDIA_TIMESCALE, _MEDIA_TIMESCALE, 0x55C4, 0)
    )


def _hdlr() -> bytes:
    return _full_box(b"hdlr", 0, 0, struct.pack(">I", 0), b"vide", bytes(12), b"VideoHandler\x00")


def _dinf() -> bytes:
    # One self-contained data reference (flag 1): the samples live in this file.
    return _box(b"dinf", _full_box(b"dref", 0, 0, struct.pack(">I", 1), _full_box(b"url ", 0, 1)))


def _avc1(sps: bytes, pps: bytes) -> bytes:
    avcc = _box(
        b"avcC",
        bytes([1, sps[1], sps[2], sps[3], 0xFF, 0xE1]),  # 4-byte NAL lengths, one SPS
        struct.pack(">H", len(sps)),
        sps,
        bytes([1]),
        struct.pack(">H", len(pps)),
        pps,
    )
    compressor = b"gen-simulator"
    return _box(
        b"avc1",
        bytes(6),
        struct.pack(">H", 1),  # data_reference_index
        bytes(16),  # pre_defined + reserved
        struct.pack(">HHIIIH", _WIDTH, _HEIGHT, 0x00480000, 0x00480000, 0, 1),
        bytes([len(compressor)]) + compressor.ljust(31, b"\x00"),
        struct.pack(">Hh", 0x0018, -1),  # depth, pre_defined
        avcc,
    )


def _stbl(sample_size: int, chunk_offset: int, sps: bytes, pps: bytes) -> bytes:
    return _box(
        b"stbl",
        _full_box(b"stsd", 0, 0, struct.pack(">I", 1), _avc1(sps, pps)),
        _full_box(b"stts", 0, 0, struct.pack(">III", 1, 1, _MEDIA_TIMESCALE)),
        _full_box(b"stsc", 0, 0, struct.pack(">IIII", 1, 1, 1, 1)),
        _full_box(b"stsz", 0, 0, struct.pack(">III", 0, 1, sample_size)),
        _full_box(b"stco", 0, 0, struct.pack(">II", 1, chunk_offset)),
    )


def _moov(sample_size: int, chunk_offset: int, sps: bytes, pps: bytes) -> bytes:
    vmhd = _full_box(b"vmhd", 0, 1, bytes(8))
    minf = _box(b"minf", vmhd, _dinf(), _stbl(sample_size, chunk_offset, sps, pps))
    mdia = _box(b"mdia", _mdhd(), _hdlr(), minf)
    return _box(b"moov", _mvhd(), _box(b"trak", _tkhd(), mdia))


# ---------------------------------------------------------------------------------------------
# H.264: one 16x16 IDR frame made of a single I_PCM macroblock
# ---------------------------------------------------------------------------------------------


@dataclass
class _Bits:
    """An MSB-first bit writer with the Exp-Golomb codes H.264 headers use."""

    bits: list[int] = field(default_factory=list)

    def u(self, width: int, value: int) -> None:
        self.bits.extend((value >> (width - 1 - i)) & 1 for i in range(width))

    def ue(self, value: int) -> None:
        code = value + 1
        self.u(code.bit_length() - 1, 0)
        self.u(code.bit_length(), code)

    def se(self, value: int) -> None:
        self.ue(2 * value - 1 if value > 0 else -2 * value)

    def align_zero(self) -> None:
        while len(self.bits) % 8:
            self.bits.append(0)

    def trailing(self) -> bytes:
        """rbsp_trailing_bits: a stop bit, then zeros up to the byte boundary."""
        self.bits.append(1)
        self.align_zero()
        return bytes(int("".join(map(str, self.bits[i : i + 8])), 2) for i in range(0, len(self.bits), 8))


def _nal(header: int, rbsp: bytes) -> bytes:
    # Emulation prevention: no 00 00 0x (x <= 3) may appear inside a NAL unit.
    out = bytearray([header])
    zeros = 0
    for byte in rbsp:
        if zeros >= 2 and byte <= 3:
            out.append(3)
            zeros = 0
        out.append(byte)
        zeros = zeros + 1 if byte == 0 else 0
    return bytes(out)


def _sps() -> bytes:
    b = _Bits()
    b.u(8, 66)  # profile_idc: Baseline
    b.u(8, 0xC0)  # constraint_set0/1 (Constrained Baseline)
    b.u(8, 10)  # level_idc 1.0
    b.ue(0)  # seq_parameter_set_id
    b.ue(0)  # log2_max_frame_num_minus4
    b.ue(2)  # pic_order_cnt_type 2: output order = decode order
    b.ue(1)  # max_num_ref_frames
    b.u(1, 0)  # gaps_in_frame_num_value_allowed_flag
    b.ue(_WIDTH // 16 - 1)  # pic_width_in_mbs_minus1
    b.ue(_HEIGHT // 16 - 1)  # pic_height_in_map_units_minus1
    b.u(1, 1)  # frame_mbs_only_flag
    b.u(1, 1)  # direct_8x8_inference_flag
    b.u(1, 0)  # frame_cropping_flag
    b.u(1, 0)  # vui_parameters_present_flag
    return _nal(0x67, b.trailing())


def _pps() -> bytes:
    b = _Bits()
    b.ue(0)  # pic_parameter_set_id
    b.ue(0)  # seq_parameter_set_id
    b.u(1, 0)  # entropy_coding_mode_flag: CAVLC
    b.u(1, 0)  # bottom_field_pic_order_in_frame_present_flag
    b.ue(0)  # num_slice_groups_minus1
    b.ue(0)  # num_ref_idx_l0_default_active_minus1
    b.ue(0)  # num_ref_idx_l1_default_active_minus1
    b.u(1, 0)  # weighted_pred_flag
    b.u(2, 0)  # weighted_bipred_idc
    b.se(0)  # pic_init_qp_minus26
    b.se(0)  # pic_init_qs_minus26
    b.se(0)  # chroma_qp_index_offset
    b.u(1, 1)  # deblocking_filter_control_present_flag
    b.u(1, 0)  # constrained_intra_pred_flag
    b.u(1, 0)  # redundant_pic_cnt_present_flag
    return _nal(0x68, b.trailing())


def _idr_slice(seed: bytes) -> bytes:
    b = _Bits()
    b.ue(0)  # first_mb_in_slice
    b.ue(7)  # slice_type: I (all slices of the picture)
    b.ue(0)  # pic_parameter_set_id
    b.u(4, 0)  # frame_num (log2_max_frame_num = 4)
    b.ue(0)  # idr_pic_id
    b.u(1, 0)  # no_output_of_prior_pics_flag
    b.u(1, 0)  # long_term_reference_flag
    b.se(0)  # slice_qp_delta
    b.ue(1)  # disable_deblocking_filter_idc: off
    b.ue(25)  # mb_type: I_PCM
    b.align_zero()  # pcm_alignment_zero_bit
    # 256 luma + 2x64 chroma samples (4:2:0). A flat colour picked from the token, kept inside
    # 16..235 so no sample is 0 (which older H.264 revisions forbid in PCM).
    luma, cb, cr = (16 + byte % 220 for byte in seed[:3])
    for sample, count in ((luma, 256), (cb, 64), (cr, 64)):
        for _ in range(count):
            b.u(8, sample)
    return _nal(0x65, b.trailing())


# ---------------------------------------------------------------------------------------------
# Public builders
# ---------------------------------------------------------------------------------------------


def minimal_mp4_size(token: str) -> int:
    """The smallest file :func:`build_mp4` can make for ``token`` (about 1 KB)."""
    return len(_build_mp4(token, 0))


@functools.lru_cache(maxsize=8)
def build_mp4(token: str, size: int) -> bytes:
    """A valid MP4 for ``token`` of exactly ``size`` bytes (or the minimum, if ``size`` is smaller).

    Deterministic: the same (token, size) always gives the same bytes. Cached, because the CDN serves
    the same output many times and a benchmark may ask for tens of megabytes.
    """
    return _build_mp4(token, size)


def _build_mp4(token: str, size: int) -> bytes:
    seed = hashlib.sha256(token.encode()).digest()
    sps, pps = _sps(), _pps()
    idr = _idr_slice(seed)
    # Samples in MP4 are length-prefixed NAL units (lengthSizeMinusOne = 3 in avcC).
    sample = struct.pack(">I", len(idr)) + idr
    ftyp = _ftyp()
    # The token makes every generation's file distinct; a free box is ignored by every reader.
    free = _box(b"free", b"gen-simulator output " + token.encode())
    moov_size = len(_moov(len(sample), 0, sps, pps))  # stco is fixed-width, so the size is final
    mdat_data_offset = len(ftyp) + len(free) + moov_size + 8
    moov = _moov(len(sample), mdat_data_offset, sps, pps)
    padding = max(0, size - (mdat_data_offset + len(sample)))
    filler = random.Random(seed).randbytes(padding)
    return b"".join([ftyp, free, moov, _box(b"mdat", sample, filler)])


def build_jpeg() -> bytes:
    """A valid 8x8 mid-grey baseline JPEG (one block: DC difference 0, then end-of-block)."""
    app0 = (
        b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00" + struct.pack(">HH", 1, 1) + b"\x00\x00"
    )
    dqt = b"\xff\xdb" + struct.pack(">H", 67) + b"\x00" + bytes([1] * 64)
    sof0 = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, 8, 8, 1) + b"\x01\x11\x00"
    # Each Huffman table holds a single 1-bit code "0": category 0 (DC) and end-of-block (AC).
    counts = bytes([1] + [0] * 15)
    dht_dc = b"\xff\xc4" + struct.pack(">H", 20) + b"\x00" + counts + b"\x00"
    dht_ac = b"\xff\xc4" + struct.pack(">H", 20) + b"\x10" + counts + b"\x00"
    sos = b"\xff\xda" + struct.pack(">H", 8) + b"\x01\x01\x00\x00\x3f\x00"
    scan = bytes([0b00111111])  # "0" (DC=0) + "0" (EOB), padded with 1-bits
    return b"\xff\xd8" + app0 + dqt + sof0 + dht_dc + dht_ac + sos + scan + b"\xff\xd9"


def build_mp3(frames: int = 10) -> bytes:
    """Silent MPEG-1 Layer III audio, mono 128 kbit/s 44.1 kHz (417-byte frames, zero side info)."""
    header = b"\xff\xfb\x90\xc0"
    frame_len = 144 * 128_000 // 44_100
    return (header + bytes(frame_len - len(header))) * frames


# ---------------------------------------------------------------------------------------------
# Parsing back
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Box:
    """One parsed box: its type, where it starts, its total size, and its children if a container."""

    kind: str
    offset: int
    size: int
    children: tuple[Box, ...] = ()


def iter_boxes(data: bytes, start: int = 0, end: int | None = None) -> Iterator[Box]:
    """Parse the boxes in ``data[start:end]``, recursing into containers; raise ValueError if broken.

    Sizes must tile the range exactly: a box that overruns its parent, or a size below the header
    length, is an error, which is what makes this a structural check and not just a scan.
    """
    stop = len(data) if end is None else end
    pos = start
    while pos < stop:
        if stop - pos < 8:
            raise ValueError(f"truncated box header at offset {pos}")
        size, kind = struct.unpack_from(">I4s", data, pos)
        header = 8
        if size == 1:  # 64-bit largesize follows the type
            if stop - pos < 16:
                raise ValueError(f"truncated largesize at offset {pos}")
            (size,) = struct.unpack_from(">Q", data, pos + 8)
            header = 16
        elif size == 0:  # box extends to the end of its parent
            size = stop - pos
        if size < header or pos + size > stop:
            raise ValueError(f"box {kind!r} at offset {pos} has bad size {size}")
        children: tuple[Box, ...] = ()
        if kind in CONTAINER_BOXES:
            children = tuple(iter_boxes(data, pos + header, pos + size))
        yield Box(kind.decode("latin-1"), pos, size, children)
        pos += size


def walk_boxes(data: bytes) -> list[Box]:
    """The top-level boxes of an ISO-BMFF file, with nested children; see :func:`iter_boxes`."""
    return list(iter_boxes(data))
