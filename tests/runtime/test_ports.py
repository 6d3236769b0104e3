"""FdPort over a datagram socketpair (no root): a header of another size than the port's is cut
or zero-padded, so Transmits cross between 10-byte pod TAPs and a 24-byte uplink intact."""

import os
import socket

import pytest

from podnet.runtime.ports import FdPort

HEADER_10 = bytes(range(1, 11))
HEADER_24 = bytes(range(1, 25))


@pytest.mark.parametrize("port_len, vnet, expected", [
    (10, HEADER_10, HEADER_10),
    (10, HEADER_24, HEADER_10),                    # a 24-byte uplink's frame to a pod TAP: cut
    (10, None, bytes(10)),
    (24, HEADER_24, HEADER_24),
    (24, HEADER_10, HEADER_10 + bytes(14)),        # a pod's frame to a 24-byte uplink: padded
    (24, None, bytes(24)),
    (24, b"", bytes(24)),
])
def test_send_writes_the_ports_header_size_and_receive_reads_it(port_len, vnet, expected):
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with ours, theirs:
        ours.setblocking(False)
        port = FdPort(ours.fileno(), vnet_hdr=True, name="t", vnet_hdr_len=port_len)
        port.send(memoryview(b"frame bytes"), vnet)
        assert theirs.recv(100) == expected + b"frame bytes" and port.counters.write_errors == 0
        os.write(theirs.fileno(), HEADER_24[:port_len] + b"back")
        frame, got_vnet = port.receive()
        assert bytes(frame) == b"back" and bytes(got_vnet) == HEADER_24[:port_len]
        assert port.receive() is None
