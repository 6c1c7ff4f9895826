"""Benchmark mms against the ceiling and a peer, side by side, in one run.

    apt-get install postfix          # smtp-source (the load) and smtp-sink (the ceiling)
    pip install -r requirements.txt nx-27017 aiosmtpd
    python bench/bench.py            # the whole matrix (about 15 minutes on 2 cores)
    python bench/bench.py --quick    # 500 messages a cell, to try it out

Servers, each started fresh for the run on a loopback port:

- sink: Postfix's smtp-sink, written in C, which accepts and forgets: the ceiling;
- mms-debug: mms in debug mode, its output to /dev/null;
- mms-store: mms in quarantine mode, storing in nx-27017;
- peer: bench/peer.py, aiosmtpd with pymongo's GridFS.put, storing in the same nx-27017.

`--only PART` runs one part: engine (1 KB at 1, 20 and 100 sessions and 100 KB at
20, against smtp-sink, the original mongo-mail-server 0.1.1 from PyPI in debug mode,
and the floor, ../shared/bench/floor_sink.py; --baseline REV adds that revision's
mms), matrix, halves, idle, large (5 and 50 MB, time and
peak RSS), concurrent_large (4 x 100 MB at once, peak RSS), workers (debug,
quarantine and proxy modes with --workers 1 and 2), metrics (msg/s
with --metrics and --statsd on and off), floor (bench/bare.py, a bare responder
with mms's thread model, with and without added Python work, beside mms-debug),
archive (count, verify and purge on 60,000 stored messages, time and peak RSS;
`--baseline REV` runs the mms.py of a git revision beside it), or console (the web
console's pages and `stats` on archives of 10,000, 50,000 and 200,000 messages,
and SMTP while two reviewers use the console: three pairs, alone then beside
them, and the median share), or parse (storing with the
completed document and its words, against --index-text 0 and --baseline REV;
reindex and list --text on 200,000 messages).

For each cell it prints msg/s, the server's CPU in ms per message, its peak RSS,
and MongoDB commands per message (counted by a pymongo CommandListener that this
script installs in the server's process), then ratios against the sink and the
peer measured in the same run. Runs vary by about 20%: compare ratios, not
absolute numbers from different runs.
"""

import argparse
import base64
import html
import os
import random
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MMS = os.path.join(os.path.dirname(HERE), "mms.py")
PEER = os.path.join(HERE, "peer.py")
BARE = os.path.join(HERE, "bare.py")
TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port, seconds=30):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def counted(argv):
    """Run a Python server with a CommandListener that writes its count to a file."""
    from pymongo import monitoring
    path = os.environ["BENCH_COUNTER"]

    class Counter(monitoring.CommandListener):
        count = 0

        def started(self, event):
            Counter.count += 1

        def succeeded(self, event):
            pass

        def failed(self, event):
            pass

    def report():
        while True:
            with open(path + ".tmp", "w") as f:
                f.write(str(Counter.count))
            os.replace(path + ".tmp", path)
            time.sleep(0.05)

    monitoring.register(Counter())
    threading.Thread(target=report, daemon=True).start()
    sys.argv = argv
    runpy.run_path(argv[0], run_name="__main__")


class Server:
    """A server process: its CPU, peak RSS and MongoDB command count, on demand."""

    def __init__(self, name, argv, port, python=True):
        self.name, self.port = name, port
        self.counter = tempfile.mktemp(prefix="bench-count-")
        env = {**os.environ, "BENCH_COUNTER": self.counter}
        if python:
            argv = [sys.executable, os.path.abspath(__file__), "counted", *argv]
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     env=env, start_new_session=True)
        wait_port(port)

    def pids(self):
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                return [self.proc.pid] + [int(p) for p in f.read().split()]
        except OSError:
            return [self.proc.pid]

    def cpu(self):
        total = 0
        for pid in self.pids():
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        return total / TICK

    def status(self, key):
        total = 0
        for pid in self.pids():
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        total += int(line.split()[1]) * 1024
        return total

    def reset_peak(self):
        for pid in self.pids():
            with open(f"/proc/{pid}/clear_refs", "w") as f:
                f.write("5")

    def commands(self):
        time.sleep(0.15)
        try:
            with open(self.counter) as f:
                return int(f.read() or 0)
        except OSError:
            return 0

    def stop(self):
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(15)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for path in (self.counter, self.counter + ".tmp"):
            if os.path.exists(path):
                os.unlink(path)


