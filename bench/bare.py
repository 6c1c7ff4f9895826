"""A bare SMTP responder on socketserver, with mms's thread model and nothing else:
the floor under any server of this design, for bench.py's `floor` part.

    python bench/bare.py --port 2525 --work-us 100

Session threads accept connections themselves, as mms's do. It answers every
command at once and reads the message to the final dot; --work-us adds that many
microseconds of pure Python (a counting loop) after each message, to see what
Python work of mms's size costs against the GIL when 20 sessions compete.
"""

import argparse
import socketserver
import threading
import time


def calibrate():
    """Loop iterations per microsecond on this machine, in this interpreter."""
    started, count = time.perf_counter(), 200_000
    spin(count)
    return count / ((time.perf_counter() - started) * 1e6)


def spin(count):
    total = 0
    for i in range(count):
        total += i
    return total


class Bare(socketserver.BaseRequestHandler):
    def handle(self):
        sock, buf, in_data = self.request, b"", False
        sock.sendall(b"220 bare ESMTP\r\n")
        while True:
            data = sock.recv(65536)
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if in_data:
                    if line == b".\r":
                        in_data = False
                        spin(self.server.spins)
                        sock.sendall(b"250 2.0.0 Ok\r\n")
                    continue
                verb = line[:4].upper()
                if verb == b"DATA":
                    in_data = True
                    sock.sendall(b"354 go\r\n")
                elif verb == b"QUIT":
                    sock.sendall(b"221 2.0.0 Bye\r\n")
                    return
                else:
                    sock.sendall(b"250 2.0.0 Ok\r\n")


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    request_queue_size = 128

    def session_thread(self):
        while True:
            request, address = self.socket.accept()
            try:
                self.finish_request(request, address)
            except OSError:
                pass
            request.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--work-us", type=float, default=0)
    parser.add_argument("--threads", type=int, default=128)
    args = parser.parse_args()
    server = Server(("127.0.0.1", args.port), Bare)
    server.spins = int(args.work_us * calibrate())
    for _ in range(args.threads):
        threading.Thread(target=server.session_thread, daemon=True).start()
    threading.Event().wait()


if __name__ == "__main__":
    main()
