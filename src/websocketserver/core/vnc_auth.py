"""VNC Authentication without I/O: the proxy answers a VNC server's challenge itself.

Each session gets a random password (:func:`new_password`) that only the proxy and the
VNC server know: the server reads it from a password file (:func:`vncpasswd_file`,
the bytes ``vncpasswd`` and ``x11vnc -storepasswd`` write), the proxy answers the
server's 16-byte challenge with :func:`vnc_response` (RFC 6143 7.2.2), so no page or
URL ever carries a VNC password.

VNC Authentication is DES, which the standard library lacks, hence
:func:`des_encrypt_block` (FIPS 46-3), encryption of one block only: nothing here
decrypts. DES is weak (and VNC uses at most 8 password bytes), so the password is
random, one per session instance, and known only to the proxy and the VNC server.

The VNC quirk: VNC's DES is Outerbridge's ``d3des`` with its ``bytebit`` table
reversed by AT&T (so that a key byte's top bit is the one ignored, not its parity
bit): it reads a key byte's bits in the reverse order of FIPS 46-3. So for a standard
DES every VNC key is bit-reversed first: the password when answering a challenge, and
the fixed key of password files too (libvncserver's OpenSSL back end reverses both;
``x11vnc -storepasswd`` agrees). The data (challenge, padded password) is used as is.
"""

from __future__ import annotations

import secrets
import string
from collections.abc import Sequence

CHALLENGE_SIZE = 16
"""Bytes of the challenge a VNC server sends, and of the answer."""
PASSWORD_SIZE = 8
"""Bytes of a VNC password that count: longer ones are cut, shorter ones zero-padded."""
PASSWORD_FILE_KEY = bytes([23, 82, 107, 6, 35, 78, 88, 7])
"""The fixed key of VNC password files (``fixedkey`` in vncauth.c), as VNC writes it."""
PASSWORD_ALPHABET = string.ascii_letters + string.digits
"""The characters of a :func:`new_password`: one byte each, typed anywhere."""

# FIPS 46-3's tables. Bits are numbered from 1, the most significant of the input.
_IP = (58, 50, 42, 34, 26, 18, 10, 2, 60, 52, 44, 36, 28, 20, 12, 4,
       62, 54, 46, 38, 30, 22, 14, 6, 64, 56, 48, 40, 32, 24, 16, 8,
       57, 49, 41, 33, 25, 17, 9, 1, 59, 51, 43, 35, 27, 19, 11, 3,
       61, 53, 45, 37, 29, 21, 13, 5, 63, 55, 47, 39, 31, 23, 15, 7)
_FP = tuple(_IP.index(bit) + 1 for bit in range(1, 65))  # IP's inverse
_E = (32, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 8, 9, 10, 11, 12, 13, 12, 13, 14, 15, 16, 17,
      16, 17, 18, 19, 20, 21, 20, 21, 22, 23, 24, 25, 24, 25, 26, 27, 28, 29, 28, 29, 30, 31,
      32, 1)
_P = (16, 7, 20, 21, 29, 12, 28, 17, 1, 15, 23, 26, 5, 18, 31, 10,
      2, 8, 24, 14, 32, 27, 3, 9, 19, 13, 30, 6, 22, 11, 4, 25)
_PC1 = (57, 49, 41, 33, 25, 17, 9, 1, 58, 50, 42, 34, 26, 18,
        10, 2, 59, 51, 43, 35, 27, 19, 11, 3, 60, 52, 44, 36,
        63, 55, 47, 39, 31, 23, 15, 7, 62, 54, 46, 38, 30, 22,
        14, 6, 61, 53, 45, 37, 29, 21, 13, 5, 28, 20, 12, 4)
_PC2 = (14, 17, 11, 24, 1, 5, 3, 28, 15, 6, 21, 10, 23, 19, 12, 4,
        26, 8, 16, 7, 27, 20, 13, 2, 41, 52, 31, 37, 47, 55, 30, 40,
        51, 45, 33, 48, 44, 49, 39, 56, 34, 53, 46, 42, 50, 36, 29, 32)