def smtp_source(port, sessions, count, size, reuse):
    argv = ["smtp-source", "-s", str(sessions), "-m", str(count), "-l", str(size),
            "-f", "a@example.org", "-t", "b@example.com"]
    if reuse:
        argv.append("-d")
    started = time.monotonic()
    subprocess.run(argv + [f"127.0.0.1:{port}"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=3600)
    return time.monotonic() - started


def measure(server, sessions, count, size, reuse):
    server.reset_peak()
    cpu, commands = server.cpu(), server.commands()
    seconds = smtp_source(server.port, sessions, count, size, reuse)
    return {"rate": count / seconds, "cpu_ms": (server.cpu() - cpu) * 1000 / count,
            "rss_mb": server.status("VmHWM") / 2**20,
            "cmds": (server.commands() - commands) / count}


class Bench:
    def __init__(self, args):
        self.args = args
        self.servers = {}
        self.nx = None

    def start(self):
        run = tempfile.mkdtemp(prefix="bench-nx-")
        nx_port = free_port()
        self.nx = subprocess.Popen(
            ["nx-27017", "--host", "127.0.0.1", "-p", str(nx_port), "--data-dir", "memory",
             "--pid-file", f"{run}/pid", "--log-file", f"{run}/log"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_port(nx_port)
        self.uri = f"mongodb://127.0.0.1:{nx_port}/"
        port = free_port()
        self.servers["sink"] = Server("sink", ["smtp-sink", "-u", "nobody", f"127.0.0.1:{port}",
                                               "1024"], port, python=False)
        self.servers["mms-debug"] = self.mms("debug")
        self.servers["mms-store"] = self.mms("mongo-quarantine", "--mongo-host", self.uri,
                                             "--mongo-database", "bench_mms")
        port = free_port()
        self.servers["peer"] = Server("peer", [PEER, "--port", str(port), "--mongo", self.uri,
                                               "--database", "bench_peer"], port)

    def mms(self, mode, *args, workers=1, program=MMS):
        port = free_port()
        return Server(f"mms-{mode}", [program, "--server", mode, "--host", "127.0.0.1",
                                      "--port", str(port), "--hostname", "bench.test",
                                      "--max-connections", "5000", "--workers", str(workers),
                                      "--data-size-limit", "0",
                                      *args], port)

    def stop(self):
        for server in self.servers.values():
            server.stop()
        if self.nx:
            os.killpg(self.nx.pid, signal.SIGTERM)

    def matrix(self):
        count = self.args.count
        print("| size | sessions | connection | server | msg/s | CPU ms/msg | peak RSS MB "
              "| MongoDB cmds/msg | vs sink | vs peer |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for size in (1024, 102400):
            for sessions in (1, 20, 100):
                for reuse in (False, True):
                    results = {name: measure(server, sessions,
                                             self.args.peer_count if name == "peer" else count,
                                             size, reuse)
                               for name, server in self.servers.items()}
                    for name, r in results.items():
                        print(f"| {size // 1024} KB | {sessions} | {'reused' if reuse else 'new'} "
                              f"| {name} | {r['rate']:.0f} | {r['cpu_ms']:.2f} | {r['rss_mb']:.0f} "
                              f"| {r['cmds']:.2f} | {r['rate'] / results['sink']['rate']:.0%} "
                              f"| {r['rate'] / results['peer']['rate']:.1f}x |", flush=True)

    def halves(self):
        """The archive grows: the second half of a run must not be slower than the first."""
        half = self.args.count // 2
        store = self.servers["mms-store"]
        first = measure(store, 20, half, 1024, False)["rate"]
        second = measure(store, 20, half, 1024, False)["rate"]
        print(f"\nmms-store, 1 KB, 20 sessions, {half} + {half} messages: "
              f"{first:.0f} msg/s, then {second:.0f} msg/s ({second / first:.0%})")

    def idle(self, connections=1000):
        for name in ("mms-debug", "peer"):
            server = self.servers[name]
            before = server.status("VmRSS")
            socks = []
            for _ in range(connections):
                sock = socket.create_connection(("127.0.0.1", server.port))
                sock.recv(512)
                socks.append(sock)
            time.sleep(0.5)
            after = server.status("VmRSS")
            for sock in socks:
                sock.close()
            print(f"{name}: RSS {after / 2**20:.0f} MB with {connections} idle connections "
                  f"({before / 2**20:.0f} MB before)")

    @staticmethod
    def send_large(server, body):
        """One message on a new connection: the seconds from DATA to the reply, and the reply."""
        sock = socket.create_connection(("127.0.0.1", server.port))
        with sock, sock.makefile("rb") as reader:
            reader.readline()
            sock.sendall(b"HELO bench\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.com>\r\n"
                         b"DATA\r\n")
            for _ in range(4):
                reader.readline()
            started = time.monotonic()
            sock.sendall(body)
            sock.sendall(b".\r\n")
            reply = reader.readline().decode().strip()
            return time.monotonic() - started, reply

    @staticmethod
    def large_body(megabytes, seed=5):
        text = base64.encodebytes(random.Random(seed).randbytes(megabytes * 2**20 * 3 // 4))
        return b"Subject: large\r\n\r\n" + text.replace(b"\n", b"\r\n")

    def large(self):
        """One 5 MB and one 50 MB message, stored: time and peak RSS (linear means ~10x)."""
        store = self.servers["mms-store"]
        times = {}
        for megabytes in (5, 50):
            body = self.large_body(megabytes)
            store.reset_peak()
            times[megabytes], reply = self.send_large(store, body)
            print(f"mms-store: {megabytes} MB message received and stored in "
                  f"{times[megabytes]:.2f} s, peak RSS {store.status('VmHWM') / 2**20:.0f} MB "
                  f"({reply[:28]}...)")
        print(f"50 MB took {times[50] / times[5]:.1f}x the time of 5 MB")

    def concurrent_large(self, count=4, megabytes=100):
        """Several large messages at once: each is stored from its file, piece by piece."""
        store = self.servers["mms-store"]
        body = self.large_body(megabytes)
        store.reset_peak()
        before = store.status("VmRSS")
        replies = []
        threads = [threading.Thread(target=lambda: replies.append(self.send_large(store, body)))
                   for _ in range(count)]
        started = time.monotonic()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        stored = sum(reply.startswith("250") for _, reply in replies)
        print(f"mms-store: {count} x {megabytes} MB at once, {stored} stored in "
              f"{time.monotonic() - started:.1f} s, peak RSS {store.status('VmHWM') / 2**20:.0f} MB "
              f"({before / 2**20:.0f} MB before)")

    def metrics(self):
        """Counting costs no measurable speed: the same server with --metrics and
        --statsd on and off, alternated, 1 KB, 20 sessions, new connections."""
        count = self.args.count
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        on = ("--metrics", f"127.0.0.1:{free_port()}", "--statsd", f"127.0.0.1:{udp.getsockname()[1]}")
        rates = {"off": [], "on": []}
        try:
            for _ in range(2):
                for name, args in (("off", ()), ("on", on)):
                    server = self.mms("debug", *args)
                    try:
                        rates[name].append(measure(server, 20, count, 1024, False)["rate"])
                    finally:
                        server.stop()
        finally:
            udp.close()
        off, with_metrics = max(rates["off"]), max(rates["on"])
        print(f"mms-debug, 1 KB, 20 sessions: {off:.0f} msg/s without metrics, "
              f"{with_metrics:.0f} msg/s with --metrics and --statsd ({with_metrics / off:.0%}; "
              f"best of 2 each)")

    def workers(self):
        """What one process does at most, and what --workers 2 adds, in each mode that
        needs no scanner: 1 KB, 20 and 100 sessions, new connections. The proxy relays
        to smtp-sink and stores what it accepted in nx-27017."""
        count, sink = self.args.count, self.servers["sink"].port
        modes = {"debug": (), "mongo-quarantine": ("--mongo-host", self.uri,
                                                   "--mongo-database", "bench_workers"),
                 "mongo-proxy": ("--mongo-host", self.uri, "--mongo-database", "bench_proxy",
                                 "--remote-host", "127.0.0.1", "--remote-port", str(sink),
                                 "--spool-dir", tempfile.mkdtemp(prefix="bench-spool-"))}
        print("| mode | --workers | 20 sessions | 100 sessions | CPU ms/msg at 100 |")
        print("|---|---|---|---|---|")
        for mode, args in modes.items():
            for workers in (1, 2):
                server = self.mms(mode, *args, workers=workers)
                try:
                    rows = [measure(server, sessions, count, 1024, False) for sessions in (20, 100)]
                finally:
                    server.stop()
                print(f"| {mode} | {workers} | {rows[0]['rate']:,.0f} msg/s | "
                      f"{rows[1]['rate']:,.0f} msg/s | {rows[1]['cpu_ms']:.2f} |", flush=True)

    def floor(self):
        """What Python work costs against the GIL at 20 sessions: bench/bare.py, with
        mms's thread model and nothing else, then with pure Python work added to
        each message, beside mms-debug; rounds alternate, and the median is shown."""
        count, rounds = self.args.count, 3
        servers = {"mms-debug": self.servers["mms-debug"]}
        for work in (0, 40, 100, 200):
            port = free_port()
            servers[f"bare + {work} us"] = Server(f"bare-{work}", [BARE, "--port", str(port),
                                                                   "--work-us", str(work)], port)
        results = {name: [] for name in servers}
        try:
            for _ in range(rounds):
                sink = measure(self.servers["sink"], 20, count, 1024, False)["rate"]
                for name, server in servers.items():
                    r = measure(server, 20, count, 1024, False)
                    results[name].append((r["rate"] / sink, r["cpu_ms"]))
        finally:
            for name, server in servers.items():
                if name.startswith("bare"):
                    server.stop()
        print("| 1 KB, 20 sessions, new connections | vs sink (median of 3) | CPU ms/msg |")
        print("|---|---|---|")
        for name, rows in results.items():
            ratio, cpu = sorted(rows)[len(rows) // 2]
            print(f"| {name} | {ratio:.0%} | {cpu:.2f} |")


    def engine(self):
        """Issue 39's table: 1 KB at 1, 20 and 100 sessions and 100 KB at 20, new
        connections, for smtp-sink, the original (mongo-mail-server 0.1.1 from PyPI,
        gevent, debug mode), the floor (../shared/bench/floor_sink.py, if present) and
        mms-debug; then mms-store's CPU at 20 sessions. Rounds alternate the servers;
        each cell is the median of --rounds, its ratio against the sink of its round."""
        count, rounds = self.args.count, self.args.rounds
        servers = {"sink": self.servers["sink"], "original": self.original()}
        if os.path.exists(FLOOR):
            port = free_port()
            servers["floor"] = Server("floor", [FLOOR, str(port)], port)
        servers["mms-debug"] = self.servers["mms-debug"]
        if self.args.baseline:
            servers[f"mms-debug {self.args.baseline}"] = self.mms("debug", program=self.baseline())
        cells = ((1024, 1), (1024, 20), (1024, 100), (102400, 20))
        results = {(cell, name): [] for cell in cells for name in servers}
        try:
            for _ in range(rounds):
                for cell in cells:
                    sink = None
                    for name, server in servers.items():
                        r = measure(server, cell[1], count, cell[0], False)
                        sink = sink or r["rate"]
                        results[cell, name].append((r["rate"] / sink, r["rate"], r["cpu_ms"]))
        finally:
            for name, server in servers.items():
                if name not in ("sink", "mms-debug"):
                    server.stop()
        print(f"| new connections, median of {rounds} | " + " | ".join(
            f"{size // 1024} KB s{sessions}" for size, sessions in cells) + " | CPU ms/msg, 1 KB s20 |")
        print("|---" * (len(cells) + 2) + "|")
        for name in servers:
            row = [sorted(results[cell, name])[rounds // 2] for cell in cells]
            print(f"| {name} | " + " | ".join(f"{ratio:.2f} ({rate:,.0f}/s)" for ratio, rate, _ in row)
                  + f" | {row[1][2]:.2f} |")
        stores = {"mms-store": self.servers["mms-store"]}
        if self.args.baseline:
            stores[f"mms-store {self.args.baseline}"] = self.mms(
                "mongo-quarantine", "--mongo-host", self.uri, "--mongo-database", "bench_base",
                program=self.baseline())
        try:
            runs = {name: [] for name in stores}
            for _ in range(rounds):
                for name, server in stores.items():
                    runs[name].append(measure(server, 20, count, 1024, False))
        finally:
            for name, server in stores.items():
                if name != "mms-store":
                    server.stop()
        print()
        for name, rows in runs.items():
            print(f"{name} (mongo-quarantine into nx-27017), 1 KB, 20 sessions: "
                  f"{sorted(r['rate'] for r in rows)[rounds // 2]:.0f} msg/s, "
                  f"{sorted(r['cpu_ms'] for r in rows)[rounds // 2]:.2f} ms CPU/msg "
                  f"(medians of {rounds})")

    def original(self):
        """The original, ported to Python 3 where it is run: lib2to3, and bytes on its
        socket decoded and encoded as Latin-1; nothing else of it changed."""
        home = os.path.join(tempfile.gettempdir(), "bench-original")
        python, source = os.path.join(home, "bin", "python"), os.path.join(home, "original.py")
        if not os.path.exists(source):
            import venv
            import zipfile
            venv.create(home, with_pip=True)
            pip = [python, "-m", "pip", "install", "-q"]
            subprocess.run(pip + ["gevent", "python-dateutil", "python-decouple", "pymongo"],
                           check=True)
            subprocess.run([python, "-m", "pip", "download", "-q", "--no-deps", "-d", home,
                            ORIGINAL], check=True)
            archive = next(f for f in os.listdir(home) if f.startswith("mongo-mail-server"))
            with zipfile.ZipFile(os.path.join(home, archive)) as z:
                text = z.read(next(n for n in z.namelist() if n.endswith("/mongo_mail_server.py")))
            with open(source + ".py2", "wb") as f:
                f.write(text)
            subprocess.run([sys.executable, "-m", "lib2to3", "-w", "-n", "-o", home,
                            source + ".py2"], check=True, capture_output=True)
            with open(source + ".py2") as f:
                text = f.read()
            for old, new in ORIGINAL_PORT:
                text = text.replace(old, new)
            with open(source, "w") as f:
                f.write(text)
        port = free_port()
        return Server("original", [python, source, "--server", "debug", "--host", "127.0.0.1",
                                   "--port", str(port), "--concurency", "5000",
                                   "--max-connections", "5000", "start"], port, python=False)

    def archive(self):
        """purge and verify on an archive of --archive-count messages, written straight
        into nx-27017 as mms writes them: time and peak RSS, each beside a `count`
        of the same archive (and beside mms.py of --baseline REV, if given)."""
        count = self.args.archive_count
        versions = {"mms": MMS}
        if self.args.baseline:
            versions["baseline"] = self.baseline()
        print(f"## archive: {count} messages; seconds and peak RSS of each command")
        print(f"{'version':<10} {'command':<34} {'time':>10} {'peak RSS':>11}")
        for name, version in versions.items():  # purge empties the archive: one each
            self.fill_archive(count)
            for command in (["count"], ["verify"], ["purge", "--older-than", "1d", "--dry-run"],
                            ["purge", "--older-than", "1d"]):
                seconds, rss = self.run_command(version, command)
                print(f"{name:<10} {' '.join(command):<34} {seconds:8.1f} s {rss / 1024:8.0f} MB")

    def fill_archive(self, count, batch=1000):
        sys.path.insert(0, os.path.dirname(MMS))
        import datetime
        import hashlib
        import mms
        cfg = mms.parse_config(["--mongo-host", self.uri, "--mongo-database", "bench_archive"])
        archive = mms.Archive(cfg).connect()
        archive.collection.drop()
        archive.ensure_indexes()
        keys, when = mms.StoreKeys(), datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
        rng = random.Random(17)
        for start in range(0, count, batch):
            jobs = []
            for n in range(start, min(count, start + batch)):
                data = (f"Subject: archived {n}\r\nFrom: a{n % 97}@example.org\r\n\r\n".encode()
                        + base64.b64encode(rng.randbytes(rng.randrange(200, 3000))) + b"\r\n")
                metadata = {"store_key": keys(), "sender": f"a{n % 97}@example.org",
                            "rcpt": ["b@example.com"], "client_address": "192.0.2.1",
                            "received": when, "size": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()}
                jobs.append(archive.prepare(metadata, mms.Message(data)))
            archive.insert(jobs)
            if any(job.error for job in jobs):
                raise SystemExit(f"bench: writing the archive failed: {jobs[0].error}")
        archive.close()

    def console(self):
        """The web console and `stats` on archives of --console-counts messages in mms's
        own shape (Zipf-distributed senders and recipients over 30 days, 3% spam, 1%
        virus, 1% banned, with their daily counts), as a reviewer uses them: the
        quarantine, the dashboard cold and warm, each search filter's first page, the old way of
        counting (an aggregation over 30 days of messages, /api/stats) as the
        baseline, `verify --since 1d`; then SMTP into mms-store alone and while two
        reviewers click through the console."""
        print("## console: seconds per page (the console's own maxTimeMS is 5 s), and the "
              "web process's peak RSS")
        for count in self.args.console_counts:
            newest = self.fill_console(count)
            web = self.web_console()
            try:
                cookie = self.web_login(web.port)

                def time_pages(pages):
                    for name, path in pages.items():
                        seconds, status, said = self.web_get(web.port, path, cookie)
                        print(f"{name:<48} {seconds:7.3f} s  {status}{said}")
                pages = {"quarantine (where every role lands)": "/",
                         "dashboard, cold": "/dashboard", "dashboard, warm": "/dashboard",
                         "lists": "/lists", "audit log": "/audit",
                         "a message's page": f"/messages/{newest}",
                         **{f"search {name}": f"/messages?{query}"
                            for name, query in CONSOLE_SEARCHES}}
                # Last: nx-27017 goes on with a query past its maxTimeMS, and the
                # baselines' would hold up the pages after them.
                baselines = {"baseline: /api/stats?since=30d": "/api/stats?since=30d",
                             "baseline: /api/stats?since=7d&by=sender-domain":
                                 "/api/stats?since=7d&by=sender-domain"}
                print(f"### {count} messages")
                time_pages(pages)
                body = self.web_fetch(web.port, "/", cookie)[2]
                for n in range(2, 12):   # older pages of the quarantine, by its own links
                    older = re.search(rb'<a href="([^"]+)">Older messages</a>', body)
                    if not older:
                        break
                    seconds, status, body = self.web_fetch(
                        web.port, html.unescape(older.group(1).decode()), cookie)
                    if n in (2, 11):
                        print(f"{f'quarantine, page {n}':<48} {seconds:7.3f} s  {status}")
                time_pages(baselines)
                for command in (["verify", "--since", "1d"], ["stats", "--since", "30d",
                                                              "--by", "sender"]):
                    seconds, rss = self.run_command(MMS, command, "bench_console")
                    print(f"{' '.join(command):<48} {seconds:7.3f} s  {rss / 1024:.0f} MB")
                print(f"{'web console peak RSS':<48} {web.status('VmHWM') / 2**20:7.0f} MB")
            finally:
                web.stop()
        self.smtp_under_console(archived=self.args.console_counts[-1])

    def smtp_under_console(self, archived):
        """msg/s of 20 SMTP sessions into mms-store, alone and with two reviewers
        clicking without pause, in three alternated pairs: one run alone varied from
        497 to 616 msg/s between two bench runs, so the share is the median pair's."""
        web = self.web_console()
        try:
            cookie = self.web_login(web.port)
            shares = []
            for _ in range(3):
                alone = measure(self.servers["mms-store"], 20, self.args.count, 1024, False)
                loaded = self.smtp_beside_reviewers(web.port, cookie)
                shares.append(loaded["rate"] / alone["rate"])
                print(f"SMTP alone {alone['rate']:.0f} msg/s, with two reviewers "
                      f"{loaded['rate']:.0f} msg/s ({shares[-1]:.0%})", flush=True)
        finally:
            web.stop()
        print(f"### SMTP, 20 sessions, 1 KB, archive of {archived}, with two reviewers: "
              f"{sorted(shares)[1]:.0%} of its rate alone (the median of three pairs)")

    def smtp_beside_reviewers(self, port, cookie):
        stop = threading.Event()

        def reviewer(n):
            paths = ["/", "/dashboard"] + [f"/messages?{query}" for _, query in CONSOLE_SEARCHES]
            while not stop.is_set():
                self.web_get(port, paths[n % len(paths)], cookie)
                n += 1
        threads = [threading.Thread(target=reviewer, args=(n,)) for n in (0, 3)]
        for thread in threads:
            thread.start()
        try:
            return measure(self.servers["mms-store"], 20, self.args.count, 1024, False)
        finally:
            stop.set()
            for thread in threads:
                thread.join()

    def parse(self):
        """What parsing and the words cost the SMTP path: quarantine mode storing 1 KB
        and 100 KB messages at 20 sessions, with --index-text at its default, 8192
        and 0, and (--baseline REV) the mms.py of that revision; then
        reindex and `list --text` on an archive of --parse-count messages."""
        servers = {"mms-store": self.servers["mms-store"],
                   **{f"index-text {n}": self.mms("mongo-quarantine", "--mongo-host", self.uri,
                                                   "--mongo-database", f"bench_text{n}",
                                                   "--index-text", str(n)) for n in (8192, 0)}}
        if self.args.baseline:
            servers["baseline"] = self.mms("mongo-quarantine", "--mongo-host", self.uri,
                                           "--mongo-database", "bench_base",
                                           program=self.baseline())
        try:
            print("## parse: 20 sessions, new connections; msg/s, CPU ms/msg, peak RSS")
            for size in (1024, 102400):
                results = {name: measure(server, 20, self.args.count, size, False)
                           for name, server in servers.items()}
                for name, r in results.items():
                    print(f"{size // 1024:>4} KB {name:<14} {r['rate']:7.0f} msg/s "
                          f"{r['cpu_ms']:6.2f} ms {r['rss_mb']:5.0f} MB "
                          f"{r['rate'] / results['mms-store']['rate']:5.0%} of mms-store",
                          flush=True)
        finally:
            for name, server in servers.items():
                if name != "mms-store":
                    server.stop()
        count = self.args.parse_count
        self.fill_console(count)
        for command in (["reindex"], ["list", "--text", "invoice", "--limit", "1"],
                        ["list", "--text", "invoice", "--limit", "1", "--since", "1d"]):
            seconds, rss = self.run_command(MMS, command, "bench_console")
            rate = f", {count / seconds:.0f} msg/s" if command == ["reindex"] else ""
            print(f"{' '.join(command):<48} {seconds:8.1f} s {rss / 1024:5.0f} MB{rate}")

    def baseline(self):
        path = os.path.join(tempfile.mkdtemp(prefix="bench-base-"), "mms.py")
        with open(path, "wb") as f:
            f.write(subprocess.run(["git", "show", f"{self.args.baseline}:mms.py"],
                                   cwd=os.path.dirname(MMS), check=True,
                                   capture_output=True).stdout)
        return path

    def web_console(self):
        sys.path.insert(0, os.path.dirname(MMS))
        import mms
        users = os.path.join(tempfile.mkdtemp(prefix="bench-web-"), "users")
        with open(os.open(users, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(f"bench:{mms.hash_password('bench')}\n")
        port = free_port()
        web = Server("web", [MMS, "web", "--web", f"127.0.0.1:{port}", "--web-users", users,
                             "--mongo-host", self.uri, "--mongo-database", "bench_console"],
                     port)
        return web

    @staticmethod
    def web_login(port):
        import http.client
        import urllib.parse
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/login")
        answer = conn.getresponse()
        cookie = answer.getheader("Set-Cookie").split(";")[0]
        token = re.search(r'name="csrf" value="([0-9a-f]+)"', answer.read().decode()).group(1)
        conn.request("POST", "/login", urllib.parse.urlencode(
            {"user": "bench", "password": "bench", "csrf": token}),
            {"Cookie": cookie, "Content-Type": "application/x-www-form-urlencoded"})
        answer = conn.getresponse()
        answer.read()
        return answer.getheader("Set-Cookie").split(";")[0]

    @staticmethod
    def web_fetch(port, path, cookie):
        """(seconds, status, body)."""
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        started = time.monotonic()
        conn.request("GET", path, headers={"Cookie": cookie})
        answer = conn.getresponse()
        body = answer.read()
        conn.close()
        return time.monotonic() - started, answer.status, body

    @staticmethod
    def web_get(port, path, cookie):
        """(seconds, status, what the page says of a figure not available now)."""
        seconds, status, body = Bench.web_fetch(port, path, cookie)
        return seconds, status, ", not available now" if b"not available now" in body else ""

    def fill_console(self, count, batch=1000):
        """An archive in mms's shape, written as mms writes it, with its daily counts."""
        sys.path.insert(0, os.path.dirname(MMS))
        import datetime
        import hashlib
        import mms
        cfg = mms.parse_config(["--mongo-host", self.uri, "--mongo-database", "bench_console"])
        archive = mms.Archive(cfg).connect()
        archive.db.drop_collection(archive.collection.name)
        archive.db.drop_collection(archive.counts.name)
        archive.ensure_indexes()
        keys, rng = mms.StoreKeys(), random.Random(29)
        now = datetime.datetime.now(datetime.timezone.utc)
        senders = [f"user{n}@sender{n % 300}.example" for n in range(3000)]
        rcpts = [f"user{n}@rcpt{n % 40}.example" for n in range(2000)]
        weights = [1 / (n + 1) for n in range(3000)]
        # Bodies of words, the commonest far more often than the rest, as words go.
        vocabulary = [f"w{n}" for n in range(5000)] + list(CONSOLE_WORDS)
        vocabulary_weights = [1 / (n + 1) for n in range(len(vocabulary))]
        started = time.monotonic()
        for start in range(0, count, batch):
            jobs = []
            for n in range(start, min(count, start + batch)):
                subject = f"note {n} about {rng.choice(CONSOLE_WORDS)}"
                body = " ".join(rng.choices(vocabulary, vocabulary_weights,
                                            k=rng.randrange(30, 400)))
                data = f"Subject: {subject}\r\n\r\n{body}\r\n".encode()
                roll = rng.random()
                flags = ({"is_spam": 1, "quarantine": "spam"} if roll < 0.03 else
                         {"is_virus": 1, "quarantine": "virus"} if roll < 0.04 else
                         {"is_banned": 1, "quarantine": "banned"} if roll < 0.05 else {})
                metadata = {"store_key": keys(), "sender": rng.choices(senders, weights)[0],
                            "rcpt": [rng.choices(rcpts, weights[:2000])[0]],
                            "client_address": f"198.51.{rng.randrange(100)}.{rng.randrange(256)}",
                            "received": now - datetime.timedelta(seconds=rng.randrange(
                                30 * 86400)),
                            "size": len(data), "sha256": hashlib.sha256(data).hexdigest(),
                            "subject": subject, **flags}
                message = mms.Message(data)
                metadata.update(mms.completed_fields(message.pieces(), cfg.index_text,
                                                     metadata["sender"]))
                jobs.append(archive.prepare(metadata, message))
            archive.insert(jobs)
            if any(job.error for job in jobs):
                raise SystemExit(f"bench: writing the archive failed: {jobs[0].error}")
            archive.add_counts(mms.tallied(job.metadata for job in jobs))
        archive.close()
        print(f"({count} messages written in {time.monotonic() - started:.0f} s)")
        return jobs[-1].metadata["store_key"]

    # The command's own peak (VmHWM) as it ends: ru_maxrss would count this process,
    # which it was forked from, before its exec.
    PEAK = ("import runpy, sys\nsys.argv = sys.argv[1:]\ntry:\n"
            "    runpy.run_path(sys.argv[0], run_name='__main__')\nfinally:\n"
            "    sys.stderr.write([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")

    def run_command(self, version, command, database="bench_archive"):
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-c", self.PEAK, version, *command,
                               "--mongo-host", self.uri, "--mongo-database", database],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        return time.monotonic() - started, int(done.stderr.split("VmHWM:")[1].split()[0])


FLOOR = os.path.join(os.path.dirname(os.path.dirname(HERE)), "shared", "bench", "floor_sink.py")
ORIGINAL = "mongo-mail-server==0.1.1"
ORIGINAL_PORT = (   # Python 2 to 3 beyond lib2to3: the module and argparse keyword gone
    ("from UserDict import UserDict", "from collections import UserDict"),
    ("version=__VERSION__,", ""),
    ("self.conn.send(msg + '\\r\\n')", "self.conn.send((msg + '\\r\\n').encode('latin-1'))"),
    ("data = self.conn.recv(self.ac_in_buffer_size)",
     "data = self.conn.recv(self.ac_in_buffer_size).decode('latin-1')"),
)
PARTS = ("engine", "matrix", "halves", "idle", "large", "concurrent_large", "workers", "metrics", "floor",
         "archive", "console", "parse")
CONSOLE_WORDS = ("invoice", "meeting", "report", "delivery", "password", "holiday")
CONSOLE_SEARCHES = [   # (name, query string): one for each kind of filter
    ("sender=@domain", "sender=%40sender7.example"),
    ("rcpt=@domain", "rcpt=%40rcpt3.example"),
    ("sender=address", "sender=user11%40sender11.example"),
    ("verdict=virus", "verdict=virus"),
    ("client=CIDR (matches nothing)", "client=203.0.113.0%2F24"),
    ("client=CIDR", "client=198.51.7.0%2F24"),
    ("since=1d", "since=1d"),
    ("subject (text index; since=1d)", "subject=invoice&since=1d"),
    ("subject (text index; a word in none)", "subject=zebra"),
    ("subject (text index; a word in 1 of 6)", "subject=invoice"),
    ("words (text index; a word in 1 of 6)", "text=invoice"),
    ("words (two, and -word)", "text=invoice+about+-holiday"),
    ("words (since=1d)", "text=invoice&since=1d"),
]


def main():
    if sys.argv[1:2] == ["counted"]:
        return counted(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="500 messages a cell")
    parser.add_argument("--count", type=int, default=5000, help="messages a cell (5000)")
    parser.add_argument("--peer-count", type=int, default=1000,
                        help="messages a cell for the peer, which takes 20-50 ms each (1000)")
    parser.add_argument("--archive-count", type=int, default=60000,
                        help="messages in the archive part (60000)")
    parser.add_argument("--console-counts", type=lambda text: [int(n) for n in text.split(",")],
                        default=[10000, 50000, 200000],
                        help="console part: the archives' sizes (10000,50000,200000)")
    parser.add_argument("--parse-count", type=int, default=200000,
                        help="parse part: messages reindex and list --text read (200000)")
    parser.add_argument("--baseline", metavar="REV",
                        help="engine, archive and parse parts: also run the mms.py of this git "
                             "revision")
    parser.add_argument("--rounds", type=int, default=3, help="engine part: rounds (3)")
    parser.add_argument("--only", action="append", choices=PARTS,
                        help="run only this part (repeatable; default: all)")
    args = parser.parse_args()
    if args.quick:
        args.count = args.peer_count = 500
        args.archive_count = 6000
        args.console_counts = [10000]
        args.parse_count = 10000
    for tool in ("smtp-source", "smtp-sink", "nx-27017"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} not found (see the docstring for what to install)")
    bench = Bench(args)
    try:
        bench.start()
        print(f"# mms benchmark, {args.count} messages a cell ({args.peer_count} for the peer), "
              f"{os.cpu_count()} cores\n")
        for part in args.only or PARTS:
            getattr(bench, part)()
            print()
    finally:
        bench.stop()


if __name__ == "__main__":
    main()
