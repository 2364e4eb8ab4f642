"""A party to a connection in the Istio conformance test (istio_iptables.rs),
run as any uid with setpriv.

  serve LABEL PORT...   listen on 0.0.0.0 and [::] (TCP and UDP) on each PORT;
                        print "ready"; answer each TCP connection, or UDP
                        datagram, with one line: LABEL LOCALPORT ORIG PEER, where
                        ORIG is SO_ORIGINAL_DST where a REDIRECT rewrote the
                        destination, else "-"
  mesh-tproxy MARK      the mesh proxy of -m TPROXY, as Envoy's original_src:
                        a transparent listener on 15006 whose connections go
                        on to where the client was going, from the client's
                        address with SO_MARK MARK; it answers
                        "mesh 15006 DST | <what the app answered>". Also
                        serves 15001 as `serve mesh 15001` does. Needs
                        NET_ADMIN and NET_RAW.
  ask SRC DST PORT      connect over TCP (from SRC unless "-") and print the line
  ask-udp DST PORT      the same over UDP
  probe-fin DST PORT    send DST:PORT a lone FIN (raw socket; needs NET_RAW),
                        which conntrack finds INVALID (no connection starts
                        with a FIN); print "reset" if a RST answers it within
                        a second, else "silent"
"""
import random
import socket
import struct
import sys
import threading
import time

SO_ORIGINAL_DST = 80


def original_dst(conn, family):
    try:
        if family == socket.AF_INET:
            raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
            port, = struct.unpack("!H", raw[2:4])
            return "%s:%d" % (socket.inet_ntop(socket.AF_INET, raw[4:8]), port)
        raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
        port, = struct.unpack("!H", raw[2:4])
        return "[%s]:%d" % (socket.inet_ntop(socket.AF_INET6, raw[8:24]), port)
    except OSError:
        return "-"


def endpoint(addr, family):
    return ("%s:%d" if family == socket.AF_INET else "[%s]:%d") % (addr[0], addr[1])


def tcp(label, family, port):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind(("0.0.0.0" if family == socket.AF_INET else "::", port))
    s.listen(64)

    def loop():
        while True:
            conn, peer = s.accept()
            orig = original_dst(conn, family)
            # conntrack reports every tracked connection's destination;
            # only a rewritten one (REDIRECT) differs from where it landed.
            if orig == endpoint(conn.getsockname(), family):
                orig = "-"
            line = "%s %d %s %s\n" % (label, port, orig, endpoint(peer, family))
            conn.sendall(line.encode())
            conn.close()

    threading.Thread(target=loop, daemon=True).start()


def udp(label, family, port):
    s = socket.socket(family, socket.SOCK_DGRAM)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind(("0.0.0.0" if family == socket.AF_INET else "::", port))

    def loop():
        while True:
            _, peer = s.recvfrom(100)
            s.sendto(("%s %d - %s\n" % (label, port, endpoint(peer, family))).encode(), peer)

    threading.Thread(target=loop, daemon=True).start()


IP_TRANSPARENT = 19
IPV6_TRANSPARENT = 75
SO_MARK = 36


def mesh_tproxy(mark, family):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET:
        s.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        s.bind(("0.0.0.0", 15006))
    else:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        s.bind(("::", 15006))
    s.listen(64)

    def serve(conn, peer):
        local = conn.getsockname()
        app = socket.socket(family, socket.SOCK_STREAM)
        app.settimeout(5)
        if family == socket.AF_INET:
            app.setsockopt(socket.SOL_IP, IP_TRANSPARENT, 1)
        else:
            app.setsockopt(socket.IPPROTO_IPV6, IPV6_TRANSPARENT, 1)
        app.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
        app.bind((peer[0], 0))
        try:
            app.connect(local[:2])
            answer = app.makefile().readline().strip()
        except OSError as e:
            answer = "failed: %s" % e
        conn.sendall(("mesh 15006 %s | %s\n" % (endpoint(local, family), answer)).encode())
        conn.close()
        app.close()

    def loop():
        while True:
            conn, peer = s.accept()
            threading.Thread(target=serve, args=(conn, peer), daemon=True).start()

    threading.Thread(target=loop, daemon=True).start()


IPV6_CHECKSUM = 7
TCP_FIN_ACK = 0x11
TCP_RST = 0x04


def checksum(data):
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def probe_fin(dst, port):
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    # The source address the kernel would pick, for the checksum.
    route = socket.socket(family, socket.SOCK_DGRAM)
    route.connect((dst, port))
    src = route.getsockname()[0]
    route.close()
    raw = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_TCP)
    sport = 40000 + random.randrange(20000)
    header = struct.pack("!HHIIBBHHH", sport, port, 1, 1, 5 << 4, TCP_FIN_ACK, 65535, 0, 0)
    if family == socket.AF_INET:
        pseudo = socket.inet_pton(family, src) + socket.inet_pton(family, dst)
        pseudo += struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(header))
        header = header[:16] + struct.pack("!H", checksum(pseudo + header)) + header[18:]
    else:
        # The kernel computes IPv6's (and checks the answers').
        raw.setsockopt(socket.IPPROTO_IPV6, IPV6_CHECKSUM, 16)
    raw.sendto(header, (dst, 0))
    deadline = time.monotonic() + 1
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        raw.settimeout(left)
        try:
            data, peer = raw.recvfrom(200)
        except socket.timeout:
            break
        if family == socket.AF_INET:
            data = data[(data[0] & 0x0F) * 4:]  # IPv4's raw sockets see the IP header
        if len(data) < 20 or peer[0] != dst:
            continue
        their, ours = struct.unpack("!HH", data[:4])
        if (their, ours) == (port, sport) and data[13] & TCP_RST:
            print("reset")
            return
    print("silent")


def main():
    mode = sys.argv[1]
    if mode == "mesh-tproxy":
        mark = int(sys.argv[2])
        for family in (socket.AF_INET, socket.AF_INET6):
            mesh_tproxy(mark, family)
            tcp("mesh", family, 15001)
        print("ready", flush=True)
        threading.Event().wait()
    elif mode == "serve":
        label = sys.argv[2]
        for port in map(int, sys.argv[3:]):
            for family in (socket.AF_INET, socket.AF_INET6):
                tcp(label, family, port)
                udp(label, family, port)
        print("ready", flush=True)
        threading.Event().wait()
    elif mode == "ask":
        src, dst, port = sys.argv[2], sys.argv[3], int(sys.argv[4])
        family = socket.AF_INET6 if ":" in dst else socket.AF_INET
        s = socket.socket(family, socket.SOCK_STREAM)
        s.settimeout(5)
        if src != "-":
            s.bind((src, 0))
        s.connect((dst, port))
        print(s.makefile().readline().strip())
    elif mode == "ask-udp":
        dst, port = sys.argv[2], int(sys.argv[3])
        family = socket.AF_INET6 if ":" in dst else socket.AF_INET
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.settimeout(5)
        s.sendto(b"?", (dst, port))
        print(s.recvfrom(200)[0].decode().strip())
    elif mode == "probe-fin":
        probe_fin(sys.argv[2], int(sys.argv[3]))


main()