_SHIFTS = (1, 1, 2, 2, 2, 2, 2, 2, 1, 2, 2, 2, 2, 2, 2, 1)
"""Left rotations of the key halves before each of the 16 rounds."""
_S = tuple(tuple(int(digit, 16) for digit in "".join(rows.split())) for rows in (
    "E4D12FB83A6C5907 0F74E2D1A6CB9538 41E8D62BFC973A50 FC8249175B3EA06D",
    "F18E6B34972DC05A 3D47F28EC01A69B5 0E7BA4D158C6932F D8A13F42B67C05E9",
    "A09E63F51DC7B428 D709346A285ECBF1 D6498F30B12C5AE7 1AD069874FE3B52C",
    "7DE3069A1285BC4F D8B56F03472C1AE9 A690CB7DF13E5284 3F06A1D8945BC72E",
    "2C417AB6853FD0E9 EB2C47D150FA3986 421BAD78F9C5630E B8C71E2D6F09A453",
    "C1AF92680D34E75B AF427C9561DE0B38 9EF528C3704A1DB6 432C95FABE17608D",
    "4B2EF08D3C975A61 D0B7491AE35C2F86 14BDC37EAF680592 6BD814A7950FE23C",
    "D2846FB1A93E50C7 1FD8A374C56B0E92 7B419CE206ADF358 21E74A8DFC90356B"))
"""S1..S8, each as its four rows of 16 values, one hex digit a value."""
_MASK28 = (1 << 28) - 1
_MASK32 = (1 << 32) - 1
_REVERSED_BITS = bytes(int(f"{byte:08b}"[::-1], 2) for byte in range(256))
"""A translation table: each byte with its bits in the reverse order."""


def _permute(value: int, width: int, table: Sequence[int]) -> int:
    """The bits of ``value`` (``width`` of them) that ``table`` names, in its order."""
    out = 0
    for position in table:
        out = out << 1 | (value >> (width - position)) & 1
    return out


def _subkeys(key: bytes) -> list[int]:
    """The 16 round keys of 48 bits (the key's parity bits are ignored, as PC-1 does)."""
    halves = _permute(int.from_bytes(key, "big"), 64, _PC1)
    c, d = halves >> 28, halves & _MASK28
    keys = []
    for shift in _SHIFTS:
        c = (c << shift | c >> (28 - shift)) & _MASK28
        d = (d << shift | d >> (28 - shift)) & _MASK28
        keys.append(_permute(c << 28 | d, 56, _PC2))
    return keys


def _feistel(right: int, subkey: int) -> int:
    """The round function f: expand, mix in the round key, substitute, permute."""
    mixed = _permute(right, 32, _E) ^ subkey
    out = 0
    for index, box in enumerate(_S):
        six = mixed >> (42 - 6 * index) & 0x3F
        # row: the outer bits (b1 b6), column: the inner four
        out = out << 4 | box[(six & 0x20) | (six & 1) << 4 | (six >> 1 & 0xF)]
    return _permute(out, 32, _P)


def des_encrypt_block(key: bytes, block: bytes) -> bytes:
    """DES (FIPS 46-3) of one 8-byte ``block`` under an 8-byte ``key``."""
    if len(key) != 8 or len(block) != 8:
        raise ValueError(f"DES needs an 8-byte key and block, got {len(key)} and {len(block)}")
    state = _permute(int.from_bytes(block, "big"), 64, _IP)
    left, right = state >> 32, state & _MASK32
    for subkey in _subkeys(key):
        left, right = right, left ^ _feistel(right, subkey)
    return _permute(right << 32 | left, 64, _FP).to_bytes(8, "big")


def _padded(password: str | bytes) -> bytes:
    """The password as VNC uses it: UTF-8, cut or zero-padded to 8 bytes.

    VNC reads a password as a C string, so a NUL would end it there: refused, since
    the server and this module would then disagree on the key.
    """
    data = password.encode() if isinstance(password, str) else password
    if b"\0" in data:
        raise ValueError("a VNC password cannot contain a NUL byte")
    return data[:PASSWORD_SIZE].ljust(PASSWORD_SIZE, b"\0")


def vnc_response(password: str | bytes, challenge: bytes) -> bytes:
    """The 16 bytes that answer a VNC server's ``challenge`` for ``password``.

    Each half of the challenge DES-encrypted under the padded password, its bits
    reversed (the VNC quirk, see the module's docstring).
    """
    if len(challenge) != CHALLENGE_SIZE:
        raise ValueError(f"a VNC challenge has {CHALLENGE_SIZE} bytes, got {len(challenge)}")
    key = _padded(password).translate(_REVERSED_BITS)
    return des_encrypt_block(key, challenge[:8]) + des_encrypt_block(key, challenge[8:])


def vncpasswd_file(password: str | bytes) -> bytes:
    """The 8 bytes of a VNC password file for ``password`` (for ``x11vnc -rfbauth``).

    The padded password DES-encrypted under VNC's fixed key, which the VNC quirk
    bit-reverses like any other VNC key (the file only hides the password).
    """
    return des_encrypt_block(PASSWORD_FILE_KEY.translate(_REVERSED_BITS), _padded(password))


def new_password() -> str:
    """A random 8-character password: letters and digits, all 8 bytes VNC uses."""
    return "".join(secrets.choice(PASSWORD_ALPHABET) for _ in range(PASSWORD_SIZE))
