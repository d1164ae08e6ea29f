"""VNC Authentication (``core/vnc_auth.py``): DES against published vectors; the answer
and the password file against values made elsewhere (OpenSSL's DES, x11vnc's
``-storepasswd``); and a real x11vnc (on Xvfb) taking both: a password file this module
wrote, a challenge it answered, in an RFB 3.8 handshake over a plain socket."""

from __future__ import annotations

import os
import select
import shutil
import socket
import string
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from support import free_port, wait_port
from websocketserver.core.vnc_auth import (
    CHALLENGE_SIZE,
    PASSWORD_FILE_KEY,
    des_encrypt_block,
    new_password,
    vnc_response,
    vncpasswd_file,
)

# (key, plaintext, ciphertext), hex
DES_VECTORS = [
    # the worked example of J. Orlin Grabbe, "The DES Algorithm Illustrated"
    ("133457799BBCDFF1", "0123456789ABCDEF", "85E813540F0AB405"),
    # FIPS 81 appendix B, ECB: "Now is the time for all "
    ("0123456789ABCDEF", "4E6F772069732074", "3FA40E8A984D4815"),
    ("0123456789ABCDEF", "68652074696D6520", "6A271787AB8883F9"),
    ("0123456789ABCDEF", "666F7220616C6C20", "893D51EC4B563B53"),
    # the validation set of Outerbridge's d3des.c (VNC's DES, before AT&T's key quirk)
    ("0123456789ABCDEF", "0123456789ABCDE7", "C95744256A5ED31D"),
    # NIST SP 800-17: variable plaintext (A.1), variable key (A.2)
    ("0101010101010101", "8000000000000000", "95F8A5E5DD31D900"),
    ("8001010101010101", "0000000000000000", "95A8D72813DAA94D"),
    # NIST SP 800-17 table A.4: together these use every entry of every S-box
    ("7CA110454A1A6E57", "01A1D6D039776742", "690F5B0D9A26939B"),
    ("0131D9619DC1376E", "5CD54CA83DEF57DA", "7A389D10354BD271"),
    ("07A1133E4A0B2686", "0248D43806F67172", "868EBB51CAB4599A"),
    ("3849674C2602319E", "51454B582DDF440A", "7178876E01F19B2A"),
    ("04B915BA43FEB5B6", "42FD443059577FA2", "AF37FB421F8C4095"),
    ("0113B970FD34F2CE", "059B5E0851CF143A", "86A560F10EC6D85B"),
    ("0170F175468FB5E6", "0756D8E0774761D2", "0CD3DA020021DC09"),
    ("43297FAD38E373FE", "762514B829BF486A", "EA676B2CB7DB2B7A"),
    ("07A7137045DA2A16", "3BDD119049372802", "DFD64A815CAF1A0F"),
    ("04689104C2FD3B2F", "26955F6835AF609A", "5C513C9C4886C088"),
    ("37D06BB516CB7546", "164D5E404F275232", "0A2AEEAE3FF4AB77"),
    ("1F08260D1AC2465E", "6B056E18759F5CCA", "EF1BF03E5DFA575A"),
    ("584023641ABA6176", "004BD6EF09176062", "88BF0DB6D70DEE56"),
    ("025816164629B007", "480D39006EE762F2", "A1F9915541020B56"),
    ("49793EBC79B3258F", "437540C8698F3CFA", "6FBF1CAFCFFD0556"),
    ("4FB05E1515AB73A7", "072D43A077075292", "2F22E49BAB7CA1AC"),
    ("49E95D6D4CA229BF", "02FE55778117F12A", "5A6B612CC26CCE4A"),
    ("018310DC409B26D6", "1D9D5C5018F728C2", "5F4C038ED12B2E41"),
    ("1C587F1C13924FEF", "305532286D6F295A", "63FAC0D034D9F793"),
    # SSLeay's destest.c: weak, semi-weak and all-ones keys
    ("0000000000000000", "0000000000000000", "8CA64DE9C1B123A7"),
    ("FFFFFFFFFFFFFFFF", "FFFFFFFFFFFFFFFF", "7359B2163E4EDC58"),
    ("3000000000000000", "1000000000000001", "958E6E627A05557B"),
    ("0123456789ABCDEF", "1111111111111111", "17668DFC7292532D"),
    ("FEDCBA9876543210", "0123456789ABCDEF", "ED39D950FA74BCC4"),
    ("1F1F1F1F0E0E0E0E", "0123456789ABCDEF", "DB958605F8C8C606"),
    ("E0FEE0FEF1FEF1FE", "0123456789ABCDEF", "EDBFD1C66C29CCC7"),
]

