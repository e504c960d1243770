"""A test DNS server for moat's egress tests: answers A queries from a fixed table, NXDOMAIN
otherwise. Usage: dns.py BIND NAME=IP... ; prints `port N` once it listens (UDP, loopback)."""
import socket, struct, sys, threading

bind, table = sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:])
if not bind.startswith("127."):
    sys.exit("refusing to listen outside loopback")
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((bind, 0))
print(f"port {s.getsockname()[1]}", flush=True)


def name_at(buf, i):
    labels = []
    while buf[i]:
        n = buf[i]
        labels.append(buf[i + 1 : i + 1 + n].decode())
        i += 1 + n
    return ".".join(labels).lower(), i + 1


def serve():
    while True:
        q, peer = s.recvfrom(512)
        try:
            tid, flags = struct.unpack(">HH", q[:4])
            name, end = name_at(q, 12)
            qtype = struct.unpack(">H", q[end : end + 2])[0]
            question = q[12 : end + 4]
            ip = table.get(name)
            answers = b""
            rcode = 0
            if ip is None:
                rcode = 3
            elif qtype == 1:
                answers = b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 5, 4) + socket.inet_aton(ip)
            count = 1 if answers else 0
            head = struct.pack(">HHHHHH", tid, 0x8180 | rcode, 1, count, 0, 0)
            s.sendto(head + question + answers, peer)
        except Exception:
            pass


threading.Thread(target=serve, daemon=True).start()
sys.stdin.read()
