#!/usr/bin/env python3
"""Crafts the hostile captures stacktap's regression tests replay (tests/hostile.rs).

    python3 tests/hostile/craft.py OUTDIR

Each file reproduces one way input once broke stacktap:

* amqp_bodies.pcap: AMQP connections whose content headers announce 64 MiB bodies on
  2000 channels each, the bodies never sent (a few bytes once reserved gigabytes);
* far_future.pcap: the failure sample with one packet stamped ten years ahead (one bad
  stamp once turned every later call into a timeout);
* corrupt_mid.pcap, corrupt_mid.pcapng: the failure sample with a record header in the
  middle given an absurd length (once: exit 1, nothing written);
* secrets_echo.pcap: APIs that quote the password they refused (nova's adminPass,
  keystone), and a token in an error message;
* escapes.pcap: terminal escape sequences (screen clear, window title, OSC 52 clipboard)
  in REST fault messages, an RPC exception class and message, and a method name.

Only the standard library: the records are packed by hand.
"""

import json
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SAMPLE = os.path.join(HERE, "..", "..", "sampledata", "failures.pcap")
T0 = 1_796_000_000.0

PASSWORD = "hunter2-Crafted-Secret-Pass"
TOKEN = "gAAAAABcrafted-token-0123456789abcdefghijklmnopqrstuvwxyzABCDEF"
ESC_CLEAR = "\x1b[2J\x1b[H"
ESC_TITLE = "\x1b]0;pwned\x07"
ESC_CLIP = "\x1b]52;c;ZXZpbCBjbGlwYm9hcmQ=\x07"


# --- pcap writing ---------------------------------------------------------------------

def pcap_header():
    return struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1)  # Ethernet


def record(t, frame):
    sec = int(t)
    usec = int(round((t - sec) * 1e6))
    return struct.pack("<IIII", sec, usec, len(frame), len(frame)) + frame


def checksum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def tcp_frame(src, dst, sport, dport, seq, ack, flags, payload=b""):
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                      5 << 4, flags, 65535, 0, 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0,
                     bytes(src), bytes(dst))
    ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
    eth = b"\x02\0\0\0\0\x02" + b"\x02\0\0\0\0\x01" + b"\x08\x00"
    return eth + ip + tcp


class Conn:
    """One TCP connection: a handshake, then data either way, with right sequence numbers."""

    def __init__(self, out, t, client, server, cport, sport):
        self.out, self.t = out, t
        self.c, self.s, self.cp, self.sp = client, server, cport, sport
        self.cseq, self.sseq = 1000, 5000
        self.send(True, b"", 0x02)   # SYN
        self.send(False, b"", 0x12)  # SYN-ACK
        self.send(True, b"", 0x10)   # ACK

    def send(self, from_client, payload, flags=0x18):
        self.t += 0.0001
        if from_client:
            f = tcp_frame(self.c, self.s, self.cp, self.sp, self.cseq, self.sseq, flags, payload)
            self.cseq += len(payload) + (1 if flags & 0x03 else 0)
        else:
            f = tcp_frame(self.s, self.c, self.sp, self.cp, self.sseq, self.cseq, flags, payload)
            self.sseq += len(payload) + (1 if flags & 0x03 else 0)
        self.out.append(record(self.t, f))


# --- AMQP 0-9-1 by hand ----------------------------------------------------------------

def shortstr(s):
    b = s.encode()
    return bytes([len(b)]) + b


def frame(kind, channel, payload):
    return struct.pack("!BHI", kind, channel, len(payload)) + payload + b"\xce"


def method(channel, class_id, method_id, args):
    return frame(1, channel, struct.pack("!HH", class_id, method_id) + args)


def publish(channel, exchange, rk):
    return method(channel, 60, 40, struct.pack("!H", 0) + shortstr(exchange) + shortstr(rk) + b"\0")


def deliver(channel, tag, exchange, rk):
    return method(channel, 60, 60, shortstr(tag) + struct.pack("!Q", 1) + b"\0"
                  + shortstr(exchange) + shortstr(rk))


def content_header(channel, size, expiration=None):
    if expiration is None:
        return frame(2, channel, struct.pack("!HHQH", 60, 0, size, 0))
    # property flags: expiration (bit 8 of the 16-bit flags, after 7 earlier properties)
    return frame(2, channel, struct.pack("!HHQH", 60, 0, size, 1 << 8) + shortstr(expiration))


def message(channel, body, pub=None, dlv=None, expiration=None):
    body = body.encode() if isinstance(body, str) else body
    head = publish(channel, *pub) if pub else deliver(channel, *dlv)
    return head + content_header(channel, len(body), expiration) + frame(3, channel, body)