# (password, challenge, answer), made with `openssl enc -des-ecb -nopad` under the
# password's bytes bit-reversed
VNC_VECTORS = [
    ("Pa55w0rd", "000102030405060708090A0B0C0D0E0F", "E401FF411DB1CF4CEDBBA1DF58AF05E2"),
    ("SECRET", "D3B1C2A4E5F60718293A4B5C6D7E8F90", "BBB23048DE33E25DBD121A467A5210BA"),
]
VNC_FIXED_KEY_REVERSED = bytes.fromhex("E84AD660C4721AE0")
"""VNC's fixed key with each byte's bits reversed: the key a standard DES needs."""
STOREPASSWD_SECRET = bytes.fromhex("467690E3F49B0146")
"""What ``x11vnc -storepasswd SECRET FILE`` (0.9.16) wrote."""
SCREEN = (320, 200)
RFB_38 = b"RFB 003.008\n"
TIMEOUT = 10.0


@pytest.mark.parametrize(("key", "plain", "cipher"), DES_VECTORS)
def test_des_matches_the_published_vectors(key: str, plain: str, cipher: str) -> None:
    assert des_encrypt_block(bytes.fromhex(key), bytes.fromhex(plain)).hex().upper() == cipher


@pytest.mark.parametrize(("key", "block"), [(7, 8), (9, 8), (8, 7), (8, 16), (0, 0)])
def test_des_takes_8_byte_keys_and_blocks_only(key: int, block: int) -> None:
    with pytest.raises(ValueError, match="8-byte"):
        des_encrypt_block(bytes(key), bytes(block))


@pytest.mark.parametrize(("password", "challenge", "answer"), VNC_VECTORS)
def test_the_answer_matches_openssl_under_the_bit_reversed_password(
        password: str, challenge: str, answer: str) -> None:
    assert vnc_response(password, bytes.fromhex(challenge)).hex().upper() == answer
    assert vnc_response(password.encode(), bytes.fromhex(challenge)).hex().upper() == answer


def test_the_answer_is_des_of_each_half_under_the_bit_reversed_password() -> None:
    challenge = bytes(range(100, 116))
    key = bytes(int(f"{byte:08b}"[::-1], 2) for byte in b"abc\0\0\0\0\0")
    assert vnc_response("abc", challenge) == (des_encrypt_block(key, challenge[:8])
                                              + des_encrypt_block(key, challenge[8:]))


def test_a_password_counts_up_to_8_bytes_and_as_utf8() -> None:
    challenge = bytes(range(CHALLENGE_SIZE))
    assert vnc_response("12345678", challenge) == vnc_response("123456789 and more", challenge)
    assert vnc_response("1234567", challenge) != vnc_response("12345678", challenge)
    assert vnc_response("pässwörd", challenge) == vnc_response("pässwörd".encode(), challenge)
    assert vncpasswd_file("12345678") == vncpasswd_file(b"123456789")


@pytest.mark.parametrize("size", [0, 8, 15, 17, 32])
def test_a_challenge_has_16_bytes(size: int) -> None:
    with pytest.raises(ValueError, match="16 bytes"):
        vnc_response("secret", bytes(size))


@pytest.mark.parametrize("password", ["a\0b", b"\0", b"12345678\0"])
def test_a_password_with_a_nul_is_refused(password: str | bytes) -> None:
    """VNC would end the password at the NUL: the two sides would disagree."""
    with pytest.raises(ValueError, match="NUL"):
        vnc_response(password, bytes(CHALLENGE_SIZE))
    with pytest.raises(ValueError, match="NUL"):
        vncpasswd_file(password)


def test_the_password_file_uses_the_fixed_key_bit_reversed_too() -> None:
    assert vncpasswd_file("SECRET") == STOREPASSWD_SECRET
    assert des_encrypt_block(VNC_FIXED_KEY_REVERSED, b"SECRET\0\0") == STOREPASSWD_SECRET
    assert des_encrypt_block(PASSWORD_FILE_KEY, b"SECRET\0\0") != STOREPASSWD_SECRET


def _require(*programs: str) -> None:
    missing = [program for program in programs if shutil.which(program) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not installed (apt-get install xvfb x11vnc)")


@pytest.mark.parametrize("password", ["SECRET", "a", "12345678", "longer than eight",
                                      "pässwörd", "!\"$%&'()"])
def test_the_password_file_is_the_one_x11vnc_writes(password: str, tmp_path: Path) -> None:
    _require("x11vnc")
    path = tmp_path / "passwd"
    subprocess.run(["x11vnc", "-storepasswd", password, str(path)], stdin=subprocess.DEVNULL,
                   capture_output=True, timeout=TIMEOUT, check=True)
    assert path.read_bytes() == vncpasswd_file(password)


def test_new_passwords_are_8_random_letters_and_digits() -> None:
    passwords = {new_password() for _ in range(100)}
    assert len(passwords) == 100
    assert all(len(p) == 8 and set(p) <= set(string.ascii_letters + string.digits)
               for p in passwords)


@contextmanager
def _xvfb() -> Iterator[int]:
    """Xvfb on a display it picks as free; its number once it accepts clients."""
    read_fd, write_fd = os.pipe()
    try:
        xvfb = subprocess.Popen(
            ["Xvfb", "-screen", "0", f"{SCREEN[0]}x{SCREEN[1]}x24", "-nolisten", "tcp",
             "-displayfd", str(write_fd)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            pass_fds=[write_fd])
    finally:
        os.close(write_fd)
    try:
        line = b""
        deadline = time.monotonic() + TIMEOUT
        while not line.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            assert remaining > 0 and select.select([read_fd], [], [], remaining)[0], \
                "Xvfb did not report its display"
            chunk = os.read(read_fd, 64)
            assert chunk, f"Xvfb exited with {xvfb.wait()}"
            line += chunk
        yield int(line)
    finally:
        os.close(read_fd)
        xvfb.terminate()  # not kill: Xvfb removes its lock file as it ends
        try:
            xvfb.wait(timeout=5)
        except subprocess.TimeoutExpired:
            xvfb.kill()
            xvfb.wait()


@contextmanager
def _x11vnc(display: int, password_file: Path) -> Iterator[int]:
    """x11vnc on ``display``, asking for the password in ``password_file``; its port.

    ``-forever``, not ``-once``: waiting for the port is a connection too.
    """
    port = free_port()
    vnc = subprocess.Popen(
        ["x11vnc", "-norc", "-display", f":{display}", "-rfbauth", str(password_file),
         "-rfbport", str(port), "-localhost", "-forever", "-shared", "-quiet"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, timeout=TIMEOUT, proc=vnc)
        yield port
    finally:  # x11vnc 0.9.16 now and then ignores SIGTERM; it leaves nothing behind
        vnc.kill()
        vnc.wait()


def _receive(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"the server closed after {data!r}"
        data += chunk
    return data


def _log_in(port: int, password: str) -> tuple[int, bytes]:
    """An RFB 3.8 handshake answering the challenge for ``password``: the SecurityResult
    and then the failure reason, or the ServerInit's first 24 bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        assert _receive(sock, 12) == RFB_38
        sock.sendall(RFB_38)
        count = _receive(sock, 1)[0]
        assert 2 in _receive(sock, count), "the server offers no VNC Authentication"
        sock.sendall(b"\x02")
        sock.sendall(vnc_response(password, _receive(sock, CHALLENGE_SIZE)))
        (result,) = struct.unpack("!I", _receive(sock, 4))
        if result:
            (length,) = struct.unpack("!I", _receive(sock, 4))
            return result, _receive(sock, length)
        sock.sendall(b"\x01")  # ClientInit, shared
        return result, _receive(sock, 24)


def test_x11vnc_takes_the_password_file_and_the_answer(tmp_path: Path) -> None:
    _require("Xvfb", "x11vnc")
    password = new_password()
    password_file = tmp_path / "passwd"
    password_file.write_bytes(vncpasswd_file(password))
    with _xvfb() as display, _x11vnc(display, password_file) as port:
        result, server_init = _log_in(port, password)
        assert result == 0
        assert struct.unpack("!HH", server_init[:4]) == SCREEN
        result, reason = _log_in(port, "wrong!")  # "!" is never in a new password
        assert result != 0, "a wrong password was accepted"
        assert reason