def oslo(msg):
    return json.dumps({"oslo.version": "2.0", "oslo.message": json.dumps(msg)})


# --- the captures ----------------------------------------------------------------------

def amqp_bodies(out):
    recs, t = [], T0
    for n in range(3):  # three connections, 2000 channels each
        c = Conn(recs, t, [10, 0, 0, 10 + n], [10, 0, 0, 1], 40000 + n, 5672)
        c.send(True, b"AMQP\0\0\x09\x01")
        burst = b""
        for ch in range(1, 2001):
            burst += publish(ch, "nova", "compute.host1")
            burst += content_header(ch, 64 << 20)
            burst += frame(3, ch, b"{\"oslo.version\": ")  # a few bytes of the 64 MiB
            if len(burst) > 1200:
                c.send(True, burst)
                burst = b""
        c.send(True, burst)
        t = c.t
    write_pcap(out, "amqp_bodies.pcap", recs)


def sample_records():
    with open(SAMPLE, "rb") as f:
        data = f.read()
    head, body, recs = data[:24], data[24:], []
    i = 0
    while i + 16 <= len(body):
        caplen = struct.unpack("<I", body[i + 8:i + 12])[0]
        recs.append(body[i:i + 16 + caplen])
        i += 16 + caplen
    return head, recs


def far_future(out):
    head, recs = sample_records()
    mid = len(recs) // 2
    r = bytearray(recs[mid])
    sec = struct.unpack("<I", r[0:4])[0]
    r[0:4] = struct.pack("<I", sec + 10 * 365 * 86400)
    recs[mid] = bytes(r)
    with open(os.path.join(out, "far_future.pcap"), "wb") as f:
        f.write(head + b"".join(recs))


def pure_ack_after(recs, start):
    """The first record from `start` on that carries no TCP payload (losing it loses no
    data: the verdicts must not change)."""
    for i in range(start, len(recs)):
        frame = recs[i][16:]
        if len(frame) < 34 or frame[12:14] != b"\x08\x00":
            continue
        ihl = (frame[14] & 0x0F) * 4
        total = struct.unpack("!H", frame[16:18])[0]
        doff = (frame[14 + ihl + 12] >> 4) * 4
        if frame[23] == 6 and total == ihl + doff:
            return i
    raise SystemExit("no payload-less packet in the sample")


def corrupt_mid(out):
    head, recs = sample_records()
    mid = pure_ack_after(recs, len(recs) // 2)
    r = bytearray(recs[mid])
    r[8:12] = struct.pack("<I", 0x7FFFFFF0)  # incl_len: 2 GiB
    recs[mid] = bytes(r)
    with open(os.path.join(out, "corrupt_mid.pcap"), "wb") as f:
        f.write(head + b"".join(recs))
    # the same as pcapng, one block's length made absurd
    linktype = struct.unpack("<I", head[20:24])[0]
    blocks = [ng_block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)),
              ng_block(1, struct.pack("<HHI", linktype, 0, 262144))]
    for rec in recs:
        sec, usec, caplen, orig = struct.unpack("<IIII", rec[:16])
        if caplen > len(rec) - 16:
            caplen = len(rec) - 16
        ts = sec * 1_000_000 + usec
        data = rec[16:16 + caplen]
        pad = b"\0" * ((4 - len(data) % 4) % 4)
        blocks.append(ng_block(6, struct.pack("<IIIII", 0, ts >> 32, ts & 0xFFFFFFFF,
                                              len(data), orig) + data + pad))
    mid = 2 + pure_ack_after(recs, len(recs) // 3)
    b = bytearray(blocks[mid])
    b[4:8] = struct.pack("<I", 0x7FFFFFF0)
    blocks[mid] = bytes(b)
    with open(os.path.join(out, "corrupt_mid.pcapng"), "wb") as f:
        f.write(b"".join(blocks))


def ng_block(kind, body):
    n = 12 + len(body)
    return struct.pack("<II", kind, n) + body + struct.pack("<I", n)


def http(recs, t, client, port, req, status, fault, cport):
    c = Conn(recs, t, client, [10, 0, 0, 2], cport, port)
    c.send(True, req.encode())
    body = json.dumps(fault).encode()
    resp = (b"HTTP/1.1 %d Error\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"x-openstack-request-id: req-0d7b6b5c-9f1e-4c36-8a1c-%012d\r\n\r\n"
            % (status, len(body), cport)) + body
    c.send(False, resp)
    return c.t + 0.01


def secrets_echo(out):
    recs, t = [], T0
    ua = "User-Agent: python-novaclient keystoneauth1/5.18.1\r\n"
    t = http(recs, t, [10, 0, 0, 50], 8774,
             "POST /v2.1/servers HTTP/1.1\r\nHost: nova\r\n" + ua
             + "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
             400, {"badRequest": {"code": 400, "message":
                                  "Invalid input for field/attribute adminPass. Value: %s. "
                                  "'%s' is too short" % (PASSWORD, PASSWORD)}}, 41000)
    t = http(recs, t, [10, 0, 0, 50], 5000,
             "POST /v3/auth/tokens HTTP/1.1\r\nHost: keystone\r\n" + ua
             + "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
             400, {"error": {"code": 400, "title": "Bad Request", "message":
                             "Invalid input for field 'password': %s" % PASSWORD}}, 41001)
    t = http(recs, t, [10, 0, 0, 50], 5000,
             "PATCH /v3/users/0d7b6b5c9f1e4c368a1c2f4e5d6c7b8a HTTP/1.1\r\nHost: keystone\r\n"
             + ua + "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
             400, {"error": {"code": 400, "title": "Bad Request", "message":
                             "%s is not a valid password" % PASSWORD}}, 41002)
    http(recs, t, [10, 0, 0, 50], 9696,
         "GET /v2.0/networks HTTP/1.1\r\nHost: neutron\r\n" + ua + "\r\n",
         500, {"NeutronError": {"type": "Unauthorized", "message":
                                "token %s could not be validated" % TOKEN, "detail": ""}}, 41003)
    write_pcap(out, "secrets_echo.pcap", recs)


def escapes(out):
    recs, t = [], T0
    ua = "User-Agent: python-openstackclient keystoneauth1/5.18.1\r\n"
    t = http(recs, t, [10, 0, 0, 60], 8774,
             "GET /v2.1/servers/detail HTTP/1.1\r\nHost: nova\r\n" + ua + "\r\n",
             500, {"computeFault": {"code": 500, "message":
                                    "boom" + ESC_CLEAR + ESC_TITLE + ESC_CLIP}}, 42000)
    # an RPC call whose method name and whose remote error carry escapes
    caller = Conn(recs, t, [10, 0, 0, 70], [10, 0, 0, 1], 43000, 5672)
    server = Conn(recs, caller.t, [10, 0, 0, 71], [10, 0, 0, 1], 43001, 5672)
    for c, name in [(caller, "nova-api:101:aaaa"), (server, "nova-compute:202:bbbb")]:
        c.send(True, b"AMQP\0\0\x09\x01")
        props = b"\x0fconnection_nameS" + struct.pack("!I", len(name)) + name.encode()
        start_ok = (struct.pack("!I", len(props)) + props + shortstr("PLAIN")
                    + struct.pack("!I", 12) + b"\0guest\0guest" + shortstr("en_US"))
        c.send(True, method(0, 10, 11, start_ok))
    evil_method = "get_console" + ESC_TITLE + "_output"
    call = {"method": evil_method, "args": {}, "version": "6.0",
            "_msg_id": "18c3aeba5d884884a9ea818660fd1abe", "_reply_q": "reply_x",
            "_unique_id": "2ca8e518e0514cd0a3f72626d9ad5aff",
            "_context_request_id": "req-11111111-2222-3333-4444-555555555555"}
    caller.send(True, message(1, oslo(call), pub=("nova", "compute.host1"), expiration="60000"))
    server.send(False, message(1, oslo(call), dlv=("ctag", "nova", "compute.host1")))
    failure = json.dumps({"class": "Evil" + ESC_CLEAR, "module": "nova.exception",
                          "message": "cleared" + ESC_CLIP, "tb": [], "args": [], "kwargs": {}})
    reply = {"result": None, "failure": failure, "ending": True,
             "_msg_id": "18c3aeba5d884884a9ea818660fd1abe", "_unique_id": "u2"}
    server.send(True, message(2, oslo(reply), pub=("", "reply_x")))
    caller.send(False, message(2, oslo(reply), dlv=("rtag", "", "reply_x")))
    write_pcap(out, "escapes.pcap", recs)


def write_pcap(out, name, recs):
    with open(os.path.join(out, name), "wb") as f:
        f.write(pcap_header() + b"".join(recs))


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for make in (amqp_bodies, far_future, corrupt_mid, secrets_echo, escapes):
        make(out)
    print(json.dumps({"password": PASSWORD, "token": TOKEN}))


if __name__ == "__main__":
    main()
