"""Tests for mms.py, with real parts: real SMTP clients over TCP, real pymongo
against a MongoDB-wire server (nx-27017, or a real MongoDB when
MMS_TEST_MONGODB_URI is set), and mms itself as a subprocess where signals or
the command line are under test.

    python -m unittest -v

Sections follow mms.py: configuration, the SMTP session, the message pipeline,
the modes, observability, the archive commands, the web console and quarantine
reports (in Chromium too: MMS_SCREENSHOTS=DIR takes the README's screenshots),
the container (MMS_TEST_CONTAINER=1, once .ci/container built it); then the
fuzzer (MMS_FUZZ_SESSIONS, MMS_FUZZ_SEED, MMS_FUZZ_REPLAY).
"""

import base64
import collections
import contextlib
import datetime
import email.utils
import hashlib
import html
import html.parser
import io
import json
import logging
import os
import random
import re
import shutil
import signal
import smtplib
import socket
import socketserver
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import types
import unittest
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zlib
from unittest import mock

import bson

import mms

# Log records are checked with assertLogs; keep the rest off the test output.
logging.getLogger("mms").addHandler(logging.NullHandler())

HERE = os.path.dirname(os.path.abspath(__file__))
MMS = os.path.join(HERE, "mms.py")

# Every reply code the tests expect, in one table: (code, enhanced status code).
CODES = {
    "greeting": (220, None),
    "bad_sender": (501, "5.1.7"),
    "relay_failed": (451, "4.4.1"),
    "ok": (250, "2.0.0"),
    "mail_ok": (250, "2.1.0"),
    "rcpt_ok": (250, "2.1.5"),
    "queued": (250, "2.0.0"),
    "data_go": (354, None),
    "bye": (221, "2.0.0"),
    "vrfy": (252, "2.0.0"),
    "help": (214, "2.0.0"),
    "unknown": (500, "5.5.2"),
    "too_long": (500, "5.5.6"),
    "syntax": (501, "5.5.4"),
    "bad_rcpt": (501, "5.1.3"),
    "sequence": (503, "5.5.1"),
    "too_big": (552, "5.3.4"),
    "too_many_rcpts": (452, "4.5.3"),
    "xforward_denied": (550, "5.7.0"),
    "access_denied": (554, "5.7.1"),
    "timeout": (421, "4.4.2"),
    "too_many_conn": (421, "4.7.0"),
    "shutdown": (421, "4.3.2"),
    "not_stored": (451, "4.3.0"),
    "no_rcpts": (554, "5.5.1"),
}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def config(*args):
    """A configuration for a server in this process, on a port the kernel picks
    (port 0, which the command line refuses), unless args name one."""
    cfg = mms.parse_config(["--port", "1", *args])
    if "--port" not in args:
        cfg.port = 0
    return cfg


def wait_port(port, host="127.0.0.1", seconds=15):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port}")


###############################################################################
# Real peers for the tests: MongoDB and the Debian daemons ####################
###############################################################################

class MongoServer:
    """nx-27017 started once for the module, unless MMS_TEST_MONGODB_URI names a real one."""

    uri = None
    process = None

    @classmethod
    def get_uri(cls):
        if cls.uri:
            return cls.uri
        cls.uri = os.environ.get("MMS_TEST_MONGODB_URI")
        if cls.uri:
            return cls.uri
        # Beside this Python first: `venv/bin/python -m unittest` in a venv not activated.
        exe = (shutil.which("nx-27017", path=os.path.dirname(sys.executable))
               or shutil.which("nx-27017"))
        if exe is None:
            raise missing("nx-27017 is not installed (pip install nx-27017)")
        port = free_port()
        run = cls.run = tempfile.mkdtemp(prefix="mms-nx-")
        cls.process = subprocess.Popen(
            [exe, "--host", "127.0.0.1", "-p", str(port), "--data-dir", "memory",
             "--pid-file", os.path.join(run, "pid"), "--log-file", os.path.join(run, "log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_port(port)
        cls.uri = f"mongodb://127.0.0.1:{port}/"
        return cls.uri

    @classmethod
    def stop(cls):
        if cls.process:
            cls.process.terminate()
            try:
                cls.process.wait(10)
            except subprocess.TimeoutExpired:  # busy freeing a large database
                cls.process.kill()
                cls.process.wait(10)
            shutil.rmtree(cls.run, ignore_errors=True)


MISSING = collections.Counter()   # why a group of tests was skipped: how many


def missing(reason):
    """The skip of a test whose peer is not installed, counted for the summary that
    every run prints (with or without -v)."""
    MISSING[reason] += 1
    return unittest.SkipTest(reason)


def tearDownModule():
    MongoServer.stop()
    Daemon.stop_all()
    if Postfix.running:
        Postfix.running.stop()
    for reason, count in sorted(MISSING.items()):
        print(f"\nskipped ({count}): {reason}", end="", file=sys.stderr)


class Cable:
    """A TCP forwarder between mms and MongoDB that a test can cut and mend.

    MongoDB cannot be stopped when it is a shared real server
    (MMS_TEST_MONGODB_URI), so an outage is made on the wire instead: every
    connection is dropped and new ones are refused, exactly what mms sees when
    mongod dies.
    """

    def __init__(self, uri):
        from pymongo.uri_parser import parse_uri
        self.target = parse_uri(uri)["nodelist"][0]
        self.up = True
        self.conns = []
        self.lock = threading.Lock()   # a connection made as cut() runs is cut too
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if not self.up:
                client.close()
                continue
            upstream = socket.create_connection(self.target)
            with self.lock:
                if not self.up:
                    client.close()
                    upstream.close()
                    continue
                self.conns += [client, upstream]
            self.join(client, upstream)

    def join(self, client, upstream):
        for a, b in ((client, upstream), (upstream, client)):
            threading.Thread(target=self.pump, args=(a, b), daemon=True).start()

    @staticmethod
    def pump(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def cut(self):
        with self.lock:
            self.up = False
            conns, self.conns = self.conns, []
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def mend(self):
        self.up = True

    def close(self):
        self.cut()
        self.listener.close()


class WireTap(Cable):
    """A Cable that reads every command mms sends to MongoDB, and may change a
    request or its reply on the way.

    Why a proxy: nx-27017 has no explain(), so whether a query can use an index
    on a real MongoDB is judged from its shape as sent (the first stage of a
    pipeline, a limit, a conditional delete). And no MongoDB can be made to report
    a write concern error, refuse one document of a batch, or stall on demand:
    that takes a lagging replica set, a schema validator, a slow disk. So the
    reply is doctored where mms's driver reads it, exactly as a real server
    would send it.

    request(command) may return a changed command; reply(command, answer) a
    changed answer. A command's document sequences (insert's documents) are
    merged into it as lists.
    """

    def __init__(self, uri, request=None, reply=None):
        self.commands, self.asked = [], {}
        self.on_request, self.on_reply = request, reply
        super().__init__(uri)

    def join(self, client, upstream):
        threading.Thread(target=self.relay, args=(client, upstream, self.request),
                         daemon=True).start()
        threading.Thread(target=self.relay, args=(upstream, client, self.reply),
                         daemon=True).start()

    def sent(self, name, collection=None):
        """The commands named `name` (on that collection), in the order sent."""
        return [c for c in list(self.commands) if next(iter(c)) == name
                and (collection is None or c[name] == collection)]

    @staticmethod
    def read(sock, count):
        data = b""
        while len(data) < count:
            chunk = sock.recv(count - len(data))
            if not chunk:
                raise OSError("closed")
            data += chunk
        return data

    def relay(self, src, dst, change):
        try:
            while True:
                head = self.read(src, 16)
                length, request_id, response_to, opcode = struct.unpack("<iiii", head)
                rest = self.read(src, length - 16)
                if opcode == 2013:  # OP_MSG
                    rest = change(request_id, response_to, rest)
                    head = struct.pack("<iiii", 16 + len(rest), request_id, response_to, opcode)
                dst.sendall(head + rest)
        except OSError:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.close()

    @staticmethod
    def decode(rest):
        """(flags, the command with its document sequences merged in, their names)."""
        flags, at, body, sequences = struct.unpack("<I", rest[:4])[0], 4, None, {}
        end = len(rest) - (4 if flags & 1 else 0)   # bit 0: a checksum follows
        while at < end:
            size = struct.unpack("<i", rest[at + 1:at + 5])[0]
            if rest[at] == 0:
                body = bson.decode(rest[at + 1:at + 1 + size])
            else:
                section = rest[at + 5:at + 1 + size]
                name, _, docs = section.partition(b"\0")
                sequences[name.decode()] = bson.decode_all(docs)
            at += 1 + size
        return flags, {**body, **sequences}, list(sequences)

    @staticmethod
    def encode(flags, command, sequences):
        body = {key: value for key, value in command.items() if key not in sequences}
        out = struct.pack("<I", flags & ~1) + b"\0" + bson.encode(body)
        for name in sequences:
            docs = b"".join(bson.encode(doc) for doc in command[name])
            section = name.encode() + b"\0" + docs
            out += b"\1" + struct.pack("<i", 4 + len(section)) + section
        return out

    def request(self, request_id, response_to, rest):
        flags, command, sequences = self.decode(rest)
        if self.on_request is not None:
            changed = self.on_request(command)
            if changed is not None:
                command = changed
                rest = self.encode(flags, command, sequences)
        self.commands.append(command)
        self.asked[request_id] = command
        return rest

    def reply(self, request_id, response_to, rest):
        command = self.asked.pop(response_to, None)
        if self.on_reply is None or command is None:
            return rest
        flags, answer, sequences = self.decode(rest)
        changed = self.on_reply(command, answer)
        return rest if changed is None else self.encode(flags, changed, sequences)


def concern_error(collection):
    """A WireTap reply: a writeConcernError on every insert into one collection."""
    def reply(command, answer):
        if command.get("insert") == collection:
            return {**answer, "writeConcernError": {
                "code": 64, "codeName": "WriteConcernFailed",
                "errmsg": "waiting for replication timed out", "errInfo": {"wtimeout": True}}}
    return reply


class Daemon:
    """A Debian daemon started on a free loopback port, once for the module."""

    started = {}

    @classmethod
    def get(cls):
        if cls.__name__ not in Daemon.started:
            if not shutil.which(cls.program):
                if os.environ.get("CI"):
                    raise RuntimeError(f"{cls.program} is not installed: .ci/run should install it")
                raise missing(f"{cls.program} is not installed ({cls.package})")
            Daemon.started[cls.__name__] = cls()
        return Daemon.started[cls.__name__]

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix=f"mms-{self.program}-")
        os.chmod(self.dir, 0o755)
        self.port = free_port()
        self.proc = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{self.program} did not start: {self.log()}")
            time.sleep(0.1)

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def log(self):
        with contextlib.suppress(OSError), open(os.path.join(self.dir, "log"), errors="replace") as f:
            return f.read()[-2000:]
        return ""

    def stop(self):
        self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    @classmethod
    def stop_all(cls):
        for daemon in Daemon.started.values():
            daemon.stop()
        Daemon.started.clear()


###############################################################################
# SMTP helpers ################################################################
###############################################################################

class Raw:
    """A raw SMTP client, for the protocol edges smtplib will not produce."""

    def __init__(self, port, host="127.0.0.1", source=None):
        self.sock = socket.create_connection((host, port), timeout=20,
                                             source_address=(source, 0) if source else None)
        self.file = self.sock.makefile("rb")

    def send(self, data):
        self.sock.sendall(data)

    def reply(self):
        lines = []
        while True:
            line = self.file.readline()
            if not line:
                raise ConnectionError("connection closed")
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return int(lines[0][:3]), "\n".join(line[4:] for line in lines)

    def cmd(self, line):
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def closed(self):
        return self.file.read() == b""

    def close(self):
        self.file.close()
        self.sock.close()


def concurrently(count, work):
    """work(n) in count threads at once; their results in order."""
    results = [None] * count

    def run(n):
        results[n] = work(n)
    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def dot_stuff(data):
    lines = data.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


def parse_debug_output(raw):
    """Split debug mode's stdout into (metadata, message bytes) pairs."""
    start, end = b"---------- MESSAGE FOLLOWS ----------\n", b"\n------------ END MESSAGE ------------\n"
    messages, at = [], 0
    while (at := raw.find(start, at)) >= 0:
        head_end = raw.index(b"\n", at + len(start))
        metadata = json.loads(raw[at + len(start):head_end])
        body_start = head_end + 1
        body = raw[body_start:body_start + metadata["size"]]
        assert raw.startswith(end, body_start + metadata["size"])
        messages.append((metadata, body))
        at = body_start + metadata["size"] + len(end)
    return messages


class ServerCase(unittest.TestCase):
    """Starts mms in this process on a free port; debug mode writes into a buffer."""

    mode = "debug"

    def start(self, *args, mode=None):
        cfg = config("--server", self.mode, "--host", "127.0.0.1", "--hostname", "mx.test", *args)
        self.output = io.BytesIO()
        if mode is None and self.mode == "debug":
            mode = mms.DebugMode(cfg, stream=self.output)
        server = mms.open_server(cfg, mode)
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                  daemon=True)
        thread.start()
        self.addCleanup(self.stop, server, thread)
        self.server = server
        self.port = server.server_address[1]
        return server

    def stop(self, server, thread):
        server.shutdown()
        server.drain(1)
        server.mode.close()
        thread.join(5)

    def raw(self, ehlo="client.test", source=None):
        client = Raw(self.port, source=source)
        self.addCleanup(client.close)
        self.assertReply(client.reply(), "greeting")
        if ehlo:
            self.assertEqual(client.cmd(f"EHLO {ehlo}")[0], 250)
        return client

    def smtp(self):
        client = smtplib.SMTP("127.0.0.1", self.port, timeout=30)
        self.addCleanup(client.close)
        return client

    def messages(self):
        return parse_debug_output(self.output.getvalue())

    def assertReply(self, reply, name):
        code, enhanced = CODES[name]
        self.assertEqual(reply[0], code, reply)
        if enhanced:
            self.assertTrue(reply[1].startswith(enhanced + " "), reply)

    def assert_a_slot_comes_back(self, first, second):
        """Once `first` quits, a new client is served, and `second` all along."""
        first.cmd("QUIT")
        first.closed()
        time.sleep(0.1)
        self.assertReply(self.send_message(self.raw(), SIMPLE), "queued")
        self.assertReply(second.cmd("NOOP"), "ok")

    def open_data(self, client):
        """MAIL, RCPT and DATA: the client may send message text next."""
        self.assertReply(client.cmd("MAIL FROM:<a@example.org>"), "mail_ok")
        self.assertReply(client.cmd("RCPT TO:<b@example.com>"), "rcpt_ok")
        self.assertReply(client.cmd("DATA"), "data_go")

    def send_message(self, client, data, sender="a@example.org", rcpts=("b@example.com",)):
        """MAIL, RCPT, DATA and the message, on a raw client; the end-of-data reply."""
        self.assertReply(client.cmd(f"MAIL FROM:<{sender}>"), "mail_ok")
        for rcpt in rcpts:
            self.assertReply(client.cmd(f"RCPT TO:<{rcpt}>"), "rcpt_ok")
        self.assertReply(client.cmd("DATA"), "data_go")
        client.send(dot_stuff(data) + b".\r\n")
        return client.reply()


SIMPLE = b"Subject: test\r\nFrom: a@example.org\r\n\r\nHello\r\n"


###############################################################################
# Configuration ###############################################################
###############################################################################

class TestConfiguration(unittest.TestCase):

    def parse(self, argv, env=None):
        with mock.patch.dict(os.environ, env or {}, clear=False):
            return mms.parse_config(argv)

    def test_defaults_follow_the_seed(self):
        with mock.patch.dict(os.environ, {}, clear=True):
            cfg = mms.parse_config([])
        self.assertEqual((cfg.server, cfg.host, cfg.port, cfg.timeout, cfg.data_size_limit),
                         ("mongo-quarantine", "0.0.0.0", 14001, 600, 50 * 2**20))
        self.assertEqual(cfg.mongo_host, "mongodb://localhost/message")
        self.assertEqual((cfg.mongo_database, cfg.mongo_collection), ("message", "message"))
        self.assertEqual((cfg.max_recipients, cfg.max_connections, cfg.grace), (1000, 256, 8))
        self.assertEqual([str(n) for n in cfg.xforward_hosts], ["127.0.0.1/32", "::1/128"])

    def test_variables_set_options(self):
        cfg = self.parse([], {"MMS_SERVER": "debug", "MMS_PORT": "2525", "MMS_TIMEOUT": "30",
                              "MMS_ALLOW": "10.0.0.0/8, 192.0.2.1", "MMS_PLUGINS": "a.b,c",
                              "MMS_REAL_RCPT": "1", "MMS_MONGODB_URI": "mongodb://db/x"})
        self.assertEqual((cfg.server, cfg.port, cfg.timeout), ("debug", 2525, 30))
        self.assertEqual([str(n) for n in cfg.allow], ["10.0.0.0/8", "192.0.2.1/32"])
        self.assertEqual(cfg.plugin, ["a.b", "c"])
        self.assertTrue(cfg.real_rcpt)
        self.assertEqual(cfg.mongo_host, "mongodb://db/x")

    def test_flags_win_over_variables(self):
        cfg = self.parse(["--port", "2626", "--allow", "10.1.0.0/16", "--allow", "::1",
                          "--mongo-host", "mongodb://flag/x"],
                         {"MMS_PORT": "2525", "MMS_ALLOW": "10.0.0.0/8",
                          "MMS_MONGODB_URI": "mongodb://env/x"})
        self.assertEqual(cfg.port, 2626)
        self.assertEqual([str(n) for n in cfg.allow], ["10.1.0.0/16", "::1/128"])
        self.assertEqual(cfg.mongo_host, "mongodb://flag/x")

    def test_trailing_start_is_accepted(self):
        self.assertEqual(self.parse(["--server", "debug", "start"]).command, "start")

    def run_mms(self, *args, env=None):
        return subprocess.run([sys.executable, MMS, *args], capture_output=True, text=True,
                              timeout=30, env={**os.environ, **(env or {})})

    def test_invalid_values_exit_2_with_a_clear_message(self):
        for args, env, words in [
            (["--port", "99999"], {}, "not a TCP port"),
            (["--allow", "10.0.0.300/8"], {}, "10.0.0.300/8"),
            (["--server", "nonsense"], {}, "unknown mode"),
            ([], {"MMS_PORT": "http"}, "MMS_PORT"),
            ([], {"MMS_XFORWARD_HOSTS": "not-an-ip"}, "MMS_XFORWARD_HOSTS"),
            (["--server", "mongo-proxy", "--real-rcpt"], {}, "quarantine"),
        ]:
            with self.subTest(args=args, env=env):
                done = self.run_mms(*args, env=env)
                self.assertEqual(done.returncode, 2, done.stderr)
                self.assertIn(words, done.stderr)
                self.assertNotIn("Traceback", done.stderr)

    def test_start_up_errors_are_one_line_and_exit_2(self):
        for args, words in [
            (["--nonsense"], "unknown option --nonsense (see mms.py --help)"),
            (["--port", "14OO1"], "--port: not a number: '14OO1'"),
            (["--port", "0"], "not a TCP port"),
            (["--mongo-host", "mongodb://db:notaport/"], "--mongo-host"),
            (["--mongo-host", "http://db/"], "--mongo-host"),
            (["--mongo-write-concern", "0"], "never stored"),
            (["--mongo-write-concern", "w; drop"], "tag set name"),
        ]:
            with self.subTest(args=args):
                done = self.run_mms(*args)
                self.assertEqual(done.returncode, 2, done.stderr)
                self.assertIn(words, done.stderr)
                self.assertEqual(len(done.stderr.strip().splitlines()), 1, done.stderr)
                self.assertNotIn("_port", done.stderr)

    def config_file(self, text):
        fd, path = tempfile.mkstemp(prefix="mms-", suffix=".conf")
        with os.fdopen(fd, "w") as f:
            f.write(text)
        self.addCleanup(os.unlink, path)
        return path

    def test_one_configuration_file_for_the_server_and_its_commands(self):
        path = self.config_file("# /etc/mms.conf\nMMS_SERVER=mongo-proxy\nMMS_PORT=14025\n"
                                "MMS_REMOTE_PORT='10026'\n\nMMS_SPOOL_DIR=\"/srv/spool\"\n"
                                "MMS_GRACE=3\n")
        for args, env, port, grace in [
                (["--config", path], {}, 14025, 3),                      # the file
                ([], {"MMS_CONFIG": path}, 14025, 3),                    # named by a variable
                (["--config", path], {"MMS_PORT": "14026"}, 14026, 3),   # a variable wins
                (["--config", path, "--port", "14027"], {"MMS_PORT": "14026"}, 14027, 3),
                (["list", "--config", path], {"MMS_GRACE": "9"}, 14025, 9)]:
            with self.subTest(args=args, env=env):
                cfg = self.parse(args, env)
                self.assertEqual((cfg.server, cfg.port, cfg.remote_port, cfg.spool_dir, cfg.grace),
                                 ("mongo-proxy", port, 10026, "/srv/spool", grace))

    def test_a_bad_configuration_file_is_one_line(self):
        for text, words in [("MMS_PORT=99999\n", "MMS_PORT in "), ("just words\n", "line 1"),
                            ("MMS_SERVER=debug\nMMS_SPOOL_DIR=/x\n", "MMS_SPOOL_DIR in ")]:
            with self.subTest(text=text):
                done = self.run_mms("--config", self.config_file(text))
                self.assertEqual(done.returncode, 2, done.stderr)
                self.assertIn(words, done.stderr)
                self.assertEqual(len(done.stderr.strip().splitlines()), 1, done.stderr)
        done = self.run_mms("--config", "/nonexistent/mms.conf")
        self.assertIn("/nonexistent/mms.conf", done.stderr)
        cfg = self.parse(["--config", self.config_file("MMS_PLUGIN=x\n"), "--server", "debug"])
        self.assertEqual(len(cfg.warnings), 1)
        self.assertRegex(cfg.warnings[0], "unknown variable MMS_PLUGIN is ignored; did you mean "
                                          "MMS_PLUGINS\\? \\(in .*mms-.*\\.conf\\)")

    def test_an_option_the_mode_cannot_use_stops_the_server(self):
        """A forgotten --server would archive mail meant to be relayed."""
        for args, env, words in [
                (["--remote-port", "10026"], {}, "--remote-port is for mongo-proxy and "
                                                 "mongo-filter mode, not mongo-quarantine"),
                ([], {"MMS_SPOOL_DIR": "/x"}, "MMS_SPOOL_DIR is for mongo-proxy"),
                (["--server", "mongo-proxy", "--clamd", "none"], {}, "--clamd is for mongo-filter"),
                (["--server", "mongo-proxy", "--real-rcpt"], {}, "--real-rcpt is for"),
                (["--server", "debug", "--retention", "30"], {}, "--retention is for"),
                (["--dry-run"], {}, "--dry-run is for the archive commands"),
                (["--since", "24h"], {}, "--since is for the archive commands"),
                (["start", "--limit", "5"], {}, "--limit is for the archive commands")]:
            with self.subTest(args=args, env=env):
                done = self.run_mms(*args, "--port", str(free_port()), env=env)
                self.assertEqual(done.returncode, 2, done.stderr)
                self.assertIn(words, done.stderr)
                self.assertEqual(len(done.stderr.strip().splitlines()), 1, done.stderr)
        # the archive commands take the server's settings, whatever the mode
        cfg = self.parse(["check", "--remote-port", "10026", "--spool-dir", "/x"])
        self.assertEqual((cfg.command, cfg.remote_port), ("check", 10026))
        self.assertFalse(self.parse(["--server", "mongo-proxy"],
                                    {"MMS_REAL_RCPT": "0"}).real_rcpt)   # off is no mistake

    def test_each_command_has_its_own_help(self):
        full = self.run_mms("--help").stdout
        for command, own, others in [("list", ["--limit", "--sender", "--quarantine-id",
                                               "--mongo-host"], ["--clamd", "--dry-run"]),
                                     ("purge", ["--older-than", "--dry-run"], ["--limit"]),
                                     ("release", ["--via", "--to", "--force"], ["--sender"])]:
            with self.subTest(command=command):
                done = self.run_mms(command, "--help")
                self.assertEqual(done.returncode, 0, done.stderr)
                self.assertTrue(done.stdout.startswith(f"usage: mms.py {command}"), done.stdout)
                self.assertLess(len(done.stdout.splitlines()), len(full.splitlines()) / 2)
                for flag in own:
                    self.assertRegex(done.stdout, rf"(?m)^  {flag}\b")
                for flag in others:
                    self.assertNotRegex(done.stdout, rf"(?m)^  {flag}\b")

    def test_help_lists_every_command_in_a_line(self):
        overview = self.run_mms("help")
        self.assertEqual(overview.returncode, 0)
        self.assertEqual(overview.stdout, self.run_mms("--help").stdout)
        for name, command in mms.COMMANDS.items():
            self.assertRegex(overview.stdout, rf"(?m)^  {re.escape(name)} +"
                                              rf"{re.escape(command.what)}$")
        self.assertLess(len(overview.stdout.splitlines()), 150)
        self.assertEqual(self.run_mms("help", "release").stdout,
                         self.run_mms("release", "--help").stdout)
        done = self.run_mms("help", "lst")
        self.assertEqual((done.returncode, done.stderr.strip()), (1, "mms.py: error: no command "
                         "'lst'; did you mean list? (mms.py help lists them)"))

    def test_an_option_before_the_key_is_read_as_meant(self):
        cfg = self.parse(["headers", "--mongo-host", "mongodb://db/x", "26d90b69"])
        self.assertEqual((cfg.command, cfg.key, cfg.mongo_host),
                         ("headers", "26d90b69", "mongodb://db/x"))

    def test_a_misspelt_option_is_named(self):
        done = self.run_mms("--sever", "debug")
        self.assertEqual(done.returncode, 2)
        self.assertEqual(done.stderr.strip(), "mms.py: error: unknown option --sever; did you "
                                              "mean --server? (see mms.py --help)")

    def test_the_database_named_in_the_uri_is_used(self):
        with mock.patch.dict(os.environ, {}, clear=True):
            self.assertEqual(mms.parse_config(["--mongo-host", "mongodb://db/wctest"]).mongo_database,
                             "wctest")
            self.assertEqual(mms.parse_config(["--mongo-host", "mongodb://db/"]).mongo_database,
                             "message")
            self.assertEqual(mms.parse_config(["--mongo-host", "mongodb://db/wctest",
                                               "--mongo-database", "x"]).mongo_database, "x")
        cfg = self.parse(["--mongo-host", "mongodb://db/wctest"], {"MMS_MONGODB_DATABASE": "y"})
        self.assertEqual(cfg.mongo_database, "y")

    def test_unknown_variables_are_warned_with_the_closest_real_one(self):
        done = subprocess.run([sys.executable, MMS, "--server", "debug", "--port", "99999"],
                              capture_output=True, text=True, timeout=30)  # exits before serving
        self.assertNotIn("unknown variable", done.stderr)
        warnings = mms.unknown_variables({"MMS_PLUGIN": "x", "MMS_MONGO_URI": "x",
                                          "MMS_LISTEN_PORT": "1", "MMS_PORT": "1", "PATH": "/"})
        self.assertEqual(warnings, [
            "unknown variable MMS_LISTEN_PORT is ignored; did you mean MMS_PORT?",
            "unknown variable MMS_MONGO_URI is ignored; did you mean MMS_MONGODB_URI?",
            "unknown variable MMS_PLUGIN is ignored; did you mean MMS_PLUGINS?"])

    def test_scanners_can_be_turned_off_by_flag_or_variable(self):
        for args, env in [(["--clamd", "none", "--spamd", "none"], {}),
                          ([], {"MMS_CLAMD": "none", "MMS_SPAMD": "off"})]:
            with self.subTest(args=args, env=env):
                cfg = self.parse(["--server", "mongo-filter", *args], env)
                self.assertEqual((cfg.clamd, cfg.spamd), (None, None))
        cfg = self.parse(["--server", "mongo-filter"], {"MMS_CLAMD": "none"})
        self.assertEqual((cfg.clamd, cfg.spamd), (None, ("127.0.0.1", 783)))

    def test_journal_and_write_concern_reach_the_driver(self):
        cfg = mms.parse_config(["--mongo-host", "mongodb://127.0.0.1:1/", "--mongo-journal",
                                "--mongo-write-concern", "majority"])
        archive = mms.Archive(cfg).connect()
        self.addCleanup(archive.close)
        self.assertEqual(archive.collection.write_concern.document,
                         {"w": "majority", "j": True, "wtimeout": 5000})

    def test_help_lists_every_option_with_its_variable(self):
        text = self.run_mms("--help").stdout
        for flag, variable, *_ in mms.OPTIONS:
            self.assertIn(flag, text)
            self.assertIn(variable, text)

    def test_mongodb_password_is_never_logged(self):
        with self.assertLogs("mms", "WARNING") as logs:
            cfg = mms.parse_config(["--mongo-host", f"mongodb://archiver:s3cret@127.0.0.1:{free_port()}/",
                                    "--mongo-timeout", "0.2"])
            store = mms.MongoStore(cfg)
            store.start()
            store.contacted.wait()
            store.close()
        self.assertNotIn("s3cret", "\n".join(logs.output))
        self.assertIn("archiver:***@", "\n".join(logs.output))

    def test_version(self):
        self.assertIn(mms.__version__, self.run_mms("--version").stdout)


###############################################################################
# The SMTP session ############################################################
###############################################################################

class TestReplies(ServerCase):

    def setUp(self):
        self.start("--data-size-limit", "100000")

    def test_greeting_and_ehlo_keywords(self):
        client = Raw(self.port)
        self.addCleanup(client.close)
        code, text = client.reply()
        self.assertEqual(code, 220)
        self.assertTrue(text.startswith("mx.test ESMTP"), text)
        code, text = client.cmd("EHLO client.test")
        self.assertEqual(code, 250)
        keywords = text.split("\n")
        self.assertEqual(keywords[0], "mx.test")
        for keyword in ("PIPELINING", "SIZE 100000", "8BITMIME", "ENHANCEDSTATUSCODES",
                        "SMTPUTF8", "HELP", "XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE"):
            self.assertIn(keyword, keywords)

    def test_a_size_limit_by_default(self):
        """50 MiB unless set: one sender's 100 MB message is refused before it is sent."""
        self.start()
        client = self.raw(ehlo=None)
        self.assertIn(f"SIZE {50 * 2**20}", client.cmd("EHLO client.test")[1].split("\n"))
        self.assertReply(client.cmd(f"MAIL FROM:<a@example.org> SIZE={100 * 10**6}"), "too_big")
        self.assertReply(client.cmd(f"MAIL FROM:<a@example.org> SIZE={50 * 2**20}"), "mail_ok")

    def test_helo(self):
        client = self.raw(ehlo=None)
        self.assertEqual(client.cmd("HELO client.test"), (250, "mx.test"))
        self.assertReply(client.cmd("MAIL FROM:<a@example.org>"), "mail_ok")

    def test_simple_verbs(self):
        client = self.raw()
        self.assertReply(client.cmd("NOOP"), "ok")
        self.assertReply(client.cmd("RSET"), "ok")
        self.assertReply(client.cmd("HELP"), "help")
        self.assertReply(client.cmd("VRFY postmaster"), "vrfy")
        self.assertReply(client.cmd("QUIT"), "bye")
        self.assertTrue(client.closed())

    def test_unknown_verb(self):
        client = self.raw()
        self.assertReply(client.cmd("EXPN staff"), "unknown")
        self.assertReply(client.cmd("GET / HTTP/1.0"), "unknown")
        self.assertReply(client.cmd("NOOP"), "ok")

    def test_out_of_order(self):
        client = self.raw(ehlo=None)
        self.assertReply(client.cmd("MAIL FROM:<a@example.org>"), "sequence")
        client.cmd("EHLO client.test")
        self.assertReply(client.cmd("RCPT TO:<b@example.com>"), "sequence")
        self.assertReply(client.cmd("DATA"), "sequence")
        self.assertReply(client.cmd("MAIL FROM:<a@example.org>"), "mail_ok")
        self.assertReply(client.cmd("DATA"), "sequence")
        self.assertReply(client.cmd("MAIL FROM:<a@example.org>"), "sequence")

    def test_bad_syntax(self):
        client = self.raw()
        self.assertReply(client.cmd("EHLO"), "syntax")
        self.assertReply(client.cmd("MAIL TO:<a@example.org>"), "syntax")
        self.assertReply(client.cmd("MAIL FROM:<a@example.org> SIZE=big"), "syntax")
        self.assertReply(client.cmd("MAIL FROM:<a@example.org> BODY=BINARYMIME"), "syntax")
        self.assertReply(client.cmd("MAIL FROM:<a@example.org> =x"), "syntax")
        self.assertReply(client.cmd("MAIL FROM:<a@example.org>"), "mail_ok")
        self.assertReply(client.cmd("RCPT TO:<>"), "bad_rcpt")
        self.assertReply(client.cmd("RCPT TO:"), "syntax")
        self.assertReply(client.cmd("RCPT TO:<" + "x" * 300 + "@example.com>"), "bad_rcpt")
        self.assertReply(client.cmd("DATA now"), "syntax")

    def test_size_parameter_over_the_limit(self):
        client = self.raw()
        self.assertReply(client.cmd("MAIL FROM:<a@example.org> SIZE=100001"), "too_big")
        self.assertReply(client.cmd("MAIL FROM:<a@example.org> SIZE=100000"), "mail_ok")

    def test_esmtp_numbers_are_ascii_digits(self):
        client = self.raw()
        for value in ("\u00b2", "\u0663\u0663", "12a", ""):
            with self.subTest(value=value):
                self.assertReply(client.cmd(f"MAIL FROM:<a@example.org> SIZE={value}"), "syntax")
        self.assertReply(client.cmd("MAIL FROM:<a@example.org> SIZE=33"), "mail_ok")

    def test_address_syntax(self):
        client = self.raw()
        for sender, name in [("<@@>", "bad_sender"), ("<a@>", "bad_sender"),
                             ("<a@b@c>", "bad_sender"), ("<a@.>", "bad_sender"),
                             ("<a@[192.0.2.1>", "bad_sender"), ('<"a b"@example.com>', "mail_ok")]:
            with self.subTest(sender=sender):
                self.assertReply(client.cmd(f"MAIL FROM:{sender}"), name)
        for rcpt, name in [("<@@>", "bad_rcpt"), ("<a@>", "bad_rcpt"), ("<a@b@c>", "bad_rcpt"),
                           ("<a@.>", "bad_rcpt"), ("<a@[IPv6:2001:db8::1>", "bad_rcpt"),
                           ('<"a b"@example.com>', "rcpt_ok"), ("<a@[192.0.2.1]>", "rcpt_ok"),
                           ("<a@[IPv6:2001:db8::1]>", "rcpt_ok"), ("bare@example.com", "rcpt_ok"),
                           ("<postmaster>", "rcpt_ok")]:
            with self.subTest(rcpt=rcpt):
                self.assertReply(client.cmd(f"RCPT TO:{rcpt}"), name)
        client.cmd("DATA")
        client.send(SIMPLE + b".\r\n")
        self.assertReply(client.reply(), "queued")
        self.assertEqual(self.messages()[0][0]["rcpt"], [
            '"a b"@example.com', "a@[192.0.2.1]", "a@[ipv6:2001:db8::1]", "bare@example.com",
            "postmaster"])

    def test_null_sender_and_utf8_addresses(self):
        client = self.raw()
        reply = self.send_message(client, SIMPLE, sender="", rcpts=("jörg@bücher.example",))
        self.assertReply(reply, "queued")
        metadata, _ = self.messages()[0]
        self.assertEqual((metadata["sender"], metadata["rcpt"]), ("", ["jörg@bücher.example"]))

    def test_queued_reply_carries_a_64_hex_store_key(self):
        client = self.raw()
        code, text = self.send_message(client, SIMPLE)
        self.assertEqual(code, 250)
        key = text.rsplit(" ", 1)[1]
        self.assertRegex(text, r"^2\.0\.0 Ok: queued as [0-9a-f]{64}$")
        self.assertEqual(self.messages()[0][0]["store_key"], key)


class Recorder(mms.DebugMode):
    """Debug mode that also keeps each transaction, to see what proxy mode would relay."""

    def __init__(self, cfg, stream):
        super().__init__(cfg, stream)
        self.transactions = []

    def on_message(self, session, tx, metadata, data):
        self.transactions.append(tx)
        return super().on_message(session, tx, metadata, data)


class TestEsmtpParameters(ServerCase):

    def test_parameters_are_kept_verbatim(self):
        recorder = Recorder(None, io.BytesIO())
        self.start(mode=recorder)
        client = self.raw()
        self.assertReply(client.cmd("MAIL FROM:<a@example.org> SIZE=180 BODY=8BITMIME RET=HDRS "
                                    "ENVID=env-123 SMTPUTF8"), "mail_ok")
        self.assertReply(client.cmd("RCPT TO:<b@example.com> NOTIFY=SUCCESS,FAILURE "
                                    "ORCPT=rfc822;b@example.com"), "rcpt_ok")
        self.assertReply(client.cmd("RCPT TO:<c@example.com> NOTIFY=NEVER"), "rcpt_ok")
        self.assertReply(client.cmd("DATA"), "data_go")
        client.send(SIMPLE + b".\r\n")
        self.assertReply(client.reply(), "queued")
        tx = recorder.transactions[0]
        self.assertEqual(tx.mail_params, ["SIZE=180", "BODY=8BITMIME", "RET=HDRS",
                                          "ENVID=env-123", "SMTPUTF8"])
        self.assertEqual(tx.rcpt_params, [["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;b@example.com"],
                                          ["NOTIFY=NEVER"]])


class TestPipelining(ServerCase):

    def setUp(self):
        self.start()

    def test_amavis_style_pipelining_in_one_write(self):
        client = self.raw()
        client.send(b"MAIL FROM:<a@example.org> BODY=7BIT ENVID=x\r\n"
                    b"RCPT TO:<virus-quarantine@example.net> NOTIFY=NEVER\r\n"
                    b"RCPT TO:<archive@example.net> NOTIFY=NEVER\r\nDATA\r\n")
        for name in ("mail_ok", "rcpt_ok", "rcpt_ok", "data_go"):
            self.assertReply(client.reply(), name)
        client.send(SIMPLE + b".\r\nQUIT\r\n")
        self.assertReply(client.reply(), "queued")
        self.assertReply(client.reply(), "bye")
        self.assertEqual(self.messages()[0][1], SIMPLE)

    def test_whole_session_in_one_write(self):
        client = Raw(self.port)
        self.addCleanup(client.close)
        client.send(b"EHLO c\r\nMAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n" + SIMPLE +
                    b".\r\nMAIL FROM:<c@x>\r\nRCPT TO:<d@y>\r\nDATA\r\n" + SIMPLE + b".\r\nQUIT\r\n")
        names = ["greeting", "ok", "mail_ok", "rcpt_ok", "data_go", "queued",
                 "mail_ok", "rcpt_ok", "data_go", "queued", "bye"]
        for name in names:
            reply = client.reply()
            self.assertEqual(reply[0], CODES[name][0], (name, reply))
        self.assertEqual([m["sender"] for m, _ in self.messages()], ["a@x", "c@x"])

    def test_a_client_that_reads_late_gets_every_reply_in_order(self):
        """Replies to 20,000 pipelined commands outgrow what the kernel takes at once
        from mms (a send buffer of 8 KiB, which its connections inherit from the
        listening socket, and a client's window of 4 KiB): the rest waits for the
        client, and none is lost or reordered. The same where every call goes
        through the socket module, as on a Python built without ctypes (HELD is
        None there; this one has ctypes, so the test sets it)."""
        self.server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        cycle = ((b"NOOP", b"250 "), (b"VRFY a", b"252 "), (b"XYZZY", b"500 "))
        commands = b"".join(cycle[n % 3][0] + b"\r\n" for n in range(20_000))
        for held in (mms.HELD, None):
            with self.subTest(held=held is not None), mock.patch.object(mms, "HELD", held):
                sock = socket.socket()
                self.addCleanup(sock.close)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.settimeout(20)
                sock.connect(("127.0.0.1", self.port))
                writer = threading.Thread(target=sock.sendall, args=(commands + b"QUIT\r\n",),
                                          daemon=True)
                writer.start()
                time.sleep(0.5)                           # mms answers into a full window
                with sock.makefile("rb") as replies:
                    lines = [replies.readline() for _ in range(20_002)]
                writer.join(20)
                self.assertEqual(lines[0][:4], b"220 ")
                wrong = next((n for n, line in enumerate(lines[1:-1])
                              if line[:4] != cycle[n % 3][1]), None)
                self.assertIsNone(wrong, f"reply {wrong}: {lines[1:-1][wrong or 0]!r}")
                self.assertEqual(lines[-1][:4], b"221 ")


class TestTransactions(ServerCase):

    def setUp(self):
        self.start()

    def test_two_transactions_on_one_connection(self):
        client = self.raw()
        self.assertReply(self.send_message(client, b"Subject: one\r\n\r\n1\r\n"), "queued")
        self.assertReply(self.send_message(client, b"Subject: two\r\n\r\n2\r\n",
                                           sender="c@example.org", rcpts=("d@example.com",)),
                         "queued")
        (first, body1), (second, body2) = self.messages()
        self.assertEqual((first["subject"], second["subject"]), ("one", "two"))
        self.assertEqual(second["rcpt"], ["d@example.com"])
        self.assertNotEqual(first["store_key"], second["store_key"])

    def test_rset_starts_over(self):
        client = self.raw()
        client.cmd("MAIL FROM:<a@example.org>")
        client.cmd("RCPT TO:<wrong@example.com>")
        self.assertReply(client.cmd("RSET"), "ok")
        self.assertReply(client.cmd("RCPT TO:<b@example.com>"), "sequence")
        self.assertReply(self.send_message(client, SIMPLE), "queued")
        self.assertEqual(self.messages()[0][0]["rcpt"], ["b@example.com"])

    def test_smtplib_sends_several_messages(self):
        client = self.smtp()
        for n in range(3):
            client.sendmail("a@example.org", [f"r{n}@example.com"], SIMPLE)
        self.assertEqual([m["rcpt"] for m, _ in self.messages()],
                         [["r0@example.com"], ["r1@example.com"], ["r2@example.com"]])


class TestXforward(ServerCase):

    def setUp(self):
        self.start()

    def metadata(self):
        return self.messages()[-1][0]

    def test_attributes_are_recorded(self):
        client = self.raw()
        self.assertReply(client.cmd("XFORWARD NAME=mx.example.org ADDR=139.129.236.68 "
                                    "PORT=35264 HELO=mx.example.org"), "ok")
        self.assertReply(client.cmd("XFORWARD PROTO=ESMTP SOURCE=REMOTE IDENT=abc"), "ok")
        self.send_message(client, SIMPLE)
        metadata = self.metadata()
        self.assertEqual(metadata["xforward"], {
            "NAME": "mx.example.org", "ADDR": "139.129.236.68", "PORT": "35264",
            "HELO": "mx.example.org", "PROTO": "ESMTP", "SOURCE": "REMOTE", "IDENT": "abc"})
        self.assertEqual(metadata["client_address"], "139.129.236.68")
        self.assertEqual(metadata["server"], "127.0.0.1")

    def test_names_are_case_insensitive_and_values_xtext(self):
        client = self.raw()
        self.assertReply(client.cmd("XFORWARD name=a+2Bb.example helo=x+3Dy"), "ok")
        self.send_message(client, SIMPLE)
        self.assertEqual(self.metadata()["xforward"], {"NAME": "a+b.example", "HELO": "x=y"})

    def test_unavailable_means_absent(self):
        client = self.raw()
        client.cmd("XFORWARD NAME=mx.example.org ADDR=192.0.2.1")
        self.assertReply(client.cmd("XFORWARD NAME=[unavailable] IDENT=[UNAVAILABLE]"), "ok")
        self.send_message(client, SIMPLE)
        self.assertEqual(self.metadata()["xforward"], {"ADDR": "192.0.2.1"})

    def test_ipv6_prefix_is_removed_for_client_address(self):
        client = self.raw()
        client.cmd("XFORWARD ADDR=IPV6:2001:db8::25")
        self.send_message(client, SIMPLE)
        self.assertEqual(self.metadata()["client_address"], "2001:db8::25")
        self.assertEqual(self.metadata()["xforward"]["ADDR"], "IPV6:2001:db8::25")

    def test_without_xforward_client_address_is_the_peer(self):
        client = self.raw()
        self.send_message(client, SIMPLE)
        self.assertEqual((self.metadata()["client_address"], self.metadata()["xforward"]),
                         ("127.0.0.1", {}))

    def test_bad_syntax_is_501(self):
        client = self.raw()
        for arg in ("", "NAME", "COLOR=blue", "ADDR=not-an-ip", "NAME=" + "x" * 256):
            with self.subTest(arg=arg):
                self.assertReply(client.cmd(f"XFORWARD {arg}".strip()), "syntax")

    def test_after_mail_is_503(self):
        client = self.raw()
        client.cmd("MAIL FROM:<a@example.org>")
        self.assertReply(client.cmd("XFORWARD ADDR=192.0.2.1"), "sequence")

    def test_reset_after_final_dot_and_rset(self):
        client = self.raw()
        client.cmd("XFORWARD ADDR=192.0.2.1")
        self.send_message(client, SIMPLE)
        self.send_message(client, SIMPLE)
        client.cmd("XFORWARD ADDR=192.0.2.2")
        client.cmd("RSET")
        self.send_message(client, SIMPLE)
        self.assertEqual([m["client_address"] for m, _ in self.messages()],
                         ["192.0.2.1", "127.0.0.1", "127.0.0.1"])


class TestXforwardUntrusted(ServerCase):

    def test_untrusted_client_gets_550_and_no_keyword(self):
        self.start("--xforward-hosts", "192.0.2.0/24")
        client = Raw(self.port)
        self.addCleanup(client.close)
        client.reply()
        code, text = client.cmd("EHLO client.test")
        self.assertNotIn("XFORWARD", text)
        self.assertReply(client.cmd("XFORWARD ADDR=192.0.2.1"), "xforward_denied")
        self.send_message(client, SIMPLE)
        self.assertEqual(self.messages()[0][0]["client_address"], "127.0.0.1")


class TestLimits(ServerCase):

    def test_out_of_file_descriptors_it_waits_and_serves_again(self):
        """accept() under EMFILE: a warning, a pause, and service once descriptors are
        free again; never a crash or a busy loop."""
        import resource
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, MMS, "--server", "debug", "--host", "127.0.0.1", "--port",
             str(port), "--max-connections", "1000", "--max-connections-per-client", "1000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40)))
        self.addCleanup(proc.kill)
        wait_port(port)
        idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(60)]
        self.assertTrue(idle[0].recv(100).startswith(b"220 "))
        idle[-1].settimeout(1)
        with self.assertRaises(TimeoutError):     # out of descriptors: not accepted yet
            idle[-1].recv(100)
        for sock in idle:
            sock.close()
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            self.assertEqual(client.sendmail("a@example.org", ["b@example.com"], SIMPLE), {})
        proc.send_signal(signal.SIGTERM)
        err = proc.communicate(timeout=30)[1].decode()
        self.assertEqual(proc.returncode, 0, err)
        self.assertIn("cannot accept a connection: Too many open files", err)

    def test_message_over_the_limit_is_drained_then_552(self):
        self.start("--data-size-limit", "10000")
        client = self.raw()
        big = b"Subject: big\r\n\r\n" + b"x" * 70 + b"\r\n" * 1 + (b"y" * 98 + b"\r\n") * 200
        self.assertReply(self.send_message(client, big), "too_big")
        self.assertReply(self.send_message(client, SIMPLE), "queued")
        self.assertEqual(len(self.messages()), 1)

    def test_message_at_the_limit_is_accepted(self):
        self.start("--data-size-limit", str(len(SIMPLE)))
        self.assertReply(self.send_message(self.raw(), SIMPLE), "queued")

    def test_long_data_lines_are_message_content(self):
        """Postfix and amavisd-new pass lines of any length: refusing one loses mail."""
        self.start()
        client = self.raw()
        bodies = [b"Subject: x\r\n\r\n" + b"a" * 999 + b"\r\nmore\r\n",
                  b"Subject: bare\n\n" + b"b\n" * 1000 + b".dot\nend\r\n",
                  b"Subject: x\r\n\r\n" + b"c" * 5_000_000 + b"\r\n"]
        for body in bodies:
            with self.subTest(length=len(body)):
                self.assertReply(self.send_message(client, body), "queued")
        self.assertReply(self.send_message(client, SIMPLE), "queued")
        self.assertEqual([b for _, b in self.messages()], bodies + [SIMPLE])

    def test_long_command_line(self):
        self.start()
        client = self.raw()
        self.assertReply(client.cmd("NOOP " + "x" * 600), "too_long")
        self.assertReply(client.cmd("NOOP " + "x" * 5000), "too_long")
        self.assertReply(client.cmd("MAIL FROM:<a@example.org> " + "ENVID=" + "e" * 600),
                         "mail_ok")
        self.assertReply(client.cmd("RCPT TO:<b@example.com> " + "X=" * 2000), "too_long")
        self.assertReply(client.cmd("RCPT TO:<b@example.com>"), "rcpt_ok")

    def test_too_many_recipients(self):
        self.start("--max-recipients", "3")
        client = self.raw()
        client.cmd("MAIL FROM:<a@example.org>")
        for n in range(3):
            self.assertReply(client.cmd(f"RCPT TO:<r{n}@example.com>"), "rcpt_ok")
        self.assertReply(client.cmd("RCPT TO:<r4@example.com>"), "too_many_rcpts")
        client.cmd("DATA")
        client.send(SIMPLE + b".\r\n")
        self.assertReply(client.reply(), "queued")
        self.assertEqual(self.messages()[0][0]["rcpt_count"], 3)

    def test_idle_timeout(self):
        self.start("--timeout", "0.3")
        client = self.raw()
        self.assertReply(client.reply(), "timeout")
        self.assertTrue(client.closed())

    def test_idle_timeout_in_data(self):
        self.start("--timeout", "0.3")
        client = self.raw()
        client.cmd("MAIL FROM:<a@x>")
        client.cmd("RCPT TO:<b@y>")
        client.cmd("DATA")
        client.send(b"Subject: half")
        self.assertReply(client.reply(), "timeout")
        self.assertEqual(self.messages(), [])

    def test_max_connections(self):
        self.start("--max-connections", "2")
        first, second = self.raw(), self.raw()
        third = Raw(self.port)
        self.addCleanup(third.close)
        self.assertReply(third.reply(), "too_many_conn")
        self.assertTrue(third.closed())
        self.assert_a_slot_comes_back(first, second)

    def test_memory_stays_bounded_while_draining(self):
        self.start("--data-size-limit", "1000000")
        client = self.raw()
        client.cmd("MAIL FROM:<a@x>")
        client.cmd("RCPT TO:<b@y>")
        client.cmd("DATA")
        block = (b"z" * 78 + b"\r\n") * 12800          # 1 MiB
        tracemalloc.start()
        try:
            for _ in range(40):
                client.send(block)
            client.send(b".\r\n")
            self.assertReply(client.reply(), "too_big")
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        self.assertLess(peak, 8 * 2**20, "40 MiB drained with a peak over 8 MiB")

    def test_misbehaving_client_does_not_block_others(self):
        self.start()
        stuck = self.raw()
        stuck.send(b"MAIL FROM:<a@x>\r\nRCPT TO:<b@y>\r\nDATA\r\n" + b"partial line, never ended")
        garbage = Raw(self.port)
        self.addCleanup(garbage.close)
        garbage.send(bytes(range(256)) * 40)
        self.assertReply(self.send_message(self.raw(), SIMPLE), "queued")


class TestSlowClients(ServerCase):
    """Slowloris: a byte now and then must not hold a session, nor all the slots."""

    def trickle(self, client, data, every):
        for byte in data:
            client.send(bytes([byte]))
            time.sleep(every)

    def test_connections_per_client_are_limited(self):
        self.start("--max-connections-per-client", "2", "--xforward-hosts", "192.0.2.1")
        first, second = self.raw(), self.raw()
        with self.assertLogs("mms", "WARNING") as logs:
            third = Raw(self.port)
            self.addCleanup(third.close)
            self.assertReply(third.reply(), "too_many_conn")
        self.assertIn("too many connections from 127.0.0.1", "\n".join(logs.output))
        other = self.raw(source="127.0.0.2")
        self.assertReply(self.send_message(other, SIMPLE), "queued")
        self.assert_a_slot_comes_back(first, second)

    def test_the_front_postfix_is_not_limited_per_client(self):
        """All of a front Postfix's sessions come from its one address."""
        self.start("--max-connections-per-client", "2", "--xforward-hosts", "127.0.0.1")
        clients = [self.raw() for _ in range(4)]
        for client in clients:
            self.assertReply(self.send_message(client, SIMPLE), "queued")

    def test_a_command_line_has_a_deadline(self):
        self.start("--timeout", "1")
        client = self.raw()
        started = time.monotonic()
        with self.assertRaises(OSError):
            self.trickle(client, b"NOOP and some more bytes, one at a time\r\n", 0.2)
        self.assertReply(client.reply(), "timeout")
        self.assertLess(time.monotonic() - started, 3)   # the deadline is the behaviour

    def test_data_has_a_deadline_and_nothing_is_stored(self):
        self.start("--timeout", "1", "--data-timeout", "2")
        client = self.raw()
        self.open_data(client)
        started = time.monotonic()
        with self.assertRaises(OSError):
            self.trickle(client, b"Subject: slow\r\n\r\n" + b"x\r\n" * 100 + b".\r\n", 0.2)
        self.assertReply(client.reply(), "timeout")
        self.assertLess(time.monotonic() - started, 4)   # the deadline is the behaviour
        self.assertEqual(self.messages(), [])

    def test_a_pause_past_the_first_second_is_waited_out_to_the_timeout(self):
        """A read begins with the accept tick (1 s) as its limit, and is given the rest
        of --timeout once it outlasts it: a pause of 1.5 s is served, and silence is
        answered 421 at --timeout, not at the tick."""
        self.start("--timeout", "3")
        client = self.raw()
        time.sleep(1.5)
        self.assertReply(self.send_message(client, SIMPLE), "queued")
        started = time.monotonic()
        self.assertReply(client.reply(), "timeout")
        self.assertGreater(time.monotonic() - started, 2.5)
        self.assertLess(time.monotonic() - started, 4.5)

    def test_an_honest_sender_is_not_cut_off(self):
        """Every read comes within --timeout, and the whole within --data-timeout."""
        self.start("--timeout", "1", "--data-timeout", "10")
        client = self.raw()
        self.open_data(client)
        body = b"Subject: steady\r\n\r\n" + b"line\r\n" * 30
        for at in range(0, len(body), 10):
            client.send(body[at:at + 10])
            time.sleep(0.1)
        client.send(b".\r\n")
        self.assertReply(client.reply(), "queued")
        self.assertEqual(self.messages()[0][1], body)


class ThreadRecorder(mms.DebugMode):
    """Debug mode that notes which thread served each message, and fails on demand."""

    def __init__(self, cfg, stream):
        super().__init__(cfg, stream)
        self.threads = []

    def on_message(self, session, tx, metadata, message):
        self.threads.append(threading.get_ident())
        if metadata["subject"] == "crash":
            raise RuntimeError("a bug in a mode")
        return super().on_message(session, tx, metadata, message)


class TestSessionThreads(ServerCase):
    """A session thread serves one connection after another instead of exiting."""

    def setUp(self):
        self.others = self.session_threads()        # other tests' servers, still stopping
        cfg = config("--server", "debug")
        self.start(mode=ThreadRecorder(cfg, io.BytesIO()))

    def session_threads(self):
        return {t for t in threading.enumerate() if t.name == "mms-session"}

    def wait_accepting(self, count):
        deadline = time.monotonic() + 5
        while self.server.accepting != count and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(self.server.accepting, count)

    def test_connections_one_after_another_share_a_thread(self):
        for _ in range(5):
            client = self.raw()
            self.assertReply(self.send_message(client, SIMPLE), "queued")
            client.cmd("QUIT")
            self.wait_accepting(2)
        # the thread that took the first connection started one to wait in its place;
        # from then on both take turns
        self.assertLessEqual(len(set(self.server.mode.threads)), 2)

    def test_a_session_that_raises_does_not_kill_the_next(self):
        crash = b"Subject: crash\r\n\r\nbody\r\n"
        with self.assertLogs("mms", "ERROR") as logs:
            client = self.raw()
            client.cmd("MAIL FROM:<a@example.org>")
            client.cmd("RCPT TO:<b@example.com>")
            client.cmd("DATA")
            client.send(crash + b".\r\n")
            self.assertTrue(client.closed())
            self.wait_accepting(2)
        self.assertIn("RuntimeError: a bug in a mode", "\n".join(logs.output))
        crashed = self.server.mode.threads[0]
        for _ in range(2):
            self.assertReply(self.send_message(self.raw(), SIMPLE), "queued")
        self.assertIn(crashed, self.server.mode.threads[1:])

    def test_idle_threads_are_bounded_and_exit_down_to_one(self):
        self.server.IDLE_THREADS_MAX, self.server.IDLE_THREAD_SECONDS = 2, 0.3
        others = self.others
        clients = [self.raw() for _ in range(5)]
        # five sessions, and one more thread waiting for the next connection
        self.assertEqual(len(self.session_threads() - others), 6)
        for client in clients:
            client.cmd("QUIT")
            client.closed()
        self.wait_accepting(2)
        deadline = time.monotonic() + 5
        while len(self.session_threads() - others) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(len(self.session_threads() - others), 1)
        self.assertEqual(self.server.accepting, 1)
        self.assertReply(self.send_message(self.raw(), SIMPLE), "queued")

    def test_out_of_threads_the_session_goes_on(self):
        # Thread.start fails as it does when the host is out of threads; really
        # exhausting them would take the test machine down with it.
        failing = mock.patch.object(threading.Thread, "start",
                                    side_effect=RuntimeError("can't start new thread"))
        with failing, self.assertLogs("mms", "ERROR") as logs:
            client = self.raw()
        self.assertIn("cannot start a session thread", "\n".join(logs.output))
        self.assertReply(self.send_message(client, SIMPLE), "queued")
        client.cmd("QUIT")
        self.assertReply(self.send_message(self.raw(), SIMPLE), "queued")

    def test_a_stopped_server_accepts_nothing_more(self):
        self.server.shutdown()
        self.server.drain(1)
        with self.assertRaises(ConnectionRefusedError):
            Raw(self.port).close()
        # and the port is free at once, for a server started again
        self.start("--port", str(self.port))
        self.assertReply(self.send_message(self.raw(), SIMPLE), "queued")


class TestAllowList(ServerCase):

    def test_client_outside_the_list_is_refused(self):
        self.start("--allow", "192.0.2.0/24", "--allow", "10.0.0.1")
        client = Raw(self.port)
        self.addCleanup(client.close)
        self.assertReply(client.reply(), "access_denied")
        self.assertTrue(client.closed())

    def test_client_inside_the_list_is_served(self):
        self.start("--allow", "192.0.2.0/24,127.0.0.0/8")
        self.assertReply(self.send_message(self.raw(), SIMPLE), "queued")


class TestIPv6(ServerCase):

    def test_ipv4_clients_of_a_dual_stack_socket_are_stored_as_ipv4(self):
        if not socket.has_ipv6:
            self.skipTest("no IPv6 on this machine")
        self.start("--host", "::")
        self.assertReply(self.send_message(self.raw(source="127.0.0.2"), SIMPLE), "queued")
        metadata = self.messages()[0][0]
        self.assertEqual((metadata["client_address"], metadata["server"]),
                         ("127.0.0.2", "127.0.0.2"))

    def test_listens_on_ipv6_loopback(self):
        if not socket.has_ipv6:
            self.skipTest("no IPv6 on this machine")
        cfg = config("--server", "debug", "--host", "::1")
        try:
            server = mms.open_server(cfg, mms.DebugMode(cfg, stream=io.BytesIO()))
        except mms.ConfigError as exc:
            self.skipTest(f"cannot bind ::1: {exc}")
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        self.addCleanup(self.stop, server, thread)
        client = smtplib.SMTP("::1", server.server_address[1], timeout=10)
        self.addCleanup(client.close)
        self.assertEqual(client.sendmail("a@x", ["b@y"], SIMPLE), {})


class TestSmuggling(ServerCase):
    """Only <CRLF>.<CRLF> ends the data (CVE-2023-51764/5); the rest is message."""

    def setUp(self):
        self.start()

    def test_bare_line_ends_do_not_end_data(self):
        client = self.raw()
        for fake in (b"\n.\n", b"\n.\r\n", b"\r.\r", b"\r\n.\n", b"\r\n.\r"):
            with self.subTest(fake=fake):
                body = (b"Subject: s\r\n\r\nbefore" + fake +
                        b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nforged\r\n")
                client.cmd("MAIL FROM:<a@x>")
                client.cmd("RCPT TO:<b@y>")
                client.cmd("DATA")
                client.send(dot_stuff(body) + b".\r\n")
                self.assertReply(client.reply(), "queued")
                metadata, data = self.messages()[-1]
                self.assertEqual(data, body)
                self.assertEqual(metadata["sender"], "a@x")
        self.assertReply(client.cmd("NOOP"), "ok")
        self.assertEqual(len(self.messages()), 5)


class TestMessageBytes(ServerCase):

    def setUp(self):
        self.start()

    def test_dot_stuffing_is_removed(self):
        body = b"Subject: dots\r\n\r\n.\r\n..\r\n.leading\r\nmiddle . dot\r\n...\r\n"
        self.send_message(self.raw(), body)
        self.assertEqual(self.messages()[0][1], body)

    def test_message_without_final_crlf_and_empty_message(self):
        client = self.raw()
        client.cmd("MAIL FROM:<a@x>")
        client.cmd("RCPT TO:<b@y>")
        client.cmd("DATA")
        client.send(b".\r\n")
        self.assertReply(client.reply(), "queued")
        self.assertEqual(self.messages()[0][1], b"")

    def test_20_mb_binary_and_8bit_message_is_byte_exact(self):
        rng = random.Random(7)
        blob = rng.randbytes(20 * 2**20).replace(b"\r", b"\x00").replace(b"\n", b"\xff")
        lines = [blob[at:at + 700] for at in range(0, len(blob), 700)]
        lines[10] = b"." + lines[10]
        body = b"Subject: binary\r\nContent-Transfer-Encoding: 8bit\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"
        client = self.smtp()
        client.sendmail("a@x", ["b@y"], body)
        metadata, data = self.messages()[0]
        self.assertEqual(metadata["size"], len(body))
        self.assertEqual(data, body)


###############################################################################
# The message pipeline ########################################################
###############################################################################

class TestMetadata(ServerCase):

    def setUp(self):
        self.start()

    def test_header_fields(self):
        body = (b"Subject: =?utf-8?q?caf=C3=A9?= time\r\nMessage-ID: <abc@mx.example>\r\n"
                b"Date: Wed, 08 Apr 2015 13:19:34 +0200\r\n\r\nbody\r\n")
        self.send_message(self.raw(), body)
        metadata = self.messages()[0][0]
        self.assertEqual(metadata["subject"], "café time")
        self.assertEqual(metadata["message_id"], "abc@mx.example")
        self.assertEqual(metadata["sent"], "2015-04-08 11:19:34+00:00")  # in UTC, as BSON keeps it

    def test_broken_headers_never_fail_a_message(self):
        body = (b"Subject: =?bogus?x?@@@?=\r\nDate: yesterday-ish\r\nMessage-ID:\r\n"
                b"\xff\xfe: \x00\r\n\r\nbody\r\n")
        self.assertReply(self.send_message(self.raw(), body), "queued")
        metadata = self.messages()[0][0]
        self.assertNotIn("sent", metadata)
        self.assertNotIn("message_id", metadata)

    def test_sender_is_lower_cased(self):
        self.send_message(self.raw(), SIMPLE, sender="Alice@Example.ORG")
        self.assertEqual(self.messages()[0][0]["sender"], "alice@example.org")

    def test_store_keys_differ_in_every_worker(self):
        """Keys come from a keyed hash of a counter: a forked worker draws its own key."""
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(write, mms.new_store_key().encode())
            os._exit(0)
        os.waitpid(pid, 0)
        child = os.read(read, 100).decode()
        os.close(read), os.close(write)
        ours = {mms.new_store_key() for _ in range(1000)}
        self.assertEqual(len(ours), 1000)
        self.assertNotIn(child, ours)
        self.assertRegex(child, r"^[0-9a-f]{64}$")

    def test_dates_are_read_as_the_email_package_reads_them(self):
        """The regular expression for the usual Date: form against the email package,
        on the usual forms, their edges, and 5,000 mutations of them."""
        def reference(raw):
            try:
                sent = email.utils.parsedate_to_datetime(raw.decode("ascii", "replace"))
                utc = datetime.timezone.utc
                return (sent if sent.tzinfo else sent.replace(tzinfo=utc)).astimezone(utc)
            except Exception:
                return None
        dates = [b"Thu, 26 Nov 2026 16:12:17 +0000 (UTC)", b"26 Nov 2026 16:12:17 -0530",
                 b"Fri, 31 Dec 9999 23:59:59 -1200", b"Fri, 31 Dec 9999 23:59:59 +1200",
                 b"Mon, 1 Jan 0001 00:00:00 +0100", b"Thu, 26 Nov 0099 16:12:17 +0000",
                 b"Thu, 26 Nov 2026 16:12:60 +0000", b"Thu, 31 Feb 2026 16:12:17 +0000",
                 b"Thu, 26 Nov 2026 16:12:17 -0000", b"Thu, 26 NOV 2026 16:12:17 +0000 (x) (y)",
                 b"Thu, 26 Nov 2026 16:12:17 +2359", b"Thu, 26 Nov 2026 16:12:17 -2399",
                 b"Mon,  7 Dec 2026 10:59:38 +0000 (UTC)"]   # Postfix pads the day
        rnd = random.Random(5)
        mutated = []
        for _ in range(5000):
            date = bytearray(rnd.choice(dates))
            for _ in range(rnd.randint(1, 3)):
                date[rnd.randrange(len(date))] = rnd.choice(b"0123456789 :+-,()ANovJ\t")
            mutated.append(bytes(date))
        for date in dates + mutated:
            mine, theirs = mms.parse_date(date), reference(date)
            self.assertEqual((mine, mine and mine.utcoffset()), (theirs, theirs and theirs.utcoffset()),
                             date)


class TestHeaderDecoding(ServerCase):
    """Subject, Message-ID, Date and X-Envelope-To are decoded in linear time."""

    def test_unclosed_encoded_words_do_not_stall_the_server(self):
        self.start()
        words = b"=?x?q?a" * 30000                  # about 200 KB, never closed by ?=
        folded = b"\r\n ".join(words[at:at + 900] for at in range(0, len(words), 900))
        body = b"Subject: " + folded + b"\r\nDate: " + words[:5000] + b"\r\n\r\nbody\r\n"
        other, other_reply = self.raw(), []
        other.cmd("MAIL FROM:<a@example.org>")
        other.cmd("RCPT TO:<b@example.com>")
        other.cmd("DATA")
        started = time.monotonic()
        client = self.raw()
        worker = threading.Thread(target=lambda: other_reply.append(
            (other.send(SIMPLE + b".\r\n"), other.reply())[1]))
        self.assertReply(self.send_message(client, body), "queued")
        worker.start()
        worker.join(5)
        self.assertLess(time.monotonic() - started, 1.0)  # not held up by the other: 5 s
        self.assertReply(other_reply[0], "queued")
        metadata = {m["subject"][:7]: m for m, _ in self.messages()}
        self.assertGreater(len(metadata["=?x?q?a"]["subject"]), mms.HEADER_VALUE_MAX - 10)
        self.assertLessEqual(len(metadata["=?x?q?a"]["subject"]), mms.HEADER_VALUE_MAX)
        self.assertNotIn("sent", metadata["=?x?q?a"])

    def test_encoded_words_are_decoded(self):
        self.start()
        body = (b"Subject: =?utf-8?q?caf=C3=A9?= =?ISO-8859-1?B?d2l0aCDp?= plain "
                b"=?unknown-charset?q?x?=\r\n\r\nbody\r\n")
        self.send_message(self.raw(), body)
        self.assertEqual(self.messages()[0][0]["subject"],
                         "caf\u00e9with \u00e9 plain =?unknown-charset?q?x?=")


class TestPlugins(ServerCase):

    def setUp(self):
        self.plugin_dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.plugin_dir)
        sys.path.insert(0, self.plugin_dir)
        self.addCleanup(sys.path.remove, self.plugin_dir)
        self.prefix = "p" + uuid.uuid4().hex[:8]

    def plugin(self, name, code):
        with open(os.path.join(self.plugin_dir, f"{self.prefix}_{name}.py"), "w") as f:
            f.write(code)
        return f"{self.prefix}_{name}"

    def test_plugins_run_in_order_and_edit_metadata(self):
        first = self.plugin("first", "def apply(metadata=None, data=None):\n"
                                     "    metadata['order'] = ['first']\n"
                                     "    metadata['server'] = '1.1.1.1'\n")
        second = self.plugin("second", "def apply(metadata=None, data=None):\n"
                                       "    metadata['order'].append('second')\n"
                                       "    metadata['seen'] = len(data)\n")
        self.start("--plugin", first, "--plugin", second)
        self.send_message(self.raw(), SIMPLE)
        metadata = self.messages()[0][0]
        self.assertEqual(metadata["order"], ["first", "second"])
        self.assertEqual((metadata["server"], metadata["seen"]), ("1.1.1.1", len(SIMPLE)))

    def test_failing_plugin_is_logged_and_message_kept(self):
        bad = self.plugin("bad", "def apply(metadata=None, data=None):\n    raise ValueError('boom')\n")
        after = self.plugin("after", "def apply(metadata=None, data=None):\n"
                                     "    metadata['after'] = True\n")
        self.start("--plugin", bad, "--plugin", after)
        with self.assertLogs("mms", "ERROR") as logs:
            self.assertReply(self.send_message(self.raw(), SIMPLE), "queued")
        self.assertIn("ValueError: boom", "\n".join(logs.output))
        self.assertTrue(self.messages()[0][0]["after"])

    def test_failed_plugin_edits_are_undone(self):
        half = self.plugin("half", "def apply(metadata=None, data=None):\n"
                                   "    metadata['server'] = 'half-done'\n"
                                   "    raise RuntimeError('gave up')\n")
        self.start("--plugin", half)
        with self.assertLogs("mms", "ERROR"):
            self.assertReply(self.send_message(self.raw(), SIMPLE), "queued")
        self.assertEqual(self.messages()[0][0]["server"], "127.0.0.1")

    def test_hanging_plugin_is_left_behind(self):
        slow = self.plugin("slow", "import time\n"
                                   "def apply(metadata=None, data=None):\n"
                                   "    metadata['server'] = 'slow'\n"
                                   "    time.sleep(5)\n")
        self.start("--plugin", slow, "--plugin-timeout", "0.3")
        started = time.monotonic()
        with self.assertLogs("mms", "WARNING") as logs:
            self.assertReply(self.send_message(self.raw(), SIMPLE), "queued")
        self.assertLess(time.monotonic() - started, 2)   # the plugin's 5 s are not waited
        self.assertIn("took more than 0.3s", "\n".join(logs.output))
        self.assertEqual(self.messages()[0][0]["server"], "127.0.0.1")

    def test_a_plugin_whose_threads_never_return_is_skipped_past_a_bound(self):
        stuck = self.plugin("stuck", "import threading\nforever = threading.Event()\n"
                                     "def apply(metadata=None, data=None):\n"
                                     "    forever.wait()\n")
        self.start("--plugin", stuck, "--plugin-timeout", "0.05")
        self.addCleanup(lambda: sys.modules[stuck].forever.set())
        client = self.raw()
        with self.assertLogs("mms", "WARNING") as logs:
            for _ in range(mms.PLUGIN_HUNG_MAX + 4):
                self.assertReply(self.send_message(client, SIMPLE), "queued")
        hung = [t for t in threading.enumerate() if t.name == f"plugin-{stuck}-hung"]
        self.assertEqual(len(hung), mms.PLUGIN_HUNG_MAX)
        self.assertEqual(sum("skipped" in line for line in logs.output), 4)
        sys.modules[stuck].forever.set()           # they return: the plugin runs again
        for thread in hung:
            thread.join(5)
        with self.assertNoLogs("mms", "WARNING"):    # it ran, and returned in time
            self.assertReply(self.send_message(client, SIMPLE), "queued")

    def test_a_late_change_from_the_plugins_own_thread_is_not_stored(self):
        """The plugin returns in time, then changes a nested field 2 ms later."""
        late = self.plugin("late", "import threading, time\n"
                                   "def apply(metadata=None, data=None):\n"
                                   "    metadata['tag'] = 'kept'\n"
                                   "    def later():\n"
                                   "        time.sleep(0.002)\n"
                                   "        metadata['rcpt'].append({'not': 'a string'})\n"
                                   "    threading.Thread(target=later).start()\n")
        self.start("--plugin", late)
        client = self.raw()
        replies = [self.send_message(client, SIMPLE) for _ in range(20)]
        self.assertEqual({code for code, _ in replies}, {250})
        kept = 0
        for metadata, _ in self.messages():  # the edit as returned, or none at all
            self.assertEqual(metadata["rcpt"], ["b@example.com"])
            kept += metadata.get("tag") == "kept"
        self.assertGreater(kept, 0)

    def test_a_plugin_that_exits_has_failed(self):
        for name, code in (("exits", "raise SystemExit(3)"), ("stops", "raise KeyboardInterrupt")):
            with self.subTest(plugin=name):
                plugin = self.plugin(name, "def apply(metadata=None, data=None):\n"
                                           f"    metadata['server'] = 'x'\n    {code}\n")
                self.start("--plugin", plugin)
                with self.assertLogs("mms", "ERROR") as logs:
                    self.assertReply(self.send_message(self.raw(), SIMPLE), "queued")
                text = "\n".join(logs.output)
                self.assertIn(f"plugin {plugin} failed", text)
                self.assertNotIn("took more than", text)
                self.assertEqual(self.messages()[-1][0]["server"], "127.0.0.1")

    def test_shipped_plugins(self):
        self.start("--plugin", "plugins.mark_bounces", "--plugin", "plugins.dummy_plugin")
        with contextlib.redirect_stdout(io.StringIO()) as printed:
            self.send_message(self.raw(), SIMPLE, sender="")
            self.send_message(self.raw(), SIMPLE)
        bounce, normal = [m for m, _ in self.messages()]
        self.assertEqual((bounce["is_bounce"], normal["is_bounce"]), (1, 0))
        self.assertEqual(bounce["server"], "1.1.1.1")
        self.assertIn("'server': '1.1.1.1'", printed.getvalue())

    def test_bad_plugins_stop_start_up(self):
        no_apply = self.plugin("noapply", "x = 1\n")
        env = {**os.environ, "PYTHONPATH": self.plugin_dir}
        for name in ("no_such_module_here", no_apply):
            with self.subTest(plugin=name):
                done = subprocess.run([sys.executable, MMS, "--server", "debug", "--port", str(free_port()),
                                       "--plugin", name], capture_output=True, text=True,
                                      timeout=30, env=env)
                self.assertEqual(done.returncode, 2, done.stderr)
                self.assertIn(name, done.stderr)
                self.assertNotIn("Traceback", done.stderr)


###############################################################################
# The modes: debug ############################################################
###############################################################################

class MmsProcess:
    """mms.py as a supervisord would run it: a subprocess on a free port."""

    def __init__(self, *args, env=None, stdout=subprocess.PIPE):
        self.port = free_port()
        self.proc = subprocess.Popen(
            [sys.executable, MMS, "--host", "127.0.0.1", "--port", str(self.port),
             "--hostname", "mx.test", *args],
            stdout=stdout, stderr=subprocess.PIPE, env={**os.environ, **(env or {})},
            start_new_session=True)
        wait_port(self.port)

    def stop(self):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # workers too
        self.proc.communicate()


class TestDebugMode(unittest.TestCase):

    def test_prints_metadata_then_the_raw_message(self):
        server = MmsProcess("--server", "debug", "--grace", "1")
        try:
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
                client.sendmail("a@example.org", ["b@example.com"], SIMPLE)
            server.proc.send_signal(signal.SIGTERM)
            out, err = server.proc.communicate(timeout=10)
        finally:
            server.stop()
        [(metadata, data)] = parse_debug_output(out)
        self.assertEqual(data, SIMPLE)
        for field in ("store_key", "sender", "rcpt", "rcpt_count", "rcpt_refused",
                      "client_address", "xforward", "server", "received", "message"):
            self.assertIn(field, metadata)
        self.assertRegex(err.decode(), rf"queued as {metadata['store_key']} from=<a@example.org> "
                                       rf"to=<b@example.com> size={len(SIMPLE)} client=127.0.0.1")

    def test_concurrent_records_stay_whole_in_a_file_and_in_a_pipe(self):
        """Into a file each record is one write with no lock; into a pipe, where a
        write over PIPE_BUF can be split, records take turns. A message over 4 MiB,
        written piece by piece, always has its turn. Either way, and for the log
        lines, 8 sessions at once never mix their output."""
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        for target in ("file", "pipe"):
            with self.subTest(target=target):
                out_path, log_path = (os.path.join(folder, f"{target}.{kind}") for kind in ("out", "log"))
                with open(out_path, "wb") as out_file:
                    server = MmsProcess("--server", "debug", "--log-file", log_path,
                                        stdout=out_file if target == "file" else subprocess.PIPE)
                    self.addCleanup(server.stop)
                    bodies, piped = {}, []
                    if target == "pipe":   # read as supervisord does, or mms would block
                        reader = threading.Thread(target=lambda: piped.append(server.proc.stdout.read()))
                        reader.start()

                    def send(worker):
                        with smtplib.SMTP("127.0.0.1", server.port, timeout=30) as client:
                            for n in range(15):
                                text = (f"{worker}{n}" * (500 * (1 + n % 4))).encode() + b"\r\n"
                                if (worker, n) == (0, 3):       # kept in a temporary file
                                    text = (b"0" * 998 + b"\r\n") * 5300
                                body = f"Subject: {worker}.{n}\r\n\r\n".encode() + text
                                bodies[f"{worker}.{n}"] = body
                                client.sendmail("a@example.org", [f"r{worker}@example.com"], body)

                    threads = [threading.Thread(target=send, args=(w,)) for w in range(8)]
                    for thread in threads:
                        thread.start()
                    for thread in threads:
                        thread.join()
                    server.proc.send_signal(signal.SIGTERM)
                    self.assertEqual(server.proc.wait(20), 0)
                if target == "file":
                    with open(out_path, "rb") as f:
                        out = f.read()
                else:
                    reader.join(10)
                    out = piped[0]
                records = parse_debug_output(out)
                self.assertEqual(len(records), 120)
                for metadata, data in records:
                    self.assertEqual(data, bodies[metadata["subject"]])
                with open(log_path) as f:
                    queued = [line for line in f if "queued as" in line]
                self.assertEqual(len(queued), 120)
                for line in queued:
                    self.assertRegex(line, r"^\S+ \S+ mms\[\d+\]: INFO queued as [0-9a-f]{64} "
                                           r"from=<a@example.org> to=<r\d@example.com> size=\d+ "
                                           r"client=127.0.0.1 result=printed\n$")

    def test_the_lines_an_administrator_greps(self):
        server = MmsProcess("--server", "debug")
        try:
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
                client.sendmail("a@example.org", [f"r{n}@example.com" for n in range(1000)],
                                SIMPLE)
            gone = Raw(server.port)
            gone.reply()
            gone.cmd("EHLO gone.test")
            gone.cmd("MAIL FROM:<a@example.org>")
            gone.cmd("RCPT TO:<b@example.com>")
            gone.cmd("DATA")
            gone.send(b"Subject: cut\r\n\r\n12345")
            gone.close()
            time.sleep(0.3)
        finally:
            server.proc.send_signal(signal.SIGTERM)
            err = server.proc.communicate(timeout=10)[1].decode()
            server.stop()
        [queued] = [line for line in err.splitlines() if "queued as" in line]
        self.assertIn("to=<r0@example.com,r1@example.com,r2@example.com,r3@example.com,"
                      "r4@example.com,... and 995 more>", queued)
        self.assertLess(len(queued), 400)
        self.assertIn("WARNING lost connection after DATA (21 bytes) from 127.0.0.1", err)

    def test_debug_flag_logs_the_dialogue(self):
        server = MmsProcess("--server", "debug", "--debug")
        try:
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
                client.noop()
        finally:
            server.proc.send_signal(signal.SIGTERM)
            err = server.proc.communicate(timeout=10)[1].decode()
        self.assertIn("< b'noop\\r\\n'", err)
        self.assertIn("> 250 2.0.0 Ok", err)


###############################################################################
# The modes: quarantine (MongoDB) #############################################
###############################################################################

class MongoCase(ServerCase):
    """A fresh database for each test, on nx-27017 or MMS_TEST_MONGODB_URI."""

    mode = "mongo-quarantine"

    def setUp(self):
        import pymongo
        self.uri = MongoServer.get_uri()
        self.dbname = "mms_test_" + uuid.uuid4().hex[:10]
        self.client = pymongo.MongoClient(self.uri, tz_aware=True, serverSelectionTimeoutMS=5000)
        self.addCleanup(self.client.close)
        self.addCleanup(self.client.drop_database, self.dbname)
        self.db = self.client[self.dbname]

    def start_mongo(self, *args, uri=None):
        return self.start("--mongo-host", uri or self.uri, "--mongo-database", self.dbname,
                          "--mongo-timeout", "2", *args)

    def stored(self, key):
        """The seed's "Open Message with Python" snippet."""
        from gridfs import GridFS
        doc = self.db["message"].find_one({"store_key": key})
        msg_base64 = GridFS(self.db).get(doc["message"]).read()
        return doc, zlib.decompress(base64.b64decode(msg_base64))

    @staticmethod
    def key(reply):
        return reply[1].rsplit(" ", 1)[1]

    def records(self):
        return list(self.db["message"].find())

    def archive_command(self, *args, uri=None, timeout=60):
        """`mms.py ARGS` on this test's database, as an administrator runs it."""
        return subprocess.run([sys.executable, MMS, *args, "--mongo-host", uri or self.uri,
                               "--mongo-database", self.dbname], capture_output=True, text=True,
                              timeout=timeout)

    def command_line(self, *args):
        """(exit status, stdout, stderr) of `mms.py ARGS`, each stripped."""
        done = self.archive_command(*args)
        return done.returncode, done.stdout.strip(), done.stderr.strip()


class TestQuarantineStorage(MongoCase):

    def setUp(self):
        super().setUp()
        self.start_mongo()

    def test_byte_exact_round_trip(self):
        client = self.raw()
        bodies = {
            "crlf": b"Subject: crlf\r\n\r\nline\r\n\r\n\r\nend\r\n",
            "dots": b"Subject: dots\r\n\r\n.\r\n..two\r\n.one\r\n",
            "8bit": "Subject: 8bit\r\n\r\ncafé, Grüße, 日本\r\n".encode(),
            "nul": b"Subject: nul\r\n\r\na\x00b\x00\r\n\x00\r\n",
            "bare-lf": b"Subject: lf\r\n\r\nunix\nline\rcr\r\n",
        }
        for name, body in bodies.items():
            with self.subTest(name):
                reply = self.send_message(client, body)
                self.assertReply(reply, "queued")
                doc, data = self.stored(self.key(reply))
                self.assertEqual(data, body)
                self.assertEqual(doc["size"], len(body))

    def test_20_mb_round_trip_and_gridfs_layout(self):
        rng = random.Random(3)
        lines = [rng.randbytes(500).replace(b"\r", b"r").replace(b"\n", b"n") for _ in range(42000)]
        body = b"Subject: big\r\n\r\n" + b"\r\n".join(lines) + b"\r\n"
        client = self.raw()
        reply = self.send_message(client, body)
        key = self.key(reply)
        doc, data = self.stored(key)
        self.assertEqual(data, body)
        files = list(self.db.fs.files.find({"filename": key}))
        self.assertEqual(len(files), 1)
        self.assertEqual(files[0]["metadata"], {"encoding": "base64(zlib(message))"})
        self.assertNotIn("contentType", files[0])  # it is not text/plain
        self.assertEqual(files[0]["_id"], doc["message"])
        chunks = list(self.db.fs.chunks.find({"files_id": doc["message"]}))
        self.assertEqual(sum(len(c["data"]) for c in chunks), files[0]["length"])
        self.assertGreater(len(chunks), 1)
        # mongofiles get <store_key> reads by filename; GridFSBucket does the same.
        from gridfs import GridFSBucket
        content = GridFSBucket(self.db).open_download_stream_by_name(key).read()
        self.assertEqual(zlib.decompress(base64.b64decode(content)), body)

    def test_every_metadata_field_with_xforward(self):
        client = self.raw()
        client.cmd("XFORWARD NAME=mx.example.org ADDR=139.129.236.68 HELO=mx.example.org "
                   "PORT=4000 PROTO=ESMTP")
        body = (b"Subject: Provident tempora\r\nMessage-ID: <20150408131934.10264.63423@admin>\r\n"
                b"Date: Wed, 08 Apr 2015 13:19:34 UTC\r\n\r\nhi\r\n")
        reply = self.send_message(client, body, sender="ACollet@Example.org",
                                  rcpts=("jean91@example.com", "paul@example.com"))
        doc, _ = self.stored(self.key(reply))
        doc.pop("_id")
        received = doc.pop("received")
        self.assertLess(abs(time.time() - received.timestamp()), 60)
        self.assertIsNotNone(received.tzinfo)
        self.assertEqual(doc.pop("sent").isoformat(), "2015-04-08T13:19:34+00:00")
        message = doc.pop("message")
        self.assertEqual(self.db.fs.files.find_one({"_id": message})["filename"], self.key(reply))
        self.assertEqual(doc, {
            "store_key": self.key(reply), "sender": "acollet@example.org",
            "rcpt": ["jean91@example.com", "paul@example.com"], "rcpt_count": 2,
            "rcpt_refused": {}, "client_address": "139.129.236.68",
            "xforward": {"NAME": "mx.example.org", "ADDR": "139.129.236.68",
                         "HELO": "mx.example.org", "PORT": "4000", "PROTO": "ESMTP"},
            "server": "127.0.0.1", "size": len(body), "subject": "Provident tempora",
            "message_id": "20150408131934.10264.63423@admin",
            "sha256": hashlib.sha256(body).hexdigest(),
            # What the searches ask, in the form an index serves (README, "At scale").
            "sender_domain": "example.org", "rcpt_domain": ["example.com"],
            "verdict": "clean", "client_hex": "00000000000000000000ffff8b81ec44",
            # the seed's "completed" document, and the words --text finds
            "files": [], "files_count": 0, "is_bounce": 0, "parsing_errors": [],
            "errors_count": 0, "completed": 1, "index_text": 8192,
            "headers": {"Subject": "Provident tempora", "Date": "Wed, 08 Apr 2015 13:19:34 UTC",
                        "Message-Id": "<20150408131934.10264.63423@admin>"},
            # the seed's defaults, where mms has nothing to say
            "events": [], "tags": [], "group_name": "DEFAULT", "queue": 1, "mark_for_delete": 0,
            "internal_field": 0, "is_virus": 0, "is_banned": 0, "is_spam": 0,
            "is_unchecked": 0,
            "text": "Provident tempora hi"})

    def test_every_metadata_field_without_xforward(self):
        reply = self.send_message(self.raw(), b"no headers at all\r\n")
        doc, _ = self.stored(self.key(reply))
        self.assertEqual(set(doc), {"_id", "store_key", "sender", "rcpt", "rcpt_count",
                                    "rcpt_refused", "client_address", "xforward", "server",
                                    "received", "message", "size", "sha256",
                                    "sender_domain", "rcpt_domain", "verdict", "client_hex",
                                    "files", "files_count", "is_bounce", "parsing_errors",
                                    "errors_count", "completed", "index_text", "headers",
                                    *mms.SEED_DEFAULTS})
        self.assertEqual((doc["client_address"], doc["xforward"]), ("127.0.0.1", {}))
        self.assertEqual(doc["client_hex"], "00000000000000000000ffff7f000001")

    def test_indexes_are_created(self):
        self.server.mode.store.contacted.wait()
        names = {tuple(spec["key"].keys()): spec for spec in self.db["message"].list_indexes()}
        self.assertTrue(names[("store_key",)].get("unique"))
        for keys in [("received",), ("sender", "received"), ("rcpt", "received"),
                     ("quarantine_to", "received"), ("quarantine", "received"),
                     ("client_hex", "received"), ("sender_domain", "received"),
                     ("rcpt_domain", "received"), ("verdict", "received"),
                     ("message_id",), ("quarantine_id",), ("held",), ("released",),
                     ("message",)]:
            self.assertIn(keys, names)
        if os.environ.get("MMS_TEST_MONGODB_URI"):  # nx-27017 keeps no partial filter
            self.assertEqual(names[("held",)]["partialFilterExpression"], {"held": True})
        chunks = {tuple(spec["key"].keys()): spec for spec in self.db.fs.chunks.list_indexes()}
        # nx-27017 names a compound key as one field, files_id_n.
        compound = chunks.get(("files_id", "n")) or chunks.get(("files_id_n",))
        self.assertTrue(compound and compound.get("unique"), chunks)
        files = {tuple(spec["key"].keys()) for spec in self.db.fs.files.list_indexes()}
        # nx-27017 keeps fs.files in a fixed table with its own filename index.
        real = bool(os.environ.get("MMS_TEST_MONGODB_URI"))
        self.assertIn(("filename", "uploadDate") if real else ("filename",), files)

    def test_concurrent_clients_lose_nothing(self):
        keys, errors = [], []

        def sender(n):
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=60) as client:
                    for m in range(25):
                        body = f"Subject: {n}-{m}\r\n\r\nbody {n} {m}\r\n".encode()
                        client.ehlo()
                        client.mail(f"s{n}@example.org")
                        client.rcpt(f"r{m}@example.com")
                        code, text = client.data(body)
                        self.assertEqual(code, 250)
                        keys.append((text.decode().rsplit(" ", 1)[1], body))
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=sender, args=(n,)) for n in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        self.assertEqual(errors, [])
        self.assertEqual(len({k for k, _ in keys}), 500)
        docs = list(self.db["message"].find({}, {"store_key": 1}))
        self.assertEqual(sorted(d["store_key"] for d in docs), sorted(k for k, _ in keys))
        for key, body in random.Random(1).sample(keys, 25):
            self.assertEqual(self.stored(key)[1], body)

    def test_concurrent_messages_are_written_in_batches(self):
        from pymongo import monitoring

        class Inserts(monitoring.CommandListener):
            count, active = 0, True

            def started(self, event):
                if self.active and event.command_name == "insert":
                    Inserts.count += 1

            def succeeded(self, event):
                pass

            def failed(self, event):
                pass

        listener = Inserts()
        monitoring.register(listener)  # seen by clients made from now on: the server's next
        self.addCleanup(setattr, listener, "active", False)
        self.server.mode.store.archive.close()
        self.server.mode.store.archive.connect()

        def sender(n):
            with smtplib.SMTP("127.0.0.1", self.port, timeout=60) as client:
                for m in range(10):
                    client.sendmail("a@example.org", ["b@example.com"], SIMPLE)

        threads = [threading.Thread(target=sender, args=(n,)) for n in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        self.assertEqual(len(list(self.db["message"].find({}, {"_id": 1}))), 200)
        self.assertLess(Inserts.count, 3 * 200 / 2, "three inserts a message: no batching")

    def test_an_unrepresentable_date_never_costs_a_message(self):
        """31 Dec 9999 -1200 is past what UTC (and BSON) can hold: the field is left out."""
        body = b"Date: Fri, 31 Dec 9999 23:59:59 -1200\r\nSubject: far\r\n\r\nfuture\r\n"
        client = self.raw()
        keys = [self.key(self.send_message(client, body)) for _ in range(3)]
        docs = self.records()
        self.assertEqual(sorted(d["store_key"] for d in docs), sorted(keys))
        self.assertTrue(all("sent" not in d and d["subject"] == "far" for d in docs))
        self.assertEqual(self.stored(keys[0])[1], body)
        files = {f["filename"] for f in self.db["fs.files"].find({}, {"filename": 1})}
        self.assertEqual(files, set(keys))

    def test_plugin_leaving_unstorable_metadata_is_undone(self):
        self.server.plugins = [types.SimpleNamespace(
            __name__="unstorable",
            apply=lambda metadata, data: metadata.update(handle=object(), server="x"))]
        with self.assertLogs("mms", "ERROR") as logs:
            reply = self.send_message(self.raw(), SIMPLE)
        self.assertReply(reply, "queued")
        doc, data = self.stored(self.key(reply))
        self.assertEqual((doc["server"], data), ("127.0.0.1", SIMPLE))
        self.assertNotIn("handle", doc)
        self.assertIn("unstorable", "\n".join(logs.output))

    def test_plugin_that_breaks_mms_own_fields_is_undone(self):
        """A plugin may edit the metadata, but not what the store and the log rely on."""
        for name, edit in [("drop_key", lambda m, d: m.pop("store_key")),
                           ("bad_rcpt", lambda m, d: m.update(rcpt=[1, 2])),
                           ("new_key", lambda m, d: m.update(store_key="0" * 64))]:
            with self.subTest(plugin=name):
                self.server.plugins = [types.SimpleNamespace(__name__=name, apply=edit)]
                with self.assertLogs("mms", "ERROR") as logs:
                    reply = self.send_message(self.raw(), SIMPLE)
                self.assertReply(reply, "queued")
                doc, data = self.stored(self.key(reply))
                self.assertEqual((doc["store_key"], doc["rcpt"], data),
                                 (self.key(reply), ["b@example.com"], SIMPLE))
                self.assertIn(name, "\n".join(logs.output))

    def test_plugin_edits_what_is_stored(self):
        self.server.plugins = mms.load_plugins(["plugins.mark_bounces", "plugins.dummy_plugin"])
        with contextlib.redirect_stdout(io.StringIO()):
            reply = self.send_message(self.raw(), SIMPLE, sender="")
        doc, _ = self.stored(self.key(reply))
        self.assertEqual((doc["server"], doc["is_bounce"]), ("1.1.1.1", 1))


class TestMongoOutage(MongoCase):

    def test_451_while_down_and_250_when_back_without_restart(self):
        cable = Cable(self.uri)
        self.addCleanup(cable.close)
        self.start_mongo(uri=f"mongodb://127.0.0.1:{cable.port}/?directConnection=true")
        client = self.raw()
        first = self.send_message(client, b"Subject: 1\r\n\r\nbefore\r\n")
        self.assertReply(first, "queued")
        cable.cut()
        with self.assertLogs("mms", "ERROR"):
            self.assertReply(self.send_message(client, b"Subject: 2\r\n\r\nduring\r\n"),
                             "not_stored")
        cable.mend()
        third = self.send_message(client, b"Subject: 3\r\n\r\nafter\r\n")
        self.assertReply(third, "queued")
        subjects = sorted(d["subject"] for d in self.db["message"].find())
        self.assertEqual(subjects, ["1", "3"])
        self.assertEqual(self.stored(self.key(third))[1], b"Subject: 3\r\n\r\nafter\r\n")

    def test_a_batch_cut_short_never_acknowledges_an_unstored_message(self):
        cable = Cable(self.uri)
        self.addCleanup(cable.close)
        self.start_mongo(uri=f"mongodb://127.0.0.1:{cable.port}/?directConnection=true")
        acknowledged, refused, errors = [], [], []
        stop = threading.Event()

        def sender(n):
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=60) as client:
                    client.ehlo()
                    m = 0
                    while not stop.is_set():
                        client.mail("a@example.org")
                        client.rcpt("b@example.com")
                        code, text = client.data(f"Subject: {n}-{m}\r\n\r\nbody\r\n".encode())
                        if code == 250:
                            acknowledged.append(text.decode().rsplit(" ", 1)[1])
                        else:
                            refused.append(code)
                            client.rset()
                        m += 1
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=sender, args=(n,)) for n in range(20)]
        def wait_for(count):
            deadline = time.monotonic() + 60
            while len(acknowledged) < count and not errors and time.monotonic() < deadline:
                time.sleep(0.01)

        with self.assertLogs("mms", "ERROR"):
            for thread in threads:
                thread.start()
            wait_for(100)
            cable.cut()
            time.sleep(1)
            cable.mend()
            wait_for(len(acknowledged) + 100)
            stop.set()
            for thread in threads:
                thread.join(60)
        self.assertEqual(errors, [])
        self.assertTrue(refused and set(refused) == {451}, refused[:5])
        stored = {d["store_key"] for d in self.db["message"].find({}, {"store_key": 1})}
        self.assertEqual(set(acknowledged) - stored, set())
        for key in random.Random(2).sample(acknowledged, 20):
            self.assertEqual(self.stored(key)[1][:9], b"Subject: ")

    def test_a_write_concern_error_is_never_acknowledged(self):
        """A write that may be rolled back (w: majority past wtimeout) is not stored."""
        for collection in ("message", "fs.files", "fs.chunks"):
            with self.subTest(collection=collection):
                tap = WireTap(self.uri, reply=concern_error(collection))
                self.addCleanup(tap.close)
                self.start_mongo(uri=f"mongodb://127.0.0.1:{tap.port}/?directConnection=true")
                with self.assertLogs("mms", "ERROR") as logs:
                    replies = [self.send_message(self.raw(), SIMPLE) for _ in range(3)]
                self.assertEqual({code for code, _ in replies}, {451})
                self.assertTrue(tap.sent("insert", collection))
                self.assertIn("waiting for replication timed out", "\n".join(logs.output))

    def test_indexes_come_back_when_mongodb_does(self):
        """MongoDB restarted empty (or replaced): the unique store_key index is made again."""
        cable = Cable(self.uri)
        self.addCleanup(cable.close)
        self.start_mongo(uri=f"mongodb://127.0.0.1:{cable.port}/?directConnection=true")
        client = self.raw()
        self.assertReply(self.send_message(client, SIMPLE), "queued")
        cable.cut()
        self.client.drop_database(self.dbname)
        with self.assertLogs("mms", "ERROR"):
            self.assertReply(self.send_message(client, SIMPLE), "not_stored")
        cable.mend()
        self.assertReply(self.send_message(client, SIMPLE), "queued")
        deadline = time.monotonic() + 3 * mms.MongoStore.PING_SECONDS
        while time.monotonic() < deadline:  # the keeper makes them, not the write path
            unique = [index for index in self.db["message"].list_indexes() if index.get("unique")]
            if unique:
                break
            time.sleep(0.2)
        self.assertEqual([list(index["key"]) for index in unique], [["store_key"]])

    def test_the_index_line_says_mongodb_is_down(self):
        cable = Cable(self.uri)
        self.addCleanup(cable.close)
        self.start_mongo("--mongo-timeout", "1",
                         uri=f"mongodb://127.0.0.1:{cable.port}/?directConnection=true")
        self.assertReply(self.send_message(self.raw(), SIMPLE), "queued")
        with self.assertLogs("mms", "ERROR") as logs:
            cable.cut()
            deadline = time.monotonic() + 4 * mms.MongoStore.PING_SECONDS
            while time.monotonic() < deadline and not any("indexes" in line
                                                           for line in logs.output):
                time.sleep(0.2)
        cable.mend()
        [line] = [line for line in logs.output if "indexes" in line]
        self.assertIn("MongoDB cannot be reached to create the archive's indexes", line)
        self.assertIn("mail is answered 451", line)
        self.assertNotIn("mail is stored", line)

    def test_start_with_mongodb_down(self):
        with self.assertLogs("mms", "WARNING") as logs:
            self.start("--mongo-host", f"mongodb://127.0.0.1:{free_port()}/",
                       "--mongo-timeout", "0.5")
            self.server.mode.store.contacted.wait()
        self.assertIn("unreachable", "\n".join(logs.output))
        with self.assertLogs("mms", "ERROR"):
            self.assertReply(self.send_message(self.raw(), SIMPLE), "not_stored")


class TestWriteConcern(MongoCase):
    """A 250 is as durable as the write concern: majority unless the URI or an
    option says otherwise, bounded by --mongo-timeout, and named at start."""

    def concern_sent(self, *args, query=""):
        tap = WireTap(self.uri)
        self.addCleanup(tap.close)
        with self.assertLogs("mms", "INFO") as logs:
            self.start_mongo(*args, uri=f"mongodb://127.0.0.1:{tap.port}/?directConnection=true"
                             + query)
            self.server.mode.store.contacted.wait()
        self.assertReply(self.send_message(self.raw(), SIMPLE), "queued")
        concerns = [c["writeConcern"] for name in ("message", "fs.files", "fs.chunks")
                    for c in tap.sent("insert", name)]
        self.assertEqual(len(concerns), 3)
        self.assertEqual(len({json.dumps(c, sort_keys=True) for c in concerns}), 1, concerns)
        return concerns[0], "\n".join(logs.output)

    def test_majority_by_default_bounded_by_the_timeout(self):
        concern, log = self.concern_sent()
        self.assertEqual(concern, {"w": "majority", "wtimeout": 2000})
        self.assertIn("write concern w: majority, wtimeout: 2000", log)

    def test_the_uri_is_honoured(self):
        concern, log = self.concern_sent(query="&w=1&wtimeoutMS=700&journal=true")
        self.assertEqual(concern, {"w": 1, "wtimeout": 700, "j": True})
        self.assertIn("write concern w: 1, wtimeout: 700, j: True", log)

    def test_an_option_given_beats_the_uri(self):
        concern, _ = self.concern_sent("--mongo-write-concern", "majority", "--mongo-journal",
                                       query="&w=1")
        self.assertEqual(concern, {"w": "majority", "wtimeout": 2000, "j": True})


def mime(*parts, boundary="b", kind="mixed", head=b""):
    """A multipart message (or part) of these parts, each bytes with its header."""
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in parts)
    return (head + b"Content-Type: multipart/" + kind.encode() + b"; boundary=\""
            + boundary.encode() + b"\"\r\n\r\npreamble\r\n" + body + b"--"
            + boundary.encode() + b"--\r\nepilogue\r\n")


def attachment(name_params, data, kind=b"application/octet-stream", encoding=b"base64"):
    encoded = base64.encodebytes(data).replace(b"\n", b"\r\n") if encoding == b"base64" else data
    return (b"Content-Type: " + kind + b"\r\nContent-Disposition: attachment; " + name_params
            + b"\r\nContent-Transfer-Encoding: " + encoding + b"\r\n\r\n" + encoded)


class TestParsing(MongoCase):
    """The seed's completed document, written as mail is stored: messages built to
    stress a MIME parser, sent over SMTP, each stored byte-exact with its fields."""

    def setUp(self):
        super().setUp()
        self.start_mongo()

    def store(self, body, sender="a@example.org"):
        reply = self.send_message(self.raw(), body, sender=sender)
        self.assertReply(reply, "queued")
        doc, data = self.stored(self.key(reply))
        self.assertEqual(data, body)                  # the stored bytes are unchanged
        return doc

    def test_nested_parts_and_filenames_in_several_charsets(self):
        pdf = b"%PDF-1.4 quarterly figures"
        body = mime(
            mime(b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: "
                 b"quoted-printable\r\n\r\ncaf=C3=A9 wire transfer=\r\n today",
                 b"Content-Type: text/html\r\n\r\n<p>only in <b>zanzibar</b></p>"
                 b"<script>var hidden='scriptword';</script>",
                 boundary="inner", kind="alternative"),
            attachment(b"filename*=UTF-8''na%C3%AFve%20invoice.pdf", pdf, b"application/pdf"),
            attachment(b"filename*0*=iso-8859-1''r%E9sum%E9;\r\n filename*1=\".txt\"", b"cv"),
            attachment(b'filename="=?utf-8?B?0L/RgNC40LLQtdGCLnppcA==?="', b"PK\x03\x04zip",
                       b"application/zip"),
            head=b"Subject: figures\r\nFrom: =?utf-8?q?J=C3=BCrgen_M=C3=BCller?= <j@x.org>\r\n")
        doc = self.store(body)
        self.assertEqual(doc["files"], [
            {"filename": "naïve invoice.pdf", "ext": "pdf", "size": len(pdf),
             "content_type": "application/pdf", "sha256": hashlib.sha256(pdf).hexdigest()},
            {"filename": "résumé.txt", "ext": "txt", "size": 2,
             "content_type": "application/octet-stream",
             "sha256": hashlib.sha256(b"cv").hexdigest()},
            {"filename": "привет.zip", "ext": "zip", "size": 7, "content_type": "application/zip",
             "sha256": hashlib.sha256(b"PK\x03\x04zip").hexdigest()}])
        self.assertEqual((doc["files_count"], doc["is_bounce"], doc["completed"]), (3, 0, 1))
        self.assertEqual((doc["parsing_errors"], doc["errors_count"]), ([], 0))
        self.assertEqual(doc["text"], "figures Jürgen Müller café wire transfer today only in "
                                      "zanzibar naïve invoice pdf résumé txt привет zip")

    def test_a_delivery_status_report_and_a_null_sender_are_bounces(self):
        dsn = mime(b"Content-Type: text/plain\r\n\r\nYour message could not be delivered.",
                   b"Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; mx\r\n"
                   b"\r\nFinal-Recipient: rfc822; b@example.com\r\nAction: failed\r\n"
                   b"Status: 5.1.1",
                   b"Content-Type: message/rfc822\r\n\r\nSubject: the original\r\n\r\nhello",
                   kind="report; report-type=delivery-status")
        self.assertEqual(self.store(dsn, sender="mailer@example.org")["is_bounce"], 1)
        self.assertEqual(self.store(SIMPLE, sender="")["is_bounce"], 1)
        self.assertEqual(self.store(SIMPLE)["is_bounce"], 0)

    def test_what_cannot_be_parsed_is_said_and_the_message_kept(self):
        cut = mime(b"Content-Type: text/plain\r\n\r\nbefore",
                   b"Content-Type: application/octet-stream; name=cut.bin\r\n"
                   b"Content-Transfer-Encoding: base64\r\n\r\nQUJDRUZHQ")
        doc = self.store(cut)
        self.assertIn("a part's base64 is cut short", doc["parsing_errors"])
        self.assertEqual(doc["errors_count"], len(doc["parsing_errors"]))
        unclosed = cut.rsplit(b"--b--", 1)[0]
        self.assertIn("a multipart is not closed (the message is cut short?)",
                      self.store(unclosed)["parsing_errors"])
        wrong = (b"Content-Type: text/plain; charset=idna\r\nContent-Transfer-Encoding: "
                 b"base64\r\n\r\nthis is not base64 at all!\r\n")
        doc = self.store(wrong)                      # read as UTF-8, never an exception
        self.assertEqual(doc["completed"], 1)
        punycode = b"Content-Type: text/plain; charset=punycode\r\n\r\n" + (b"a-" * 400 + b"\r\n") * 50
        self.assertTrue(self.store(punycode)["text"].startswith("a a a "))  # read as UTF-8

    def test_5000_attachments_and_parts_past_the_bounds(self):
        many = mime(*[attachment(b'filename="f%d.txt"' % n, b"%d" % n) for n in range(5000)])
        doc = self.store(many)
        self.assertEqual(doc["files_count"], 5000)
        self.assertEqual(doc["files"][4999]["filename"], "f4999.txt")
        more = mime(*[b"Content-Type: text/plain\r\n\r\nx" for _ in range(10000)])
        self.assertIn(f"more than {mms.MIME_PARTS_MAX} parts: the rest are not looked into",
                      self.store(more)["parsing_errors"])
        deep = b"x"
        for depth in range(2000):
            deep = mime(b"Content-Type: text/plain\r\n\r\nlevel", deep[:0] + deep,
                        boundary=f"d{depth}") if depth < 2000 else deep
        doc = self.store(b"Subject: deep\r\n" + deep)
        self.assertIn(f"parts nested deeper than {mms.MIME_DEPTH_MAX}: not looked into",
                      doc["parsing_errors"])

    def test_index_text_bounds_the_words_and_0_keeps_none(self):
        self.server.cfg.index_text = 0
        big = b"Subject: s\r\n\r\n" + (b"word " * 20 + b"\r\n") * 1000
        self.assertNotIn("text", self.store(big))
        self.server.cfg.index_text = 100
        doc = self.store(big)
        self.assertEqual((len(doc["text"]), doc["index_text"]), (100, 100))


class TestWritePath(MongoCase):
    """What MongoDB refuses fails only the message it belongs to, and index builds
    never stand between a message and its 250."""

    def tapped(self, *args, **hooks):
        tap = WireTap(self.uri, **hooks)
        self.addCleanup(tap.close)
        self.start_mongo(*args, uri=f"mongodb://127.0.0.1:{tap.port}/?directConnection=true")
        return tap

    def send_together(self, count):
        """`count` messages at once, each on its own connection: {subject: reply}."""
        def send(n):
            with smtplib.SMTP("127.0.0.1", self.port, timeout=60) as client:
                client.ehlo()
                client.mail("a@example.org")
                client.rcpt("b@example.com")
                return client.data(f"Subject: m{n}\r\n\r\nbody\r\n".encode())
        return {f"m{n}": reply for n, reply in enumerate(concurrently(count, send))}

    def test_a_refused_document_fails_its_own_message_only(self):
        """As a schema validator would: the first document of each metadata insert is
        taken out of the request, and the reply names it in writeErrors."""
        refused, first = [], threading.Event()

        def request(command):
            if command.get("insert") != "message":
                return None
            if not first.is_set():  # hold the first batch back, so the next ones are full
                first.set()
                time.sleep(0.5)
            docs = command["documents"]
            refused.append(docs[0]["subject"])
            if len(docs) == 1:
                return {**command, "insert": "mms_refused"}
            return {**command, "documents": docs[1:]}

        def reply(command, answer):
            if command.get("insert") in ("message", "mms_refused"):
                return {**answer, "n": answer["n"] - (command["insert"] == "mms_refused"),
                        "writeErrors": [{"index": 0, "code": 121,
                                         "errmsg": "Document failed validation"}]}

        tap = self.tapped(request=request, reply=reply)
        with self.assertLogs("mms", "ERROR") as logs:
            replies = self.send_together(12)
        inserts = tap.sent("insert", "message") + tap.sent("insert", "mms_refused")
        self.assertTrue(all(c["ordered"] is False for c in inserts))
        self.assertGreater(max(len(c["documents"]) for c in inserts), 1, "no batch of several")
        failed = sorted(s for s, (code, _) in replies.items() if code != 250)
        self.assertEqual(failed, sorted(refused))
        self.assertEqual({replies[s][0] for s in failed}, {451})
        stored = sorted(d["subject"] for d in self.db["message"].find())
        self.assertEqual(stored, sorted(set(replies) - set(refused)))
        self.assertIn("Document failed validation", "\n".join(logs.output))

    def test_a_metadata_document_over_the_server_limit_keeps_mms_fields(self):
        class Huge:
            @staticmethod
            def apply(metadata=None, data=None):
                metadata["notes"] = "x" * (17 * 2**20)
                return metadata

        self.start_mongo()
        self.server.plugins = [Huge]
        with self.assertLogs("mms", "WARNING") as logs:
            reply = self.send_message(self.raw(), SIMPLE)
        self.assertReply(reply, "queued")
        doc, data = self.stored(self.key(reply))
        self.assertNotIn("notes", doc)
        self.assertEqual((doc["sender"], data), ("a@example.org", SIMPLE))
        self.assertIn("over the server's 16777216 bytes", "\n".join(logs.output))

    def test_index_builds_that_fail_leave_the_mail_flowing(self):
        """A role without createIndex: each index is asked for once, each refusal is
        logged once, and every message is stored."""
        def reply(command, answer):
            if "createIndexes" in command:
                return {"ok": 0.0, "code": 13, "codeName": "Unauthorized",
                        "errmsg": "not authorized to execute command createIndexes"}

        with self.assertLogs("mms", "ERROR") as logs:
            tap = self.tapped(reply=reply)
            self.server.mode.store.contacted.wait()
            replies = [self.send_message(self.raw(), SIMPLE) for _ in range(5)]
        self.assertEqual({code for code, _ in replies}, {250})
        self.assertEqual(len(self.records()), 5)
        wanted = len(mms.Archive.INDEXES) + 4      # and GridFS's two, the lists' two
        self.assertEqual(len(tap.sent("createIndexes")), wanted)  # none in the write path
        self.assertEqual(len(logs.output), wanted, logs.output)
        self.assertTrue(all("not authorized" in line for line in logs.output))

    def test_an_index_the_cluster_refuses_leaves_the_others_built(self):
        """A collection sharded on another key refuses a unique store_key (code 67):
        the other indexes are built, and the refusal is said once, by the log, by
        `check` and by /healthz, with what it costs."""
        def request(command):   # nx-27017 has no shards: the index goes elsewhere
            if command.get("createIndexes") == "message" and \
                    list(command["indexes"][0]["key"]) == ["store_key"]:
                return {**command, "createIndexes": "mms_refused"}

        def reply(command, answer):
            if command.get("createIndexes") == "mms_refused":
                return {"ok": 0.0, "code": 67, "codeName": "CannotCreateIndex",
                        "errmsg": "cannot create unique index over { store_key: 1 } with "
                                  "shard key pattern { _id: \"hashed\" }"}

        metrics_port = free_port()
        with self.assertLogs("mms", "ERROR") as logs:
            tap = self.tapped("--metrics", f"127.0.0.1:{metrics_port}", request=request,
                              reply=reply)
            self.server.mode.store.contacted.wait()
            self.assertReply(self.send_message(self.raw(), SIMPLE), "queued")
        self.assertEqual(len(tap.sent("createIndexes")), len(mms.Archive.INDEXES) + 4)
        [said] = logs.output
        self.assertIn("cannot create the index on message: store_key", said)
        self.assertIn("show, release, hold and delete read every message", said)
        self.assertIn("shard key pattern", said)
        have = {tuple(spec["key"]) for spec in self.db["message"].list_indexes()}
        self.assertNotIn(("store_key",), have)
        self.assertLessEqual({("received",), ("sender_domain", "received"),
                              ("verdict", "received"), ("client_hex", "received")}, have)
        http = mms.MetricsServer(self.server.cfg, self.server.metrics, self.server)
        self.addCleanup(http.server_close)
        self.addCleanup(http.shutdown)
        status, text, _ = scrape(metrics_port, "/healthz")
        self.assertEqual(status, 200)
        self.assertTrue(text.startswith("ok, but MongoDB refused indexes: message: store_key "
                                        "(store keys are not unique"), text)
        done = self.archive_command("check", "--server", "mongo-quarantine",
                                    "--port", str(self.port), "--mongo-timeout", "2")
        self.assertEqual(done.returncode, 1, done.stdout + done.stderr)
        self.assertRegex(done.stdout, r"^WARNING: probe [0-9a-f]{12} stored in MongoDB and "
                         r"deleted, but indexes are missing: store_key \(store keys")

    def test_the_daily_counts_are_a_command_a_second_not_a_write_a_message(self):
        tap = self.tapped()
        self.assertEqual({code for code, _ in self.send_together(12).values()}, {250})
        self.server.mode.store.tally.flush()
        commands = tap.sent("update", "message_daily")
        self.assertLessEqual(len(commands), 3)                 # once a second, at most
        statements = [u for c in commands for u in c["updates"]]
        self.assertLessEqual(len(statements), 4 * len(commands))  # merged: 4 counters
        for command in commands:
            ids = [u["q"]["_id"] for u in command["updates"]]
            self.assertEqual(len(ids), len(set(ids)))
            self.assertTrue(all(u["upsert"] for u in command["updates"]))
        docs = self.records()
        day = f"{docs[0]['received']:%Y-%m-%d}"
        counts = {d["_id"]: (d["messages"], d["bytes"]) for d in self.db["message_daily"].find()}
        size = sum(d["size"] for d in docs)
        for counter in (f"verdict|{day}|clean", f"sender-domain|{day}|example.org",
                        f"rcpt-domain|{day}|example.com", f"client|{day}|127.0.0.1"):
            self.assertEqual(counts[counter], (12, size), counter)

    def test_gridfs_file_length_is_int64_on_the_wire(self):
        tap = self.tapped()
        self.assertReply(self.send_message(self.raw(), SIMPLE), "queued")
        [insert] = tap.sent("insert", "fs.files")
        [file] = insert["documents"]
        self.assertIsInstance(file["length"], bson.Int64)
        self.assertNotIn("contentType", file)


class TestMemory(MongoCase):
    """A message costs about its own size in memory, or less once it is in a file.
    tracemalloc counts what Python allocates in this process, server included."""

    def setUp(self):
        super().setUp()
        self.start_mongo()

    def peak(self, send):
        tracemalloc.start()
        try:
            reply = send()
            return reply, tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    def test_a_message_in_tiny_segments_costs_about_its_size(self):
        body = b"Subject: tiny\r\n\r\n" + b"ab\r\n" * 250_000          # 1 MB of short lines
        client = self.raw()
        client.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.open_data(client)

        def send():
            for at in range(0, len(body), 8):
                client.send(body[at:at + 8])
            client.send(b".\r\n")
            return client.reply()

        reply, peak = self.peak(send)
        self.assertReply(reply, "queued")
        self.assertLess(peak, 3 * len(body), f"{len(body)} bytes cost a peak of {peak}")
        self.assertEqual(self.stored(self.key(reply))[1], body)

    def test_a_large_message_is_stored_from_its_file_piece_by_piece(self):
        line = base64.b64encode(os.urandom(57)) + b"\r\n"             # 78 bytes, like MIME
        body = b"Subject: large\r\n\r\n" + line * (30 * 2**20 // len(line))
        client = self.raw()
        self.open_data(client)
        reply, peak = self.peak(lambda: (client.send(body), client.send(b".\r\n"),
                                         client.reply())[2])
        self.assertReply(reply, "queued")
        self.assertLess(peak, 8 * 2**20, f"a 30 MB message cost a peak of {peak}")
        self.assertEqual(self.stored(self.key(reply))[1], body)


class TestRealRcpt(MongoCase):

    AMAVIS = (b"X-Envelope-From: <sender@example.org>\r\n"
              b"X-Envelope-To: <alice@example.com>,\r\n <bob@example.com>,\r\n\t<Carol@Example.com>\r\n"
              b"X-Quarantine-ID: <abc123>\r\nX-Amavis-Alert: INFECTED, message contains virus\r\n"
              b"Subject: quarantined\r\n\r\nbody\r\n")

    def test_amavis_quarantine_copy(self):
        self.start_mongo("--real-rcpt")
        reply = self.send_message(self.raw(), self.AMAVIS, sender="sender@example.org",
                                  rcpts=("virus-quarantine@example.net", "archive@example.net"))
        doc, data = self.stored(self.key(reply))
        self.assertEqual(doc["rcpt"], ["alice@example.com", "bob@example.com", "carol@example.com"])
        self.assertEqual(doc["rcpt_count"], 3)
        header = b"X-MMS-RCPT: <virus-quarantine@example.net>, <archive@example.net>\r\n"
        self.assertEqual(data, header + self.AMAVIS)
        self.assertEqual(doc["size"], len(data))

    def test_a_large_copy_held_in_a_file_gets_its_header_too(self):
        """Over SPOOL_THRESHOLD the message waits in a file: X-MMS-RCPT is prepended by
        copying it once, and the rest stays byte-exact."""
        self.start_mongo("--real-rcpt")
        body = b"x" * 76 + b"\r\n"
        data = self.AMAVIS + body * (mms.SPOOL_THRESHOLD // len(body) + 1000)
        reply = self.send_message(self.raw(), data, sender="sender@example.org",
                                  rcpts=("virus-quarantine@example.net",))
        doc, stored = self.stored(self.key(reply))
        self.assertEqual(stored, b"X-MMS-RCPT: <virus-quarantine@example.net>\r\n" + data)
        self.assertEqual(doc["size"], len(stored))
        self.assertEqual(doc["rcpt"], ["alice@example.com", "bob@example.com", "carol@example.com"])

    def test_header_lines_end_at_lf_or_crlf_only(self):
        """A bare CR inside a Subject never starts an X-Envelope-To, and only the first
        X-Envelope-To (the one amavisd-new prepends) counts."""
        self.start_mongo("--real-rcpt")
        client = self.raw()
        smuggled = (b"Subject: hello\rX-Envelope-To: <smuggled@evil.example>\r\n\r\nbody\r\n")
        doc, data = self.stored(self.key(self.send_message(client, smuggled,
                                                           rcpts=("archive@example.net",))))
        self.assertEqual((doc["rcpt"], data), (["archive@example.net"], smuggled))
        self.assertEqual(doc["subject"], "hello\rX-Envelope-To: <smuggled@evil.example>")
        later = (b"X-Envelope-To: <real@example.com>\r\nSubject: x\r\n"
                 b"X-Envelope-To: <smuggled@evil.example>\r\n\r\nbody\r\n")
        doc, _ = self.stored(self.key(self.send_message(client, later,
                                                        rcpts=("archive@example.net",))))
        self.assertEqual(doc["rcpt"], ["real@example.com"])

    def test_a_senders_own_x_envelope_to_below_received_is_ignored(self):
        """amavisd-new prepends its X-Envelope-To above its Received:; below, the
        header is the sender's, who would otherwise choose where release sends."""
        self.start_mongo("--real-rcpt")
        forged = (b"X-Quarantine-ID: <q1>\r\nReceived: from amavis by mx\r\n"
                  b"X-Envelope-To: <boss@example.com>, <everyone@example.com>\r\n"
                  b"Subject: hi\r\n\r\nbody\r\n")
        doc, data = self.stored(self.key(self.send_message(
            self.raw(), forged, rcpts=("spam-quarantine@example.net",))))
        self.assertEqual((doc["rcpt"], data), (["spam-quarantine@example.net"], forged))

    def test_header_recipients_pass_rcpts_checks(self):
        self.start_mongo("--real-rcpt", "--max-recipients", "5")
        hostile = "<a@b\x1b]0;owned\x07\x1b[2J\x1b[31mFAKE>"
        addresses = ", ".join([hostile, "<two@at@example.com>"] + [f"<r{n}@example.com>" for n in range(9)])
        body = f"X-Envelope-To: {addresses}\r\nSubject: many\r\n\r\nbody\r\n".encode()
        with self.assertLogs("mms", "WARNING") as logs:
            doc, _ = self.stored(self.key(self.send_message(self.raw(), body,
                                                            rcpts=("archive@example.net",))))
        self.assertEqual(doc["rcpt"], [f"r{n}@example.com" for n in range(5)])
        self.assertEqual(doc["rcpt_count"], 5)
        self.assertIn("6 of the 11 X-Envelope-To recipients left out", "\n".join(logs.output))

    def test_without_the_header_envelope_recipients_stay(self):
        self.start_mongo("--real-rcpt")
        reply = self.send_message(self.raw(), SIMPLE, rcpts=("archive@example.net",))
        doc, data = self.stored(self.key(reply))
        self.assertEqual((doc["rcpt"], data), (["archive@example.net"], SIMPLE))

    def test_off_by_default(self):
        self.start_mongo()
        reply = self.send_message(self.raw(), self.AMAVIS, rcpts=("archive@example.net",))
        doc, data = self.stored(self.key(reply))
        self.assertEqual((doc["rcpt"], data), (["archive@example.net"], self.AMAVIS))


AMAVISD_CONF = """\
use strict;
$MYHOME = '{home}';
$TEMPBASE = "$MYHOME/tmp";
$db_home = "$MYHOME/db";
$helpers_home = "$MYHOME/var";
$pid_file = "$MYHOME/amavisd.pid";
$lock_file = "$MYHOME/amavisd.lock";
$daemon_user = 'amavis';
$daemon_group = 'amavis';
$mydomain = 'example.com';
$myhostname = 'amavis.mms.test';
$inet_socket_bind = '127.0.0.1';
$inet_socket_port = {port};
@inet_acl = qw(127.0.0.1);
$max_servers = 2;
$do_syslog = 0;
$LOGFILE = "$MYHOME/amavis.log";
$enable_db = 0;
$enable_dkim_verification = 0;
@local_domains_maps = (['.example.com']);
@av_scanners = (['ClamAV-clamd', \\&ask_daemon, ["CONTSCAN {{}}\\n", "127.0.0.1:{clamd}"],
  qr/\\bOK$/m, qr/\\bFOUND$/m, qr/^.*?: (?!Infected Archive)(.*) FOUND$/m ]);
@av_scanners_backup = ();
$sa_local_tests_only = 1;
$sa_tag_level_deflt = -999;
$sa_tag2_level_deflt = 5;
$sa_kill_level_deflt = 6.9;
$banned_filename_re = new_RE(qr'.\\.(exe|com)$'i);
$final_virus_destiny = D_DISCARD;
$final_spam_destiny = D_DISCARD;
$final_banned_destiny = D_DISCARD;
# The README's quarantine settings: each kind is sent to mms, with its own address.
$virus_quarantine_method = 'smtp:[127.0.0.1]:{mms}';
$virus_quarantine_to = 'virus-quarantine@localhost.net';
$spam_quarantine_method = 'smtp:[127.0.0.1]:{mms}';
$spam_quarantine_to = 'spam-quarantine@localhost.net';
$banned_files_quarantine_method = 'smtp:[127.0.0.1]:{mms}';
$banned_quarantine_to = 'banned-quarantine@localhost.net';
$QUARANTINEDIR = undef;
$forward_method = 'smtp:[127.0.0.1]:{final}';
$notify_method = $forward_method;
# The README's "archive only" settings: every message is copied to mms.
$archive_quarantine_method = 'smtp:[127.0.0.1]:{mms}';
$archive_quarantine_to = 'archive-quarantine@localhost.net';
1;
"""


class Amavis(Daemon):
    """amavisd-new with clamd and SpamAssassin, forwarding clean mail to a capture
    server, and sending its quarantines and an archive copy of everything to mms."""

    program, package = "amavisd", "apt-get install amavisd-new"

    def command(self):
        self.mms = free_port()
        self.capture = io.BytesIO()
        cfg = config("--server", "debug", "--host", "127.0.0.1")
        self.final = mms.open_server(cfg, mms.DebugMode(cfg, stream=self.capture))
        threading.Thread(target=self.final.serve_forever, daemon=True).start()
        home, conf = os.path.join(self.dir, "home"), os.path.join(self.dir, "conf")
        for sub in ("tmp", "db", "var"):
            os.makedirs(os.path.join(home, sub))
        for root, dirs, _ in os.walk(home):
            for path in [root] + [os.path.join(root, d) for d in dirs]:
                shutil.chown(path, "amavis", "amavis")
        os.makedirs(conf)  # owned by root: amavisd refuses a config it could rewrite
        with open(os.path.join(conf, "amavisd.conf"), "w") as f:
            f.write(AMAVISD_CONF.format(home=home, port=self.port, mms=self.mms,
                                        final=self.final.server_address[1],
                                        clamd=Clamd.get().port))
        return ["amavisd", "-c", os.path.join(conf, "amavisd.conf"), "foreground"]

    def send(self, sender, rcpts, body):
        """As an MTA sends: again after a 4xx. Each of amavisd-new's two children keeps
        its connection to mms open between messages; when the previous test's mms has
        gone, the first use of each fails, and amavisd-new tempfails its client."""
        for attempt in (1, 2, 3):
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=120) as client:
                    return client.sendmail(sender, rcpts, body)
            except smtplib.SMTPDataError as error:
                if attempt == 3 or not 400 <= error.smtp_code < 500:
                    raise

    def log(self):
        with contextlib.suppress(OSError), open(os.path.join(self.dir, "home", "amavis.log")) as f:
            return f.read()[-2000:]
        return ""

    def ready(self):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1) as s:
            s.settimeout(5)
            return s.recv(64).startswith(b"220")
        return False

    def stop(self):
        super().stop()
        self.final.shutdown()
        self.final.server_close()


class TestAmavisQuarantine(MongoCase):
    """What amavisd-new 2.13 really sends for virus, banned and spam quarantine, with
    real clamd and SpamAssassin, recorded by mms under --real-rcpt and searched."""

    BANNED = (b"Subject: banned\r\nMIME-Version: 1.0\r\nMessage-ID: <banned@example.org>\r\n"
              b"Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\nContent-Type: text/plain"
              b"\r\n\r\nhi\r\n--XX\r\nContent-Type: application/octet-stream; name=run.exe\r\n"
              b"Content-Disposition: attachment; filename=run.exe\r\n\r\nTVqQAAMAAAAEAAAA\r\n"
              b"--XX--\r\n")

    def test_each_kind_of_quarantine(self):
        amavis = Amavis.get()
        self.start_mongo("--real-rcpt", "--port", str(amavis.mms))
        for body in (VIRUS_INLINE, mail(b"spam", GTUBE + b"\r\n"), self.BANNED):
            self.assertEqual(amavis.send("sender@example.org", ["alice@example.com"], body), {})
        docs = {d["quarantine"]: d for d in self.records()}
        self.assertEqual(sorted(docs), ["banned", "spam", "virus"])
        for kind, doc in docs.items():
            self.assertEqual(doc["quarantine_to"], [f"{kind}-quarantine@localhost.net",
                                                    "archive-quarantine@localhost.net"])
            self.assertEqual((doc["rcpt"], doc["rcpt_blocked"], doc["envelope_from"]),
                             (["alice@example.com"], ["alice@example.com"], "sender@example.org"))
            self.assertRegex(doc["quarantine_id"], r"^[A-Za-z0-9_+-]{12}$")
        self.assertEqual((docs["virus"]["is_virus"], docs["virus"]["virus"]), (1, [EICAR_NAME]))
        self.assertEqual((docs["spam"]["is_spam"], docs["virus"]["is_spam"]), (1, 0))
        self.assertGreater(docs["spam"]["spam_score"], 900)     # GTUBE is 1000
        self.assertEqual((docs["banned"]["is_banned"], docs["banned"]["is_virus"]), (1, 0))
        for args, kind in [(("--quarantine", "virus"), "virus"), (("--virus",), "virus"),
                           (("--spam",), "spam"), (("--quarantine", "banned"), "banned"),
                           (("--rcpt", "spam-quarantine@localhost.net"), "spam")]:
            with self.subTest(args=args):
                done = self.archive_command("list", *args)
                self.assertEqual(done.stdout.split()[:1], [docs[kind]["store_key"]], done.stdout)
        self.assertEqual(len(self.archive_command(
            "list", "--rcpt", "archive-quarantine@localhost.net").stdout.splitlines()), 3)
        for kind, doc in docs.items():   # amavisd-new logs the quarantine id
            done = self.archive_command("list", "--quarantine-id", doc["quarantine_id"])
            self.assertEqual(done.stdout.split()[:1], [doc["store_key"]], done.stdout)


class AmavisWithLists(Amavis):
    """amavisd-new reading mms's lists for everyone, as the README's amavisd.conf
    lines say: `mms.py lists --amavis DIR` writes them from the archive `source`
    names before it starts (it reads them as it starts)."""

    source = None     # (MongoDB URI, database): set by the test before get()

    def command(self):
        argv = super().command()
        folder = os.path.join(self.dir, "lists")
        os.makedirs(folder)
        done = subprocess.run([sys.executable, MMS, "lists", "--amavis", folder, "--mongo-host",
                               self.source[0], "--mongo-database", self.source[1]],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        conf = argv[2]
        with open(conf) as f:
            text = f.read()
        with open(conf, "w") as f:
            f.write(text.replace("\n1;", f"""
@whitelist_sender_maps = (read_hash("{folder}/mms-allow-senders"));
@blacklist_sender_maps = (read_hash("{folder}/mms-block-senders"));
1;"""))
        return argv


class TestAmavisLists(MongoCase):
    """The lists for everyone, written for amavisd-new (mms.py lists --amavis) and
    read by the real amavisd-new: a blocked sender's clean mail arrives as spam, an
    allowed sender's spam arrives as clean."""

    def test_amavisd_new_honours_the_lists(self):
        for args in (("allow", "friend@example.org"), ("block", "@foe.example"),
                     ("block", "other@foe.example", "--for", "alice@example.com")):
            self.assertEqual(self.archive_command(*args).returncode, 0)
        AmavisWithLists.source = (self.uri, self.dbname)
        amavis = AmavisWithLists.get()
        with open(os.path.join(amavis.dir, "lists", "mms-block-senders")) as f:
            self.assertEqual(f.read().splitlines()[1:], ["foe.example"])   # everyone's only
        self.start_mongo("--real-rcpt", "--port", str(amavis.mms))
        self.assertEqual(amavis.send("friend@example.org", ["alice@example.com"],
                                     mail(b"gtube", GTUBE + b"\r\n")), {})
        self.assertEqual(amavis.send("someone@foe.example", ["alice@example.com"], SIMPLE), {})
        docs = {d["envelope_from"]: d for d in self.records()}
        self.assertEqual(docs["friend@example.org"].get("is_spam"), 0)
        self.assertNotEqual(docs["friend@example.org"]["quarantine"], "spam")
        self.assertEqual((docs["someone@foe.example"]["is_spam"],
                          docs["someone@foe.example"]["quarantine"]), (1, "spam"))


class TestAmavisArchive(MongoCase):
    """amavisd-new, as Debian ships it, archiving every message into mms (--real-rcpt)."""

    def test_archive_copy_keeps_the_real_recipients(self):
        amavis = Amavis.get()
        self.start_mongo("--real-rcpt", "--port", str(amavis.mms))
        self.assertEqual(amavis.send("sender@example.org", ["alice@example.com", "bob@example.com"],
                                     SIMPLE), {})
        [doc] = self.records()
        self.assertEqual(doc["rcpt"], ["alice@example.com", "bob@example.com"])
        self.assertEqual((doc["rcpt_count"], doc["sender"]), (2, "sender@example.org"))
        self.assertEqual(doc["xforward"], {})  # amavisd-new sends none to its quarantine
        self.assertEqual(doc["quarantine_to"], ["archive-quarantine@localhost.net"])
        # SIMPLE has no Date:, and amavisd-new says so on the copy it archives.
        self.assertEqual((doc["quarantine"], doc["is_virus"], doc["is_spam"]), ("bad-header", 0, 0))
        _, data = self.stored(doc["store_key"])
        self.assertTrue(data.startswith(b"X-MMS-RCPT: <archive-quarantine@localhost.net>\r\n"
                                        b"X-Envelope-From: <sender@example.org>\r\n"
                                        b"X-Envelope-To: <alice@example.com>, <bob@example.com>\r\n"),
                        data[:300])
        self.assertTrue(data.endswith(SIMPLE))
        delivered = parse_debug_output(amavis.capture.getvalue())
        self.assertEqual(delivered[-1][0]["rcpt"], ["alice@example.com", "bob@example.com"])


###############################################################################
# The modes: proxy ############################################################
###############################################################################

class ScriptedDownstream(socketserver.ThreadingTCPServer):
    """A downstream SMTP server whose replies each test sets, recording what it is sent.

    Real Postfix cannot be made to answer a multi-line 550, to stall, or to hide
    XFORWARD on demand; the edges of reply pass-through are tested against this.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 100    # Postfix's backlog; socketserver's 5 is fewer than 20 sessions

    def __init__(self, **replies):
        self.replies = {
            "EHLO": "250-down.test\r\n250-XFORWARD NAME ADDR PORT PROTO HELO IDENT SOURCE\r\n250 8BITMIME",
            "XFORWARD": "250 2.0.0 Ok", "MAIL": "250 2.1.0 Ok", "RCPT": "250 2.1.5 Ok",
            "DATA": "354 go ahead", ".": "250 2.0.0 Ok: queued as DOWN1", "QUIT": "221 2.0.0 Bye",
            "RSET": "250 2.0.0 Ok"}
        self.replies.update(replies)
        self.rcpt_replies = {}
        self.commands, self.messages = [], []
        self.stall, self.stall_seconds = threading.Event(), 3
        super().__init__(("127.0.0.1", 0), self.Handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    class Handler(socketserver.StreamRequestHandler):
        def handle(self):
            with contextlib.suppress(OSError):
                self.converse(self.server)

        def converse(self, server):
            self.wfile.write(b"220 down.test ESMTP\r\n")
            while line := self.rfile.readline():
                command = line.decode().rstrip("\r\n")
                server.commands.append(command)
                verb = command.split(" ")[0].upper()
                reply = server.replies.get(verb, "500 5.5.2 unknown")
                if verb == "RCPT":
                    address = command.split("<", 1)[1].split(">", 1)[0]
                    reply = server.rcpt_replies.get(address, reply)
                if reply is None:  # hang up instead of answering
                    return
                self.wfile.write(reply.encode() + b"\r\n")
                if verb == "DATA" and reply.startswith("354"):
                    wire = b""
                    while not wire.endswith(b"\r\n.\r\n") and (chunk := self.rfile.readline()):
                        wire += chunk
                    server.messages.append(wire)
                    if server.stall.is_set():
                        time.sleep(server.stall_seconds)
                    self.wfile.write(server.replies["."].encode() + b"\r\n")
                if verb == "QUIT":
                    return

    def close(self):
        self.shutdown()
        self.server_close()


class ProxyCase(MongoCase):

    mode = "mongo-proxy"

    def start_proxy(self, downstream_port, *args, uri=None):
        self.spool = tempfile.mkdtemp(prefix="mms-spool-")
        self.addCleanup(shutil.rmtree, self.spool)
        return self.start_mongo("--remote-port", str(downstream_port), "--spool-dir", self.spool,
                                "--remote-timeout", "2", *args, uri=uri)


class TestProxyRelay(ProxyCase):
    """Reply pass-through, against a scripted downstream."""

    def setUp(self):
        super().setUp()
        self.down = ScriptedDownstream()
        self.addCleanup(self.down.close)
        self.start_proxy(self.down.server_address[1])

    def test_accepted_message_is_relayed_and_recorded(self):
        client = self.raw()
        client.cmd("XFORWARD NAME=mx.example.org ADDR=192.0.2.7 PORT=4567 HELO=helo.example "
                   "PROTO=ESMTP")
        body = b"Subject: relay\r\n\r\n.dot\r\nbare\n.lf\r\n"
        reply = self.send_message(client, body)
        self.assertEqual(reply, (250, "2.0.0 Ok: queued as DOWN1"))
        self.assertEqual(self.down.messages, [b"Subject: relay\r\n\r\n..dot\r\nbare\n..lf\r\n.\r\n"])
        self.assertIn("XFORWARD NAME=mx.example.org ADDR=192.0.2.7 PORT=4567 HELO=helo.example "
                      "PROTO=ESMTP", self.down.commands)
        [doc] = self.records()
        self.assertEqual((doc["client_address"], doc["rcpt"]), ("192.0.2.7", ["b@example.com"]))
        self.assertEqual(self.stored(doc["store_key"])[1], body)

    def test_data_after_every_recipient_was_refused_is_mms_own_554(self):
        self.down.replies["RCPT"] = "550 5.1.1 <nobody@example.com>: Recipient address rejected"
        client = self.raw()
        self.assertReply(client.cmd("MAIL FROM:<a@example.org>"), "mail_ok")
        self.assertEqual(client.cmd("RCPT TO:<nobody@example.com>")[0], 550)
        self.assertReply(client.cmd("DATA"), "no_rcpts")
        self.assertEqual(self.down.messages, [])
        self.assertNotIn("DATA", self.down.commands)

    def test_parameters_are_relayed_verbatim(self):
        client = self.raw()
        client.cmd("MAIL FROM:<a@example.org> SIZE=180 BODY=8BITMIME RET=HDRS ENVID=env-123 SMTPUTF8")
        client.cmd("RCPT TO:<b@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.com")
        self.assertIn("MAIL FROM:<a@example.org> SIZE=180 BODY=8BITMIME RET=HDRS ENVID=env-123 "
                      "SMTPUTF8", self.down.commands)
        self.assertIn("RCPT TO:<b@example.com> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;b@example.com",
                      self.down.commands)

    def test_multiline_refusal_is_passed_through_and_recorded(self):
        self.down.rcpt_replies["gone@example.com"] = ("550-5.1.1 <gone@example.com>: no such user\r\n"
                                                      "550 5.1.1 try another address")
        client = self.raw()
        client.cmd("MAIL FROM:<a@example.org>")
        self.assertReply(client.cmd("RCPT TO:<b@example.com>"), "rcpt_ok")
        code, text = client.cmd("RCPT TO:<gone@example.com>")
        self.assertEqual((code, text), (550, "5.1.1 <gone@example.com>: no such user\n"
                                             "5.1.1 try another address"))
        client.cmd("DATA")
        client.send(SIMPLE + b".\r\n")
        self.assertEqual(client.reply()[0], 250)
        [doc] = self.records()
        self.assertEqual(doc["rcpt"], ["b@example.com"])
        self.assertEqual(doc["rcpt_refused"], {"gone@example.com": [
            550, "5.1.1 <gone@example.com>: no such user 5.1.1 try another address"]})

    def test_temporary_and_permanent_refusals_at_end_of_data(self):
        for reply in ("450 4.7.1 try later", "554 5.7.1 rejected by policy"):
            with self.subTest(reply=reply):
                self.down.replies["."] = reply
                answer = self.send_message(self.raw(), SIMPLE)
                self.assertEqual(answer, (int(reply[:3]), reply[4:]))
        self.assertEqual(self.records(), [])

    def test_refusal_at_mail_and_data(self):
        self.down.replies["MAIL"] = "452 4.3.1 insufficient system storage"
        client = self.raw()
        self.assertEqual(client.cmd("MAIL FROM:<a@example.org>"),
                         (452, "4.3.1 insufficient system storage"))
        self.assertReply(client.cmd("RCPT TO:<b@example.com>"), "sequence")
        self.down.replies["MAIL"] = "250 2.1.0 Ok"
        self.down.replies["DATA"] = "554 5.5.1 no valid recipients"
        client.cmd("MAIL FROM:<a@example.org>")
        client.cmd("RCPT TO:<b@example.com>")
        self.assertEqual(client.cmd("DATA"), (554, "5.5.1 no valid recipients"))

    def test_downstream_without_xforward_gets_none(self):
        self.down.replies["EHLO"] = "250-down.test\r\n250 8BITMIME"
        client = self.raw()
        client.cmd("XFORWARD ADDR=192.0.2.7 HELO=helo.example")
        self.send_message(client, SIMPLE)
        self.assertFalse([c for c in self.down.commands if c.startswith("XFORWARD")])
        self.assertEqual(self.records()[0]["client_address"], "192.0.2.7")

    def test_only_announced_attributes_in_short_commands(self):
        self.down.replies["EHLO"] = "250-down.test\r\n250 XFORWARD NAME ADDR HELO"
        client = self.raw()
        client.cmd("XFORWARD NAME=" + "n" * 250 + " ADDR=192.0.2.7 PORT=99")
        client.cmd("XFORWARD HELO=" + "h" * 250 + " PROTO=ESMTP")
        self.send_message(client, SIMPLE)
        sent = [c for c in self.down.commands if c.startswith("XFORWARD")]
        self.assertGreater(len(sent), 1)
        self.assertTrue(all(len(c) + 2 <= 512 for c in sent), sent)
        attrs = " ".join(sent)
        self.assertIn("ADDR=192.0.2.7", attrs)
        self.assertNotIn("PORT=", attrs)
        self.assertNotIn("PROTO=", attrs)

    def test_rset_ends_the_downstream_session(self):
        client = self.raw()
        client.cmd("MAIL FROM:<a@example.org>")
        client.cmd("RCPT TO:<b@example.com>")
        self.assertReply(client.cmd("RSET"), "ok")
        self.assertEqual(self.down.commands[-1], "QUIT")
        self.assertReply(self.send_message(client, SIMPLE), "queued")

    def test_downstream_lost_mid_transaction_is_451_for_the_rest(self):
        self.down.rcpt_replies["hangup@example.com"] = None
        client = self.raw()
        client.cmd("MAIL FROM:<a@example.org>")
        with self.assertLogs("mms", "ERROR"):
            self.assertEqual(client.cmd("RCPT TO:<hangup@example.com>")[0], 451)
            self.assertEqual(client.cmd("RCPT TO:<b@example.com>")[0], 451)
        self.assertReply(client.cmd("RSET"), "ok")
        self.assertReply(self.send_message(client, SIMPLE), "queued")

    def test_a_downstream_that_refuses_ehlo_leaves_no_socket_behind(self):
        """The errors are kept, as a log handler keeps them: their frames hold the
        Downstream, and so would hold its socket open had it not closed it."""
        down = ScriptedDownstream(EHLO="554 5.7.1 go away", HELO="554 5.7.1 no")
        self.addCleanup(down.close)
        cfg = config("--server", "mongo-proxy", "--remote-port", str(down.server_address[1]))
        before, errors = len(os.listdir("/proc/self/fd")), []
        for _ in range(20):
            with self.assertRaises(mms.DownstreamError) as caught:
                mms.Downstream(cfg)
            errors.append(caught.exception)
        self.assertLessEqual(len(os.listdir("/proc/self/fd")), before + 2)

    def test_refused_recipients_count_toward_the_limit(self):
        """After the downstream is lost every RCPT is refused locally: that list is bounded."""
        self.server.cfg.max_recipients = 20
        self.down.rcpt_replies["hangup@example.com"] = None
        client = self.raw()
        client.cmd("MAIL FROM:<a@example.org>")
        with self.assertLogs("mms", "ERROR"):
            codes = [client.cmd(f"RCPT TO:<{n}@example.com>")[0] for n in ["hangup"] + list(range(40))]
        self.assertEqual(codes, [451] * 20 + [452] * 21)

    def test_replies_that_break_rfc_5321_are_a_downstream_error(self):
        """A reply read by its first line and passed on to be read by its last must not
        differ; a code the command cannot get is no reply. 451 4.4.1, nothing recorded."""
        usual = dict(self.down.replies)
        for step, reply in [("RCPT", "250-2.1.5 ok\r\n550 5.1.1 no"), ("RCPT", "354 go on"),
                            ("RCPT", "999 what"), ("MAIL", "100 continue"),
                            (".", "354 more"), (".", "250-2.0.0 Ok\r\n451 4.3.0 not really")]:
            with self.subTest(step=step, reply=reply):
                self.down.replies = {**usual, step: reply}
                self.down.commands.clear()
                client = self.raw()
                with self.assertLogs("mms", "ERROR") as logs:
                    if step == ".":
                        answer = self.send_message(client, SIMPLE)
                    else:
                        answer = client.cmd("MAIL FROM:<a@example.org>")
                        if step == "RCPT":
                            answer = client.cmd("RCPT TO:<b@example.com>")
                self.assertReply(answer, "relay_failed")
                self.assertIn(reply.split("\r\n")[-1][:3], "\n".join(logs.output))
                self.assertEqual(self.down.commands[-1], "QUIT")
                self.assertEqual(self.records(), [])

    def test_an_unrepresentable_date_is_left_out_and_spooled_messages_replay(self):
        cable = Cable(self.uri)
        self.addCleanup(cable.close)
        self.start_proxy(self.down.server_address[1],
                         uri=f"mongodb://127.0.0.1:{cable.port}/?directConnection=true")
        body = b"Date: Fri, 31 Dec 9999 23:59:59 -1200\r\nSubject: far\r\n\r\nfuture\r\n"
        cable.cut()
        with self.assertLogs("mms", "ERROR"):
            self.assertEqual(self.send_message(self.raw(), body)[0], 250)
        self.assertEqual(sorted(name.rsplit(".", 1)[1] for name in os.listdir(self.spool)),
                         ["bson", "msg"])
        self.server.cfg.metrics = f"127.0.0.1:{free_port()}"
        http = mms.MetricsServer(self.server.cfg, self.server.metrics, self.server)
        self.addCleanup(http.server_close)
        self.addCleanup(http.shutdown)
        self.assertEqual(scrape(http.server_address[1])[2]["mms_spooled_messages"], 1)
        cable.mend()
        done = self.archive_command("replay", "--spool-dir", self.spool)
        self.assertEqual(done.returncode, 0, done.stderr)
        [doc] = self.records()
        self.assertEqual((doc["subject"], self.stored(doc["store_key"])[1]), ("far", body))
        self.assertNotIn("sent", doc)

    def test_root_does_not_make_the_spool_directory(self):
        """Made by root it would be root's, and mms started as its own user could not write."""
        if os.geteuid() != 0:
            self.skipTest("only root is refused")
        missing = os.path.join(tempfile.mkdtemp(), "spool")
        self.addCleanup(shutil.rmtree, os.path.dirname(missing))
        done = subprocess.run([sys.executable, MMS, "--server", "mongo-proxy", "--port",
                               str(free_port()), "--spool-dir", missing], capture_output=True,
                              text=True, timeout=30)
        self.assertEqual(done.returncode, 2)
        self.assertIn(f"install -d -o mms -g mms {missing}", done.stderr)
        self.assertFalse(os.path.exists(missing))

    def test_downstream_down_or_stalled_is_451(self):
        self.down.close()
        with self.assertLogs("mms", "ERROR"):
            self.assertEqual(self.raw().cmd("MAIL FROM:<a@example.org>")[0], 451)
        stalled = ScriptedDownstream()
        self.addCleanup(stalled.close)
        stalled.stall.set()
        self.server.cfg.remote_port = stalled.server_address[1]
        with self.assertLogs("mms", "ERROR"):
            answer = self.send_message(self.raw(), SIMPLE)
        self.assertEqual(answer[0], 451)
        self.assertTrue(answer[1].startswith("4.4.1 "))
        self.assertEqual(self.records(), [])


POSTFIX_MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {dir}/queue
data_directory = {dir}/data
maillog_file = {dir}/maillog
maillog_file_prefixes = {dir}
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = front.mms.test
mydestination =
mynetworks = 127.0.0.0/8
relayhost = [127.0.0.1]:{final}
alias_maps =
alias_database =
smtputf8_enable = yes
smtpd_relay_restrictions = permit_mynetworks, reject
"""

# The two smtpd services, exactly as the README shows them.
POSTFIX_MASTER_CF = """\
127.0.0.1:{front} inet  n       -       n       -       -       smtpd
  -o smtpd_proxy_filter=127.0.0.1:{mms}
127.0.0.1:{after} inet n  -       n       -       -       smtpd
  -o smtpd_proxy_filter=
  -o smtpd_authorized_xforward_hosts=127.0.0.0/8
  -o smtpd_recipient_restrictions=check_recipient_access,regexp:{dir}/rcpt_access,permit_mynetworks,reject
  -o smtpd_end_of_data_restrictions=check_sender_access,regexp:{dir}/sender_access
"""


class Postfix:
    """A private Postfix on loopback ports: a front smtpd whose smtpd_proxy_filter is
    mms, an after-filter smtpd that mms relays to, and relayhost delivery to a
    capture server (mms's own debug mode, proven byte-exact above). One for the
    module, started by the first test that needs it."""

    running = None

    @classmethod
    def get(cls):
        if cls.running is None:
            cls.running = cls()
        return cls.running

    def __init__(self):
        if not shutil.which("postfix"):
            if os.environ.get("CI"):
                raise RuntimeError("postfix is not installed: .ci/run should install it")
            raise missing("postfix is not installed (apt-get install postfix)")
        self.dir = tempfile.mkdtemp(prefix="mms-postfix-")
        os.chmod(self.dir, 0o755)  # Postfix's daemons run as the postfix user
        self.front, self.after, self.mms = free_port(), free_port(), free_port()
        self.capture = io.BytesIO()
        cfg = config("--server", "debug", "--host", "127.0.0.1", "--hostname", "final.mms.test")
        self.final = mms.open_server(cfg, mms.DebugMode(cfg, stream=self.capture))
        threading.Thread(target=self.final.serve_forever, daemon=True).start()
        ports = dict(dir=self.dir, front=self.front, after=self.after, mms=self.mms,
                     final=self.final.server_address[1])
        with open(os.path.join(self.dir, "main.cf"), "w") as f:
            f.write(POSTFIX_MAIN_CF.format(**ports))
        with open(os.path.join(self.dir, "master.cf"), "w") as f:
            f.write(self.stock_services() + POSTFIX_MASTER_CF.format(**ports))
        with open(os.path.join(self.dir, "rcpt_access"), "w") as f:
            f.write("/^refused@/ 550 5.1.1 User unknown\n")
        with open(os.path.join(self.dir, "sender_access"), "w") as f:
            f.write("/^reject-at-dot@/ 554 5.7.1 Rejected at end of data\n")
        os.makedirs(os.path.join(self.dir, "queue"))
        os.makedirs(os.path.join(self.dir, "data"))
        shutil.chown(os.path.join(self.dir, "data"), "postfix")
        self.postfix("check")
        self.postfix("start")
        wait_port(self.front)
        wait_port(self.after)

    @staticmethod
    def stock_services():
        """Debian's master.cf without its port-25 smtpd, and with no chroot."""
        lines = []
        with open("/etc/postfix/master.cf") as f:
            for line in f:
                fields = line.split()
                if line[:1].isalnum() and len(fields) >= 8:
                    if fields[1] == "inet":
                        continue
                    fields[4] = "n"
                    line = " ".join(fields) + "\n"
                lines.append(line)
        return "".join(lines)

    def emptied(self):
        """This Postfix, with nothing yet delivered: for the next test."""
        self.capture.seek(0)
        self.capture.truncate()
        return self

    def postfix(self, command):
        done = subprocess.run(["postfix", "-c", self.dir, command], capture_output=True,
                              text=True, timeout=60)
        if done.returncode:
            raise RuntimeError(f"postfix {command} failed: {done.stderr}{self.maillog()}")

    def queue(self):
        return subprocess.run(["postqueue", "-c", self.dir, "-p"], capture_output=True,
                              text=True, timeout=30).stdout.strip()

    def maillog(self):
        with contextlib.suppress(OSError), open(os.path.join(self.dir, "maillog")) as f:
            return f.read()
        return ""

    def delivered(self, count, seconds=60):
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            messages = parse_debug_output(self.capture.getvalue())
            if len(messages) >= count:
                return messages
            time.sleep(0.1)
        raise AssertionError(f"{count} message(s) not delivered:\n{self.maillog()[-3000:]}")

    def stop(self):
        with contextlib.suppress(RuntimeError):
            self.postfix("stop")
        self.final.shutdown()
        self.final.server_close()
        shutil.rmtree(self.dir, ignore_errors=True)


class TestProxySpooling(ProxyCase):
    """MongoDB down behind a proxy: mail flows, waits in the spool, and the monitors
    say so without calling the server down."""

    def test_the_downstream_reply_is_kept_and_spooling_is_a_warning(self):
        down = ScriptedDownstream(**{".": "250 2.0.0 Ok: queued as 4XyZ1"})
        self.addCleanup(down.close)
        cable = Cable(self.uri)
        self.addCleanup(cable.close)
        with self.assertLogs("mms", "INFO") as logs:
            self.start_proxy(down.server_address[1], "--metrics", f"127.0.0.1:{free_port()}",
                             uri=f"mongodb://127.0.0.1:{cable.port}/?directConnection=true")
            self.server.mode.store.contacted.wait()
            self.assertReply(self.send_message(self.raw(), SIMPLE), "ok")
        [doc] = self.records()
        self.assertEqual(doc["downstream_reply"], "250 2.0.0 Ok: queued as 4XyZ1")
        self.assertIn("result=delivered downstream=(250 2.0.0 Ok: queued as 4XyZ1)",
                      "\n".join(logs.output))
        metrics_port = free_port()
        self.server.cfg.metrics = f"127.0.0.1:{metrics_port}"
        http = mms.MetricsServer(self.server.cfg, self.server.metrics, self.server)
        self.addCleanup(http.server_close)
        self.addCleanup(http.shutdown)
        cable.cut()
        with self.assertLogs("mms", "ERROR"):
            self.assertEqual(self.send_message(self.raw(), SIMPLE)[0], 250)   # delivered
        status, text, _ = scrape(metrics_port, "/healthz")
        self.assertEqual(status, 200)
        self.assertTrue(text.startswith("ok, spooling: MongoDB's last contact failed, 1 "
                                        f"message(s) wait in {self.spool}"), text)
        done = self.archive_command("check", "--server", "mongo-proxy", "--port", str(self.port),
                                    "--remote-port", str(down.server_address[1]),
                                    "--spool-dir", self.spool, "--mongo-timeout", "1",
                                    uri=f"mongodb://127.0.0.1:{cable.port}/?directConnection=true")
        self.assertEqual(done.returncode, 1, done.stdout)
        self.assertTrue(done.stdout.startswith("WARNING: MongoDB: "), done.stdout)
        self.assertIn(f"1 message(s) wait in {self.spool}", done.stdout)

    def test_a_downstream_that_does_not_answer_is_said_at_start(self):
        with self.assertLogs("mms", "WARNING") as logs:
            self.start_proxy(free_port())
            deadline = time.monotonic() + 10
            while not any("does not answer" in line for line in logs.output):
                self.assertLess(time.monotonic(), deadline, logs.output)
                time.sleep(0.05)
        self.assertIn("downstream does not answer at start", "\n".join(logs.output))


class TestProxyWithPostfix(ProxyCase):
    """smtpd_proxy_filter=127.0.0.1:<mms>, with mms relaying to a second smtpd."""

    def setUp(self):
        super().setUp()
        self.postfix = Postfix.get().emptied()

    def start_filter(self, *args, remote=None, uri=None):
        self.start_proxy(remote or self.postfix.after, "--port", str(self.postfix.mms), *args,
                         uri=uri)

    def send(self, body, rcpts=("b@example.com",), sender="a@example.org"):
        with smtplib.SMTP("127.0.0.1", self.postfix.front, local_hostname="client.example.net",
                          timeout=120) as client:
            return client.sendmail(sender, list(rcpts), body)

    @staticmethod
    def added_by_postfix(delivered, original):
        """What Postfix put before the original: only Received: headers."""
        self_check = delivered.endswith(original)
        head = delivered[:len(delivered) - len(original)]
        lines = head.split(b"\r\n")[:-1]
        return self_check and all(l.startswith((b"Received:", b"\t", b" ")) for l in lines)

    def test_message_is_delivered_and_recorded(self):
        self.start_filter()
        body = (b"Subject: through postfix\r\nFrom: a@example.org\r\nMessage-ID: <t1@example.org>\r\n"
                b"Date: Thu, 26 Nov 2026 02:27:17 +0000\r\n\r\n.dot\r\ncaf\xc3\xa9\r\n")
        self.assertEqual(self.send(body), {})
        [(_, delivered)] = self.postfix.delivered(1)
        [doc] = self.records()
        _, stored = self.stored(doc["store_key"])
        self.assertTrue(self.added_by_postfix(stored, body), stored)
        self.assertTrue(self.added_by_postfix(delivered, stored), delivered)
        # The after-filter smtpd took mms's XFORWARD: it logs the original client.
        self.assertIn(b"with ESMTP id ", delivered)
        queue_id = delivered.split(b"with ESMTP id ", 1)[1].split(b"\r\n", 1)[0].decode()
        self.assertIn(f"{queue_id}: client=localhost[127.0.0.1], orig_client=localhost[127.0.0.1]",
                      self.postfix.maillog())
        self.assertEqual(doc["xforward"]["HELO"], "client.example.net")
        self.assertEqual(doc["xforward"]["ADDR"], "127.0.0.1")
        self.assertEqual(doc["client_address"], "127.0.0.1")
        self.assertEqual((doc["sender"], doc["rcpt"]), ("a@example.org", ["b@example.com"]))

    def test_only_the_front_postfix_may_connect(self):
        """Anything else that reached mms would relay through the after-filter, which
        sees mms's own address: an open relay (Postfix uses XFORWARD for logging only)."""
        self.start_filter()
        with self.assertLogs("mms", "WARNING") as logs:
            stranger = Raw(self.postfix.mms, source="127.0.0.2")
            self.addCleanup(stranger.close)
            self.assertReply(stranger.reply(), "access_denied")
        self.assertTrue(stranger.closed())
        self.assertIn("reject connection from 127.0.0.2: not in --xforward-hosts",
                      "\n".join(logs.output))
        self.assertEqual(self.send(SIMPLE), {})
        self.postfix.delivered(1)
        self.assertEqual(len(self.records()), 1)

    def test_a_client_without_xforward_is_named_to_the_after_filter(self):
        self.start_filter("--allow", "127.0.0.0/8")
        client = Raw(self.postfix.mms, source="127.0.0.2")
        self.addCleanup(client.close)
        client.reply()
        client.cmd("EHLO direct.example")
        self.assertReply(self.send_message(client, SIMPLE), "queued")
        [(_, delivered)] = self.postfix.delivered(1)
        queue_id = delivered.split(b"with ESMTP id ", 1)[1].split(b"\r\n", 1)[0].decode()
        self.assertIn(f"{queue_id}: client=localhost[127.0.0.1], orig_client=unknown[127.0.0.2]",
                      self.postfix.maillog())
        self.assertEqual(self.records()[0]["client_address"], "127.0.0.2")

    def test_refused_recipient(self):
        self.start_filter()
        refused = self.send(SIMPLE, rcpts=("b@example.com", "refused@example.com"))
        self.assertEqual(refused["refused@example.com"][0], 550)
        [(metadata, _)] = self.postfix.delivered(1)
        self.assertEqual(metadata["rcpt"], ["b@example.com"])
        [doc] = self.records()
        self.assertEqual(doc["rcpt"], ["b@example.com"])
        code, text = doc["rcpt_refused"]["refused@example.com"]
        self.assertEqual(code, 550)
        self.assertIn("User unknown", text)

    def test_rejected_at_end_of_data_is_not_recorded(self):
        self.start_filter()
        with self.assertRaises(smtplib.SMTPDataError) as caught:
            self.send(SIMPLE, sender="reject-at-dot@example.org")
        self.assertEqual(caught.exception.smtp_code, 554)
        self.assertEqual(self.records(), [])

    def test_downstream_stopped_is_4xx_at_the_client(self):
        self.start_filter(remote=free_port())
        with self.assertLogs("mms", "ERROR"):
            with self.assertRaises(smtplib.SMTPRecipientsRefused) as caught:
                self.send(SIMPLE)
        [(code, text)] = caught.exception.recipients.values()
        self.assertTrue(400 <= code < 500, (code, text))
        self.assertEqual(self.records(), [])

    def test_mongodb_stopped_spools_and_replay_stores(self):
        cable = Cable(self.uri)
        self.addCleanup(cable.close)
        self.start_filter(uri=f"mongodb://127.0.0.1:{cable.port}/?directConnection=true")
        cable.cut()
        with self.assertLogs("mms", "ERROR") as logs:
            self.assertEqual(self.send(SIMPLE), {})
        self.postfix.delivered(1)
        self.assertIn("spooled", "\n".join(logs.output))
        self.assertEqual(len(os.listdir(self.spool)), 2)
        self.assertEqual(self.records(), [])
        cable.mend()
        done = self.archive_command("replay", "--spool-dir", self.spool)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("replayed 1 message", done.stdout)
        [doc] = self.records()
        self.assertTrue(self.added_by_postfix(self.stored(doc["store_key"])[1], SIMPLE))
        self.assertEqual(os.listdir(self.spool), [])

    def test_smtp_source_200_messages(self):
        self.start_filter()
        done = subprocess.run(["smtp-source", "-s", "10", "-m", "200", "-l", "1024", "-c",
                               "-f", "a@example.org", "-t", "b@example.com",
                               f"127.0.0.1:{self.postfix.front}"],
                              capture_output=True, text=True, timeout=300)
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(len(self.postfix.delivered(200, seconds=120)), 200)
        docs = self.records()
        self.assertEqual(len(docs), 200)
        self.assertEqual(len({d["store_key"] for d in docs}), 200)
        self.assertTrue(all(d["xforward"].get("ADDR") == "127.0.0.1" for d in docs))


###############################################################################
# The modes: filter (clamd and spamd) #########################################
###############################################################################

# Built in two halves, so that no file in this repository carries them whole.
EICAR = ("X5O!P%@AP[4\\PZX54(P^)7CC)7}$" + "EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*").encode()
GTUBE = ("XJS*C4JDBQADN1.NSBN3*2IDNEN*" + "GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X").encode()


def mail(subject, body, extra=b""):
    return (b"From: Alice <alice@example.org>\r\nTo: Bob <bob@example.com>\r\n"
            b"Subject: " + subject + b"\r\nMessage-ID: <" + uuid.uuid4().hex.encode() +
            b"@example.org>\r\nDate: Thu, 26 Nov 2026 02:27:17 +0000\r\n" + extra + b"\r\n" + body)


CLEAN = mail(b"lunch", b"Shall we meet at noon on Friday?\r\n")
VIRUS_INLINE = mail(b"inline", EICAR + b"\r\n")
VIRUS_ATTACHED = mail(b"attached", b"--XX\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--XX\r\n"
                      b"Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
                      b"Content-Disposition: attachment; filename=eicar.com\r\n\r\n" +
                      base64.b64encode(EICAR) + b"\r\n--XX--\r\n",
                      b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=XX\r\n")
SPAM = mail(b"offer", GTUBE + b"\r\n")
EICAR_NAME = "Test.EICAR-Body.UNOFFICIAL"


class Clamd(Daemon):
    """clamd with a one-line signature database of the test's own: freshclam cannot run here."""

    program, package = "clamd", "apt-get install clamav-daemon"

    def command(self):
        db = os.path.join(self.dir, "db")
        os.makedirs(db)
        with open(os.path.join(db, "mms-test.ndb"), "w") as f:
            f.write(f"Test.EICAR-Body:0:*:{EICAR.hex()}\n")
        conf = os.path.join(self.dir, "clamd.conf")
        with open(conf, "w") as f:
            f.write(f"DatabaseDirectory {db}\nTCPSocket {self.port}\nTCPAddr 127.0.0.1\n"
                    f"Foreground yes\nLogFile {self.dir}/log\nStreamMaxLength 25M\n"
                    f"User root\n")
        return ["clamd", "-c", conf]

    def ready(self):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1) as s:
            s.sendall(b"zPING\0")
            return s.recv(16) == b"PONG\0"
        return False


class Spamd(Daemon):
    """spamd with the stock rules, --local, and Bayes off."""

    program, package = "spamd", "apt-get install spamassassin spamd"

    def command(self):
        return ["spamd", f"--listen=127.0.0.1:{self.port}", "--allowed-ips=127.0.0.1", "--local",
                "--nouser-config", "--cf=use_bayes 0", "--max-children=4",
                f"--pidfile={self.dir}/pid", f"--syslog={self.dir}/log",
                "--username=debian-spamd", "--groupname=debian-spamd",
                f"--helper-home-dir={self.dir}"]

    def ready(self):
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 1) as s:
            s.sendall(b"PING SPAMC/1.5\r\n\r\n")
            return b"PONG" in s.recv(64)
        return False


class LearningSpamd(Spamd):
    """spamd started as `mms.py learn` needs it: --allow-tell, Bayes on, its
    database in a directory of its own that sa-learn reads back."""

    def command(self):
        os.chmod(self.dir, 0o777)          # spamd writes its Bayes files as debian-spamd
        return ["spamd", f"--listen=127.0.0.1:{self.port}", "--allowed-ips=127.0.0.1", "--local",
                "--nouser-config", "--allow-tell", "--cf=use_bayes 1",
                f"--cf=bayes_path {self.dir}/bayes", "--cf=bayes_file_mode 0777",
                "--max-children=2", f"--pidfile={self.dir}/pid", f"--syslog={self.dir}/log",
                "--username=debian-spamd", "--groupname=debian-spamd",
                f"--helper-home-dir={self.dir}"]

    def learned(self):
        """{"nspam": n, "nham": n}, as `sa-learn --dump magic` reads the database."""
        done = subprocess.run(["sa-learn", "--dbpath", f"{self.dir}/bayes", "--dump", "magic"],
                              capture_output=True, text=True, timeout=60)
        found = dict((m.group(2), int(m.group(1))) for m in re.finditer(
            r"^\S+\s+\S+\s+(\d+)\s+\S+\s+non-token data: (nspam|nham)$", done.stdout, re.M))
        return {"nspam": found.get("nspam", 0), "nham": found.get("nham", 0)}


class FakeScanner(socketserver.ThreadingTCPServer):
    """Stands in for a scanner where the real one cannot misbehave on demand: it reads
    the request, waits at `barrier` if given, then sends `answer` (or nothing)."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, answer=None, barrier=None, trickle=0):
        self.answer, self.barrier, self.connections = answer, barrier, 0
        self.trickle = trickle     # seconds between the answer's bytes, if any
        super().__init__(("127.0.0.1", 0), self.Handler)
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()

    @property
    def address(self):
        return f"127.0.0.1:{self.server_address[1]}"

    class Handler(socketserver.BaseRequestHandler):
        def handle(self):
            self.server.connections += 1
            self.request.settimeout(5)
            with contextlib.suppress(OSError):
                request = self.request.recv(65536)
                while request and not self.complete(request):  # all of it, or the close
                    request += self.request.recv(65536)        # would reset mms's send
                if self.server.barrier is not None:
                    self.server.barrier.wait(10)
                if self.server.answer is not None and self.server.trickle:
                    for byte in self.server.answer:
                        self.request.sendall(bytes([byte]))
                        time.sleep(self.server.trickle)
                if self.server.answer is not None:
                    self.request.sendall(self.server.answer)
                    return
                time.sleep(5)

        @staticmethod
        def complete(request):
            """clamd's INSTREAM ends with a zero-length chunk, its other commands with
            NUL; spamd's request has Content-length bytes after its head."""
            if request.startswith(b"zINSTREAM\0"):
                return len(request) >= 14 and request.endswith(b"\0\0\0\0")
            if request.startswith(b"z"):                    # zPING and other commands
                return request.endswith(b"\0")
            head, blank, body = request.partition(b"\r\n\r\n")
            length = re.search(rb"Content-length: *([0-9]+)", head, re.I)
            return bool(blank) and (not length or len(body) >= int(length.group(1)))

    def close(self):
        self.shutdown()
        self.server_close()


class FilterCase(ProxyCase):

    mode = "mongo-filter"

    def setUp(self):
        super().setUp()
        self.down = ScriptedDownstream()
        self.addCleanup(self.down.close)

    def start_filter(self, *args, clamd=None, spamd=None):
        return self.start_proxy(self.down.server_address[1],
                                "--clamd", clamd or Clamd.get().address,
                                "--spamd", spamd or Spamd.get().address, *args)

    def deliver(self, body):
        """Send one message on a fresh connection; the reply and its metadata document."""
        reply = self.send_message(self.raw(), body)
        docs = [d for d in self.records() if d.get("message_id") and
                body.find(d["message_id"].encode()) >= 0]
        return reply, (docs[0] if docs else None)

    def fake(self, **kwargs):
        server = FakeScanner(**kwargs)
        self.addCleanup(server.close)
        return server


class TestFilterVerdicts(FilterCase):

    def test_clean_mail_is_delivered_and_recorded(self):
        self.start_filter()
        reply, doc = self.deliver(CLEAN)
        self.assertEqual(reply, (250, "2.0.0 Ok: queued as DOWN1"))
        self.assertEqual(self.down.messages, [CLEAN + b".\r\n"])
        self.assertEqual((doc["is_virus"], doc["is_spam"], doc["is_unchecked"]), (0, 0, 0))
        self.assertEqual(doc["virus"], [])
        self.assertLess(doc["spam_score"], doc["spam_required"])
        self.assertIsInstance(doc["spam_symbols"], list)
        self.assertEqual(doc["scan"]["clamd"], "stream: OK")
        self.assertTrue(doc["scan"]["spamd"].startswith("Spam: False ; "))
        self.assertEqual(self.stored(doc["store_key"])[1], CLEAN)

    def test_virus_is_quarantined_not_delivered(self):
        self.start_filter()
        for body in (VIRUS_INLINE, VIRUS_ATTACHED):
            with self.subTest(body=body[:60]):
                (code, text), doc = self.deliver(body)
                self.assertEqual(code, 250)
                self.assertEqual(text, f"2.0.0 Ok: queued as {doc['store_key']}")
                self.assertEqual((doc["is_virus"], doc["virus"]), (1, [EICAR_NAME]))
                self.assertEqual(doc["quarantine"], "virus")
                self.assertEqual(self.stored(doc["store_key"])[1], body)
        self.assertEqual(self.down.messages, [])
        self.assertNotIn("DATA", self.down.commands)

    def test_virus_reject(self):
        self.start_filter("--virus-action", "reject")
        reply, doc = self.deliver(VIRUS_ATTACHED)
        self.assertEqual(reply, (554, f"5.7.1 Virus found: {EICAR_NAME}"))
        self.assertEqual(doc["is_virus"], 1)
        self.assertEqual(self.down.messages, [])

    def test_spam_is_quarantined(self):
        self.start_filter()
        (code, text), doc = self.deliver(SPAM)
        self.assertEqual((code, text), (250, f"2.0.0 Ok: queued as {doc['store_key']}"))
        self.assertEqual((doc["is_spam"], doc["is_virus"]), (1, 0))
        self.assertGreaterEqual(doc["spam_score"], 1000)
        self.assertEqual(doc["spam_required"], 5.0)
        self.assertIn("GTUBE", doc["spam_symbols"])
        self.assertEqual(self.down.messages, [])

    def test_spam_deliver(self):
        self.start_filter("--spam-action", "deliver")
        reply, doc = self.deliver(SPAM)
        self.assertEqual(reply, (250, "2.0.0 Ok: queued as DOWN1"))
        self.assertEqual(self.down.messages, [SPAM + b".\r\n"])
        self.assertEqual(doc["is_spam"], 1)

    def test_spam_reject(self):
        self.start_filter("--spam-action", "reject")
        reply, doc = self.deliver(SPAM)
        self.assertEqual(reply[0], 554)
        self.assertTrue(reply[1].startswith("5.7.1 "))
        self.assertEqual(doc["is_spam"], 1)
        self.assertEqual(self.down.messages, [])

    def test_reader_finds_quarantined_mail(self):
        self.start_filter()
        for body in (CLEAN, VIRUS_INLINE, SPAM):
            self.deliver(body)
        def listed(flag):
            done = self.archive_command("list", flag, "--json")
            return [json.loads(line)["subject"] for line in done.stdout.splitlines()]
        self.assertEqual(listed("--virus"), ["inline"])
        self.assertEqual(listed("--spam"), ["offer"])


class TestFilterScanErrors(FilterCase):

    def test_clamd_stopped_tempfail(self):
        self.start_filter(clamd=f"127.0.0.1:{free_port()}")
        with self.assertLogs("mms", "WARNING"):
            reply, doc = self.deliver(CLEAN)
        self.assertEqual(reply[0], 451)
        self.assertTrue(reply[1].startswith("4.7.1 "))
        self.assertIsNone(doc)
        self.assertEqual(self.down.messages, [])

    def test_clamd_stopped_deliver(self):
        self.start_filter("--on-scan-error", "deliver", clamd=f"127.0.0.1:{free_port()}")
        reply, doc = self.deliver(CLEAN)
        self.assertEqual(reply, (250, "2.0.0 Ok: queued as DOWN1"))
        self.assertEqual(doc["is_unchecked"], 1)
        self.assertTrue(doc["scan"]["clamd"].startswith("error: "))
        self.assertEqual(self.down.messages, [CLEAN + b".\r\n"])

    def test_spamd_slower_than_the_timeout_tempfail(self):
        stalled = self.fake()  # reads the message, never answers
        self.start_filter("--scan-timeout", "0.5", spamd=stalled.address)
        with self.assertLogs("mms", "WARNING"):
            reply, doc = self.deliver(CLEAN)
        self.assertEqual((reply[0], doc), (451, None))
        self.assertEqual(self.down.messages, [])

    def test_spamd_slower_than_the_timeout_deliver(self):
        stalled = self.fake()
        self.start_filter("--on-scan-error", "deliver", "--scan-timeout", "0.5",
                          spamd=stalled.address)
        reply, doc = self.deliver(CLEAN)
        self.assertEqual(reply[0], 250)
        self.assertEqual(doc["is_unchecked"], 1)
        self.assertIn("timed out", doc["scan"]["spamd"])
        self.assertEqual(doc["scan"]["clamd"], "stream: OK")
        self.assertEqual(len(self.down.messages), 1)

    def test_the_scan_timeout_is_for_the_whole_scan(self):
        """A spamd that trickles its answer a byte at a time is as late as a silent one."""
        trickling = self.fake(answer=b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; 1.0 / 5.0\r\n\r\n",
                              trickle=0.2)
        self.start_filter("--scan-timeout", "1", spamd=trickling.address)
        with self.assertLogs("mms", "WARNING"):   # each byte within 1 s, the whole in 9 s
            reply, doc = self.deliver(CLEAN)
        self.assertEqual((reply[0], doc), (451, None))

    def test_a_spamd_answer_that_does_not_parse_is_a_scan_error(self):
        garbled = self.fake(answer=b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; 1.2.3 / 5.0\r\n\r\n")
        self.start_filter(spamd=garbled.address)
        with self.assertLogs("mms", "WARNING"):
            reply, doc = self.deliver(CLEAN)
        self.assertEqual((reply[0], doc), (451, None))   # --on-scan-error tempfail
        self.assertEqual(self.down.messages, [])
        self.server.mode.cfg.on_scan_error = "deliver"
        reply, doc = self.deliver(CLEAN)
        self.assertEqual((reply[0], doc["is_unchecked"]), (250, 1))
        self.assertIn("ValueError", doc["scan"]["spamd"])

    def test_message_over_scan_max_size_is_not_scanned(self):
        clamd, spamd = self.fake(answer=b"stream: OK\0"), self.fake(answer=b"")
        self.start_filter("--scan-max-size", "100", clamd=clamd.address, spamd=spamd.address)
        deadline = time.monotonic() + 10   # each is asked once at start (ask_peers)
        while clamd.connections + spamd.connections < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        reply, doc = self.deliver(CLEAN)
        self.assertEqual(reply[0], 250)
        self.assertEqual(doc["is_unchecked"], 1)
        self.assertEqual((clamd.connections, spamd.connections), (1, 1))
        self.assertEqual(len(self.down.messages), 1)

    def test_verdicts_and_timings_are_counted(self):
        clamd = self.fake(answer=b"stream: Test.Fake FOUND\0")
        spamd = self.fake(answer=b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; 0.1 / 5.0\r\n\r\n")
        self.start_filter(clamd=clamd.address, spamd=spamd.address)
        self.assertEqual(self.deliver(CLEAN)[0][0], 250)
        text = self.server.metrics.exposition()
        self.assertIn('mms_scan_verdicts_total{verdict="virus"} 1', text)
        self.assertIn('mms_scan_verdicts_total{verdict="clean"} 0', text)
        self.assertIn('mms_scan_seconds_count{scanner="clamd"} 1', text)
        self.assertIn('mms_scan_seconds_count{scanner="spamd"} 1', text)
        self.assertIn('mms_messages_total{result="quarantined"} 1', text)
        self.assertIn("mms_relay_seconds_count 0", text)

    def test_scanners_are_asked_at_the_same_time(self):
        # Each fake answers only once both have been asked (a barrier of two):
        # asked one after the other, the first would give up and fail the scan.
        both = threading.Barrier(2)
        clamd = self.fake(answer=b"stream: OK\0", barrier=both)
        spamd = self.fake(answer=b"SPAMD/1.1 0 EX_OK\r\nSpam: False ; 0.1 / 5.0\r\n\r\nRULE_A\r\n",
                          barrier=both)
        self.start_filter("--scan-timeout", "5", clamd=clamd.address, spamd=spamd.address)
        reply, doc = self.deliver(CLEAN)
        self.assertEqual(reply[0], 250)
        self.assertEqual((doc["is_unchecked"], doc["spam_symbols"]), (0, ["RULE_A"]))


class TestSenderLists(FilterCase):
    """Allow and block lists (mms.py allow, block, unlist, lists), as filter mode
    honours them: a blocked sender is refused at RCPT for the recipients it is
    blocked for (550 5.7.1); an allowed one skips spamd but never clamd; read into
    memory every LISTS_REFRESH seconds, never per message."""

    def setUp(self):
        patcher = mock.patch.object(mms, "LISTS_REFRESH", 0.2)
        patcher.start()
        self.addCleanup(patcher.stop)
        super().setUp()
        self.clamd = self.fake(answer=b"stream: OK\0")
        self.spamd = self.fake(answer=b"SPAMD/1.1 0 EX_OK\r\nContent-length: 10\r\nSpam: True "
                                      b"; 15.0 / 5.0\r\n\r\nGTUBE,XYZ\r\n")
        self.start_filter(clamd=self.clamd.address, spamd=self.spamd.address)

    def lists(self, *args):
        done = self.archive_command(*args)
        return done.returncode, done.stdout.strip(), done.stderr.strip()

    def settle(self):
        """The lists as the server holds them, once it has read them again."""
        self.server.mode.lists.entries = {}
        deadline = time.monotonic() + 10
        while not self.server.mode.lists.entries and time.monotonic() < deadline:
            time.sleep(0.05)

    def test_the_commands(self):
        self.assertEqual(self.lists("allow", "Partner@Example.org"),
                         (0, "allowed mail from partner@example.org to everyone", ""))
        self.assertEqual(self.lists("block", "@spam.example", "--for", "bob@example.com"),
                         (0, "blocked mail from @spam.example to bob@example.com", ""))
        self.assertEqual(self.lists("block", "partner@example.org")[1],
                         "blocked mail from partner@example.org to everyone (it was allowed)")
        code, out, _ = self.lists("lists")
        self.assertEqual([line.split(" (by ")[0] for line in out.splitlines()], [
            "block partner@example.org -> everyone", "block @spam.example -> bob@example.com"])
        self.assertRegex(out, r"\(by [^ ]+ \(command line\), 20[0-9-]{8} [0-9:]{5}\)")
        self.assertEqual(len(self.lists("lists", "--for", "bob@example.com")[1].splitlines()), 1)
        for bad in ("example.org", "a@", "@nodot", "@", "<>"):
            code, _, err = self.lists("allow", bad)
            self.assertEqual(code, 1, bad)
            self.assertIn("not an address or @domain (no patterns)", err)
        self.assertEqual(self.lists("unlist", "@spam.example", "--for", "bob@example.com")[0], 0)
        self.assertEqual(self.lists("unlist", "@spam.example", "--for", "bob@example.com")[:2],
                         (1, ""))
        self.assertEqual(self.db["message_lists"].count_documents({}), 1)

    def test_bounded_and_read_on_their_index(self):
        tap = WireTap(self.uri)
        self.addCleanup(tap.close)
        cfg = mms.parse_config(["--mongo-host", f"mongodb://127.0.0.1:{tap.port}/?"
                                "directConnection=true", "--mongo-database", self.dbname])
        archive = mms.Archive(cfg).connect()
        self.addCleanup(archive.close)
        with mock.patch.object(mms, "LISTS_DOMAIN_MAX", 2):
            archive.list_entry("block", "a@x.org", "bob@example.com", "test")
            archive.list_entry("block", "b@x.org", "carol@example.com", "test")
            with self.assertRaisesRegex(mms.Conflict, "example.com has 2 list entries"):
                archive.list_entry("block", "c@x.org", "dave@example.com", "test")
            archive.list_entry("allow", "a@x.org", "bob@example.com", "test")   # a change
        list(archive.list_entries("bob@example.com"))
        [find] = [c for c in tap.sent("find", "message_lists") if "rcpt" in c["filter"]]
        self.assertEqual((find["filter"], find["sort"], find["maxTimeMS"]),
                         ({"rcpt": "bob@example.com"}, {"rcpt": 1, "sender": 1},
                          mms.LISTS_QUERY_MS))
        counts = [c["pipeline"][0] for c in tap.sent("aggregate", "message_lists")]
        self.assertIn({"$match": {"rcpt_domain": "example.com"}}, counts)

    def test_filter_mode_blocks_at_rcpt_and_allowed_mail_skips_spamd(self):
        client = self.raw()
        self.assertEqual(self.send_message(client, SIMPLE, sender="partner@example.org")[0], 250)
        self.assertEqual(len(self.down.messages), 0)          # spam: kept, not delivered
        self.lists("allow", "partner@example.org")
        self.lists("block", "@spam.example", "--for", "bob@example.com")
        self.settle()
        asked = self.spamd.connections
        reply = self.send_message(self.raw(), SIMPLE, sender="partner@example.org",
                                  rcpts=("bob@example.com", "carol@example.com"))
        self.assertEqual(reply[0], 250)
        self.assertEqual(len(self.down.messages), 1)          # allowed: delivered
        self.assertEqual(self.spamd.connections, asked)       # spamd not asked
        doc = self.db["message"].find_one({"allowed": {"$exists": True}})
        self.assertEqual(doc["allowed"], ["bob@example.com", "carol@example.com"])
        self.assertEqual(doc["verdict"], "clean")
        client = self.raw()
        self.assertReply(client.cmd("MAIL FROM:<x@spam.example>"), "mail_ok")
        code, text = client.cmd("RCPT TO:<bob@example.com>")
        self.assertEqual((code, text), (550, "5.7.1 <x@spam.example>: Sender address "
                                             "rejected: blocked for this recipient"))
        self.assertReply(client.cmd("RCPT TO:<carol@example.com>"), "rcpt_ok")
        last = " ".join(self.down.commands).rpartition("MAIL FROM:<x@spam.example>")[2]
        self.assertEqual(last.split(), ["RCPT", "TO:<carol@example.com>"])   # bob never asked
        self.server.mode.store.tally.flush()
        code, out, _ = self.lists("stats")
        self.assertRegex(out.splitlines()[0], r", allowed 1, blocked 1$")

    def test_a_virus_from_an_allowed_sender_is_still_a_virus(self):
        self.clamd.answer = b"stream: Eicar-Test-Signature FOUND\0"
        self.lists("allow", "partner@example.org")
        self.settle()
        reply = self.send_message(self.raw(), SIMPLE, sender="partner@example.org")
        self.assertEqual(reply[0], 250)
        doc = self.db["message"].find_one({"sender": "partner@example.org"})
        self.assertEqual((doc["verdict"], doc["quarantine"]), ("virus", "virus"))
        self.assertEqual(self.down.messages, [])


class TestFilterWithPostfix(TestProxyWithPostfix):
    """mongo-filter as Postfix's smtpd_proxy_filter, with real clamd and spamd: every
    proxy test again (clean mail must pass exactly as in proxy mode), plus verdicts."""

    mode = "mongo-filter"

    def start_filter(self, *args, **kwargs):
        super().start_filter("--clamd", Clamd.get().address, "--spamd", Spamd.get().address,
                             *args, **kwargs)

    def test_clean_delivered_virus_quarantined_spam_rejected(self):
        self.start_filter("--spam-action", "reject")
        self.assertEqual(self.send(CLEAN), {})
        self.assertEqual(self.send(VIRUS_ATTACHED), {})
        with self.assertRaises(smtplib.SMTPDataError) as caught:
            self.send(SPAM)
        self.assertEqual(caught.exception.smtp_code, 554)
        [(_, delivered)] = self.postfix.delivered(1)
        self.assertTrue(self.added_by_postfix(delivered, CLEAN), delivered)
        verdicts = sorted((d["subject"], d["is_virus"], d["is_spam"]) for d in self.records())
        self.assertEqual(verdicts, [("attached", 1, 0), ("lunch", 0, 0), ("offer", 0, 1)])
        self.assertEqual(self.postfix.queue(), "Mail queue is empty")
        self.assertEqual(len(self.postfix.delivered(1)), 1)


class TestFilterLoad(FilterCase):

    def test_20_concurrent_sessions_of_mixed_mail(self):
        # 60 sessions' threads share this process's GIL with clamd and spamd busy on two
        # cores: the 2 s that tests of a stalled downstream use is not what is tested here.
        self.start_filter("--remote-timeout", "30")
        kinds = [("clean", CLEAN), ("virus", VIRUS_INLINE), ("spam", SPAM), ("attached", VIRUS_ATTACHED)]
        sent, errors = [], []

        def session(n):
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=120) as client:
                    for m in range(3):
                        kind, template = kinds[(n + m) % len(kinds)]
                        body = template.replace(b"Message-ID: <", f"Message-ID: <{n}-{m}-".encode(), 1)
                        client.sendmail("a@example.org", ["b@example.com"], body)
                        sent.append((kind, body))
            except Exception as exc:
                errors.append(exc)

        threads = [threading.Thread(target=session, args=(n,)) for n in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        self.assertEqual(errors, [])
        self.assertEqual(len(sent), 60)
        docs = {d["message_id"]: d for d in self.records()}
        self.assertEqual(len(docs), 60)
        expected = {"clean": (0, 0), "virus": (1, 0), "attached": (1, 0), "spam": (0, 1)}
        for kind, body in sent:
            message_id = body.split(b"Message-ID: <", 1)[1].split(b">", 1)[0].decode()
            doc = docs[message_id]
            self.assertEqual((doc["is_virus"], doc["is_spam"]), expected[kind], kind)
            self.assertEqual(doc["is_unchecked"], 0)
        delivered = sorted(self.down.messages)
        self.assertEqual(delivered, sorted(b + b".\r\n" for k, b in sent if k == "clean"))


###############################################################################
# Observability: metrics, statsd, health ######################################
###############################################################################

def raw_http(test, port, data, source="127.0.0.1"):
    """A socket to an HTTP server of mms's, with `data` sent (if any), closed at cleanup."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    test.addCleanup(sock.close)
    if data:
        sock.sendall(data)
    return sock


def http_answer(sock):
    """Everything the server sends until it closes (b"" if it closes unanswered)."""
    data = b""
    with contextlib.suppress(OSError):
        while chunk := sock.recv(65536):
            data += chunk
    return data


def scrape(port, path="/metrics"):
    """A real HTTP client: (status, text), and for /metrics {series: value}."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            status, text = answer.status, answer.read().decode()
    except urllib.error.HTTPError as error:
        status, text = error.code, error.read().decode()
    if path != "/metrics":
        return status, text, {}
    series = dict(line.rsplit(" ", 1) for line in text.splitlines()
                  if line and not line.startswith("#"))
    return status, text, {name: float(value) for name, value in series.items()}


class TestMetrics(MongoCase):
    """--metrics: what a Prometheus scrape sees matches what the test sent."""

    def start_metrics(self, *args, uri=None):
        self.start_mongo(*args, uri=uri)
        self.server.mode.store.contacted.wait()
        self.metrics_port = free_port()
        self.server.cfg.metrics = f"127.0.0.1:{self.metrics_port}"
        http = mms.MetricsServer(self.server.cfg, self.server.metrics, self.server)
        self.addCleanup(http.server_close)
        self.addCleanup(http.shutdown)

    def test_counters_match_what_was_sent(self):
        cable = Cable(self.uri)
        self.addCleanup(cable.close)
        self.start_metrics("--data-size-limit", "1000", "--allow", "127.0.0.1",
                           uri=f"mongodb://127.0.0.1:{cable.port}/?directConnection=true")
        client = self.raw()
        for _ in range(3):
            self.assertReply(self.send_message(client, SIMPLE), "queued")
        self.assertReply(self.send_message(client, b"Subject: big\r\n\r\n" + b"x" * 2000 + b"\r\n"),
                         "too_big")
        with self.assertLogs("mms", "WARNING"):
            stranger = Raw(self.port, source="127.0.0.2")
            self.addCleanup(stranger.close)
            self.assertReply(stranger.reply(), "access_denied")
        self.assertEqual(scrape(self.metrics_port, "/healthz")[:2], (200, "ok\n"))
        cable.cut()
        with self.assertLogs("mms", "ERROR"):
            self.assertReply(self.send_message(client, SIMPLE), "not_stored")
        status, text, values = scrape(self.metrics_port)
        self.assertEqual(status, 200)
        self.assertEqual(values['mms_connections_total{result="served"}'], 1)
        self.assertEqual(values['mms_connections_total{result="refused_allow"}'], 1)
        self.assertEqual(values['mms_messages_total{result="stored"}'], 3)
        self.assertEqual(values['mms_messages_total{result="too_big"}'], 1)
        self.assertEqual(values['mms_messages_total{result="tempfail"}'], 1)
        self.assertEqual(values["mms_received_bytes_total"], 4 * len(SIMPLE))
        self.assertEqual(values["mms_store_seconds_count"], 4)
        self.assertEqual(values['mms_store_seconds_bucket{le="+Inf"}'], 4)
        self.assertEqual(values["mms_store_errors_total"], 1)
        self.assertEqual(values["mms_sessions_active"], 1)
        self.assertEqual(values["mms_mongodb_up"], 0)
        self.assertIn(f'mms_build_info{{version="{mms.__version__}",mode="mongo-quarantine"}} 1',
                      text)
        self.assertIn("# TYPE mms_store_seconds histogram", text)
        status, text, _ = scrape(self.metrics_port, "/healthz")
        self.assertEqual((status, text), (503, "MongoDB: the last contact failed\n"))
        cable.mend()
        self.assertReply(self.send_message(client, SIMPLE), "queued")
        self.assertEqual(scrape(self.metrics_port, "/healthz")[0], 200)

    def test_plugin_errors_by_plugin(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        name = "p" + uuid.uuid4().hex[:8] + "_failing"
        with open(os.path.join(folder, name + ".py"), "w") as f:
            f.write("def apply(metadata=None, data=None):\n    raise ValueError('no')\n")
        sys.path.insert(0, folder)
        self.addCleanup(sys.path.remove, folder)
        self.start_metrics("--plugin", name, "--plugin", "plugins.mark_bounces")
        with self.assertLogs("mms", "ERROR"):
            for _ in range(2):
                self.assertReply(self.send_message(self.raw(), SIMPLE), "queued")
        values = scrape(self.metrics_port)[2]
        self.assertEqual(values[f'mms_plugin_errors_total{{plugin="{name}"}}'], 2)
        self.assertEqual(values['mms_plugin_errors_total{plugin="plugins.mark_bounces"}'], 0)
        self.assertEqual(values['mms_messages_total{result="stored"}'], 2)


class TestMetricsHardening(ServerCase):
    """Scrapers share the process's file descriptors with SMTP: strangers, idle
    connections and endless headers never take them."""

    def start_metrics(self, *args):
        self.start(*args)
        self.metrics_port = free_port()
        self.server.cfg.metrics = f"127.0.0.1:{self.metrics_port}"
        http = mms.MetricsServer(self.server.cfg, self.server.metrics, self.server)
        self.addCleanup(http.server_close)
        self.addCleanup(http.shutdown)

    def raw_http(self, data, source="127.0.0.1"):
        return raw_http(self, self.metrics_port, data, source)

    answer = staticmethod(http_answer)

    def test_idle_connections_cannot_take_smtps_descriptors(self):
        self.start_metrics()
        idle = [self.raw_http(b"") for _ in range(mms.MetricsServer.CONNECTIONS + 20)]
        self.assertReply(self.send_message(self.raw(), SIMPLE), "queued")   # SMTP serves
        self.assertEqual(self.answer(idle[-1]), b"")     # over the cap: closed at once
        started = time.monotonic()
        for sock in idle[:mms.MetricsServer.CONNECTIONS]:
            self.assertEqual(self.answer(sock), b"")     # the read timeout frees the rest
        self.assertLess(time.monotonic() - started, mms.MetricsHandler.timeout + 3)
        deadline = time.monotonic() + 5   # each handler gives its slot back as it ends
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                self.assertEqual(scrape(self.metrics_port, "/healthz")[:2], (200, "ok\n"))
                break
            time.sleep(0.1)
        else:
            self.fail("no slot came back")

    def test_a_long_request_line_or_header_is_refused(self):
        self.start_metrics()
        long_line = self.answer(self.raw_http(b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n"))
        self.assertTrue(long_line.startswith(b"HTTP/1.0 414"), long_line[:80])
        headers = b"".join(b"X-%d: %s\r\n" % (n, b"v" * 1000) for n in range(99))
        long_head = self.answer(self.raw_http(b"GET /metrics HTTP/1.1\r\n" + headers + b"\r\n"))
        self.assertTrue(long_head.startswith(b"HTTP/1.0 431"), long_head[:80])
        self.assertEqual(scrape(self.metrics_port)[0], 200)

    def test_only_metrics_allow_may_scrape(self):
        self.start_metrics("--metrics-allow", "127.0.0.2")
        with self.assertRaises(OSError):  # refused: the connection is closed unanswered
            scrape(self.metrics_port)
        stranger = self.answer(self.raw_http(b"GET /metrics HTTP/1.0\r\n\r\n"))
        self.assertEqual(stranger, b"")
        allowed = self.answer(self.raw_http(b"GET /healthz HTTP/1.0\r\n\r\n", "127.0.0.2"))
        self.assertTrue(allowed.startswith(b"HTTP/1.0 200"), allowed[:80])

    def test_beyond_loopback_without_an_allow_list_is_warned(self):
        self.start()
        cfg = self.server.cfg
        cfg.metrics = f"0.0.0.0:{free_port()}"
        with self.assertLogs("mms", "WARNING") as logs:
            http = mms.MetricsServer(cfg, self.server.metrics, self.server)
        self.addCleanup(http.server_close)
        self.addCleanup(http.shutdown)
        self.assertIn("--metrics-allow", logs.output[0])


class TestMetricsProcess(unittest.TestCase):
    """mms.py as supervisord runs it, with --metrics, --statsd and --workers."""

    def test_workers_are_summed_and_statsd_gets_the_same(self):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        udp.settimeout(5)
        self.addCleanup(udp.close)
        metrics_port = free_port()
        server = MmsProcess("--server", "debug", "--workers", "2", "--plugin", "plugins.mark_bounces",
                            "--metrics", f"127.0.0.1:{metrics_port}",
                            "--statsd", f"127.0.0.1:{udp.getsockname()[1]}")
        self.addCleanup(server.stop)
        wait_port(metrics_port)
        for _ in range(10):
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
                client.sendmail("a@example.org", ["b@example.com"], SIMPLE)
        _, text, values = scrape(metrics_port)
        self.assertEqual(values['mms_messages_total{result="printed"}'], 10)
        self.assertEqual(values['mms_messages_total{result="stored"}'], 0)   # debug stores none
        self.assertEqual(values["mms_received_bytes_total"], 10 * len(SIMPLE))
        self.assertGreaterEqual(values['mms_connections_total{result="served"}'], 10)
        self.assertEqual(values['mms_plugin_errors_total{plugin="plugins.mark_bounces"}'], 0)
        self.assertNotIn("mms_mongodb_up", text)                # debug mode has no MongoDB
        self.assertEqual(scrape(metrics_port, "/healthz")[:2], (200, "ok\n"))
        # counters come summed over each 0.2 s, as statsd adds them up anyway
        lines, counted = [], collections.Counter()
        deadline = time.monotonic() + 5
        while counted["mms.messages.printed"] < 10 and time.monotonic() < deadline:
            for line in udp.recv(65536).decode().split("\n"):
                lines.append(line)
                name, _, value = line.partition(":")
                if value.endswith("|c"):
                    counted[name] += float(value[:-2])
        self.assertEqual(counted["mms.messages.printed"], 10)
        self.assertNotIn("mms.messages.stored", counted)
        self.assertEqual(counted["mms.received_bytes"], 10 * len(SIMPLE))
        self.assertTrue(any(line.startswith("mms.sessions_active:") and line.endswith("|g")
                            for line in lines))


    def test_healthz_says_503_while_workers_drain(self):
        metrics_port = free_port()
        server = MmsProcess("--server", "debug", "--workers", "2", "--grace", "5",
                            "--metrics", f"127.0.0.1:{metrics_port}")
        self.addCleanup(server.stop)
        wait_port(metrics_port)
        self.assertEqual(scrape(metrics_port, "/healthz")[0], 200)
        client = Raw(server.port)
        self.addCleanup(client.close)
        client.reply()
        client.cmd("EHLO c.test")
        client.cmd("MAIL FROM:<a@example.org>")
        client.cmd("RCPT TO:<b@example.com>")
        self.assertEqual(client.cmd("DATA")[0], 354)   # a transaction keeps the drain going
        server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while scrape(metrics_port, "/healthz")[0] == 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(scrape(metrics_port, "/healthz")[:2],
                         (503, "not accepting connections: stopping\n"))
        client.send(SIMPLE + b".\r\n")
        self.assertEqual(client.reply()[0], 250)

###############################################################################
# The archive commands ########################################################
###############################################################################

class ArchiveCase(MongoCase):
    """Four stored messages, and the archive commands to run on them."""

    def setUp(self):
        super().setUp()
        self.start_mongo()
        client = self.raw()
        self.keys = []
        for n, (sender, rcpt) in enumerate([("a@x.org", "b@y.com"), ("c@x.org", "d@y.com"),
                                            ("a@x.org", "e@z.com"), ("", "f@y.com")]):
            body = f"Subject: Msg {n}\r\nMessage-ID: <m{n}@x.org>\r\n\r\nbody {n}\r\n".encode()
            self.keys.append(self.key(self.send_message(client, body, sender, (rcpt,))))
            time.sleep(0.01)  # newest first, by received

    def tapped(self, **hooks):
        """(a WireTap before this test's MongoDB, the URI that goes through it), for
        a command or an archive to be asked through; the server is left as it is."""
        tap = WireTap(self.uri, **hooks)
        self.addCleanup(tap.close)
        return tap, f"mongodb://127.0.0.1:{tap.port}/?directConnection=true"

    def mms(self, *args, uri=None):
        """The command in this process (as `mms.py` runs it after parsing): many
        commands a test, without starting Python each time."""
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                cfg = mms.parse_config([*args, "--mongo-host", uri or self.uri,
                                        "--mongo-database", self.dbname])
                code = mms.run_archive_command(cfg)
            except mms.MMSError as exc:     # as main() says it
                print(f"mms.py: error: {exc}", file=sys.stderr)
                code = exc.exit_status
        return code, out.getvalue().strip(), err.getvalue().strip()


class TestArchiveCommands(ArchiveCase):
    """Search, keys by prefix, delete, hold and purge, as an administrator runs them."""

    def test_export_as_eml_needs_a_folder(self):
        code, out, err = self.command_line("export", "--format", "eml")
        self.assertEqual((code, out), (1, ""))
        self.assertIn("export --format eml needs --output DIR, an existing directory", err)

    def test_count_and_list_take_the_same_filters(self):
        for args, expected in [((), 4), (("--sender", "a@x.org"), 2), (("--sender", "@X.org"), 3),
                               (("--sender", "<>"), 1), (("--rcpt", "@y.com"), 3),
                               (("--rcpt", "d@y.com"), 1), (("--subject", "MSG 2"), 1),
                               (("--message-id", "<m3@x.org>"), 1), (("--since", "1h"), 4),
                               (("--since", "30m"), 4), (("--until", "2w"), 0),
                               (("--until", "1h"), 0), (("--since", "2000-01-01"), 4),
                               (("--client", "127.0.0.0/8"), 4), (("--client", "127.0.0.1"), 4),
                               (("--client", "192.0.2.0/24"), 0), (("--held",), 0),
                               (("--released",), 0), (("--virus",), 0)]:
            with self.subTest(args=args):
                self.assertEqual(self.mms("count", *args), (0, str(expected), ""))
                code, out, _ = self.mms("list", "--limit", "100", *args)
                self.assertEqual(len(out.splitlines()) if out else 0, expected, out)
        self.assertIn(self.keys[2], self.command_line("list", "--rcpt", "e@z.com")[1])
        self.assertEqual(self.command_line("count", "--sender", "@x.org"), (0, "3", ""))
        self.assertEqual(self.command_line("count", "--client", "not-an-ip")[0], 2)

    def test_list_newest_first(self):
        lines = self.command_line("list")[1].splitlines()
        self.assertEqual([line.split()[0] for line in lines], self.keys[::-1])   # key first
        self.assertIn("'Msg 3'", lines[0])
        docs = [json.loads(line) for line in
                self.command_line("list", "--sender", "A@x.org", "--json")[1].splitlines()]
        self.assertEqual([d["store_key"] for d in docs], [self.keys[2], self.keys[0]])
        self.assertEqual(len(self.command_line("list", "--limit", "1")[1].splitlines()), 1)

    def test_no_control_character_reaches_the_terminal(self):
        """A sender's escape sequences in a stored field are printed as \\xNN; --json
        stays JSON, with them escaped as JSON does."""
        evil = "\x1b]0;owned\x07\x1b[2J\x9b31m"
        self.db["message"].insert_one({"store_key": "c" * 64, "sender": f"x{evil}@y.org",
                                       "rcpt": [f"r{evil}@y.org"], "subject": f"s{evil}",
                                       "received": datetime.datetime.now(datetime.timezone.utc)})
        for args in (("list",), ("stats", "--by", "sender"), ("stats", "--by", "rcpt"),
                     ("list", "--json"), ("stats", "--json", "--by", "rcpt")):
            with self.subTest(args=args):
                code, out, err = self.command_line(*args)
                self.assertEqual(code, 0, err)
                self.assertIsNone(re.search(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]", out), repr(out))
                if "--json" in args:
                    text = json.dumps([json.loads(line) for line in out.splitlines()])
                    self.assertIn(json.dumps(evil)[1:-1], text)
                else:
                    self.assertIn("\\x1b]0;owned\\x07\\x1b[2J\\x9b31m", out)

    def test_documents_written_by_another_tool(self):
        self.db["message"].insert_many([{"note": "no mms fields at all"},
                                        {"store_key": "k" * 64, "received": "yesterday",
                                         "rcpt": "not-a-list", "size": "big"}])
        code, out, err = self.command_line("list")
        self.assertEqual(code, 0, err)
        self.assertEqual(len(out.splitlines()), 6, out)
        self.assertTrue(any(line.startswith("k" * 64 + " yesterday") for line in out.splitlines()))

    def test_unreachable_mongodb(self):
        done = subprocess.run([sys.executable, MMS, "count", "--mongo-host",
                               f"mongodb://127.0.0.1:{free_port()}/", "--mongo-timeout", "0.5"],
                              capture_output=True, text=True, timeout=60)
        self.assertEqual(done.returncode, 1)
        self.assertEqual(len(done.stderr.splitlines()), 1, done.stderr)
        self.assertIn("cannot read the archive", done.stderr)

    def test_keys_by_unique_prefix(self):
        code, out, _ = self.command_line("show", self.keys[1][:8])
        self.assertEqual((code, out), (0, "Subject: Msg 1\nMessage-ID: <m1@x.org>\n\nbody 1"))
        self.assertEqual(self.command_line("headers", self.keys[1]),
                         (0, "Subject: Msg 1\nMessage-ID: <m1@x.org>", ""))
        self.assertEqual(self.command_line("show", self.keys[1][:7])[0], 1)
        twins = ["abcdef01" + "0" * 56, "abcdef01" + "1" * 56]
        self.db["message"].insert_many([{"store_key": key} for key in twins])
        code, _, err = self.command_line("headers", "abcdef01")
        self.assertEqual(code, 1)
        self.assertIn("ambiguous", err)
        self.assertTrue(all(key in err for key in twins), err)
        self.assertIn("no message with store_key", self.command_line("show", "fedcba98")[2])

    def test_delete_and_hold(self):
        doc = self.db["message"].find_one({"store_key": self.keys[0]})
        self.assertEqual(self.mms("hold", self.keys[0][:10])[0], 0)
        code, _, err = self.mms("delete", self.keys[0])
        self.assertEqual(code, 1)
        self.assertIn("is on legal hold: `mms.py unhold` it first", err)
        self.assertEqual(self.mms("count", "--held"), (0, "1", ""))
        self.assertEqual(self.mms("unhold", self.keys[0])[0], 0)
        self.assertEqual(self.mms("delete", self.keys[0])[:2], (0, f"deleted {self.keys[0]}"))
        self.assertIsNone(self.db["message"].find_one({"store_key": self.keys[0]}))
        self.assertEqual(list(self.db["fs.files"].find({"_id": doc["message"]})), [])
        self.assertEqual(list(self.db["fs.chunks"].find({"files_id": doc["message"]})), [])
        self.assertEqual(self.mms("count"), (0, "3", ""))

    def test_purge_leaves_what_is_new_or_held(self):
        old = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
        for key in self.keys[:3]:  # replace_one: nx-27017 stores a $set datetime as a string
            doc = self.db["message"].find_one({"store_key": key})
            self.db["message"].replace_one({"_id": doc["_id"]}, {**doc, "received": old})
        self.mms("hold", self.keys[2])
        code, out, _ = self.mms("purge", "--older-than", "90d", "--dry-run")
        self.assertTrue(out.startswith("would purge 2 message(s)"), out)
        self.assertEqual(self.mms("count"), (0, "4", ""))
        code, out, _ = self.mms("purge", "--older-than", "90d")
        self.assertTrue(out.startswith("purged 2 message(s)"), out)
        self.assertEqual(sorted(d["store_key"] for d in self.db["message"].find()),
                         sorted(self.keys[2:]))
        files = {f["filename"] for f in self.db["fs.files"].find({}, {"filename": 1})}
        self.assertEqual(files, set(self.keys[2:]))
        self.assertTrue(self.mms("purge", "--older-than", "90d")[1].startswith("purged 0"))
        self.assertEqual(self.mms("purge")[0], 1)


class TestRelease(MongoCase):
    """`mms.py release`: a kept message sent on through a real Postfix smtpd."""

    def setUp(self):
        super().setUp()
        self.postfix = Postfix.get().emptied()
        self.start_mongo("--real-rcpt")

    def release(self, *args):
        done = self.archive_command("release", *args, "--via", f"127.0.0.1:{self.postfix.after}",
                                    timeout=120)
        return done.returncode, done.stdout.strip(), done.stderr.strip()

    def test_release_to_the_real_recipients_once(self):
        key = self.key(self.send_message(self.raw(), TestRealRcpt.AMAVIS, sender="sender@example.org",
                                         rcpts=("virus-quarantine@example.net",)))
        code, _, err = self.release(key[:12])
        self.assertEqual(code, 1)                         # a virus: only when asked
        self.assertIn("holds a virus: --force to release it all the same", err)
        self.assertEqual(self.postfix.delivered(0), [])
        code, out, err = self.release(key[:12], "--force")
        self.assertEqual(code, 0, err)
        self.assertIn("to alice@example.com, bob@example.com, carol@example.com via 127.0.0.1:", out)
        [(metadata, delivered)] = self.postfix.delivered(1)
        self.assertEqual((metadata["sender"], metadata["rcpt"]),
                         ("sender@example.org",
                          ["alice@example.com", "bob@example.com", "carol@example.com"]))
        head, body = TestRealRcpt.AMAVIS.split(b"\r\n\r\n")
        for field in (b"X-Envelope-", b"X-Quarantine-ID", b"X-Amavis-Alert", b"X-MMS-RCPT"):
            self.assertNotIn(field, delivered)    # the quarantine's own fields stay behind
        self.assertIn(head[head.index(b"Subject:"):], delivered)   # the sender's, as sent
        self.assertTrue(delivered.endswith(b"\r\n\r\n" + body), delivered[-200:])
        [record] = self.db["message"].find_one({"store_key": key})["released"]
        self.assertEqual((record["via"], record["reply"][:3]),
                         (f"127.0.0.1:{self.postfix.after}", "250"))
        self.assertIsInstance(record["at"], datetime.datetime)
        code, _, err = self.release(key)
        self.assertEqual(code, 1)
        self.assertIn("--force to release it", err)       # a virus, released already
        self.assertEqual(self.release(key, "--force", "--to", "dave@example.com")[0], 0)
        self.assertEqual(self.postfix.delivered(2)[1][0]["rcpt"], ["dave@example.com"])
        self.assertEqual(len(self.db["message"].find_one({"store_key": key})["released"]), 2)

    def test_a_refused_recipient_is_printed_and_exits_1(self):
        key = self.key(self.send_message(self.raw(), SIMPLE))
        code, out, _ = self.release(key, "--to", "refused@example.com", "--to", "ok@example.com")
        self.assertEqual(code, 1)
        self.assertIn("refused@example.com: 550 5.1.1", out)
        self.assertEqual(self.postfix.delivered(1)[0][0]["rcpt"], ["ok@example.com"])


class TestStats(ArchiveCase):
    """`mms.py stats`: every number checked against the stored documents."""

    def stats(self, *args):
        code, out, err = self.mms("stats", "--json", *args)
        self.assertEqual(code, 0, err)
        return json.loads(out)

    def test_totals_and_groups_match_the_documents(self):
        self.db["message"].insert_one({"store_key": "v" * 64, "sender": "a@x.org",
                                       "rcpt": ["b@y.com"], "size": 7, "is_virus": 1,
                                       "received": datetime.datetime.now(datetime.timezone.utc)})
        self.db["message"].insert_one({"store_key": "b" * 64, "sender": "a@x.org",  # banned
                                       "rcpt": ["b@y.com"], "size": 9, "is_banned": 1,
                                       "is_spam": 1, "quarantine": "banned",
                                       "received": datetime.datetime.now(datetime.timezone.utc)})
        docs = self.records()
        result = self.stats("--by", "sender")
        self.assertEqual(result["totals"], {"messages": 6, "bytes": sum(d["size"] for d in docs),
                                            "virus": 1, "banned": 1, "spam": 1, "unchecked": 0,
                                            "allowed": 0, "blocked": 0})
        self.assertEqual({g["group"]: g["messages"] for g in result["groups"]},
                         {"a@x.org": 4, "c@x.org": 1, "<>": 1})
        self.assertEqual(result["groups"][0]["bytes"],
                         sum(d["size"] for d in docs if d["sender"] == "a@x.org"))
        self.assertEqual({g["group"]: g["messages"] for g in self.stats("--by", "rcpt-domain")["groups"]},
                         {"y.com": 5, "z.com": 1})
        self.assertEqual({g["group"]: g["messages"] for g in self.stats("--by", "sender-domain")["groups"]},
                         {"x.org": 5, "-": 1})
        self.assertEqual({g["group"]: g["messages"] for g in self.stats("--by", "verdict")["groups"]},
                         {"clean": 4, "virus": 1, "banned": 1})   # banned before spam
        today = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d}"
        self.assertEqual(self.stats("--by", "day")["groups"],
                         [{"group": today, "messages": 6, "bytes": result["totals"]["bytes"]}])
        code, out, _ = self.command_line("list", "--sender", "a@x.org")
        self.assertIn(f"{'b' * 64} ", out)
        self.assertIn("[banned]", out)
        self.assertEqual(len(self.stats("--by", "rcpt", "--top", "2")["groups"]), 2)

    def test_a_time_range(self):
        old = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
        doc = self.db["message"].find_one({"store_key": self.keys[0]})
        self.db["message"].replace_one({"_id": doc["_id"]}, {**doc, "received": old})
        self.assertEqual(self.stats("--since", "7d")["totals"]["messages"], 3)
        self.assertEqual(self.stats("--until", "7d")["totals"]["messages"], 1)
        self.assertEqual(self.stats("--since", "2019-12-31", "--until", "2020-01-02")["totals"]
                         ["bytes"], doc["size"])
        code, out, _ = self.command_line("stats", "--by", "client")
        self.assertEqual(code, 0)
        self.assertEqual(out.splitlines()[0], "messages 4, bytes "
                         f"{sum(d['size'] for d in self.records())}, virus 0, banned 0, spam 0, "
                         f"unchecked 0, allowed 0, blocked 0")
        self.assertTrue(out.splitlines()[1].split()[-1] == "127.0.0.1", out)


class TestContentSearch(ArchiveCase):
    """--text, the attachment filters and --bounce, on messages whose answers are
    known, and each asked in the form its index serves, read off the wire."""

    def setUp(self):
        super().setUp()
        client = self.raw()
        self.found = {}
        mails = {
            "html": mime(b"Content-Type: text/plain\r\n\r\nnothing here",
                         b"Content-Type: text/html\r\n\r\n<p>meet in <b>Zanzibar</b></p>",
                         kind="alternative", head=b"Subject: trip\r\n"),
            "named": mime(b"Content-Type: text/plain\r\n\r\nsee attached",
                          attachment(b'filename="Quarterly.PDF"', b"%PDF same", b"application/pdf"),
                          head=b"Subject: figures\r\n"),
            "same-file": mime(attachment(b'filename="copy.pdf"', b"%PDF same",
                                         b"application/pdf"), head=b"Subject: again\r\n"),
            "phrase": b"Subject: payment\r\n\r\nplease send the wire transfer today\r\n",
            "words": b"Subject: payment\r\n\r\ntransfer the wire to me\r\n",
            "invoice": b"Subject: invoice\r\n\r\nyour invoice is attached\r\n",
            "danish": "Subject: film\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
                      "Døden er et kjærtegn\r\n".encode(),
            "draft": b"Subject: invoice draft\r\n\r\nthe invoice, a draft\r\n",
        }
        for name, body in mails.items():
            self.found[name] = self.key(self.send_message(client, body, "s@example.org",
                                                          ("r@example.com",)))
        self.bounce = self.key(self.send_message(client, SIMPLE, "", ("r@example.com",)))

    def listed(self, *args):
        code, out, err = self.mms("list", "--limit", "0", *args)
        self.assertEqual(code, 0, err)
        return {self.name(line.split()[0]) for line in out.splitlines()}

    def name(self, key):
        return next((n for n, k in self.found.items() if k == key), key)

    def test_words_phrases_and_negation(self):
        self.assertEqual(self.listed("--text", "zanzibar"), {"html"})      # only in the HTML
        self.assertEqual(self.listed("--text", "quarterly.pdf"), {"named"})  # an attachment's name
        self.assertEqual(self.listed("--text", '"wire transfer"'), {"phrase"})
        self.assertEqual(self.listed("--text", "wire transfer"), {"phrase", "words"})  # each word
        self.assertEqual(self.listed("--text", "invoice -draft"), {"invoice"})
        self.assertEqual(self.listed("--text", "invoice", "--sender", "@example.org",
                                   "--since", "1h"), {"invoice", "draft"})
        self.assertEqual(self.listed("--text", "zanzibar", "--until", "1h"), set())
        self.assertEqual(self.listed("--text", "døden"), {"danish"})   # a word is all of it:
        self.assertEqual(self.listed("--text", "den"), set())        # \w is ASCII on MongoDB
        code, _, err = self.mms("list", "--text=-draft")
        self.assertEqual(code, 1)
        self.assertIn("at least one word to find", err)

    def test_attachments_and_bounces(self):
        self.assertEqual(self.listed("--attachment", "*.pdf"), {"named", "same-file"})
        self.assertEqual(self.listed("--attachment", "Quarterly.PDF"), {"named"})
        self.assertEqual(self.listed("--attachment", "quart*"), {"named"})
        self.assertEqual(self.listed("--attachment-type", "Application/PDF"),
                         {"named", "same-file"})
        sha = hashlib.sha256(b"%PDF same").hexdigest()
        self.assertEqual(self.listed("--attachment-sha256", sha.upper()), {"named", "same-file"})
        self.assertEqual(self.listed("--bounce"), {self.bounce, self.keys[3]})  # both from <>
        code, out, _ = self.mms("stats", "--by", "attachment-type")
        self.assertIn(f"{2:>10} {18:>14} application/pdf", out.splitlines())

    def test_each_filter_is_asked_as_its_index_serves_it(self):
        tap = WireTap(self.uri)
        self.addCleanup(tap.close)
        uri = f"mongodb://127.0.0.1:{tap.port}/?directConnection=true"
        table = {
            ("--text", 'invoice "wire transfer"'): {
                "$text": {"$search": "transfer"},       # its longest word, then each term
                "text": {"$regex": "(?i)^(?=(?:[^ ]* )*?(?<![^ ])invoice(?![^ ]))"
                                   "(?=(?:[^ ]* )*?(?<![^ ])wire transfer(?![^ ]))"}},
            ("--text", "invoice -draft", "--sender", "@example.org"): {   # no $and, $or
                "$text": {"$search": "invoice"}, "sender_domain": {   # or $nor
                    "$gte": "example.org", "$lte": "example.org"},
                "text": {"$regex": "(?i)^(?=(?:[^ ]* )*?(?<![^ ])invoice(?![^ ]))"
                                   "(?!(?:[^ ]* )*?(?<![^ ])draft(?![^ ]))"}},
            ("--text", "invoice"): {"$text": {"$search": "invoice"},
                                    "text": {"$regex": "(?i)(?<![^ ])invoice(?![^ ])"}},
            ("--attachment", "*.PDF"): {"files": {"$elemMatch": {"ext": "pdf"}}},
            ("--attachment", "Quarterly.PDF"): {"files": {"$elemMatch": {
                "filename": "Quarterly.PDF"}}},
            ("--attachment-type", "application/pdf"): {"files": {"$elemMatch": {
                "content_type": "application/pdf"}}},
            ("--attachment-sha256", "AB" * 32): {"files": {"$elemMatch": {"sha256": "ab" * 32}}},
            ("--bounce",): {"is_bounce": 1},
        }
        for args, expected in table.items():
            with self.subTest(args):
                self.mms("list", *args, uri=uri)
                find = tap.sent("find", "message")[-1]
                self.assertEqual(find["filter"], expected)
                self.assertEqual(find["projection"], {"text": 0})   # the words stay there
        self.mms("list", "--text", "invoice", "--sort", "score", uri=uri)
        find = tap.sent("find", "message")[-1]
        self.assertEqual(find["sort"], {"score": {"$meta": "textScore"}})
        self.assertEqual(find["projection"], {"text": 0})      # every field comes back
        self.assertEqual(self.listed("--text", "invoice", "--sort", "score"),
                         {"invoice", "draft"})
        self.assertEqual(self.mms("list", "--sort", "score")[:2], (1, ""))  # it needs --text

    def test_a_text_search_stops_at_its_since_rather_than_asking_it(self):
        """Newest first, since is where reading a $text search's matches stops: the
        text index serves neither the date nor the order, and nx-27017 reads every
        message for a $text beside a date."""
        draft = self.db["message"].find_one_and_delete({"store_key": self.found["draft"]})
        draft["received"] = datetime.datetime.now(mms.UTC) - datetime.timedelta(days=2)
        self.db["message"].insert_one(draft)   # a $set of a date: a string on nx-27017
        tap, uri = self.tapped()
        for since, found in (("1d", ["invoice"]), ("3d", ["invoice", "draft"])):
            code, out, _ = self.mms("list", "--text", "invoice", "--since", since, "--limit",
                                    "5", uri=uri)
            self.assertEqual([self.name(line.split()[0]) for line in out.splitlines()], found)
            find = tap.sent("find", "message")[-1]
            self.assertNotIn("received", str(find["filter"]))
            self.assertEqual((find["sort"], find["limit"]), ({"received": -1}, 5))
        code, out, _ = self.mms("count", "--text", "invoice", "--since", "1d", uri=uri)
        self.assertEqual(out, "1")

    def test_atlas_search_is_asked_a_search_stage_first(self):
        """No mongot can run here: the stage is read off the wire, and the answer is
        written as Atlas Search would give it (the message that holds the word)."""
        doc = self.db["message"].find_one({"store_key": self.found["invoice"]}, {"text": 0})

        def reply(command, answer):
            if command.get("aggregate") == "message" and "$search" in command["pipeline"][0]:
                last = command["pipeline"][-1]
                batch = [{"n": 1}] if "$count" in last else [doc]
                return {"cursor": {"firstBatch": batch, "id": 0,
                                   "ns": f"{self.dbname}.message"}, "ok": 1.0}

        tap = WireTap(self.uri, reply=reply)
        self.addCleanup(tap.close)
        uri = f"mongodb://127.0.0.1:{tap.port}/?directConnection=true"
        code, out, err = self.mms("list", "--text", "invoice", "--text-search", "atlas",
                                  uri=uri)
        self.assertEqual((code, out.split()[0]), (0, self.found["invoice"]), err)
        [pipeline] = [c["pipeline"] for c in tap.sent("aggregate", "message")]
        self.assertEqual(pipeline[0], {"$search": {"index": "mms_words", "text": {
            "query": "invoice", "path": ["subject", "text"]}}})
        self.assertEqual(pipeline[1], {"$match": {"text": mms.term_found(["invoice"])}})
        self.assertEqual(pipeline[2:], [{"$sort": {"received": -1}}, {"$limit": 20},
                                        {"$project": {"text": 0}}])
        self.assertEqual(self.mms("count", "--text", "invoice", "--text-search", "atlas",
                                  uri=uri), (0, "1", ""))
        self.assertEqual(tap.sent("aggregate", "message")[-1]["pipeline"][-1], {"$count": "n"})
        self.assertEqual(tap.sent("find", "message"), [])

    def test_the_console_and_the_api_search_the_same(self):
        cfg = mms.parse_config(["web", "--mongo-host", self.uri, "--mongo-database", self.dbname])
        archive = mms.Archive(cfg, max_time_ms=mms.WEB_QUERY_MS).connect()
        self.addCleanup(archive.close)
        query = mms.Filters.parse({"text": "zanzibar", "attachment": "", "bounce": ""}).query()
        self.assertEqual([d["store_key"] for d in archive.search(query)], [self.found["html"]])
        form = mms.search_form({"text": "zanzibar"})
        for name in ("text", "attachment", "attachment_type", "attachment_sha256", "bounce"):
            self.assertIn(f'name="{name}"', form)
        self.assertIn('value="zanzibar"', form)
        self.server.mode.store.tally.flush()
        top = mms.dashboard_data(archive)["top"]["attachment-type"]
        self.assertEqual(top[0], {"group": "application/pdf", "messages": 2})
        self.assertIn("Top attachment types", mms.render_dashboard(mms.dashboard_data(archive)))


class TestCheck(MongoCase):
    """`mms.py check`, as Nagios or a HEALTHCHECK runs it: one line, exit 0 or 2."""

    def check(self, *args, uri=None):
        started = time.monotonic()
        done = self.archive_command("check", "--port", str(self.port), "--mongo-timeout", "2",
                                    *args, uri=uri)
        self.assertEqual(len(done.stdout.splitlines()), 1, done.stdout + done.stderr)
        return done.returncode, done.stdout.strip(), time.monotonic() - started

    def test_quarantine_probe_goes_in_and_is_deleted(self):
        self.start_mongo()
        code, out, _ = self.check("--server", "mongo-quarantine")
        self.assertEqual(code, 0, out)
        self.assertRegex(out, r"^OK: probe [0-9a-f]{12} stored in MongoDB and deleted$")
        self.assertEqual(self.records(), [])
        self.assertEqual(list(self.db["fs.files"].find()), [])

    def test_critical_when_mongodb_or_mms_is_down(self):
        self.start_mongo()
        code, out, took = self.check("--server", "mongo-quarantine",
                                     uri=f"mongodb://127.0.0.1:{free_port()}/")
        self.assertEqual(code, 2)
        self.assertTrue(out.startswith("CRITICAL: "), out)
        self.assertLess(took, 2 + 3)   # --mongo-timeout, and Python's start
        self.server.shutdown()
        self.server.server_close()
        code, out, _ = self.check("--server", "mongo-quarantine")
        self.assertEqual(code, 2)
        self.assertIn(f"mms at 127.0.0.1:{self.port}", out)

    def test_debug_mode(self):
        self.mode = "debug"
        self.start()
        self.assertEqual(self.check("--server", "debug")[:2],
                         (0, f"OK: mms at port {self.port} answers (250)"))

    def test_filter_mode_asks_every_peer_and_relays_nothing(self):
        down = ScriptedDownstream()
        self.addCleanup(down.close)
        clamd, spamd = FakeScanner(answer=b"PONG\0"), FakeScanner(answer=b"SPAMD/1.5 0 PONG\r\n")
        for fake in (clamd, spamd):
            self.addCleanup(fake.close)
        self.mode = "mongo-filter"
        spool = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, spool)
        peers = ("--server", "mongo-filter", "--remote-port", str(down.server_address[1]),
                 "--spool-dir", spool, "--clamd", clamd.address, "--spamd", spamd.address)
        self.start_mongo(*peers[2:])
        code, out, _ = self.check(*peers)
        self.assertEqual((code, out), (0, f"OK: mms, MongoDB, downstream 127.0.0.1:"
                                          f"{down.server_address[1]}, clamd, spamd answer"))
        self.assertNotIn("MAIL", " ".join(down.commands))
        clamd.answer = b"stream: OK\0"
        code, out, _ = self.check(*peers)
        self.assertEqual(code, 2)
        self.assertIn("clamd", out)
        down.close()
        self.assertEqual(self.check(*peers)[0], 2)


class TestCheckInstances(MongoCase):
    """Two instances on one host (a quarantine and another, each with its own
    MongoDB database): `check` without --port asks the one whose MongoDB it is given,
    and says which to name when it cannot tell."""

    def test_check_asks_the_instance_of_its_mongodb(self):
        state_dir = tempfile.mkdtemp(prefix="mms-state-")
        self.addCleanup(shutil.rmtree, state_dir)
        env = {"TMPDIR": state_dir}
        instances = {}
        for name in ("archive_a", "archive_b"):
            process = MmsProcess("--mongo-host", self.uri, "--mongo-database", name, env=env)
            self.addCleanup(process.stop)
            instances[name] = process
        deadline = time.monotonic() + 15
        while len(os.listdir(state_dir)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)

        def check(database):
            done = subprocess.run([sys.executable, MMS, "check", "--mongo-host", self.uri,
                                   "--mongo-database", database, "--mongo-timeout", "5"],
                                  capture_output=True, text=True, timeout=60,
                                  env={**os.environ, **env})
            return done.returncode, done.stdout.strip()
        for name in instances:
            code, out = check(name)
            self.assertEqual(code, 0, out)
            self.assertRegex(out, r"^OK: probe [0-9a-f]{12} stored in MongoDB and deleted$")
        code, out = check("archive_c")
        ports = sorted(p.port for p in instances.values())
        self.assertEqual((code, out), (3, f"UNKNOWN: 2 mms instances run here, on ports "
                                          f"{ports[0]} (mongo-quarantine), {ports[1]} "
                                          f"(mongo-quarantine), and none of them store into "
                                          f"{self.uri} archive_c.message: name one with --port"))
        instances["archive_b"].stop()                   # one runs: check asks that one
        self.assertEqual(check("archive_a")[0], 0)


def clauses(query):
    """A query's conditions, one a field, whether all_of put them at its top or in
    its $and (an $or, a second range of the same field)."""
    return [{key: value} for clause in [query, *query.get("$and", ())]
            for key, value in clause.items() if key != "$and"]


def old_messages(db_uri, dbname, count, when):
    """`count` messages written straight into the archive as mms writes them, received
    at `when`: an archive's years, without sending each one over SMTP."""
    cfg = mms.parse_config(["--mongo-host", db_uri, "--mongo-database", dbname])
    archive = mms.Archive(cfg).connect()
    keys = mms.StoreKeys()
    try:
        for start in range(0, count, 500):
            jobs = []
            for n in range(start, min(count, start + 500)):
                data = f"Subject: old {n}\r\n\r\nbody {n}\r\n".encode()
                metadata = {"store_key": keys(), "sender": "old@x.org", "rcpt": ["r@y.com"],
                            "client_address": "192.0.2.1", "received": when, "size": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()}
                jobs.append(archive.prepare(metadata, mms.Message(data)))
            archive.insert(jobs)
            assert all(job.error is None for job in jobs), jobs[0].error
    finally:
        archive.close()


class TestArchiveQueries(ArchiveCase):
    """The shapes of what the archive commands ask, read off the wire: each one a
    query an index serves on a real MongoDB, bounded, and batched."""

    def test_list_gives_its_limit_to_mongodb(self):
        tap, uri = self.tapped()
        code, out, _ = self.mms("list", "--limit", "3", "--sender", "@x.org", uri=uri)
        self.assertEqual(out.splitlines()[0].split()[0], self.keys[2])
        [find] = tap.sent("find", "message")
        self.assertEqual((find["limit"], find["sort"]), (3, {"received": -1}))
        self.assertEqual(len(out.splitlines()), 3)
        code, out, _ = self.mms("list", "--limit", "2", "--client", "127.0.0.0/8", uri=uri)
        self.assertEqual(len(out.splitlines()), 2)   # a CIDR is a range of client_hex
        find = tap.sent("find", "message")[-1]
        self.assertEqual(find["limit"], 2)
        self.assertEqual(find["filter"], {"client_hex": {
            "$gte": "00000000000000000000ffff7f000000", "$lte": "00000000000000000000ffff7fffffff"}})
        self.assertEqual(len(self.mms("list", "--limit", "0")[1].splitlines()), 4)  # 0: all

    def test_a_date_range_is_read_in_windows_of_time_from_its_edge(self):
        """A page of a date range asks for its first hour, then for windows as much
        wider as the rows found say, each one ending where the last began, the last
        one open: nx-27017 reads every message of a range before it limits. A rest
        shorter than the window is read with it. A count of a range reads the same
        way from a day."""
        edge = datetime.datetime(2024, 5, 1, tzinfo=mms.UTC)
        for ago, count in ((datetime.timedelta(minutes=10), 3), (datetime.timedelta(hours=5), 2),
                           (datetime.timedelta(days=20), 2), (datetime.timedelta(days=1000), 1)):
            old_messages(self.uri, self.dbname, count, edge - ago)
        tap, uri = self.tapped()
        archive = mms.Archive(mms.parse_config(["--mongo-host", uri, "--mongo-database",
                                                self.dbname])).connect()
        self.addCleanup(archive.close)
        older = {"sender": "old@x.org", "received": {"$lt": edge}}
        docs = list(archive.search(older, limit=20))
        self.assertEqual([doc["received"] for doc in docs], sorted(
            [edge - datetime.timedelta(minutes=10)] * 3 + [edge - datetime.timedelta(hours=5)] * 2
            + [edge - datetime.timedelta(days=20)] * 2 + [edge - datetime.timedelta(days=1000)],
            reverse=True))
        finds = tap.sent("find", "message")
        windows = [find["filter"]["$and"][0]["received"] for find in finds[:-1]]
        edge = edge.replace(tzinfo=None)                       # as the wire gives it back
        self.assertEqual(windows[0], {"$gte": edge - datetime.timedelta(hours=1)})
        for newer, window in zip(windows, windows[1:]):
            self.assertEqual(window["$lt"], newer["$gte"])
        self.assertEqual(finds[-1]["filter"]["$and"][0]["received"], {"$lt": windows[-1]["$gte"]})
        self.assertLessEqual(len(finds), mms.Archive.WINDOWS_MAX)
        self.assertEqual([find["limit"] for find in finds[:3]], [20, 20 - 3, 20 - 3 - 2])
        tap.commands.clear()
        self.assertEqual(len(list(archive.search(older, limit=3))), 3)
        self.assertEqual(len(tap.sent("find", "message")), 1)   # the first hour held them
        tap.commands.clear()
        ends = older["received"]["$lt"]                      # 1 hour, and the 30 minutes before
        self.assertEqual(len(list(archive.search({**older, "received": {
            "$lt": ends, "$gte": ends - datetime.timedelta(minutes=90)}}, limit=20))), 3)
        [find] = tap.sent("find", "message")
        self.assertEqual(find["filter"]["received"], {
            "$lt": edge, "$gte": edge - datetime.timedelta(minutes=90)})
        self.assertNotIn("$and", find["filter"])
        tap.commands.clear()
        self.assertEqual(archive.count(older, limit=4), 4)
        [find] = tap.sent("find", "message")                   # the first day held them
        self.assertEqual((find["projection"], find["limit"], find["filter"]["$and"]), (
            {"store_key": 1, "received": 1}, 4, [{"received": {"$gte": edge - mms.DAY}}]))

    def test_a_since_newest_first_is_where_reading_stops(self):
        """Newest first, a since is not asked of MongoDB: the query without it, newest
        first, in batches of at most SINCE_BATCH, read until a message older than it
        (nx-27017 reads every message for any date range). On MongoDB the same index
        keys, and at most the rest of a batch past the since."""
        now = datetime.datetime.now(mms.UTC).replace(microsecond=123456)
        old_messages(self.uri, self.dbname, 3, now - datetime.timedelta(minutes=10))
        old_messages(self.uri, self.dbname, 2, now - datetime.timedelta(hours=30))
        tap, uri = self.tapped()
        archive = mms.Archive(mms.parse_config(["--mongo-host", uri, "--mongo-database",
                                                self.dbname])).connect()
        self.addCleanup(archive.close)
        since = {"sender": "old@x.org", "received": {"$gte": now - mms.DAY}}
        self.assertEqual(len(list(archive.search(since, limit=20))), 3)
        [find] = tap.sent("find", "message")
        self.assertEqual((find["filter"], find["sort"], find["limit"]),
                         ({"sender": {"$gte": "old@x.org", "$lte": "old@x.org"}},
                          {"received": -1}, 20))
        self.assertEqual(find["batchSize"], 20 + 1)   # pymongo's: the limit in one batch
        tap.commands.clear()
        with mock.patch.object(mms.Archive, "SINCE_BATCH", 1):
            self.assertEqual(archive.count(since, limit=1001), 3)
        [find] = tap.sent("find", "message")
        self.assertEqual((find["projection"], find["limit"], find["batchSize"]),
                         ({"store_key": 1, "received": 1}, 1001, 1))
        more = [c for c in tap.sent("getMore") if c["collection"] == "message"]
        self.assertEqual(len(more), 3)       # the 2nd, the 3rd, then the 4th: older: stop
        # A since at the very microsecond they were received keeps them, as MongoDB's
        # range would: BSON dates hold milliseconds.
        at = {"sender": "old@x.org", "received": {"$gte": now - datetime.timedelta(minutes=10)}}
        self.assertEqual(len(list(archive.search(at, limit=20))), 3)

    def test_count_without_a_filter_is_the_collections_own(self):
        tap, uri = self.tapped()
        self.assertEqual(self.mms("count", uri=uri), (0, "4", ""))
        self.assertEqual(len(tap.sent("count", "message")), 1)
        self.assertEqual(tap.sent("aggregate"), [])
        self.assertEqual(self.mms("count", "--sender", "a@x.org", uri=uri), (0, "2", ""))
        [pipeline] = [c["pipeline"] for c in tap.sent("aggregate", "message")]
        self.assertEqual(pipeline[0], {"$match": {"sender": {"$gte": "a@x.org",
                                                             "$lte": "a@x.org"}}})

    def test_conditions_are_joined_so_that_each_one_counts(self):
        """A --rcpt (an $or of rcpt and quarantine_to) beside a time range."""
        self.assertEqual(self.mms("count", "--rcpt", "@y.com", "--until", "1h"), (0, "0", ""))
        self.assertEqual(self.mms("count", "--rcpt", "@y.com", "--since", "1h"), (0, "3", ""))

    def test_stats_matches_the_received_index_first(self):
        tap, uri = self.tapped()
        code, out, err = self.mms("stats", "--since", "1h", "--by", "day", "--json", uri=uri)
        self.assertEqual(code, 0, err)
        self.assertEqual(json.loads(out)["totals"]["messages"], 4)
        for pipeline in [c["pipeline"] for c in tap.sent("aggregate", "message")]:
            [(field, window)] = pipeline[0]["$match"].items()
            self.assertEqual(field, "received")
            self.assertIsInstance(window["$gte"], datetime.datetime)

    def test_stats_spill_to_disk_and_the_digest_reads_what_it_prints(self):
        tap, uri = self.tapped()
        self.assertEqual(self.mms("stats", "--by", "sender", uri=uri)[0], 0)
        aggregates = tap.sent("aggregate", "message")
        self.assertEqual(len(aggregates), 2)
        self.assertTrue(all(c["allowDiskUse"] for c in aggregates))
        secret = os.path.join(tempfile.mkdtemp(), "web-secret")
        self.addCleanup(shutil.rmtree, os.path.dirname(secret))
        with mms.private(secret) as f:
            f.write(base64.b64encode(os.urandom(32)))
        code, out, err = self.mms("digest", "--url", "https://quarantine.example.org/",
                                  "--rcpt-domain", "y.com", "--web-secret", secret,
                                  "--dry-run", uri=uri)
        self.assertEqual(code, 0, err)
        [find] = tap.sent("find", "message")
        self.assertEqual(set(find["projection"]), set(mms.DIGEST_FIELDS))

    def test_stats_of_a_document_another_tool_wrote(self):
        self.db["message"].insert_one({"store_key": "k" * 64, "received": "yesterday",
                                       "size": "big"})
        for by in ("day", "hour", "sender", "verdict"):
            with self.subTest(by=by):
                code, out, err = self.mms("stats", "--by", by)
                self.assertEqual(code, 0, err)
                self.assertTrue(out.startswith("messages 5, bytes "), out)

    def test_verify_streams_without_distinct(self):
        """The orphan scan reads every GridFS file: only when asked, and in batches."""
        tap, uri = self.tapped()
        self.assertEqual(self.mms("verify", "--since", "1d", uri=uri)[:2],
                         (0, "verify: 0 problem(s)"))
        [files] = tap.sent("find", "fs.files")               # the window's files, by _id
        self.assertEqual(list(files["filter"]), ["_id"])
        self.assertEqual(self.mms("verify", "--orphans", uri=uri)[:2],
                         (0, "verify: 0 problem(s)"))
        self.assertEqual(tap.sent("distinct"), [])
        [files] = tap.sent("find", "fs.files")[-1:]
        self.assertEqual(files["batchSize"], mms.Archive.BATCH)
        looked_up = [c for c in tap.sent("find", "message") if "message" in c["filter"]]
        self.assertEqual(len(looked_up[0]["filter"]["message"]["$in"]), 4)

    def test_purge_deletes_in_conditional_batches_and_a_hold_placed_meanwhile_wins(self):
        old = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
        old_messages(self.uri, self.dbname, 2500, old)
        held = []

        def request(command):  # between purge's read and its delete, 100 holds
            if command.get("delete") == "message" and not held:
                ids = command["deletes"][0]["q"]["_id"]["$in"][:100]
                held.extend(ids)
                self.db["message"].update_many({"_id": {"$in": ids}}, {"$set": {"held": True}})

        tap, uri = self.tapped(request=request)
        code, out, err = self.mms("purge", "--older-than", "90d", uri=uri)
        self.assertEqual((code, out.split(" received")[0]), (0, "purged 2400 message(s)"), err)
        deletes = tap.sent("delete", "message")
        self.assertEqual(len(deletes), 3)
        for command in deletes:
            [statement] = command["deletes"]
            self.assertEqual(statement["limit"], 0)
            self.assertEqual(list(statement["q"]), ["_id", "store_key", "held"])
            self.assertEqual(statement["q"]["held"], {"$nin": [True]})
            self.assertLessEqual(len(statement["q"]["_id"]["$in"]), mms.Archive.BATCH)
            # the shard key: on a cluster sharded on store_key, each shard its own
            self.assertEqual(len(statement["q"]["store_key"]["$in"]),
                             len(statement["q"]["_id"]["$in"]))
        [read] = [clauses(c["filter"]) for c in tap.sent("find", "message")
                  if "received" in c["filter"]][:1]
        self.assertEqual([list(c["received"]) for c in read if "received" in c], [["$lt"]])
        self.assertIn({"held": {"$nin": [True]}}, read)
        left = list(self.db["message"].find({"received": {"$lt": old + datetime.timedelta(1)}}))
        self.assertEqual(sorted(d["_id"] for d in left), sorted(held))
        for doc in left:   # their files stay
            self.assertEqual(len(list(self.db["fs.chunks"].find({"files_id": doc["message"]}))), 1)
        self.assertEqual(self.mms("count"), (0, "104", ""))
        self.assertEqual(self.mms("verify")[0], 0)

    def test_the_dashboard_reads_the_daily_counts_not_the_messages(self):
        """However much mail 30 days hold, the dashboard reads a few hundred counters
        by a range of their _id, and the held and released counters by theirs; each
        query carries the console's maxTimeMS."""
        self.server.mode.store.tally.flush()     # what the writer's thread does each second
        tap, uri = self.tapped()
        cfg = mms.parse_config(["web", "--mongo-host", uri, "--mongo-database", self.dbname])
        archive = mms.Archive(cfg, max_time_ms=mms.WEB_QUERY_MS).connect()
        self.addCleanup(archive.close)
        data = mms.dashboard_data(archive)
        self.assertEqual((data["totals"]["messages"], data["archived"]), (4, 4))
        self.assertEqual(data["totals"]["bytes"], sum(d["size"] for d in self.records()))
        self.assertEqual(sum(sum(day.values()) for day in data["days"].values()), 4)
        self.assertEqual(data["top"]["sender-domain"][0], {"group": "x.org", "messages": 3})
        self.assertEqual(data["top"]["rcpt-domain"][0], {"group": "y.com", "messages": 3})
        self.assertEqual(tap.sent("aggregate", "message"), [])
        self.assertEqual(tap.sent("find", "message"), [])
        [states] = tap.sent("find", "message_daily")          # held and released
        self.assertEqual(list(states["filter"]["_id"]), ["$in"])
        days, listed, *tops = tap.sent("aggregate", "message_daily")  # verdicts, lists;
        self.assertEqual((days["pipeline"], listed["pipeline"][0]["$match"]["_id"]["$gte"][:5]),
                         ([days["pipeline"][0]], "list|"))             # 7 days, summed
        self.assertEqual(days["pipeline"][0]["$match"]["_id"]["$gte"][:8], "verdict|")
        self.assertEqual(len(tops), len(mms.DASHBOARD_TOPS))
        for read in [c["pipeline"][0]["$match"] for c in [days, listed] + tops]:
            self.assertEqual(list(read), ["_id"])
            self.assertEqual(set(read["_id"]), {"$gte", "$lte"})
        for command in [days, states, listed] + tops:
            self.assertEqual(command["maxTimeMS"], mms.WEB_QUERY_MS)
        for top in tops:
            self.assertTrue(top["allowDiskUse"])
            self.assertEqual(top["pipeline"][-1], {"$limit": 10})
        counts = tap.sent("aggregate", "message") + tap.sent("count", "message")
        self.assertTrue(all(c.get("maxTimeMS") == mms.WEB_QUERY_MS for c in counts), counts)

    def test_reindex_gives_old_messages_their_fields_once_and_goes_on_where_it_stopped(self):
        """Messages as mms 1.0 stored them: no search fields, and no daily counts."""
        self.server.mode.store.tally.flush()
        self.db["message_daily"].delete_many({})
        self.db["message"].update_many({}, {"$unset": dict.fromkeys(
            ("sender_domain", "rcpt_domain", "verdict", "client_hex", "files", "files_count",
             "is_bounce", "parsing_errors", "errors_count", "completed", "index_text",
             "text"), "")})
        self.assertEqual(self.mms("count", "--sender", "@x.org"), (0, "0", ""))
        self.assertEqual(self.mms("count", "--text", "body"), (0, "0", ""))

        def cut(command):    # the second batch's write never arrives: a kill
            if command.get("update") == "message" and tap.sent("update", "message"):
                raise OSError("killed")

        tap, uri = self.tapped(request=cut)
        code, _, err = self.mms("reindex", "--batch", "3", uri=uri)
        self.assertNotEqual(code, 0)
        [first] = tap.sent("update", "message")[:1]
        self.assertEqual(len(first["updates"]), 3)
        for statement in first["updates"]:
            its, wanted = statement["q"]["$and"]
            self.assertEqual(set(its), {"_id", "store_key"})
            self.assertIn({"verdict": {"$exists": False}}, wanted["$or"])
        self.assertEqual(self.mms("count", "--sender", "@x.org"), (0, "2", ""))  # newest 3
        code, out, err = self.mms("reindex")
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith("reindex: 1 message(s) given their search fields"), out)
        self.assertEqual(self.mms("count", "--sender", "@x.org"), (0, "3", ""))
        self.assertEqual(self.mms("count", "--rcpt", "@y.com"), (0, "3", ""))
        self.assertEqual(self.mms("count", "--verdict", "clean"), (0, "4", ""))
        self.assertEqual(self.mms("count", "--text", "body"), (0, "4", ""))   # parsed again
        [doc] = self.db["message"].find({"store_key": self.keys[0]})
        self.assertEqual((doc["completed"], doc["text"], doc["files"]), (1, "Msg 0 body 0", []))
        verdicts = list(self.db["message_daily"].find({"by": "verdict"}))
        self.assertEqual(sum(d["messages"] for d in verdicts), 4)   # each counted once
        self.assertTrue(self.mms("reindex")[1].startswith("reindex: 0 message(s)"))
        self.assertEqual(sum(d["messages"] for d in self.db["message_daily"].find(
            {"by": "verdict"})), 4)

    def test_reindex_after_a_change_of_index_text_parses_again_and_counts_nothing(self):
        self.server.mode.store.tally.flush()
        self.server.mode.store.archive.states()   # as the server's index builder may yet
        counted = sorted((d["_id"], d["messages"]) for d in self.db["message_daily"].find())
        code, out, err = self.mms("reindex", "--index-text", "5")
        self.assertEqual(code, 0, err)
        self.assertTrue(out.startswith("reindex: 4 message(s)"), out)
        self.assertEqual({(d["index_text"], d["text"]) for d in self.db["message"].find(
            {"store_key": self.keys[0]})}, {(5, "Msg 0")})
        self.assertEqual(sorted((d["_id"], d["messages"]) for d in self.db["message_daily"]
                                .find()), counted)
        self.assertTrue(self.mms("reindex", "--index-text", "5")[1].startswith(
            "reindex: 0 message(s)"))

    def test_archive_commands_wait_for_a_slow_query(self):
        """Longer than the SMTP path's 20 s socket timeout: a query over millions."""
        def request(command):
            if command.get("find") == "message" or command.get("aggregate") == "message":
                time.sleep(21)

        tap, uri = self.tapped(request=request)
        runs = {}
        commands = {"list": ("list",), "count": ("count", "--sender", "a@x.org")}
        threads = [threading.Thread(target=lambda name=name, args=args: runs.__setitem__(
            name, self.archive_command(*args, "--mongo-timeout", "0.5", uri=uri)))
            for name, args in commands.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        self.assertEqual(runs["count"].stdout.strip(), "2", runs["count"].stderr)
        self.assertEqual(len(runs["list"].stdout.splitlines()), 4, runs["list"].stderr)


PEAK_RSS = """import runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    sys.stderr.write([l for l in open("/proc/self/status") if l.startswith("VmHWM")][0])
"""


def mongoengine_module():
    """mongoengine, for the tests only (pip install mongoengine): .ci/run installs it."""
    try:
        import mongoengine
    except ImportError:
        if os.environ.get("CI"):
            raise RuntimeError("mongoengine is not installed: .ci/run should install it")
        raise missing("mongoengine is not installed (pip install mongoengine)")
    return mongoengine


class TestMongoMailWeb(MongoCase):
    """The seed's reader, mongo-mail-web, loads messages with a mongoengine model of
    the seed's completed document: every field typed as the seed shows it, and the
    fields mms adds (README, "The completed document"), with meta strict True. It
    loads, validates and saves back every document mms writes, in every storing
    mode: quarantine (an amavisd-new copy too), proxy and filter."""

    def model(self):
        me = mongoengine_module()
        alias = "mms-" + uuid.uuid4().hex[:8]
        me.connect(db=self.dbname, host=self.uri, alias=alias, tz_aware=True,
                   uuidRepresentation="standard")
        self.addCleanup(me.disconnect, alias)
        fields = {name: me.IntField(default=0) for name in (     # the seed's, as it types them
            "completed", "errors_count", "files_count", "internal_field", "is_banned",
            "is_bounce", "is_in", "is_spam", "is_unchecked", "is_virus", "mark_for_delete",
            "queue", "rcpt_count")}
        fields.update(
            store_key=me.StringField(required=True, unique=True), sender=me.StringField(),
            rcpt=me.ListField(me.StringField()), rcpt_refused=me.DictField(),
            client_address=me.StringField(), xforward=me.DictField(), server=me.StringField(),
            received=me.DateTimeField(), message=me.ObjectIdField(), size=me.LongField(),
            subject=me.StringField(), message_id=me.StringField(), sent=me.DateTimeField(),
            country=me.StringField(), group_name=me.StringField(default="DEFAULT"),
            headers=me.DictField(), events=me.ListField(), files=me.ListField(me.DictField()),
            parsing_errors=me.ListField(me.StringField()), tags=me.ListField())
        fields.update(                                          # mms's own (README)
            sha256=me.StringField(), sender_domain=me.StringField(),
            rcpt_domain=me.ListField(me.StringField()), verdict=me.StringField(),
            client_hex=me.StringField(), text=me.StringField(), index_text=me.IntField(),
            quarantine=me.StringField(), quarantine_id=me.StringField(),
            quarantine_to=me.ListField(me.StringField()), envelope_from=me.StringField(),
            rcpt_blocked=me.ListField(me.StringField()), virus=me.ListField(me.StringField()),
            spam_score=me.FloatField(), spam_required=me.FloatField(),
            spam_symbols=me.ListField(me.StringField()), scan=me.DictField(),
            downstream_reply=me.StringField(), held=me.BooleanField(), held_by=me.DictField(),
            unheld_by=me.DictField(), released=me.ListField(me.DictField()),
            meta={"collection": "message", "strict": True, "db_alias": alias})
        return type("MessageStore" + alias[4:], (me.Document,), fields)

    def test_every_document_mms_writes_loads_strictly_and_saves_back(self):
        self.start_mongo("--real-rcpt", "--local-domains", "example.com")
        keys = [self.key(self.send_message(self.raw(), body, rcpts=("q@example.net",)))
                for body in (SIMPLE, TestRealRcpt.AMAVIS, PHISH, amavis_copy("pills", ["b@x.org"]),
                             b"Date: Wed, 08 Apr 2015 13:19:34 UTC\r\nSubject: dated\r\n\r\nx\r\n")]
        self.db["message"].update_one({"store_key": keys[0]}, {"$set": {"held": True}})
        self.server.shutdown()
        self.server.server_close()
        down = ScriptedDownstream()
        self.addCleanup(down.close)
        clamd = FakeScanner(answer=b"stream: Test.Fake FOUND\0")
        spamd = FakeScanner(answer=b"SPAMD/1.1 0 EX_OK\r\nContent-length: 10\r\nSpam: True ; "
                                   b"15.0 / 5.0\r\n\r\nGTUBE,XYZ\r\n")
        for fake in (clamd, spamd):
            self.addCleanup(fake.close)
        spool = tempfile.mkdtemp(prefix="mms-spool-")
        self.addCleanup(shutil.rmtree, spool)
        for mode, more in (("mongo-proxy", ()), ("mongo-filter", ("--clamd", clamd.address,
                                                                  "--spamd", spamd.address))):
            self.mode = mode
            self.start_mongo("--remote-port", str(down.server_address[1]), "--spool-dir",
                             spool, *more)
            reply = self.send_message(self.raw(), SIMPLE, rcpts=("b@example.com",))
            self.assertEqual(reply[0], 250, reply)
            self.server.shutdown()
            self.server.server_close()
        MessageStore = self.model()
        docs = {doc.store_key: doc for doc in MessageStore.objects()}
        self.assertEqual(len(docs), 7)
        self.assertLessEqual(set(keys), set(docs))
        self.assertEqual({d.verdict for d in docs.values()}, {"clean", "spam", "virus"})
        from gridfs import GridFS
        for key, doc in docs.items():
            doc.validate()
            raw = zlib.decompress(base64.b64decode(GridFS(self.db).get(doc.message).read()))
            self.assertEqual(raw, self.stored(key)[1])
            self.assertEqual((doc.group_name, doc.queue, doc.events, doc.tags), ("DEFAULT", 1,
                                                                               [], []))
            doc.tags = ["reviewed"]
            doc.save()
        self.assertEqual(self.db["message"].count_documents({"tags": "reviewed"}), 7)
        self.assertEqual(docs[keys[1]].rcpt, ["alice@example.com", "bob@example.com",
                                              "carol@example.com"])
        self.assertEqual(docs[keys[2]].headers["Subject"], "Your account")


class TestCompletedDocument(MongoCase):
    """headers, is_in and the seed's defaults, written at store time from the same
    single pass as the rest of the completed document; reindex fills them in."""

    def test_headers_as_the_seed_shows_them(self):
        self.start_mongo()
        message = (b"Content-Type: text/plain; charset=\"utf-8\"\r\nMIME-Version: 1.0\r\n"
                   b"Content-Transfer-Encoding: base64\r\nDate: Wed, 08 Apr 2015 13:19:34 UTC\r\n"
                   b"From: \"Bertrand Auger\" <acollet@example.org>\r\n"
                   b"Subject: =?utf-8?q?Caf=C3=A9?=\r\nTo: \"Thierry\" <jean91@example.com>\r\n"
                   b"Message-Id: <20150408131934.10264.63423@admin-VAIO>\r\nX-Mailer: MessageFaker"
                   b"\r\nReceived: from a\r\n\tby b\r\nReceived: from c\r\nX.Dotted: 1\r\n"
                   b"$Dollar: 2\r\n\r\nYm9keQ==\r\n")
        doc, stored = self.stored(self.key(self.send_message(self.raw(), message)))
        self.assertEqual(stored, message)                        # the bytes untouched
        self.assertEqual(doc["headers"], {
            "Content-Type": ["text/plain", {"charset": "utf-8"}], "Mime-Version": "1.0",
            "Content-Transfer-Encoding": ["base64", {}],
            "Date": "Wed, 08 Apr 2015 13:19:34 UTC",
            "From": '"Bertrand Auger" <acollet@example.org>', "Subject": "Café",
            "To": '"Thierry" <jean91@example.com>',
            "Message-Id": "<20150408131934.10264.63423@admin-VAIO>", "X-Mailer": "MessageFaker",
            "Received": ["from a by b", "from c"], "X_dotted": "1", "_dollar": "2"})
        self.assertEqual(doc["parsing_errors"], [])
        for name, value in (("events", []), ("tags", []), ("group_name", "DEFAULT"),
                            ("queue", 1), ("mark_for_delete", 0), ("internal_field", 0)):
            self.assertEqual(doc[name], value, name)
        self.assertNotIn("is_in", doc)                          # no --local-domains

    def test_headers_are_bounded_and_say_what_they_left_out(self):
        self.start_mongo()
        many = b"".join(b"X-Field-%d: %s\r\n" % (n, b"v" * 100) for n in range(400))
        doc, _ = self.stored(self.key(self.send_message(self.raw(), many + b"\r\nbody\r\n")))
        self.assertEqual(len(doc["headers"]), mms.HEADERS_MAX)
        self.assertEqual(doc["parsing_errors"], [
            f"headers: 200 field(s) past {mms.HEADERS_MAX} fields or "
            f"{mms.HEADERS_SIZE_MAX} bytes are not in headers"])
        big = b"".join(b"X-Big-%d: %s\r\n" % (n, b"w" * 1000) for n in range(60))
        doc, _ = self.stored(self.key(self.send_message(self.raw(), big + b"\r\nbody\r\n")))
        self.assertLessEqual(sum(len(k) + len(v) for k, v in doc["headers"].items()),
                             mms.HEADERS_SIZE_MAX + 1100)
        self.assertEqual(doc["errors_count"], 1)

    def test_is_in_from_the_local_domains(self):
        self.start_mongo("--local-domains", "example.com,Example.NET")
        cases = {("x@outside.org", ("b@example.com",)): 1,
                 ("a@example.com", ("b@outside.org",)): 0,
                 ("a@example.com", ("b@example.net",)): 0,
                 ("", ("b@example.net",)): 1}
        for (sender, rcpts), inbound in cases.items():
            with self.subTest(sender=sender, rcpts=rcpts):
                doc, _ = self.stored(self.key(self.send_message(self.raw(), SIMPLE, sender=sender,
                                                                rcpts=rcpts)))
                self.assertEqual(doc["is_in"], inbound)

    def test_reindex_fills_them_in_for_messages_stored_before(self):
        self.start_mongo()
        key = self.key(self.send_message(self.raw(), SIMPLE))
        self.db["message"].update_one({"store_key": key}, {"$unset": {
            "headers": "", "tags": "", "group_name": "", "queue": ""}})
        done = self.archive_command("reindex", "--local-domains", "example.com")
        self.assertEqual(done.returncode, 0, done.stderr)
        doc = self.db["message"].find_one({"store_key": key})
        self.assertEqual((doc["headers"]["Subject"], doc["tags"], doc["group_name"],
                          doc["queue"], doc["is_in"]), ("test", [], "DEFAULT", 1, 1))


class TestGeoipCountry(MongoCase):
    """plugins/geoip_country: the client's ISO country (XFORWARD's ADDR first), from
    geoip2fast's bundled data or a MaxMind .mmdb through maxminddb (the 2018
    GeoLite2 City database maxminddb-geolite2 ships, in the tests); no country for
    a private or loopback address; a missing package stops mms at start-up;
    list --country and stats --by country on their index."""

    def send_from(self, address, body=SIMPLE):
        client = self.raw()
        if address:
            self.assertEqual(client.cmd(f"XFORWARD ADDR={address}")[0], 250)
        return self.key(self.send_message(client, body))

    def test_the_country_of_the_real_client(self):
        geoip_packages()
        self.start_mongo("--plugin", "plugins.geoip_country")
        keys = {address: self.send_from(address) for address in (
            "139.129.236.68", "8.8.8.8", "10.1.2.3", None)}
        countries = {address: self.stored(key)[0].get("country") for address, key in keys.items()}
        self.assertEqual(countries, {"139.129.236.68": "CN", "8.8.8.8": "US", "10.1.2.3": None,
                                     None: None})
        code, out, _ = self.command_line("list", "--country", "cn")
        self.assertEqual((code, [line.split()[0] for line in out.splitlines()]),
                         (0, [keys["139.129.236.68"]]))
        code, out, _ = self.command_line("stats", "--by", "country")
        self.assertRegex(out, r"(?m)^ +1 +[0-9]+ CN$")
        self.assertRegex(out, r"(?m)^ +1 +[0-9]+ US$")

    def test_a_maxmind_database_through_maxminddb(self):
        database = geoip_packages()
        process = MmsProcess("--mongo-host", self.uri, "--mongo-database", self.dbname,
                             "--plugin", "plugins.geoip_country",
                             env={"MMS_GEOIP_DB": database})
        self.addCleanup(process.stop)
        with smtplib.SMTP("127.0.0.1", process.port, timeout=30) as smtp:
            smtp.ehlo()
            self.assertEqual(smtp.docmd("XFORWARD", "ADDR=IPv6:2a00:1450:4001::1")[0], 250)
            smtp.sendmail("a@example.org", ["b@example.com"], SIMPLE)
        [doc] = self.records()
        self.assertEqual(doc["country"], "DE")

    def test_a_missing_package_or_database_stops_mms_at_start_up(self):
        geoip_packages()
        stub = tempfile.mkdtemp(prefix="mms-stub-")
        self.addCleanup(shutil.rmtree, stub)
        for name in ("geoip2fast", "maxminddb"):       # as if not installed
            with open(os.path.join(stub, f"{name}.py"), "w") as f:
                f.write("raise ImportError('not installed')\n")
        for env, said in (({"PYTHONPATH": stub}, "pip install geoip2fast (its data is bundled)"),
                          ({"PYTHONPATH": stub, "MMS_GEOIP_DB": "/x.mmdb"},
                           "MMS_GEOIP_DB names a .mmdb database: pip install maxminddb"),
                          ({"MMS_GEOIP_DB": "/nonexistent/GeoLite2-Country.mmdb"},
                           "/nonexistent/GeoLite2-Country.mmdb")):
            with self.subTest(env=env):
                done = subprocess.run([sys.executable, MMS, "--server", "debug", "--port",
                                       str(free_port()), "--plugin", "plugins.geoip_country"],
                                      capture_output=True, text=True, timeout=30,
                                      env={**os.environ, **env})
                self.assertEqual(done.returncode, 2, done.stderr)
                self.assertIn("plugin 'plugins.geoip_country' cannot be imported", done.stderr)
                self.assertIn(said, done.stderr)

    def command_line(self, *args):
        done = self.archive_command(*args)
        return done.returncode, done.stdout, done.stderr


def geoip_packages():
    """The path of maxminddb-geolite2's database; geoip2fast and maxminddb installed
    (test-only, by .ci/run)."""
    try:
        import geoip2fast  # noqa: F401
        import maxminddb   # noqa: F401
        import _maxminddb_geolite2
    except ImportError:
        if os.environ.get("CI"):
            raise RuntimeError("geoip2fast, maxminddb and maxminddb-geolite2: .ci/run should "
                               "install them")
        raise missing("pip install geoip2fast maxminddb maxminddb-geolite2") from None
    return os.path.join(os.path.dirname(_maxminddb_geolite2.__file__), "GeoLite2-City.mmdb")


class TestArchiveMemory(MongoCase):
    """show, headers and verify of a 30 MB message read it a chunk at a time: their
    peak RSS (the kernel's count, of the whole mms.py process) stays near a count's."""

    def peak_rss(self, *args):
        """MB. VmHWM, read by the process itself as it ends: the kernel's ru_maxrss
        would count the test process it was forked from, before its exec."""
        done = subprocess.run([sys.executable, "-c", PEAK_RSS, MMS, *args, "--mongo-host",
                               self.uri, "--mongo-database", self.dbname],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                              timeout=120)
        self.assertEqual(done.returncode, 0, done.stderr)
        return int(done.stderr.split("VmHWM:")[1].split()[0]) / 1024

    def test_a_30_mb_message(self):
        self.start_mongo()
        line = base64.b64encode(os.urandom(57)) + b"\r\n"
        body = b"Subject: large\r\n\r\n" + line * (30 * 2**20 // len(line))
        key = self.key(self.send_message(self.raw(), body))
        rss = {command: self.peak_rss(command, *([key] if command != "count" else []))
               for command in ("count", "headers", "show", "verify")}
        # Against a count's peak in the same run (mms and pymongo alone, about 60 MB
        # here): the message whole in memory would add 30 MB, its base64 40.
        for command in ("headers", "show", "verify"):
            self.assertLess(rss[command] - rss["count"], 15, rss)


class TestLearning(ArchiveCase):
    """mms.py learn KEY --spam|--ham: the stored message taught to real spamd (Debian's,
    with --allow-tell), as spamc -L does; its Bayes counts move, the message notes
    it, the same class twice is a no-op, and a spamd that will not learn changes
    nothing."""

    def learn(self, key, kind, spamd):
        done = self.archive_command("learn", key, f"--{kind}", "--spamd", spamd.address)
        return done.returncode, done.stdout.strip(), done.stderr.strip()

    def test_spam_and_ham_move_the_bayes_counts(self):
        spamd = LearningSpamd.get()
        before = spamd.learned()
        spam, ham = (self.key(self.send_message(self.raw(), f"Subject: {kind}\r\n\r\n{kind} "
                                                f"{uuid.uuid4().hex}\r\n".encode()))
                     for kind in ("spam", "ham"))      # spamd's Bayes learns a text once
        self.assertEqual(self.learn(spam, "spam", spamd), (0, f"learned {spam} as spam", ""))
        self.assertEqual(self.learn(ham, "ham", spamd), (0, f"learned {ham} as ham", ""))
        self.assertEqual(spamd.learned(), {"nspam": before["nspam"] + 1,
                                           "nham": before["nham"] + 1})
        doc = self.db["message"].find_one({"store_key": spam})
        self.assertEqual((doc["learned"]["class"], doc["learned"]["by"].endswith(
            "(command line)")), ("spam", True))
        code, out, _ = self.learn(spam, "spam", spamd)
        self.assertEqual((code, out), (0, f"{spam} was learned as spam already, by "
                                          f"{doc['learned']['by']}: nothing to do"))
        self.assertEqual(spamd.learned()["nspam"], before["nspam"] + 1)

    def test_a_spamd_that_will_not_learn_changes_nothing(self):
        key = self.keys[0]
        code, _, err = self.learn(key, "spam", Spamd.get())       # no --allow-tell
        self.assertEqual(code, 1)
        self.assertIn("did not learn it: 'SPAMD/1.0 69 Service Unavailable: TELL commands are "
                      "not enabled, set the --allow-tell switch.' (spamd runs without "
                      "--allow-tell); nothing was changed", err)
        down = types.SimpleNamespace(address=f"127.0.0.1:{free_port()}")
        code, _, err = self.learn(key, "ham", down)
        self.assertEqual(code, 1)
        self.assertIn("Connection refused; nothing was changed", err)
        self.assertNotIn("learned", self.db["message"].find_one({"store_key": key}))


class TestHeldAndReleasedCounters(ArchiveCase):
    """The dashboard's held and released figures are two counters that each hold,
    unhold, first release, delete and purge moves, and nothing else: one read of two
    documents however large the archive, and always what a count would say."""

    def setUp(self):
        super().setUp()
        self.down = ScriptedDownstream()
        self.addCleanup(self.down.close)

    def figures(self):
        """(held, released) from the counters, checked against a count of the archive."""
        cfg = mms.parse_config(["web", "--mongo-host", self.uri, "--mongo-database", self.dbname])
        archive = mms.Archive(cfg).connect()
        self.addCleanup(archive.close)
        states = archive.states()
        self.assertEqual(states, {name: archive.count(query)
                                  for name, query in archive.STATE_QUERIES.items()})
        return states["held"], states["released"]

    def run_ok(self, *args):
        code, out, err = self.mms(*args)
        self.assertEqual(code, 0, err)
        return out

    def release(self, key, *args):
        return self.run_ok("release", key, "--via", f"127.0.0.1:{self.down.server_address[1]}",
                           *args)

    def test_each_change_moves_its_figure_once(self):
        first, second, third, fourth = self.keys
        self.assertEqual(self.figures(), (0, 0))
        self.run_ok("hold", first)
        self.run_ok("hold", first)                 # held already: counted once
        self.assertEqual(self.figures(), (1, 0))
        self.run_ok("unhold", first)
        self.run_ok("unhold", first)
        self.assertEqual(self.figures(), (0, 0))
        self.release(second)
        self.release(second, "--force")             # released again: still one message
        self.assertEqual(self.figures(), (0, 1))
        self.run_ok("delete", second)
        self.assertEqual(self.figures(), (0, 0))
        self.release(third)
        self.release(fourth)
        self.run_ok("hold", first)
        self.assertEqual(self.figures(), (1, 2))
        tomorrow = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(1)).date()
        purged = self.run_ok("purge", "--older-than", tomorrow.isoformat(), "--rcpt", "@y.com")
        self.assertTrue(purged.startswith("purged 1 "), purged)  # the fourth; the first is held
        self.assertEqual(self.figures(), (1, 1))

    def test_the_dashboard_reads_two_counters_not_the_archive(self):
        self.run_ok("hold", self.keys[0])
        tap, uri = self.tapped()
        cfg = mms.parse_config(["web", "--mongo-host", uri, "--mongo-database", self.dbname])
        archive = mms.Archive(cfg, max_time_ms=mms.WEB_QUERY_MS).connect()
        self.addCleanup(archive.close)
        totals = mms.dashboard_data(archive)["totals"]
        self.assertEqual((totals["held"], totals["released"]), (1, 0))
        counts = tap.sent("aggregate", "message") + tap.sent("count", "message")
        self.assertEqual([c for c in counts if c.get("query") or c.get("pipeline")], [])
        [states] = [c for c in tap.sent("find", "message_daily") if "$in" in c["filter"]["_id"]]
        self.assertEqual(states["filter"], {"_id": {"$in": ["state|held", "state|released"]}})
        self.assertEqual(states["maxTimeMS"], mms.WEB_QUERY_MS)

    def test_an_archive_without_counters_is_counted_once_and_reindex_counts_again(self):
        self.db["message_daily"].delete_many({"by": "state"})      # as an earlier mms left it
        self.db["message"].update_one({"store_key": self.keys[1]}, {"$set": {"held": True}})
        self.assertEqual(self.figures(), (1, 0))
        self.assertEqual(self.db["message_daily"].find_one({"_id": "state|held"})["messages"], 1)
        self.db["message_daily"].update_one({"_id": "state|held"}, {"$set": {"messages": 7}})
        self.run_ok("reindex")
        self.assertEqual(self.figures(), (1, 0))


class TestHoldsThatStick(ArchiveCase):
    """Each change asks the message's state in the write itself: a hold placed while
    release sends, or while purge runs, is kept; two releases send once."""

    def setUp(self):
        super().setUp()
        self.down = ScriptedDownstream()
        self.addCleanup(self.down.close)
        self.down.stall.set()
        self.down.stall_seconds = 4   # the final dot is answered 4 s later

    def release(self, key, *args):
        return self.archive_command("release", key, "--via",
                                    f"127.0.0.1:{self.down.server_address[1]}", *args)

    def doc(self, key):
        return self.db["message"].find_one({"store_key": key})

    def test_a_hold_placed_while_release_sends_stays(self):
        key, done = self.keys[0], {}
        thread = threading.Thread(target=lambda: done.setdefault("run", self.release(key)))
        thread.start()
        deadline = time.monotonic() + 20
        while not self.down.messages and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertEqual(self.mms("hold", key)[:2], (0, f"legal hold placed on {key}"))
        thread.join(30)
        self.assertEqual(done["run"].returncode, 0, done["run"].stderr)
        doc = self.doc(key)
        self.assertEqual(doc["held"], True)   # nx-27017 gives back true as 1
        self.assertEqual(len(doc["released"]), 1)
        self.assertIsInstance(doc["released"][0]["at"], datetime.datetime)
        self.assertNotIn("releasing", doc)

    def test_two_releases_at_once_send_once(self):
        key, runs = self.keys[1], []
        threads = [threading.Thread(target=lambda: runs.append(self.release(key, "--force")))
                   for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        self.assertEqual(sorted(run.returncode for run in runs), [0, 1])
        [refused] = [run for run in runs if run.returncode]
        self.assertIn("is being released by another `mms.py release`", refused.stderr)
        self.assertEqual(len(self.down.messages), 1)
        self.assertEqual(len(self.doc(key)["released"]), 1)
        self.down.stall.clear()
        self.assertEqual(self.release(key).returncode, 1)   # released already
        self.assertEqual(self.release(key, "--force").returncode, 0)
        self.assertEqual(len(self.doc(key)["released"]), 2)

    def test_a_release_back_into_mms_is_not_a_release(self):
        """Filter mode's front Postfix re-scans and re-quarantines: the reply is mms's."""
        done = self.archive_command("release", self.keys[0], "--via", f"127.0.0.1:{self.port}")
        self.assertEqual(done.returncode, 1, done.stdout)
        self.assertIn("went back into an archive", done.stderr)
        doc = self.doc(self.keys[0])
        self.assertNotIn("released", doc)
        self.assertNotIn("releasing", doc)

    def test_a_release_into_a_debug_mode_mms_is_a_release(self):
        """The README's test sink answers 'queued as KEY' but stores nothing: the
        message was delivered, so it is recorded, and a retry does not send it again."""
        sink = MmsProcess("--server", "debug")
        self.addCleanup(sink.stop)
        done = self.archive_command("release", self.keys[0], "--via", f"127.0.0.1:{sink.port}")
        self.assertEqual(done.returncode, 0, done.stderr)
        [record] = self.doc(self.keys[0])["released"]
        self.assertEqual(record["via"], f"127.0.0.1:{sink.port}")
        again = self.archive_command("release", self.keys[0], "--via", f"127.0.0.1:{sink.port}")
        self.assertEqual(again.returncode, 1)
        self.assertIn("released already", again.stderr)
        sink.proc.terminate()
        printed = sink.proc.communicate(timeout=30)[0]
        self.assertEqual(printed.count(b"Subject: Msg 0"), 1)       # one copy, not five

    def test_a_claim_older_than_its_lapse_is_taken_over(self):
        """A release that died (killed mid-send) leaves its claim: after CLAIM_LAPSES
        another release may take it; before, it may not."""
        self.down.stall.clear()
        said = []
        for age in (datetime.timedelta(minutes=1),
                    mms.Archive.CLAIM_LAPSES + datetime.timedelta(minutes=1)):
            doc = self.doc(self.keys[0])   # replace_one keeps the datetime on nx-27017
            self.db["message"].replace_one({"_id": doc["_id"]}, {**doc, "releasing": {
                "token": "a release that died", "at": datetime.datetime.now(
                    datetime.timezone.utc) - age}})
            done = self.release(self.keys[0])
            said.append((done.returncode, done.stderr))
        self.assertEqual(said[0][0], 1)
        self.assertIn("is being released by another", said[0][1])
        self.assertEqual(said[1], (0, ""))
        doc = self.doc(self.keys[0])
        self.assertNotIn("releasing", doc)
        self.assertEqual(len(doc["released"]), 1)
        self.assertEqual(len(self.down.messages), 1)

    def test_a_failed_release_gives_its_claim_back(self):
        self.down.close()
        self.assertEqual(self.release(self.keys[0]).returncode, 1)
        self.assertNotIn("releasing", self.doc(self.keys[0]))

    def test_held_means_held_true(self):
        """One definition everywhere: held: false is not on hold."""
        for key in self.keys[:2]:
            self.db["message"].update_one({"store_key": key}, {"$set": {"held": False}})
        self.assertEqual(self.mms("count", "--held"), (0, "0", ""))
        self.assertNotIn("[held]", self.mms("list")[1])
        self.assertEqual(self.mms("delete", self.keys[0])[0], 0)
        old = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
        self.db["message"].replace_one({"store_key": self.keys[1]},
                                       {**self.doc(self.keys[1]), "received": old})
        self.assertTrue(self.mms("purge", "--older-than", "1d")[1].startswith("purged 1 "))

    def test_a_message_gone_meanwhile_is_said_to_be_gone(self):
        cfg = mms.parse_config(["--mongo-host", self.uri, "--mongo-database", self.dbname])
        archive = mms.Archive(cfg).connect()
        self.addCleanup(archive.close)
        doc = archive.resolve(self.keys[2])
        self.db["message"].delete_one({"_id": doc["_id"]})
        for change in (archive.hold, archive.delete,
                       lambda doc: archive.claim_release(doc, False)):
            with self.assertRaisesRegex(mms.NotFound, "is gone: deleted or purged meanwhile"):
                change(doc)


class TestRetention(ArchiveCase):

    def test_the_server_purges_what_is_older_than_retention(self):
        """--retention runs purge once an hour; here, every 0.2 s."""
        old = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
        for key in self.keys[:2]:
            doc = self.db["message"].find_one({"store_key": key})
            self.db["message"].replace_one({"_id": doc["_id"]}, {**doc, "received": old})
        self.mms("hold", self.keys[1])
        with mock.patch.object(mms.MongoStore, "RETENTION_SECONDS", 0.2):
            with self.assertLogs("mms", "INFO") as logs:
                self.start_mongo("--retention", "30")
                deadline = time.monotonic() + 10
                while (not any("--retention: purged" in line for line in logs.output)
                       and time.monotonic() < deadline):
                    time.sleep(0.1)
        self.assertIsNone(self.db["message"].find_one({"store_key": self.keys[0]}))
        self.assertEqual(self.mms("count"), (0, "3", ""))
        self.assertIn("--retention: purged 1 message(s)", "\n".join(logs.output))


class TestVerify(ArchiveCase):
    """`mms.py verify`: every damage it names is one made here on purpose."""

    def test_a_sound_archive(self):
        self.assertEqual(self.mms("verify"), (0, "verify: 0 problem(s)", ""))

    def test_every_kind_of_damage_is_named(self):
        docs = {d["store_key"]: d for d in self.db["message"].find()}
        garbled, short, altered, lost, dropped = self.keys[:3] + [self.keys[3], None]
        fid = docs[garbled]["message"]
        self.db["fs.chunks"].delete_many({"files_id": fid})
        self.db["fs.chunks"].insert_one({"files_id": fid, "n": 0, "data": bson.Binary(b"!!")})
        self.db["message"].replace_one({"store_key": short}, {**docs[short], "size": 1})
        self.db["message"].replace_one({"store_key": altered}, {**docs[altered], "sha256": "0" * 64})
        self.db["fs.files"].delete_one({"_id": docs[lost]["message"]})
        self.db["fs.chunks"].delete_many({"files_id": docs[lost]["message"]})
        extra = self.key(self.send_message(self.raw(), SIMPLE))
        self.db["message"].delete_one({"store_key": extra})   # its file is now an orphan
        large = b"Subject: large\r\n\r\n" + base64.b64encode(random.Random(4).randbytes(600000))
        holed = self.key(self.send_message(self.raw(), large + b"\r\n"))
        hole = self.db["message"].find_one({"store_key": holed})["message"]
        self.assertEqual(len(list(self.db["fs.chunks"].find({"files_id": hole}))), 4)
        chunks = sorted(self.db["fs.chunks"].find({"files_id": hole}), key=lambda c: c["n"])
        self.db["fs.chunks"].delete_many({"files_id": hole})
        self.db["fs.chunks"].insert_many([c for c in chunks if c["n"] != 2])
        self.db["message"].insert_one({"store_key": "e" * 64, "note": "no message field"})
        code, out, err = self.mms("verify")
        self.assertEqual((code, out.splitlines()[-1]), (1, "verify: 6 problem(s)"))
        self.assertNotIn("orphan", out)                 # every file is read only if asked
        code, out, err = self.mms("verify", "--orphans")
        self.assertEqual(code, 1)
        lines = out.splitlines()
        self.assertEqual(lines[-1], "verify: 7 problem(s)")
        self.assertEqual(len(lines), 8, out)
        self.assertIn(f"{holed}: chunk 3 of 4 of its GridFS file is missing", lines)
        self.assertIn(f"{'e' * 64}: its document has no message field", lines)
        self.assertTrue(any(line.startswith(f"{garbled}: the stored file does not decode")
                            for line in lines), out)
        self.assertIn(f"{short}: {len(docs[short]['size'] * b'x')} bytes stored, 1 recorded", lines)
        self.assertIn(f"{altered}: sha256 differs from the one recorded at receipt", lines)
        self.assertIn(f"{lost}: its GridFS file is missing", lines)
        self.assertIn(f"orphan file {extra}, no message points at it", lines)

    def test_repair_removes_only_old_orphans(self):
        old = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
        fid = bson.ObjectId()
        self.db["fs.files"].insert_one({"_id": fid, "filename": "f" * 64, "length": 4,
                                        "chunkSize": 261120, "uploadDate": old})
        self.db["fs.chunks"].insert_one({"files_id": fid, "n": 0, "data": bson.Binary(b"eJwD")})
        young = self.key(self.send_message(self.raw(), SIMPLE))
        self.db["message"].delete_one({"store_key": young})
        code, out, err = self.mms("verify", "--repair")   # --repair looks for orphans
        self.assertEqual(code, 1, err)   # the young orphan stays: a write may be under way
        self.assertEqual(out.splitlines(), [f"removed orphan file {'f' * 64}",
                                            f"orphan file {young}, no message points at it",
                                            "verify: 1 problem(s)"])
        self.assertEqual(list(self.db["fs.files"].find({"_id": fid})), [])
        self.assertEqual(list(self.db["fs.chunks"].find({"files_id": fid})), [])


class TestReplay(MongoCase):
    """`mms.py replay`: spooled messages into the archive, as often as it is run."""

    def setUp(self):
        super().setUp()
        self.spool = tempfile.mkdtemp(prefix="mms-spool-")
        self.addCleanup(shutil.rmtree, self.spool, True)
        cfg = mms.parse_config(["--mongo-host", self.uri, "--mongo-database", self.dbname])
        self.store = mms.Archive(cfg).connect()
        self.addCleanup(self.store.close)

    def replay(self, spool=None):
        return self.archive_command("replay", "--spool-dir", spool or self.spool)

    def spooled(self, key, data=SIMPLE):
        metadata = {"store_key": key, "sender": "a@example.org", "rcpt": ["b@example.com"],
                    "client_address": "192.0.2.1", "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "received": datetime.datetime.now(datetime.timezone.utc)}
        mms.Spool(self.spool).put(dict(metadata), mms.Message(data))
        return metadata

    def test_a_message_already_stored_is_a_success_and_writes_nothing(self):
        """An earlier replay stored it, then died before removing its files."""
        metadata = self.spooled("a" * 64)
        self.store.store(dict(metadata), mms.Message(SIMPLE))
        self.spooled("b" * 64)
        first, again = self.replay(), self.replay()
        self.assertEqual((first.returncode, again.returncode), (0, 0), first.stderr)
        self.assertIn("replayed 2 message(s)", first.stdout)
        self.assertIn("replayed 0 message(s)", again.stdout)
        self.assertEqual(os.listdir(self.spool), [])
        for key in ("a" * 64, "b" * 64):
            self.assertEqual(len(list(self.db["fs.files"].find({"filename": key}))), 1)
            self.assertEqual(self.stored(key)[1], SIMPLE)

    def test_a_message_whose_metadata_never_reached_the_disk_is_stored(self):
        """mms was killed between the two files: the message is kept, the envelope lost."""
        path = os.path.join(self.spool, "d" * 64)
        with open(path + ".msg", "wb") as f:
            f.write(SIMPLE)
        with open(path + ".tmp", "wb"):
            pass
        self.assertIn("replayed 0 message(s)", self.replay().stdout)   # may still be written
        old = time.time() - 120
        os.utime(path + ".msg", (old, old))
        done = self.replay()
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("rebuilt", done.stderr)
        doc, data = self.stored("d" * 64)
        self.assertEqual((doc["subject"], doc["rebuilt"], data), ("test", True, SIMPLE))
        self.assertEqual(os.listdir(self.spool), [])

    def test_metadata_bson_cannot_hold_is_spooled_without_it(self):
        metadata = self.spooled("c" * 64)
        mms.Spool(self.spool).put(dict(metadata, handle=object()), mms.Message(SIMPLE))
        done = self.replay()
        self.assertEqual(done.returncode, 0, done.stderr)
        doc, data = self.stored("c" * 64)
        self.assertEqual((doc["sender"], data), ("a@example.org", SIMPLE))
        self.assertNotIn("handle", doc)

    def test_a_spool_directory_open_to_others_is_warned(self):
        os.chmod(self.spool, 0o755)
        with self.assertLogs("mms", "WARNING") as logs:
            mms.Spool(self.spool).check()
        self.assertIn("is open to other users (mode 755)", logs.output[0])
        os.chmod(self.spool, 0o700)
        with self.assertNoLogs("mms", "WARNING"):
            mms.Spool(self.spool).check()

    def test_spooled_files_are_private(self):
        self.spooled("a" * 64)
        for name in os.listdir(self.spool):
            self.assertEqual(stat.S_IMODE(os.lstat(os.path.join(self.spool, name)).st_mode),
                             0o600, name)

    def test_a_hostile_spool_loses_nothing_and_stores_nothing_it_should_not(self):
        """replay is often run as root, on a directory others may have written to."""
        other = b"Subject: another\r\n\r\nnot the archived one\r\n"
        archived = self.spooled("a" * 64)
        self.store.store(dict(archived), mms.Message(SIMPLE))
        self.spooled("a" * 64, other)            # the same key, another message
        self.spooled("b" * 64)
        os.rename(os.path.join(self.spool, "b" * 64 + ".bson"),
                  os.path.join(self.spool, "c" * 64 + ".bson"))   # names b, is called c
        os.rename(os.path.join(self.spool, "b" * 64 + ".msg"),
                  os.path.join(self.spool, "c" * 64 + ".msg"))
        with open(os.path.join(self.spool, "not hex.msg"), "wb") as f:
            f.write(SIMPLE)
        secret = os.path.join(self.spool, "..", os.path.basename(self.spool) + "-secret")
        with open(secret, "wb") as f:
            f.write(b"root:x:0:0:secret\r\n")
        self.addCleanup(os.unlink, secret)
        self.spooled("d" * 64)
        os.unlink(os.path.join(self.spool, "d" * 64 + ".msg"))
        os.symlink(secret, os.path.join(self.spool, "d" * 64 + ".msg"))
        done = self.replay()
        self.assertEqual(done.returncode, 1, done.stderr)
        self.assertIn("replayed 0 message(s)", done.stdout)
        self.assertIn("4 left, 1 a symbolic link, not a regular file, 1 another message is "
                      "archived under its store key, 1 its .bson names another store key, "
                      "1 not named by a store key", done.stdout)
        self.assertEqual(sorted(os.listdir(self.spool)), sorted(
            ["a" * 64 + ".bson", "a" * 64 + ".msg", "c" * 64 + ".bson", "c" * 64 + ".msg",
             "not hex.msg", "d" * 64 + ".bson", "d" * 64 + ".msg"]))
        self.assertEqual(self.stored("a" * 64)[1], SIMPLE)
        self.assertEqual(sorted(d["store_key"] for d in self.db["message"].find()), ["a" * 64])

    def test_a_missing_spool_directory_is_named(self):
        done = self.replay(os.path.join(self.spool, "missing"))
        self.assertEqual(done.returncode, 1)
        self.assertIn("spool directory", done.stderr)
        self.assertIn("missing", done.stderr)
        self.assertNotIn("archive", done.stderr)


###############################################################################
# The web console #############################################################
###############################################################################

# Mail is written by attackers: each of these has sent script through a web UI.
HOSTILE_SUBJECT = "<script>alert('subject')</script>"
HOSTILE = (b"From: \"<img src=x onerror=alert('name')>\" <evil@example.org>\r\n"
           b"Subject: <script>alert('subject')</script>\r\nMIME-Version: 1.0\r\n"
           b"Content-Type: multipart/mixed; boundary=b1\r\n\r\n"
           b"--b1\r\nContent-Type: text/html\r\n\r\n<b>hi</b><script>alert('body')</script>\r\n"
           b"--b1\r\nContent-Type: text/plain; name=\"x.txt\"\r\n"
           b"Content-Disposition: attachment; filename=\"\\\"><svg onload=alert('file')>.txt\"\r\n"
           b"\r\nattached\r\n--b1--\r\n")


class WebCase(MongoCase):
    """A quarantine-mode mms with hostile mail in it, and the console in this process."""

    PASSWORDS = {"admin": "correct horse", "viewer": "battery staple"}

    def setUp(self):
        super().setUp()
        self.start_mongo()
        self.down = ScriptedDownstream()
        self.addCleanup(self.down.close)
        self.hostile = self.key(self.send_message(self.raw(), HOSTILE, sender="evil@example.org"))
        self.plain = self.key(self.send_message(self.raw(), SIMPLE))
        fd, users = tempfile.mkstemp(prefix="mms-users-")
        with os.fdopen(fd, "w") as f:
            f.write(f"admin:{mms.hash_password(self.PASSWORDS['admin'])}\n"
                    f"viewer:{mms.hash_password(self.PASSWORDS['viewer'])}:viewer\n"
                    + "".join(self.more_users()))
        self.addCleanup(os.unlink, users)
        self.users_file = users
        self.web_port = free_port()
        cfg = mms.parse_config(["web", "--web", f"127.0.0.1:{self.web_port}", "--web-users", users,
                                "--mongo-host", self.web_uri(), "--mongo-database", self.dbname,
                                "--via", f"127.0.0.1:{self.down.server_address[1]}",
                                *self.web_args()])
        archive = mms.Archive(cfg, max_time_ms=mms.WEB_QUERY_MS).connect()
        self.addCleanup(archive.close)
        self.web = mms.WebServer(cfg, archive)
        threading.Thread(target=self.web.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()
        self.addCleanup(self.web.server_close)
        self.addCleanup(self.web.shutdown)

    def web_args(self):
        return []

    def more_users(self):
        return []

    def web_uri(self):
        return self.uri

    def http(self, method, path, fields=None, cookie=None, headers=None, source="127.0.0.1"):
        """(status, headers, body bytes), from http.client."""
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", self.web_port, timeout=30,
                                          source_address=(source, 0))
        self.addCleanup(conn.close)
        body = urllib.parse.urlencode(fields).encode() if fields is not None else None
        sent = dict(headers or {})
        if body is not None:
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        if cookie:
            sent["Cookie"] = cookie
        conn.request(method, path, body=body, headers=sent)
        answer = conn.getresponse()
        return answer.status, dict(answer.getheaders()), answer.read()

    def login_form(self, source="127.0.0.1"):
        """(the pre-session cookie, the login form's token), as a browser gets them."""
        status, headers, body = self.http("GET", "/login", source=source)
        self.assertEqual(status, 200)
        token = re.search(r'name="csrf" value="([0-9a-f]+)"', body.decode()).group(1)
        return headers["Set-Cookie"].split(";")[0], token

    def post_login(self, user, password, source="127.0.0.1"):
        cookie, token = self.login_form(source)
        return self.http("POST", "/login", {"user": user, "password": password, "csrf": token},
                         cookie=cookie, source=source)

    def login(self, user="admin"):
        status, headers, _ = self.post_login(user, self.PASSWORDS[user])
        self.assertEqual(status, 303)
        return headers["Set-Cookie"].split(";")[0]

    def browser(self):
        try:
            from playwright.sync_api import sync_playwright
        except ImportError:
            if os.environ.get("CI"):
                raise RuntimeError("playwright is not installed: .ci/run should install it")
            raise missing("playwright is not installed (pip install playwright)")
        if not os.path.exists("/usr/bin/chromium"):
            if os.environ.get("CI"):
                raise RuntimeError("chromium is not installed: .ci/run should install it")
            raise missing("Debian's chromium is not installed")
        playwright = sync_playwright().start()
        self.addCleanup(playwright.stop)
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-background-networking", "--disable-gpu"])
        self.addCleanup(browser.close)
        self.chromium, self.devices = browser, playwright.devices
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        self.dialogs = []
        page.on("dialog", lambda dialog: (self.dialogs.append(dialog.message), dialog.dismiss()))
        return page

    def phone(self, name, scheme):
        """A page as that phone shows it (Playwright's emulation: its viewport, scale,
        touch and user agent), light or dark; after browser()."""
        device = {k: v for k, v in PHONES[name].items() if k != "default_browser_type"} \
            if name in PHONES else {k: v for k, v in self.devices[name].items()
                                    if k != "default_browser_type"}
        context = self.chromium.new_context(**device, color_scheme=scheme)
        self.addCleanup(context.close)
        return context.new_page()

    def log_in(self, page, user):
        """As a helpdesk does, by the form; the console's base URL."""
        base = f"http://127.0.0.1:{self.web_port}"
        page.goto(base + "/login")
        page.fill("input[name=user]", user)
        page.fill("input[name=password]", self.PASSWORDS[user])
        page.click("button[type=submit]")
        page.wait_for_url(base + "/")
        return base

    def shoot(self, page, name):
        folder = os.environ.get("MMS_SCREENSHOTS")
        if folder:
            page.screenshot(path=os.path.join(folder, name), full_page=True)

    def csrf(self, cookie):
        body = self.http("GET", "/messages", cookie=cookie)[2].decode()
        return re.search(r'name="csrf" value="([0-9a-f]+)"', body).group(1)


class TestWebConsole(WebCase):
    """Over HTTP, with http.client: login, sessions, CSRF, roles, escaping, headers,
    the raw download, a release, pagination, the API."""

    def test_login_sessions_and_the_rate_limit(self):
        self.assertEqual(self.http("GET", "/")[:1], (303,))
        self.assertEqual(self.http("GET", "/")[1]["Location"], "/login")
        self.assertEqual(self.http("GET", "/api/messages")[0], 401)
        self.assertEqual(self.post_login("admin", "no")[0], 401)
        status, headers, _ = self.post_login("admin", self.PASSWORDS["admin"])
        self.assertEqual((status, headers["Location"]), (303, "/"))
        cookie = headers["Set-Cookie"]
        for flag in ("HttpOnly", "SameSite=Strict", "Path=/"):
            self.assertIn(flag, cookie)
        self.assertNotIn("Secure", cookie)            # plain HTTP here; set under TLS
        session = cookie.split(";")[0]
        self.assertEqual(self.http("GET", "/", cookie=session)[0], 200)
        csrf = self.csrf(session)
        self.assertEqual(self.http("POST", "/logout", {"csrf": csrf}, cookie=session)[0], 303)
        self.assertEqual(self.http("GET", "/", cookie=session)[0], 303)   # the session is gone
        for _ in range(10):                            # from another address
            self.assertEqual(self.post_login("admin", "x", source="127.0.0.2")[0], 401)
        self.assertEqual(self.post_login("admin", self.PASSWORDS["admin"], source="127.0.0.2")[0],
                         429)

    def test_hostile_mail_is_shown_as_text(self):
        cookie = self.login()
        for path in (f"/messages/{self.hostile}", "/messages", "/messages?subject=script", "/"):
            with self.subTest(path=path):
                status, headers, body = self.http("GET", path, cookie=cookie)
                self.assertEqual(status, 200)
                self.assertEqual(headers["Content-Security-Policy"],
                                 "default-src 'none'; style-src 'self'; img-src 'self' data:; "
                                 "form-action 'self'; frame-ancestors 'none'; frame-src 'self'")
                self.assertEqual((headers["X-Content-Type-Options"], headers["Referrer-Policy"]),
                                 ("nosniff", "no-referrer"))
                text = body.decode()
                self.assertNotIn("<script", text)
                self.assertNotIn("<img", text)
                self.assertNotIn("<svg onload", text)
        page = self.http("GET", f"/messages/{self.hostile}", cookie=cookie)[2].decode()
        self.assertIn("&lt;script&gt;alert(&#x27;subject&#x27;)&lt;/script&gt;", page)
        self.assertIn("&lt;script&gt;alert(&#x27;body&#x27;)&lt;/script&gt;", page)  # as source
        self.assertIn("&lt;svg onload=alert(&#x27;file&#x27;)&gt;.txt", page)        # attachment

    def test_csrf_and_roles(self):
        admin, viewer = self.login(), self.login("viewer")
        path = f"/messages/{self.plain}/hold"
        self.assertEqual(self.http("POST", path, {}, cookie=admin)[0], 403)         # no csrf
        self.assertEqual(self.http("POST", path, {"csrf": self.csrf(viewer)}, cookie=viewer)[0],
                         403)                                                        # a viewer
        self.assertNotIn(b"<button", self.http("GET", f"/messages/{self.plain}",
                                                cookie=viewer)[2].split(b"</header>")[1])
        self.assertEqual(self.http("POST", path, {"csrf": self.csrf(admin)}, cookie=admin)[0], 303)
        doc = self.db["message"].find_one({"store_key": self.plain})
        self.assertEqual((doc["held"], doc["held_by"]["user"], doc["held_by"]["via"]),
                         (True, "admin", "web"))
        self.assertIsInstance(doc["held_by"]["at"], datetime.datetime)
        self.assertEqual(self.http("POST", f"/messages/{self.plain}/delete",
                                   {"csrf": self.csrf(admin)}, cookie=admin)[0], 409)  # held

    def test_the_raw_download_is_the_stored_bytes(self):
        status, headers, body = self.http("GET", f"/messages/{self.hostile}/raw",
                                          cookie=self.login("viewer"))
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Disposition"], f'attachment; filename="{self.hostile}.eml"')
        self.assertEqual(body, self.stored(self.hostile)[1])

    def test_a_release_is_delivered_once_and_recorded(self):
        cookie = self.login()
        path = f"/messages/{self.plain}/release"
        self.assertEqual(self.http("POST", path, {"csrf": self.csrf(cookie)}, cookie=cookie)[0], 303)
        self.assertEqual(len(self.down.messages), 1)
        [record] = self.db["message"].find_one({"store_key": self.plain})["released"]
        self.assertEqual((record["by"], record["reply"][:3]), ("admin", "250"))
        status, _, body = self.http("POST", path, {"csrf": self.csrf(cookie)}, cookie=cookie)
        self.assertEqual(status, 409)                       # released already: once
        self.assertIn(b"released already", body)
        self.assertEqual(len(self.down.messages), 1)

    def test_the_dashboard_is_cached_for_a_minute(self):
        cookie = self.login("viewer")

        def archived():
            page = self.http("GET", "/dashboard", cookie=cookie)[2].decode()
            return int(re.search(r"([0-9]+) messages in the archive in all", page).group(1))
        self.assertEqual(archived(), 2)
        self.send_message(self.raw(), SIMPLE)
        self.assertEqual(archived(), 2)                      # the same figures, cached
        with mock.patch.object(mms, "WEB_CACHE_SECONDS", 0):
            self.assertEqual(archived(), 3)                  # once the minute is over

    def test_pages_of_fifty_by_a_range_on_received(self):
        old_messages(self.uri, self.dbname, 60, datetime.datetime(2024, 5, 1, tzinfo=datetime.timezone.utc))
        cookie = self.login("viewer")
        first = self.http("GET", "/messages?sender=old%40x.org", cookie=cookie)[2].decode()
        keys = re.findall(r'href="/messages/([0-9a-f]{64})"', first)
        self.assertEqual(len(keys), 50)
        older = html.unescape(re.search(r'<a href="(/messages\?[^"]+)">Older', first).group(1))
        self.assertIn("before=", older)
        second = self.http("GET", older, cookie=cookie)[2].decode()
        more = re.findall(r'href="/messages/([0-9a-f]{64})"', second)
        self.assertEqual(len(more), 10)
        self.assertEqual(set(keys) & set(more), set())
        self.assertNotIn("Older", second)

    def test_the_api_with_basic_auth(self):
        basic = {"Authorization": "Basic " + base64.b64encode(
            f"viewer:{self.PASSWORDS['viewer']}".encode()).decode()}
        status, headers, _ = self.http("GET", "/api/messages")
        self.assertEqual((status, headers.get("WWW-Authenticate")), (401, 'Basic realm="mms"'))
        status, _, body = self.http("GET", "/api/messages?sender=evil%40example.org", headers=basic)
        self.assertEqual(status, 200)
        [doc] = json.loads(body)["messages"]
        self.assertEqual((doc["store_key"], doc["subject"]), (self.hostile, HOSTILE_SUBJECT))
        self.assertEqual(json.loads(self.http("GET", f"/api/messages/{self.plain}",
                                              headers=basic)[2])["store_key"], self.plain)
        stats = json.loads(self.http("GET", "/api/stats?since=1d&by=sender", headers=basic)[2])
        self.assertEqual(stats["totals"]["messages"], 2)
        self.assertEqual(sorted(g["group"] for g in stats["groups"]),
                         ["a@example.org", "evil@example.org"])
        self.assertEqual(self.http("GET", "/api/stats?by=nonsense", headers=basic)[0], 400)

    def test_export_as_mbox_and_eml(self):
        import mailbox
        done = subprocess.run([sys.executable, MMS, "export", "--mongo-host", self.uri,
                               "--mongo-database", self.dbname], capture_output=True, timeout=60)
        self.assertEqual(done.returncode, 0, done.stderr)
        path = os.path.join(tempfile.mkdtemp(), "out.mbox")
        self.addCleanup(shutil.rmtree, os.path.dirname(path))
        with open(path, "wb") as f:
            f.write(done.stdout)
        box = mailbox.mbox(path)
        self.addCleanup(box.close)
        self.assertEqual(sorted(str(m["Subject"]) for m in box), sorted([HOSTILE_SUBJECT, "test"]))
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        done = self.archive_command("export", "--format", "eml", "--output", folder)
        self.assertEqual(done.returncode, 0, done.stderr)
        with open(os.path.join(folder, self.hostile + ".eml"), "rb") as f:
            self.assertEqual(f.read(), self.stored(self.hostile)[1])
        mbox = self.http("GET", "/messages.mbox?sender=evil%40example.org",
                         cookie=self.login("viewer"))
        self.assertEqual(mbox[1]["Content-Type"], "application/mbox")
        self.assertTrue(mbox[2].startswith(b"From evil@example.org "), mbox[2][:80])

    def test_web_user_prints_a_line_and_never_the_password(self):
        done = subprocess.run([sys.executable, MMS, "web-user", "carol", "--role", "viewer"],
                              input="s3cret pass\n", capture_output=True, text=True, timeout=30)
        self.assertEqual(done.returncode, 0, done.stderr)
        name, digest, role = done.stdout.strip().split(":")
        self.assertEqual((name, role), ("carol", "viewer"))
        self.assertTrue(mms.password_matches(digest, "s3cret pass"))
        self.assertFalse(mms.password_matches(digest, "s3cret pas"))
        self.assertNotIn("s3cret", done.stdout + done.stderr)


def vm_kib(pid, field):
    """VmRSS or VmHWM (the peak) of a process, in KiB, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


class TestConsoleUnderAttack(WebCase):
    """A stranger, a viewer and a recipient attack the console: requests that would
    take its memory or its connections, bad input, guessed names and passwords, a
    cross-site login. Each answer is what a browser or a scanner expects, and the
    console keeps serving."""

    def raw_request(self, head, source="127.0.0.1", port=None):
        return raw_http(self, port or self.web_port, head, source)

    answer = staticmethod(http_answer)

    def console_process(self):
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, MMS, "web", "--web", f"127.0.0.1:{port}", "--web-users",
             self.users_file, "--mongo-host", self.uri, "--mongo-database", self.dbname],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.addCleanup(process.wait, 30)
        self.addCleanup(process.kill)
        wait_port(port)
        return process, port

    def test_a_body_length_is_checked_before_a_byte_is_read(self):
        process, port = self.console_process()
        before = vm_kib(process.pid, "VmRSS")
        block = b"user=x&" * (2**20 // 7)
        for length, code in (("-1", 400), ("abc", 400), ("-5", 400), ("1e9", 400),
                             (str(200 * 2**20), 413), (str(64 * 1024 + 1), 413)):
            with self.subTest(length=length):
                sock = self.raw_request(b"POST /login HTTP/1.1\r\nHost: x\r\nContent-Length: " +
                                        length.encode() + b"\r\n\r\n", port=port)
                sock.settimeout(5)            # answered before the body is read
                status = sock.recv(12)
                self.assertEqual(status, b"HTTP/1.0 %d" % code)
                with contextlib.suppress(OSError):
                    for _ in range(50):       # 50 MiB more, that nobody reads
                        sock.sendall(block)

        def flood(n):                         # six at once, the same way
            sock = self.raw_request(b"POST /login HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                                    port=port)
            with contextlib.suppress(OSError):
                for _ in range(30):
                    sock.sendall(block)
        concurrently(6, flood)
        self.assertEqual(self.http("GET", "/login")[0], 200)
        grown = vm_kib(process.pid, "VmHWM") - before
        self.assertLess(grown, 20 * 1024, f"the console grew by {grown} KiB")
        process.terminate()
        self.assertNotIn(b"ERROR", process.communicate(timeout=30)[1])

    def test_a_body_that_comes_too_slowly_is_cut(self):
        with mock.patch.object(mms.WebHandler, "BODY_SECONDS", 1):
            sock = self.raw_request(b"POST /login HTTP/1.1\r\nContent-Length: 100\r\n\r\nuser=",
                                    source="127.0.0.5")
            self.assertTrue(self.answer(sock).startswith(b"HTTP/1.0 408"))

    def test_slowloris_never_locks_the_console(self):
        """32 connections that send a header byte every half second from one address,
        and 8 from each of four more: the slow ones are cut at HEAD_SECONDS in all,
        and a reviewer from another address is served all the while."""
        stop = threading.Event()
        socks = []
        with mock.patch.object(mms.WebHandler, "HEAD_SECONDS", 3):
            for n in range(32 + 4 * 8):
                with contextlib.suppress(OSError):
                    socks.append(self.raw_request(b"GET / HTTP/1.1\r\n",
                                                  source=f"127.0.0.{3 + max(0, n - 24) // 8}"))

            def drip():
                while not stop.is_set():
                    for sock in socks:
                        with contextlib.suppress(OSError):
                            sock.send(b"X")
                    stop.wait(0.5)
            dripping = threading.Thread(target=drip)
            dripping.start()
            self.addCleanup(dripping.join)
            self.addCleanup(stop.set)
            served, started = [], time.monotonic()
            while time.monotonic() - started < 4:
                served.append(self.http("GET", "/login")[0])
                time.sleep(0.3)
            self.assertEqual(set(served), {200})
            self.assertGreaterEqual(len(served), 8)
            deadline = time.monotonic() + 5          # every slow head is cut by then
            for sock in socks:
                sock.settimeout(max(0.1, deadline - time.monotonic()))
                with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                    while sock.recv(4096):
                        pass

    def test_bad_input_is_a_400_and_every_answer_has_the_security_headers(self):
        cookie = self.login()
        with self.assertNoLogs("mms", "ERROR"):
            for length in ("abc", "-5"):
                status, headers, _ = self.http("POST", f"/messages/{self.plain}/hold",
                                               cookie=cookie, headers={"Content-Length": length})
                self.assertEqual(status, 400)
                self.assertEqual(headers["X-Content-Type-Options"], "nosniff")
            status, _, _ = self.http("POST", f"/messages/{self.plain}/hold",
                                     {"csrf": "\u00e9t\u00e9"}, cookie=cookie)
            self.assertEqual(status, 403)
            answers = [self.answer(self.raw_request(request)) for request in (
                b"PUT / HTTP/1.0\r\n\r\n", b"GET /" + b"a" * 9000 + b" HTTP/1.0\r\n\r\n",
                b"GET / HTTP/1.0\r\n" + b"X-A: b\r\n" * 2000 + b"\r\n", b"NONSENSE\r\n\r\n")]
        for answer, code in zip(answers, (b"501", b"414", b"431", b"400")):
            self.assertEqual(answer[9:12], code, answer[:80])
            for header in (b"Content-Security-Policy: default-src 'none'",
                           b"X-Content-Type-Options: nosniff", b"Referrer-Policy: no-referrer",
                           b"Cache-Control: no-store"):
                self.assertIn(header, answer)
        status, headers, _ = self.http("GET", "/messages.mbox", cookie=cookie)
        self.assertEqual(status, 200)
        for name in ("Content-Security-Policy", "X-Content-Type-Options", "Referrer-Policy",
                     "Cache-Control"):
            self.assertIn(name, headers)

    def test_a_time_out_of_range_is_a_400_that_says_the_range(self):
        cookie = self.login()
        with self.assertNoLogs("mms", "ERROR"):
            for path in ("/api/messages?since=99999999d", "/messages?since=99999999d",
                         "/messages?until=0001-01-01", "/api/stats?since=9999999999w",
                         "/audit?since=99999999d", "/messages?since=" + "9" * 5000 + "d",
                         "/messages?before=9999-12-31T23:59:59-23:00"):
                with self.subTest(path=path[:60]):
                    status, _, body = self.http("GET", path, cookie=cookie)
                    self.assertEqual(status, 400, body[:300])
                    self.assertRegex(body.decode(), r"at most 36500d|from 1970 to 2999|not an "
                                                    r"ISO date")
        done = self.archive_command("list", "--since", "99999999d")
        self.assertEqual(done.returncode, 2)
        self.assertIn("a time ago is at most 36500d", done.stderr)
        for option, value, said in (("--retention", "99999999", "days: 0 to 36500"),
                                    ("--timeout", "1e12", "at most 86400")):
            done = subprocess.run([sys.executable, MMS, "--server", "debug", option, value],
                                  capture_output=True, text=True, timeout=30)
            self.assertEqual(done.returncode, 2, option)
            self.assertIn(said, done.stderr)

    def test_an_unknown_filter_is_a_400_that_names_it(self):
        cookie = self.login()
        status, _, body = self.http("GET", "/messages?bogus=x&sender=%40example.org",
                                    cookie=cookie)
        self.assertEqual(status, 400)
        self.assertIn(b"no such filter: bogus", body)
        self.assertEqual(self.http("GET", "/api/messages?bogus=1", cookie=cookie)[0], 400)

    def test_slow_heads_from_many_addresses_hold_no_worker(self):
        """One trickling head from each of 40 addresses: a login from another address
        is served within 2 s all the while (the heads wait in a selector)."""
        stop = threading.Event()
        socks = [self.raw_request(b"GET / HTTP/1.1\r\n", source=f"127.0.3.{n + 1}")
                 for n in range(40)]

        def drip():
            while not stop.wait(0.5):
                for sock in socks:
                    with contextlib.suppress(OSError):
                        sock.send(b"X")
        dripping = threading.Thread(target=drip)
        dripping.start()
        self.addCleanup(dripping.join)
        self.addCleanup(stop.set)
        time.sleep(1)
        for n in range(5):
            started = time.monotonic()
            status, _, _ = self.post_login("viewer", self.PASSWORDS["viewer"],
                                           source="127.0.4.1")
            self.assertEqual(status, 303)
            self.assertLess(time.monotonic() - started, 2)
        self.assertEqual(len(self.web.heads.waiting), 40)       # all still trickling

    def test_names_cannot_be_told_from_the_time_a_login_takes(self):
        def timed(name, source, basic=False):
            cookie, token = self.login_form(source)
            started = time.perf_counter()
            if basic:
                status = self.http("GET", "/api/messages", source=source, headers={
                    "Authorization": "Basic " + base64.b64encode(
                        f"{name}:wrong".encode()).decode()})[0]
                self.assertEqual(status, 401)
            else:
                self.assertEqual(self.http("POST", "/login", {
                    "user": name, "password": "wrong", "csrf": token}, cookie=cookie,
                    source=source)[0], 401)
            return time.perf_counter() - started
        for basic in (False, True):
            with self.subTest(basic=basic):
                # Taken in turns, so that the machine's load falls on both alike. A name
                # told apart skips the hash: one side near 0 ms, the other the hash's tens.
                pairs = [(timed("nobody-here", f"127.0.1.{10 + basic}", basic),
                          timed("admin", f"127.0.1.{20 + basic}", basic)) for _ in range(9)]
                unknown, known = (sorted(side)[4] for side in zip(*pairs))
                self.assertLess(abs(unknown - known) / max(unknown, known), 0.5,
                                f"unknown {unknown * 1000:.1f} ms, known {known * 1000:.1f} ms")

    def test_concurrent_guesses_are_counted_before_the_hash(self):
        real, running, most = mms.password_matches, [0], [0]
        lock = threading.Lock()

        def measured(stored, password):      # the real hash, with its concurrency noted
            with lock:
                running[0] += 1
                most[0] = max(most[0], running[0])
            try:
                return real(stored, password)
            finally:
                with lock:
                    running[0] -= 1
        forms = [self.login_form("127.0.0.7") for _ in range(30)]

        def guess(i):
            while True:   # a connection over the address's cap is closed unread: again
                with contextlib.suppress(ConnectionError):
                    return self.http("POST", "/login", {
                        "user": "admin", "password": f"guess {i}", "csrf": forms[i][1]},
                        cookie=forms[i][0], source="127.0.0.7")[0]
                time.sleep(0.05)

        def guesses(n):   # 30 in all, as many at once as one address may connect
            return [guess(i) for i in range(n, 30, per_client)]
        per_client = mms.WebServer.PER_CLIENT
        with mock.patch.object(mms, "password_matches", measured):
            statuses = sum(concurrently(per_client, guesses), [])
        self.assertEqual(sorted(statuses), [401] * 10 + [429] * 20)
        self.assertLessEqual(most[0], mms.WEB_HASHING_MAX)

    def test_a_cross_site_form_cannot_log_a_browser_in(self):
        fields = {"user": "viewer", "password": self.PASSWORDS["viewer"]}
        for cookie, token in ((None, None), (self.login_form()[0], None),
                              (self.login_form()[0], self.login_form()[1])):
            with self.subTest(cookie=cookie, token=token):
                status, headers, _ = self.http("POST", "/login", dict(
                    fields, **({"csrf": token} if token else {})), cookie=cookie)
                self.assertEqual(status, 403)
                self.assertNotIn("mms_session", headers.get("Set-Cookie", ""))
        self.assertEqual(self.post_login("viewer", self.PASSWORDS["viewer"])[0], 303)

    def test_a_users_file_others_can_read_is_refused(self):
        os.chmod(self.users_file, 0o644)
        done = subprocess.run([sys.executable, MMS, "web", "--web", f"127.0.0.1:{free_port()}",
                               "--web-users", self.users_file, "--mongo-host", self.uri],
                              capture_output=True, text=True, timeout=30)
        self.assertEqual(done.returncode, 2)
        self.assertIn(f"can be read by others: chmod 600 {self.users_file}", done.stderr)


class TestConsoleSessions(WebCase):
    """Sessions and failed logins do not pile up under a scan: swept on a timer,
    capped in number (the oldest goes first)."""

    def setUp(self):
        for name, value in (("WEB_SWEEP_SECONDS", 0.2), ("WEB_SESSION_SECONDS", 2),
                            ("WEB_SESSIONS_MAX", 3), ("WEB_FAILURES_WINDOW", 1)):
            patcher = mock.patch.object(mms, name, value)
            patcher.start()
            self.addCleanup(patcher.stop)
        super().setUp()

    def test_sessions_expire_and_are_capped(self):
        cookies = [self.login("viewer") for _ in range(5)]
        self.assertEqual([self.http("GET", "/", cookie=c)[0] for c in cookies],
                         [303, 303, 200, 200, 200])          # the two oldest are gone
        self.assertEqual(len(self.web.sessions), 3)
        for n in range(5):
            self.post_login("viewer", "wrong", source=f"127.0.2.{n + 1}")
        self.assertEqual(len(self.web.failures), 5)
        deadline = time.monotonic() + 10
        while (self.web.sessions or self.web.failures) and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertEqual((self.web.sessions, self.web.failures), ({}, {}))
        self.assertEqual(self.http("GET", "/", cookie=cookies[-1])[0], 303)


def nested_mime(depth):
    """A message whose multipart parts are nested depth levels deep."""
    body = b"Content-Type: text/plain\r\n\r\ninnermost\r\n"
    for n in range(depth):
        boundary = b"b%d" % n
        body = (b"Content-Type: multipart/mixed; boundary=" + boundary + b"\r\n\r\n--" +
                boundary + b"\r\n" + body + b"\r\n--" + boundary + b"--\r\n")
    return b"Subject: deep\r\nMIME-Version: 1.0\r\n" + body


RLO = "\u202e"
HOSTILE_MIME = {
    "idna text": b"Subject: idna text\r\nMIME-Version: 1.0\r\n"
                 b"Content-Type: text/plain; charset=idna\r\n\r\nxn--nxasmq6b\r\n",
    "idna filename": b"Subject: idna filename\r\nMIME-Version: 1.0\r\n"
                     b"Content-Type: multipart/mixed; boundary=z\r\n\r\n--z\r\n"
                     b"Content-Type: application/octet-stream\r\n"
                     b"Content-Disposition: attachment; filename*=idna''evil.exe\r\n\r\n"
                     b"MZ\r\n--z--\r\n",
    "deep": nested_mime(2000),
    "bidi": b"Subject: =?utf-8?b?" + base64.b64encode(f"invoice {RLO}gnp.exe".encode()) +
            b"?=\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=z\r\n\r\n"
            b"--z\r\nContent-Type: text/plain\r\n\r\nsee attached\r\n--z\r\n"
            b"Content-Type: application/octet-stream\r\nContent-Disposition: attachment; "
            b"filename=\"=?utf-8?b?" + base64.b64encode(f"{RLO}gnp.exe".encode()) +
            b"?=\"\r\n\r\nMZ\r\n--z--\r\n",
}


class TestHostileMime(WebCase):
    """MIME built to break the message view: a charset that cannot decode, a filename
    in one, nesting 2,000 deep, bidi controls that turn 'exe' into 'png'. The page
    renders every time, says what it could not decode, and shows bidi controls."""

    def setUp(self):
        super().setUp()
        self.keys = {name: self.key(self.send_message(self.raw(), data))
                     for name, data in HOSTILE_MIME.items()}

    def test_every_page_renders_and_says_why(self):
        cookie = self.login("viewer")
        pages = {name: self.http("GET", f"/messages/{key}", cookie=cookie)
                 for name, key in self.keys.items()}
        for name, (status, _, _) in pages.items():
            self.assertEqual(status, 200, name)
        text = {name: html.unescape(body.decode()) for name, (_, _, body) in pages.items()}
        self.assertIn("Charset idna cannot be decoded", text["idna text"])
        self.assertIn("xn--nxasmq6b", text["idna text"])                # its bytes
        self.assertIn("the name cannot be decoded", text["idna filename"])
        self.assertIn("filename*=idna''evil.exe", text["idna filename"])
        self.assertIn("nested too deep", text["deep"])
        self.assertEqual(self.http("GET", "/messages", cookie=cookie)[0], 200)

    def test_bidi_controls_are_shown_and_values_isolated(self):
        cookie = self.login("viewer")
        for path in (f"/messages/{self.keys['bidi']}", "/messages"):
            body = self.http("GET", path, cookie=cookie)[2].decode()
            self.assertNotIn(RLO, body)
            self.assertIn("[U+202E]gnp.exe", body)
        self.assertIn("unicode-bidi:isolate", self.http("GET", "/style.css")[2].decode())

    def test_in_chromium(self):
        page = self.browser()
        base = f"http://127.0.0.1:{self.web_port}"
        page.goto(base + "/login")
        page.fill("input[name=user]", "viewer")
        page.fill("input[name=password]", self.PASSWORDS["viewer"])
        page.click("button[type=submit]")
        for name, key in self.keys.items():
            with self.subTest(name=name):
                answer = page.goto(f"{base}/messages/{key}")
                self.assertEqual(answer.status, 200)
                self.assertTrue(page.locator("main h1").is_visible())
        self.assertIn("[U+202E]gnp.exe", page.locator("main").inner_text())
        self.assertEqual(self.dialogs, [])


class TestConsoleVerdicts(WebCase):
    """One verdict everywhere (virus, banned, spam, unchecked, clean), and the
    console's release: a virus only after a page that names it, 'again' by name."""

    def setUp(self):
        super().setUp()
        self.virus = self.key(self.send_message(self.raw(), amavis_copy(
            "invoice", ["alice@example.com"], alert="INFECTED, message contains virus: Eicar"),
            rcpts=("virus-quarantine@example.net",)))
        self.banned = self.key(self.send_message(self.raw(), amavis_copy(
            "photos", ["alice@example.com"], alert="BANNED, message contains .exe"),
            rcpts=("banned-quarantine@example.net",)))

    def test_the_list_the_dashboard_and_the_api_say_the_same(self):
        self.server.mode.store.tally.flush()      # the daily counts, written each second
        cookie = self.login()
        self.assertEqual(self.http("POST", f"/messages/{self.plain}/hold",
                                   {"csrf": self.csrf(cookie)}, cookie=cookie)[0], 303)
        rows = {key: row for row, key in re.findall(
            r'(?s)<tr>(.*?href="/messages/([0-9a-f]{64})".*?)</tr>',
            self.http("GET", "/messages", cookie=cookie)[2].decode())}
        self.assertIn("virus", rows[self.virus])
        self.assertIn("banned", rows[self.banned])
        self.assertIn('<td data-label="State">legal hold</td>', rows[self.plain])
        chart = self.http("GET", "/dashboard", cookie=cookie)[2].decode()
        self.assertRegex(chart, r"<title>[0-9-]+: 1 banned</title>")
        self.assertIn('fill="#8e44ad">banned</text>', chart)
        api = json.loads(self.http("GET", "/api/messages", cookie=cookie)[2])
        self.assertEqual({doc["store_key"]: doc["verdict"] for doc in api["messages"]},
                         {self.virus: "virus", self.banned: "banned", self.plain: "clean",
                          self.hostile: "clean"})
        code, out, _ = self.mms_list()
        self.assertIn("[banned]", out)
        self.assertIn("[virus]", out)

    def test_a_virus_or_banned_message_is_deleted_or_released_only_when_confirmed(self):
        cookie = self.login()
        status, _, body = self.http("POST", f"/messages/{self.virus}/delete",
                                    {"csrf": self.csrf(cookie)}, cookie=cookie)
        self.assertEqual(status, 200)
        self.assertIn(b"Eicar", body)
        self.assertIn(b"Deleted, it is gone from the archive", body)
        self.assertIn(b'name="confirm" value="virus"', body)
        self.assertEqual(len(self.records()), 4)                   # nothing done yet
        status, _, body = self.http("POST", f"/messages/{self.virus}/delete",
                                    {"csrf": self.csrf(cookie), "confirm": "virus"}, cookie=cookie)
        self.assertEqual((status, len(self.records())), (200, 3))
        path = f"/messages/{self.banned}/release"
        status, _, body = self.http("POST", path, {"csrf": self.csrf(cookie)}, cookie=cookie)
        self.assertIn(b'name="confirm" value="banned"', body)
        self.assertEqual(self.down.messages, [])
        self.assertEqual(self.http("POST", path, {"csrf": self.csrf(cookie), "confirm": "banned"},
                                   cookie=cookie)[0], 303)
        self.assertEqual(len(self.down.messages), 1)

    def test_the_list_has_the_columns_a_reviewer_sorts_by_eye(self):
        self.server.mode.store.tally.flush()
        cookie = self.login()
        page = self.http("GET", "/messages", cookie=cookie)[2].decode()
        rows = {key: dict(re.findall(r'<td data-label="([^"]+)">([^<]*)</td>', row))
                for row, key in re.findall(
                    r'(?s)<tr>(.*?href="/messages/([0-9a-f]{64})".*?)</tr>', page)}
        self.assertEqual([rows[self.virus][n] for n in ("Verdict", "Score", "State")],
                         ["virus", "-", "-"])
        self.assertEqual(rows[self.plain]["Verdict"], "clean")
        self.assertRegex(rows[self.plain]["Size"], r"^[0-9]+ bytes$")
        for name in ("verdict", "quarantine", "held"):
            self.assertIn(f'<select name="{name}">', page)
        self.assertIn('<option value="0">not on legal hold</option>', page)
        self.assertEqual(self.http("GET", "/messages?quarantine=spma", cookie=cookie)[0], 400)
        dashboard = self.http("GET", "/dashboard", cookie=cookie)[2].decode()
        self.assertIn('<a class="figure" href="/messages?verdict=virus&amp;since=30d"><span>'
                      'virus</span> <strong>1</strong></a>', dashboard)
        self.assertIn('<a href="/messages?client=127.0.0.1&amp;since=7d">127.0.0.1</a>',
                      dashboard)

    def mms_list(self):
        done = self.archive_command("list")
        return done.returncode, done.stdout, done.stderr

    def test_a_virus_is_released_only_from_a_page_that_names_it(self):
        cookie = self.login()
        path = f"/messages/{self.virus}/release"
        status, _, body = self.http("POST", path, {"csrf": self.csrf(cookie)}, cookie=cookie)
        self.assertEqual(status, 200)
        self.assertIn(b"Eicar", body)
        self.assertIn(b'name="confirm" value="virus"', body)
        self.assertEqual(self.down.messages, [])                  # nothing sent yet
        status, _, _ = self.http("POST", path, {"csrf": self.csrf(cookie), "confirm": "virus"},
                                 cookie=cookie)
        self.assertEqual(status, 303)
        self.assertEqual(len(self.down.messages), 1)

    def test_a_second_release_names_the_consoles_own_control(self):
        cookie = self.login()
        path = f"/messages/{self.plain}/release"
        self.assertEqual(self.http("POST", path, {"csrf": self.csrf(cookie)}, cookie=cookie)[0],
                         303)
        status, _, body = self.http("POST", path, {"csrf": self.csrf(cookie)}, cookie=cookie)
        self.assertEqual(status, 409)
        self.assertIn(b"tick &quot;again&quot; to send it again", body)
        self.assertNotIn(b"--force", body)

    def test_a_unique_key_prefix_opens_the_message(self):
        cookie = self.login("viewer")
        status, headers, _ = self.http("GET", f"/messages/{self.plain[:10]}", cookie=cookie)
        self.assertEqual((status, headers["Location"]), (303, f"/messages/{self.plain}"))
        self.assertEqual(self.http("GET", "/messages/00000000", cookie=cookie)[0], 404)

    def test_the_start_up_line_names_where_releases_go(self):
        port = free_port()
        process = subprocess.Popen(
            [sys.executable, MMS, "web", "--web", f"127.0.0.1:{port}", "--web-users",
             self.users_file, "--mongo-host", self.uri, "--via", "127.0.0.1:10025"],
            stderr=subprocess.PIPE, text=True)
        self.addCleanup(process.kill)
        guard = threading.Timer(30, process.kill)       # no line at all: EOF, not a hang
        guard.start()
        self.addCleanup(guard.cancel)
        err = ""       # the line is written just after the port opens: waited for, not the port
        while "web console on" not in err and (line := process.stderr.readline()):
            err += line
        wait_port(port)
        process.terminate()
        err += process.communicate(timeout=30)[1]
        self.assertIn("releases via 127.0.0.1:10025", err)
        self.assertNotIn("('127.0.0.1'", err)


class TestQuarantinePage(WebCase):
    """Where every role lands: the mail awaiting judgement (spam, virus, banned; not
    released), newest first, asked on the (verdict, received) index with maxTimeMS,
    a scoped user's within their domains; each row with what a reviewer decides by
    and the actions their role allows."""

    PASSWORDS = {**WebCase.PASSWORDS, "reviewer": "tr0ub4dor", "scoped": "hunter2 hunter2",
                 "two": "correct horse"}

    def more_users(self):
        return [f"reviewer:{mms.hash_password(self.PASSWORDS['reviewer'])}:reviewer\n",
                f"scoped:{mms.hash_password(self.PASSWORDS['scoped'])}:reviewer:example.org\n",
                f"two:{mms.hash_password(self.PASSWORDS['two'])}:reviewer:"
                "example.org,example.net\n"]

    def web_uri(self):
        self.tap = WireTap(self.uri)
        self.addCleanup(self.tap.close)
        return f"mongodb://127.0.0.1:{self.tap.port}/?directConnection=true"

    def setUp(self):
        super().setUp()
        quarantine = ("spam-quarantine@example.net",)
        self.spam = self.key(self.send_message(self.raw(), amavis_copy(
            "cheap pills", ["bob@example.com"]), rcpts=quarantine))
        self.released = self.key(self.send_message(self.raw(), amavis_copy(
            "released pills", ["bob@example.com"]), rcpts=quarantine))
        self.virus = self.key(self.send_message(self.raw(), amavis_copy(
            "invoice", ["bob@example.com"], alert="INFECTED, message contains virus: Eicar"),
            rcpts=("virus-quarantine@example.net",)))
        self.banned = self.key(self.send_message(self.raw(), amavis_copy(
            "photos", ["bob@example.com"], alert="BANNED, message contains .exe"),
            rcpts=("banned@example.org",)))
        cookie = self.login()
        self.assertEqual(self.http("POST", f"/messages/{self.released}/release",
                                   {"csrf": self.csrf(cookie)}, cookie=cookie)[0], 303)

    def rows(self, user):
        page = self.http("GET", "/", cookie=self.login(user))[2].decode()
        return page, {key: row for row, key in re.findall(
            r'(?s)<tr class="[a-z]+">(.*?href="/messages/([0-9a-f]{64})".*?)</tr>', page)}

    def test_what_awaits_judgement_and_nothing_else(self):
        page, rows = self.rows("reviewer")
        self.assertEqual(list(rows), [self.banned, self.virus, self.spam])   # newest first
        self.assertIn("3 messages await judgement.", page)
        self.assertIn('<td data-label="Verdict">spam, score 12.5</td>', rows[self.spam])
        self.assertIn('<td data-label="Subject"><a href="/messages/'
                      f'{self.spam}">cheap pills</a></td>', rows[self.spam])
        self.assertRegex(rows[self.spam], r'<td data-label="Age">[0-9]+ min</td>')
        self.assertIn(f'action="/messages/{self.spam}/release"', rows[self.spam])
        self.assertNotIn("/release", rows[self.virus])        # not a reviewer's to release
        self.assertNotIn("<button", self.rows("viewer")[0].split("</header>")[1])
        _, scoped = self.rows("scoped")                        # example.org's only
        self.assertEqual(list(scoped), [self.banned])

    def test_asked_on_its_index_with_max_time(self):
        self.tap.commands.clear()
        self.rows("scoped")
        [find, *counts] = [c for c in self.tap.sent("find", "message")
                           if "verdict" in str(c["filter"])]
        self.assertEqual(find["filter"], {
            "verdict": {"$in": ["virus", "banned", "spam"]}, "released": {"$in": [None]},
            "rcpt_domain": "example.org"})
        self.assertEqual((find["sort"], find["limit"], find["maxTimeMS"]),
                         ({"received": -1}, mms.WEB_PAGE + 1, mms.WEB_QUERY_MS))
        left = mms.WEB_COUNT_MAX + 1              # how many, up to 1,001: a verdict at a
        for verdict, count in zip(mms.AWAITING, counts, strict=True):   # time, each a point
            self.assertEqual((count["filter"], count["projection"], count["limit"],
                              count["maxTimeMS"]), ({**find["filter"], "verdict": {
                                  "$gte": verdict, "$lte": verdict}}, {"_id": 1}, left,
                                  mms.WEB_QUERY_MS))
            left -= verdict == "banned"           # the one message for example.org

    def test_the_count_stops_at_its_limit(self):
        """The first verdicts fill the count's limit: the others are not asked."""
        self.tap.commands.clear()
        with mock.patch.object(mms, "WEB_COUNT_MAX", 1):
            page, _ = self.rows("admin")
        self.assertIn("More than 1 messages await judgement.", page)
        counts = [c for c in self.tap.sent("find", "message") if c["projection"] == {"_id": 1}]
        self.assertEqual([(c["filter"]["verdict"]["$gte"], c["limit"]) for c in counts],
                         [("virus", 2), ("banned", 1)])

    def test_more_than_its_limit_is_a_bound_kept_until_a_release(self):
        """A busy quarantine's "more than" is counted once a minute, not at each visit;
        a release on the console forgets it, and the page says the number again."""
        def counts():
            return [c for c in self.tap.sent("find", "message") if c["projection"] == {"_id": 1}]
        with mock.patch.object(mms, "WEB_COUNT_MAX", 2):
            self.tap.commands.clear()
            for _ in range(2):
                self.assertIn("More than 2 messages await judgement.", self.rows("admin")[0])
            self.assertEqual(len(counts()), 3)      # the first visit's: a verdict at a time
            with mock.patch.object(mms, "WEB_OVER_KEEP", 0):    # a minute on
                self.assertIn("More than 2 messages", self.rows("admin")[0])
            self.assertEqual(len(counts()), 6)
            cookie = self.login()
            self.assertEqual(self.http("POST", f"/messages/{self.spam}/release",
                                       {"csrf": self.csrf(cookie)}, cookie=cookie)[0], 303)
            for _ in range(2):
                self.assertRegex(self.rows("admin")[0], r">2 messages await judgement\.")
            self.assertEqual(len(counts()), 12)     # a number is counted at each visit

    def test_older_pages_are_ranges_of_the_same_query(self):
        with mock.patch.object(mms, "WEB_PAGE", 2):
            page, rows = self.rows("admin")
            self.assertEqual(list(rows), [self.banned, self.virus])
            older = html.unescape(re.search(r'<a href="(/\?[^"]+)">Older messages</a>',
                                            page).group(1))
            page = self.http("GET", older, cookie=self.login())[2].decode()
        self.assertIn(f'href="/messages/{self.spam}"', page)
        self.assertNotIn(f'href="/messages/{self.virus}"', page)
        finds = [c for c in self.tap.sent("find", "message") if "$and" in c["filter"]]
        # One range of (verdict, received) a verdict, merged by date, in windows from
        # the edge; the verdict a point of its index, as nx-27017 serves it.
        for verdict in mms.AWAITING:
            point = {"$gte": verdict, "$lte": verdict}
            ranges, windows = zip(*(({key: value for key, value in find["filter"].items()
                                      if key != "$and"}, find["filter"]["$and"][0])
                                    for find in finds if find["filter"]["verdict"] == point))
            edge = ranges[0]["received"]["$lte"]
            self.assertEqual(list(ranges), [{"verdict": point, "received": {"$lte": edge}}]
                             * len(ranges))
            self.assertEqual(windows[0]["received"], {"$gte": edge - mms.DAY})   # a day first
            for newer, window in zip(windows, windows[1:]):
                self.assertEqual(window["received"]["$lt"], newer["received"]["$gte"])
        for find in finds:
            self.assertEqual((find["sort"], find["maxTimeMS"]), ({"received": -1},
                                                                 mms.WEB_QUERY_MS))

    def test_a_user_of_two_domains_gets_one_range_a_domain_and_each_message_once(self):
        """A message quarantined for both domains is read in both ranges, and shown
        once."""
        both = self.key(self.send_message(self.raw(), amavis_copy("both", ["bob@example.com"]),
                                          rcpts=("spam@example.net", "banned@example.org")))
        cookie, pages, path, ranges = self.login("two"), [], "/", set()
        with mock.patch.object(mms, "WEB_PAGE", 1):
            while path:
                self.tap.commands.clear()
                page = self.http("GET", path, cookie=cookie)[2].decode()
                pages.append(re.findall(r'<tr class="[a-z]+">.*?href="/messages/([0-9a-f]{64})"',
                                        page, re.S))
                older = re.search(r'<a href="(/\?[^"]+)">Older messages</a>', page)
                path = older and html.unescape(older.group(1))
                finds = [c["filter"] for c in self.tap.sent("find", "message")
                         if "received" in str(c["filter"])]
                ranges |= {re.search(r"'verdict': \{'\$gte': '(\w+)'.*'rcpt_domain': '([\w.]+)'",
                                     find).groups() for find in map(str, finds)}
        self.assertEqual(pages, [[both], [self.banned], [self.virus], [self.spam]])
        self.assertEqual(ranges, {(verdict, domain) for verdict in mms.AWAITING  # no $in
                                  for domain in ("example.org", "example.net")})
        self.tap.commands.clear()
        status, _, body = self.http("GET", "/messages?since=1d", cookie=cookie)
        self.assertEqual(status, 200)
        found = list(dict.fromkeys(re.findall(r'href="/messages/([0-9a-f]{64})"',
                                              body.decode())))
        self.assertEqual(found, [both, self.banned, self.virus, self.released, self.spam])
        self.assertIn("5 messages", body.decode())
        # A since is where reading stops (newest_since): the domains' $in, no date,
        # newest first, in batches of 101; the page is the count's rows, read again.
        [count, page] = self.tap.sent("find", "message")
        self.assertEqual({k: count[k] for k in ("filter", "sort", "limit", "batchSize")},
                         {"filter": {"rcpt_domain": {"$in": ["example.org", "example.net"]}},
                          "sort": {"received": -1}, "limit": mms.WEB_COUNT_MAX + 1,
                          "batchSize": mms.Archive.SINCE_BATCH})
        self.assertEqual(set(page["filter"]), {"_id", "store_key"})

    def test_a_failed_release_says_what_to_do_and_links_back(self):
        self.down.close()                                      # nothing listens there now
        cookie = self.login()
        status, _, body = self.http("POST", f"/messages/{self.spam}/release",
                                    {"csrf": self.csrf(cookie)}, cookie=cookie)
        page = html.unescape(body.decode())
        self.assertEqual(status, 502)
        self.assertIn("<h1>Not delivered</h1>", page)
        self.assertIn("did not take the message (Connection refused). The message is still "
                      "here, unchanged. Try again in a few minutes", page)
        self.assertIn(f'<a href="/messages/{self.spam}">Back to the message</a>', page)
        self.assertEqual(self.http("GET", "/messages/" + "0" * 64, cookie=cookie)[0], 404)


class TestConsoleAtScale(WebCase):
    """What the console asks MongoDB, read off the wire: each search in the form an
    index serves, every read bounded by maxTimeMS, and one that runs out said on
    the page, never retried or run again by the next visitor."""

    READS = ("find", "aggregate", "count", "distinct")

    def web_uri(self):
        self.tap = WireTap(self.uri)
        self.addCleanup(self.tap.close)
        return f"mongodb://127.0.0.1:{self.tap.port}/?directConnection=true"

    def reads(self):
        return [c for c in list(self.tap.commands) if next(iter(c)) in self.READS]

    def test_an_older_page_is_a_range_and_passes_over_the_rows_shown(self):
        """Three messages of one second: the older page's edge is that second, and the
        two shown already are read again and passed over, not asked away with $nin.
        The page is its count's first rows (counted_page), read by _id and store_key."""
        old_messages(self.uri, self.dbname, 3, datetime.datetime(2024, 5, 1, tzinfo=mms.UTC))
        cookie = self.login("viewer")
        with mock.patch.object(mms, "WEB_PAGE", 2):
            first = self.http("GET", "/messages?sender=old%40x.org", cookie=cookie)[2].decode()
            older = html.unescape(re.search(r'<a href="(/messages\?[^"]+)">Older', first)
                                  .group(1))
            before = len(self.tap.sent("find", "message"))
            second = self.http("GET", older, cookie=cookie)[2].decode()
        shown, rest = (re.findall(r'href="/messages/([0-9a-f]{64})"', page)
                       for page in (first, second))
        self.assertEqual((len(shown), len(rest), set(shown) & set(rest)), (2, 1, set()))
        self.assertIn("skip=", older)
        find = self.tap.sent("find", "message")[before]
        edge = datetime.datetime(2024, 5, 1)
        self.assertEqual(find["filter"], {   # and a day from the edge (newest_keys)
            "sender": {"$gte": "old@x.org", "$lte": "old@x.org"}, "received": {"$lte": edge},
            "$and": [{"received": {"$gte": edge - mms.DAY}}]})
        self.assertEqual((find["limit"], find["projection"]),
                         (mms.WEB_COUNT_MAX + 1, {"store_key": 1, "received": 1}))
        rows = self.tap.sent("find", "message")[-1]             # after the count's windows
        self.assertEqual(rows["filter"], {"_id": {"$in": [mock.ANY]},
                                          "store_key": {"$in": rest}})
        self.assertIn("maxTimeMS", rows)

    def test_another_tools_document_without_a_store_key_is_listed(self):
        """A document another tool wrote, with no store_key: the page of a date range,
        read again by _id and store_key, lists it all the same (null matches the
        missing field), as a page read on its own did."""
        self.db["message"].insert_one({"sender": "other@x.org", "sender_domain": "x.org",
                                       "received": datetime.datetime.now(mms.UTC), "size": 1})
        status, _, body = self.http("GET", "/messages?sender=other%40x.org&since=1d",
                                    cookie=self.login("viewer"))
        self.assertEqual(status, 200, body[:300])
        self.assertIn(b"<strong>1 message</strong>", body)
        self.assertIn(b"other@x.org", body)

    def test_a_first_page_that_holds_every_match_is_its_own_count(self):
        """Three messages of a sender: on a page of 50, one find and "3 messages"; on
        pages of two, the count is asked (up to 1,001 _ids) beside the page."""
        for _ in range(3):
            self.send_message(self.raw(), b"Subject: s\r\n\r\nbody\r\n", sender="three@x.org")
        cookie = self.login("viewer")
        for size, finds in ((50, [50 + 1]), (2, [2 + 1, mms.WEB_COUNT_MAX + 1])):
            with self.subTest(size=size), mock.patch.object(mms, "WEB_PAGE", size):
                before = len(self.tap.sent("find", "message"))
                page = self.http("GET", "/messages?sender=three%40x.org", cookie=cookie)[2]
                self.assertIn(b"<p><strong>3 messages</strong></p>", page)
                self.assertEqual([f["limit"] for f in self.tap.sent("find", "message")[before:]],
                                 finds)

    def test_a_page_of_a_date_range_is_its_counts_first_rows(self):
        """Five messages of a sender, two a page, since=1d: each page is the first rows
        of its count's read, newest first, read again by _id and store_key, and not
        read a second time on its own (nx-27017 reads every message's date for each
        date range). A count MongoDB stops leaves the rows, read once more, and no
        count."""
        keys = []
        for n in range(5):
            keys.insert(0, self.key(self.send_message(
                self.raw(), b"Subject: s\r\n\r\nbody\r\n", sender="five@x.org")))
            time.sleep(0.01)
        cookie, path, pages = self.login("viewer"), "/messages?sender=five%40x.org&since=1d", []
        with mock.patch.object(mms, "WEB_PAGE", 2):
            while path:
                before = len(self.tap.sent("find", "message"))
                page = self.http("GET", path, cookie=cookie)[2].decode()
                finds = self.tap.sent("find", "message")[before:]
                pages.append((re.findall(r'href="/messages/([0-9a-f]{64})"', page),
                              re.search(r"<p><strong>([^<]*)</strong>", page).group(1)))
                self.assertEqual([f["projection"] for f in finds[:-1]],
                                 [{"store_key": 1, "received": 1}] * (len(finds) - 1))
                self.assertEqual(finds[0]["limit"], mms.WEB_COUNT_MAX + 1)
                self.assertEqual(set(finds[-1]["filter"]), {"_id", "store_key"})
                start = 2 * (len(pages) - 1)             # the page's rows and one more
                self.assertEqual(finds[-1]["filter"]["store_key"]["$in"], keys[start:start + 3])
                older = re.search(r'<a href="(/messages\?[^"]+)">Older', page)
                path = older and html.unescape(older.group(1))
            self.assertEqual([rows for rows, _ in pages], [keys[0:2], keys[2:4], keys[4:]])
            # The first page's count: an older page counts its edge's whole second on
            # nx-27017 (which compares dates to the second), where MongoDB's does not.
            self.assertEqual(pages[0][1], "5 messages")

            def stopped(command, answer):
                if command.get("projection") == {"store_key": 1, "received": 1}:
                    return {"ok": 0.0, "code": 50, "codeName": "MaxTimeMSExpired",
                            "errmsg": "operation exceeded time limit"}

            self.tap.on_reply = stopped
            before = len(self.tap.sent("find", "message"))
            page = self.http("GET", "/messages?sender=five%40x.org&since=1d",
                             cookie=cookie)[2].decode()
        self.tap.on_reply = None
        self.assertEqual(re.findall(r'href="/messages/([0-9a-f]{64})"', page), keys[0:2])
        self.assertNotIn("5 messages", page)
        self.assertEqual([f["limit"] for f in self.tap.sent("find", "message")[before:]],
                         [mms.WEB_COUNT_MAX + 1, 2 + 1])   # the count once, then the page

    def test_a_word_searchs_pages_read_its_matches_from_the_newest(self):
        """Five messages with the word, two a page: no page asks a date beside the
        $text (nx-27017 reads every message for one); each reads the matches from the
        newest, as far as start= says the newer pages went, and the pages hold each
        message once, newest first, there and back."""
        keys = []
        for n in range(5):
            keys.insert(0, self.key(self.send_message(
                self.raw(), f"Subject: invoice {n}\r\n\r\nbody\r\n".encode())))
            time.sleep(0.01)
        cookie, pages, path = self.login("viewer"), [], "/messages?subject=invoice"
        with mock.patch.object(mms, "WEB_PAGE", 2):
            while path:
                before = len(self.tap.sent("find", "message"))
                page = self.http("GET", path, cookie=cookie)[2].decode()
                pages.append((re.findall(r'href="/messages/([0-9a-f]{64})"', page),
                              self.tap.sent("find", "message")[before]))
                older = re.search(r'<a href="(/messages\?[^"]+)">Older', page)
                path = older and html.unescape(older.group(1))
            newer = html.unescape(re.search(r'<a href="(/messages\?[^"]+)">Newer', page).group(1))
            back = re.findall(r'href="/messages/([0-9a-f]{64})"',
                              self.http("GET", newer, cookie=cookie)[2].decode())
        self.assertEqual([shown for shown, _ in pages], [keys[0:2], keys[2:4], keys[4:]])
        self.assertEqual(back, keys[2:4])
        for _, find in pages:
            self.assertNotIn("received", str(find["filter"]))
            self.assertEqual(find["sort"], {"received": -1})
        self.assertEqual([find["limit"] for _, find in pages], [2 + 1, 2 + 1 + 1 + 2,
                                                               2 + 1 + 1 + 4])
        self.assertIn("start=2", newer)          # the rows above the page it goes to

    def test_every_read_carries_the_consoles_max_time(self):
        cookie = self.login()
        for path in ["/", "/dashboard", "/messages", "/messages?sender=%40example.org&verdict=clean",
                     "/messages?rcpt=%40example.com&client=127.0.0.0%2F8&subject=test",
                     f"/messages/{self.plain}", f"/messages/{self.plain}/raw",
                     f"/messages/{self.plain[:12]}", "/messages.mbox?since=1d",
                     "/api/messages?quarantine=spam", f"/api/messages/{self.plain}",
                     "/api/stats?since=1d&by=sender-domain", f"/messages/{self.hostile}/preview",
                     f"/messages/{self.hostile}/parts/0", "/audit?user=admin",
                     "/messages?sort=size"]:
            with self.subTest(path):
                self.assertIn(self.http("GET", path, cookie=cookie, headers={
                    "Sec-Fetch-Dest": "iframe"} if path.endswith("/preview") else None)[0],
                    (200, 302, 303), path)
        reads = self.reads()
        self.assertGreater(len(reads), 15)
        unbounded = [c for c in reads if c.get("maxTimeMS") != mms.WEB_QUERY_MS]
        self.assertEqual(unbounded, [])
        self.assertEqual([c for c in reads if c.get("skip")], [])     # pages are ranges

    def test_each_filter_is_asked_as_its_index_serves_it(self):
        """The README's table, "At scale": one filter, one indexed field."""
        cookie = self.login()
        hex_range = {"$gte": "00000000000000000000ffff7f000000",
                     "$lte": "00000000000000000000ffff7fffffff"}
        def point(value):           # a field of one value: [value, value] (as_points)
            return {"$gte": value, "$lte": value}
        table = {
            "sender=%40Example.ORG": {"sender_domain": point("example.org")},
            "sender=evil%40example.org": {"sender": point("evil@example.org")},
            "sender=%3C%3E": {"sender": point("")},
            "rcpt=%40example.com": {"rcpt_domain": "example.com"},
            "rcpt=b%40example.com": {"$or": [{"rcpt": "b@example.com"},
                                             {"quarantine_to": "b@example.com"}]},
            "verdict=virus": {"verdict": point("virus")},
            "virus=1": {"verdict": point("virus")},
            "client=127.0.0.0%2F8": {"client_hex": hex_range},
            "message_id=%3Cm1%40x.org%3E": {"message_id": "m1@x.org"},
            "quarantine=spam": {"quarantine": point("spam")},
            "subject=Invoice%20n%C2%BA%207": {"$text": {"$search": "Invoice"}, "subject": {
                "$regex": "(?i)" + re.escape("Invoice nº 7")}},   # its longest word
        }
        asked = set()
        for query, expected in table.items():
            # Pages of none: a page that holds every match is its own count ("No
            # messages"), and a count is asked where the page's one more row came back.
            with self.subTest(query), mock.patch.object(mms, "WEB_PAGE", 0):
                before = len(self.tap.sent("find", "message"))
                status, _, body = self.http("GET", f"/messages?{query}", cookie=cookie)
                self.assertEqual(status, 200)
                [find, *counts] = self.tap.sent("find", "message")[before:]
                self.assertEqual(find["filter"], expected)
                self.assertEqual(find["sort"], {"received": -1})
                self.assertEqual(find["limit"], 0 + 1)
                self.assertEqual(len(counts), int(b"<strong>No messages</strong>" not in body))
                for count in counts:
                    self.assertEqual((count["filter"], count["projection"], count["limit"]),
                                     (expected, {"_id": 1}, mms.WEB_COUNT_MAX + 1))
                    asked.add(query)
        self.assertEqual(len(asked), 5)    # sender domain and address, rcpt, and client

    def test_more_than_its_limit_is_a_bound_kept_a_minute(self):
        """A busy search's first page counts it once a minute; a number
        under the limit is counted at each visit, and the bound is each search's own."""
        old_messages(self.uri, self.dbname, 3, datetime.datetime(2024, 5, 1, tzinfo=mms.UTC))
        cookie = self.login("viewer")

        def counts(query):
            before = len(self.tap.sent("find", "message"))
            body = self.http("GET", f"/messages?{query}", cookie=cookie)[2].decode()
            said = re.search(r"<p><strong>([^<]*)</strong>", body).group(1)
            return said, sum(c["projection"] == {"_id": 1}
                             for c in self.tap.sent("find", "message")[before:])
        with mock.patch.object(mms, "WEB_PAGE", 1):
            for _ in range(2):
                self.assertEqual(counts("sender=old%40x.org"), ("3 messages", 1))
            with mock.patch.object(mms, "WEB_COUNT_MAX", 2):
                self.assertEqual(counts("sender=old%40x.org"), ("More than 2 messages", 1))
                self.assertEqual(counts("sender=old%40x.org"), ("More than 2 messages", 0))
                self.assertEqual(counts("sender=%40x.org"), ("More than 2 messages", 1))
                with mock.patch.object(mms, "WEB_OVER_KEEP", 0):    # a minute on
                    self.assertEqual(counts("sender=old%40x.org"), ("More than 2 messages", 1))

    def test_a_field_of_one_value_is_a_point_of_its_index(self):
        """Equality on a field that holds one value is asked as the range [value,
        value], with a date or without: one point of the same index on MongoDB, and
        the form nx-27017 reads from that index. A recipient domain, one of an
        array, stays equality."""
        cookie = self.login()
        point = {"$gte": "evil@example.org", "$lte": "evil@example.org"}
        for query in ("sender=evil%40example.org&rcpt=%40example.com&since=1d",
                      "sender=evil%40example.org&rcpt=%40example.com"):
            with self.subTest(query):
                before = len(self.tap.sent("find", "message"))
                status, _, body = self.http("GET", f"/messages?{query}", cookie=cookie)
                self.assertEqual(status, 200)
                self.assertEqual(set(re.findall(r'href="/messages/([0-9a-f]{64})"',
                                                body.decode())), {self.hostile})
                find = self.tap.sent("find", "message")[before]["filter"]
                clauses = [find, *find.get("$and", ())]
                self.assertEqual([c["sender"] for c in clauses if "sender" in c], [point])
                self.assertEqual([c["rcpt_domain"] for c in clauses if "rcpt_domain" in c],
                                 ["example.com"])

    def test_a_subject_of_short_words_says_it_cannot_be_searched_so(self):
        status, _, body = self.http("GET", "/messages?subject=re%3A%20hi", cookie=self.login())
        self.assertEqual(status, 400)
        self.assertIn(b"subject: a word of 3 letters or more", body)
        self.assertEqual(self.tap.sent("find", "message"), [])

    def test_a_search_mongodb_stops_is_said_and_not_retried(self):
        """MaxTimeMSExpired (code 50), as MongoDB answers a query over its maxTimeMS."""
        cookie = self.login()
        self.tap.on_reply = lambda command, answer: (
            {"ok": 0.0, "code": 50, "codeName": "MaxTimeMSExpired",
             "errmsg": "operation exceeded time limit"}
            if command.get("find") == "message" else None)
        before = len(self.tap.sent("find", "message"))
        with self.assertNoLogs("mms", "ERROR"):
            status, _, body = self.http("GET", "/messages?subject=invoice", cookie=cookie)
            self.assertEqual(status, 200)
            self.assertIn(b"not available now", body)
            self.assertIn(b"Narrow it", body)
            self.assertEqual(len(self.tap.sent("find", "message")), before + 1)  # no retry
            status, headers, body = self.http("GET", "/api/messages?subject=xyz", cookie=cookie)
        self.assertEqual((status, headers["Retry-After"]), (503, "60"))
        self.assertIn("not available now", json.loads(body)["error"])
        self.tap.on_reply = None
        self.assertEqual(self.http("GET", "/messages?subject=invoice", cookie=cookie)[0], 200)

    def test_a_dashboard_figure_mongodb_stops_is_said_and_made_once(self):
        """Eight visitors at once, each count stopped at maxTimeMS: one visit's worth
        of queries, a page for every visitor, with the figures that could be had."""
        cookie = self.login()
        self.web.cache.clear()
        gate = threading.Event()

        def slow(command):
            if "message_daily" in (command.get("find"), command.get("aggregate")):
                gate.wait(10)

        def stopped(command, answer):
            if command.get("aggregate") == "message_daily" and command["pipeline"][0][
                    "$match"]["_id"].get("$gte", "").startswith("verdict|"):
                return {"ok": 0.0, "code": 50, "codeName": "MaxTimeMSExpired",
                        "errmsg": "operation exceeded time limit"}

        self.tap.on_request, self.tap.on_reply = slow, stopped
        def asked():
            return len(self.tap.sent("find", "message_daily") +
                       self.tap.sent("aggregate", "message_daily"))
        before = asked()
        threading.Timer(1, gate.set).start()
        pages = concurrently(8, lambda n: self.http("GET", "/dashboard", cookie=cookie))
        self.assertEqual({status for status, _, _ in pages}, {200})
        for _, _, body in pages:
            self.assertIn(b"not available now", body)        # the verdicts' figures
            self.assertIn(b"Top sender domains", body)
        self.assertEqual(asked() - before, 3 + len(mms.DASHBOARD_TOPS))   # verdicts, held
        #                                                   and released, lists, the tops

    def test_the_audit_log_and_a_bulk_search_are_asked_on_their_indexes(self):
        cookie = self.login()
        self.assertEqual(self.http("GET", "/audit?user=admin&action=hold&since=1d",
                                   cookie=cookie)[0], 200)
        [find] = self.tap.sent("find", "message_audit")
        self.assertEqual(clauses(find["filter"])[:2], [{"user": "admin"}, {"action": "hold"}])
        self.assertEqual((find["sort"], find["limit"], find["maxTimeMS"]),
                         ({"at": -1}, 4 * mms.WEB_PAGE, mms.WEB_QUERY_MS))
        self.assertNotIn("skip", find)
        self.http("POST", "/messages/bulk", {"csrf": self.csrf(cookie), "action": "hold",
                                             "all": "1", "sender": "@example.org"}, cookie=cookie)
        [count] = [c for c in self.tap.sent("aggregate", "message")
                   if c["pipeline"][0]["$match"] == {"sender_domain": {
                       "$gte": "example.org", "$lte": "example.org"}}]
        self.assertEqual(count["maxTimeMS"], mms.WEB_QUERY_MS)

    def test_each_write_to_a_message_names_its_shard_key(self):
        """_id and store_key in every filter, so that on a collection sharded on a
        hashed store_key (the README's advice) a write goes to one shard."""
        cookie = self.login()
        for action in ("hold", "unhold", "release", "delete"):
            with self.subTest(action):
                status, _, body = self.http("POST", f"/messages/{self.plain}/{action}",
                                            {"csrf": self.csrf(cookie)}, cookie=cookie)
                self.assertIn(status, (200, 303), body)   # delete says so on a page
        writes = [(c["q"] if "q" in c else c["query"])
                  for c in [*(u for cmd in self.tap.sent("update", "message")
                              for u in cmd["updates"]),
                            *(d for cmd in self.tap.sent("delete", "message")
                              for d in cmd["deletes"]),
                            *self.tap.sent("findAndModify", "message")]]
        self.assertGreaterEqual(len(writes), 5)   # hold, unhold, claim, done, delete
        for q in writes:
            self.assertIsInstance(q["_id"], bson.ObjectId)
            self.assertEqual(q["store_key"], self.plain, q)
        # hold, unhold, the release's claim and delete: each gets the state before
        self.assertEqual(len(self.tap.sent("findAndModify", "message")), 4)


PNG_1PX = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==")
PHISH = mime(
    mime(b"Content-Type: text/plain\r\n\r\nYour account is locked.",
         b"Content-Type: text/html; charset=utf-8\r\n\r\n"
         b"<html><head><meta http-equiv=\"refresh\" content=\"0;url=http://198.51.100.7/go\">"
         b"<base href=\"http://198.51.100.7/\"></head><body>"
         b"<script>alert('preview')</script><img src=x onerror=\"alert('img')\">"
         b"<p>Dear customer, sign in at <a href=\"http://paypa1.example/login\">www.paypal.com"
         b"</a> or <a href='https://www.paypal.com/help'>help</a>.</p>"
         b"<img id=\"logo\" src=\"cid:logo@x\" alt=\"logo\">"
         b"<img src=\"http://198.51.100.7/track.png\"><div style=\"background:url("
         b"'https://198.51.100.7/bg.png')\">x</div>"
         b"<form action=\"http://198.51.100.7/steal\"><input name=p></form></body></html>",
         b"Content-Type: image/png\r\nContent-ID: <logo@x>\r\nContent-Transfer-Encoding: "
         b"base64\r\n\r\n" + base64.b64encode(PNG_1PX),
         kind="related", boundary="rel"),
    attachment(b'filename="invoice.pdf.exe"', b"MZ\x90\x00 a program", b"application/pdf"),
    head=b"From: \"PayPal\" <service@paypa1.example>\r\nTo: <bob@example.com>\r\n"
         b"Subject: Your account\r\nDate: Fri, 04 Dec 2026 14:54:08 +0000\r\n")


class TestMessageView(WebCase):
    """The message as a reviewer judges it: who and when in words, the HTML in a
    sandbox that runs and loads nothing, its links with their real targets, its
    attachments with what their bytes say, each one downloadable as bytes."""

    PASSWORDS = {**WebCase.PASSWORDS, "tokyo": "sakura sakura"}

    def web_args(self):
        return ["--web-timezone", "Europe/Paris"]

    def more_users(self):
        return [f"tokyo:{mms.hash_password(self.PASSWORDS['tokyo'])}:viewer::Asia/Tokyo\n"]

    def setUp(self):
        super().setUp()
        self.phish = self.key(self.send_message(self.raw(), PHISH, sender="bounce@paypa1.example",
                                                rcpts=("bob@example.com",)))

    def test_the_summary_reads_like_a_mail_client(self):
        cookie = self.login()
        self.assertEqual(self.http("POST", f"/messages/{self.phish}/release",
                                   {"csrf": self.csrf(cookie)}, cookie=cookie)[0], 303)
        page = self.http("GET", f"/messages/{self.phish}", cookie=cookie)[2].decode()
        rows = dict(re.findall(r"<tr><th>([^<]+)</th><td>([^<]*)</td></tr>",
                               page.split('<table class="summary">')[1].split("</table>")[0]))
        self.assertEqual(rows["From"], "&quot;PayPal&quot; &lt;service@paypa1.example&gt; "
                                       "(envelope: bounce@paypa1.example)")
        self.assertEqual(rows["Date"], "04 Dec 2026 15:54 Europe/Paris")
        self.assertRegex(rows["Size"], r"^[0-9.]+ KB$")
        self.assertEqual(rows["Verdict"], "clean")
        self.assertRegex(rows["History"], r"^released to bob@example.com by admin, "
                                          r"[0-9]{2} \w{3} 20[0-9]{2} [0-9:]{5} Europe/Paris \(250")
        self.assertIn("<summary>All stored fields</summary>", page)
        page = self.http("GET", f"/messages/{self.phish}", cookie=self.login("tokyo"))[2]
        self.assertIn(b"<tr><th>Date</th><td>04 Dec 2026 23:54 Asia/Tokyo</td></tr>", page)

    def test_the_verdict_says_what_the_scanners_said(self):
        """filter mode's fields (spamd's score, required score and rules; clamd's names)."""
        self.assertEqual(mms.verdict_sentence({
            "is_spam": 1, "spam_score": 7.5, "spam_required": 5.0,
            "spam_symbols": ["BAYES_99", "URIBL_BLOCKED"]}),
            "spam; spam score 7.5 (required 5.0); rules BAYES_99, URIBL_BLOCKED")
        self.assertEqual(mms.verdict_sentence({"is_virus": 1, "virus": ["Eicar-Signature"]}),
                         "virus; virus Eicar-Signature")

    def test_the_preview_runs_nothing_loads_nothing_and_tells_the_links(self):
        cookie = self.login("viewer")
        status, headers, body = self.http("GET", f"/messages/{self.phish}/preview", cookie=cookie,
                                          headers={"Sec-Fetch-Dest": "iframe"})
        self.assertEqual(status, 200)
        self.assertEqual(headers["Content-Security-Policy"], mms.PREVIEW_CSP)
        preview = body.decode()
        self.assertIn("data:image/png;base64," + base64.b64encode(PNG_1PX).decode(), preview)
        for gone in ("http-equiv", "<base", "<form", " href="):
            self.assertNotIn(gone, preview)
        page = self.http("GET", f"/messages/{self.phish}", cookie=cookie)[2].decode()
        self.assertIn('<iframe class="preview" sandbox', page)
        self.assertIn("2 remote image(s) not loaded", page)
        self.assertIn('<td data-label="Text">www.paypal.com</td><td data-label="Goes to">'
                      'http://paypa1.example/login</td><td data-label="Warning">text says '
                      'www.paypal.com, goes to paypa1.example</td>', page)
        self.assertIn('<td data-label="Text">help</td><td data-label="Goes to">'
                      'https://www.paypal.com/help</td><td data-label="Warning">-</td>', page)

    def test_in_chromium_the_preview_runs_nothing_and_loads_nothing_remote(self):
        page = self.browser()
        asked, failed = [], {}
        page.on("request", lambda request: asked.append(request.url))
        page.on("requestfailed", lambda request: failed.__setitem__(request.url,
                                                                     request.failure))
        base = self.log_in(page, "viewer")
        page.goto(f"{base}/messages/{self.phish}")
        frame = page.frame_locator("iframe.preview")
        self.assertEqual(frame.locator("a").first.inner_text(), "www.paypal.com")
        self.assertEqual(frame.locator("#logo").evaluate("img => img.naturalWidth"), 1)  # cid:
        frame.locator("a").first.click()                  # a link in the preview goes nowhere
        page.wait_for_timeout(300)
        self.assertEqual(page.url, f"{base}/messages/{self.phish}")
        remote = [url for url in asked if "198.51.100.7" in url or "paypa1" in url]
        self.assertEqual(remote, [])                      # not even a CSS url() is asked
        self.assertEqual(failed, {})
        self.assertEqual(self.dialogs, [])                # no script ran
        self.shoot(page, "preview.png")

    def test_attachments_say_what_their_bytes_are_and_download_as_bytes(self):
        cookie = self.login("viewer")
        page = self.http("GET", f"/messages/{self.phish}", cookie=cookie)[2].decode()
        self.assertIn('<td data-label="Name">invoice.pdf.exe</td><td data-label="Declared">'
                      'application/pdf</td><td data-label="Its bytes say">'
                      'application/x-msdownload</td>', page)
        self.assertIn("a program (.exe) behind .pdf", page)
        files = re.findall(rf'href="(/messages/{self.phish}/parts/[0-9]+)"', page)
        status, headers, body = self.http("GET", files[-1], cookie=cookie)
        self.assertEqual((status, body), (200, b"MZ\x90\x00 a program"))
        self.assertEqual(headers["Content-Type"], "application/octet-stream")
        self.assertEqual(headers["X-Content-Type-Options"], "nosniff")
        self.assertEqual(headers["Content-Disposition"],
                         "attachment; filename=\"invoice.pdf.exe\"; "
                         "filename*=UTF-8''invoice.pdf.exe")
        self.assertEqual(self.http("GET", f"/messages/{self.phish}/parts/99",
                                   cookie=cookie)[0], 404)

    def test_a_name_with_a_path_downloads_as_its_last_part(self):
        key = self.key(self.send_message(self.raw(), mime(
            b"Content-Type: text/plain\r\n\r\nsee attached",
            attachment(b"filename*=utf-8''..%2F..%2Fetc%2F%C3%A9t%C3%A9%201%3B.pdf", b"%PDF-1"),
            attachment(b'filename="C:\\Users\\x\\run.bat"', b"@echo off"),
            attachment(b'filename="/.."', b"dots"))))
        cookie = self.login("viewer")
        disposition = [self.http("GET", f"/messages/{key}/parts/{n}", cookie=cookie)[1][
            "Content-Disposition"] for n in range(3)]
        self.assertEqual(disposition, [
            "attachment; filename=\"_t__1_.pdf\"; filename*=UTF-8''%C3%A9t%C3%A9%201%3B.pdf",
            "attachment; filename=\"run.bat\"; filename*=UTF-8''run.bat",
            "attachment; filename=\"attachment\"; filename*=UTF-8''attachment"])


# Each of these got a sender's markup past an earlier filter, or tries to: every one
# names its own address on 198.51.100.9, which no request may ever reach.
BYPASSES = {
    "meta in a quoted value": '<meta content="a>" http-equiv="refresh" '
                              'content="0;url=http://198.51.100.9/meta">',
    "href after a quoted >": '<a title="x>" href="http://198.51.100.9/title">read</a>',
    "cid type": '<img src="cid:trap@x" alt="trap">',
    "onerror": '<img src=x onerror="location=\'http://198.51.100.9/onerror\'">',
    "script": "<script>location='http://198.51.100.9/script'</script>",
    "iframe": '<iframe src="http://198.51.100.9/iframe"></iframe>',
    "object": '<object data="http://198.51.100.9/object"></object><embed '
              'src="http://198.51.100.9/embed">',
    "link": '<link rel="stylesheet" href="http://198.51.100.9/link">',
    "import": "<style>@import 'http://198.51.100.9/import';</style>",
    "escaped url": "<style>p{background:u\\72l(http://198.51.100.9/escaped)}</style><p>p</p>",
    "image-set": "<p style=\"background-image:image-set('http://198.51.100.9/set' 1x)\">s</p>",
    "srcset": '<img srcset="http://198.51.100.9/srcset 1x">',
    "background": '<table background="http://198.51.100.9/background"><tr><td>t</td></tr>'
                  '</table>',
    "poster": '<video poster="http://198.51.100.9/poster"></video>',
    "input image": '<input type="image" src="http://198.51.100.9/input">',
    "form": '<form action="http://198.51.100.9/form"><button>go</button></form>',
    "base": '<base href="http://198.51.100.9/base/"><a href="rel">relative</a>',
    "svg": '<svg><a xlink:href="http://198.51.100.9/svg"><text y="20">svg</text></a>'
           '<image href="http://198.51.100.9/svgimage"/></svg>',
    "math": '<math><mtext><a href="http://198.51.100.9/math">math</a></mtext></math>',
    "entity": '<a href="http&#58;//198.51.100.9/entity">entity</a>',
    "javascript": '<a href="javascript:location=\'http://198.51.100.9/js\'">js</a>',
    "comment": '<!--><img src="http://198.51.100.9/comment">-->',
    "title": "<title></title><meta http-equiv=refresh content='0;url=http://198.51.100.9/t'>",
    "textarea": '<textarea><img src="http://198.51.100.9/textarea"></textarea>',
    "noscript": '<noscript><img src="http://198.51.100.9/noscript"></noscript>',
    "unquoted": "<img src=http://198.51.100.9/unquoted>",
    "cut off": '<img src="http://198.51.100.9/cutoff',
}
TRAP_TYPE = (b'image/x"><meta http-equiv="refresh" content="0;url=http://198.51.100.9/cid">'
             b'<b x="')


def bypass_message(html_text):
    return mime(mime(b"Content-Type: text/html; charset=utf-8\r\n\r\n" + html_text.encode(),
                     b"Content-Type: " + TRAP_TYPE + b"\r\nContent-ID: <trap@x>\r\n"
                     b"Content-Transfer-Encoding: base64\r\n\r\n" + base64.b64encode(PNG_1PX),
                     kind="related", boundary="rel"),
                head=b"From: <a@example.org>\r\nSubject: bypass\r\n")


class RebuiltMarkup(html.parser.HTMLParser):
    """The preview's output, read back: every tag and attribute it holds (our own
    markup, so the stdlib's parser reads it as a browser does)."""

    def __init__(self, text):
        super().__init__(convert_charrefs=True)
        self.tags, self.styles, self.style = [], [], False
        self.feed(text)
        self.close()

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self.style = tag == "style"
        self.styles += [v for k, v in attrs if k == "style"]

    def handle_data(self, data):
        if self.style:
            self.styles.append(data)
            self.style = False


class TestPreviewFilter(WebCase):
    """The HTML preview keeps none of a sender's markup as it came: each tag is
    rebuilt from an allow-list, each value escaped, in one linear pass; opened on
    its own, it is refused. In Chromium, no bypass makes a request or a navigation."""

    def assertRebuilt(self, text, name=""):
        preview = mms.Preview(text, {"trap@x": (TRAP_TYPE.decode(), PNG_1PX)})
        found = RebuiltMarkup(preview.html)
        for tag, attrs in found.tags:
            self.assertIn(tag, mms.PREVIEW_TAGS | {"style"}, name)
            self.assertLessEqual(set(attrs), mms.PREVIEW_ATTRIBUTES | {"src"}, (name, tag))
            self.assertTrue(attrs.get("src", "data:image/png").startswith(
                ("data:image/png", "data:image/jpeg", "data:image/gif", "data:image/webp")),
                (name, attrs))
        for css in found.styles:
            self.assertNotRegex(css.lower(), r"(url|image-set)\((?!\"data:image/)|@import|\\",
                                name)
        self.assertNotIn("198.51.100.9", "".join(
            value for _, attrs in found.tags for key, value in attrs.items() if key != "title"))
        return preview

    def test_every_bypass_is_rebuilt_from_the_allow_list(self):
        for name, text in BYPASSES.items():
            with self.subTest(name=name):
                preview = self.assertRebuilt(f"<p>before</p>{text}<p>after</p>", name)
                self.assertNotIn("<meta", preview.html)
        preview = self.assertRebuilt(BYPASSES["href after a quoted >"])
        self.assertEqual(preview.links, [("read", "http://198.51.100.9/title", "")])
        self.assertEqual(preview.html, '<a title="goes to http://198.51.100.9/title">read</a>')
        self.assertEqual(mms.Preview(BYPASSES["cid type"], {"trap@x": (
            TRAP_TYPE.decode(), PNG_1PX)}).html, '<img alt="trap">')   # not an image type

    def test_random_markup_never_escapes(self):
        pieces = ['<', '>', '"', "'", "=", "/", " ", "a", "img", "meta", "style", "href",
                  "src", "http://198.51.100.9/r", "url(", ")", "<!--", "-->", "<!", "&quot;",
                  "&#62;", "\\", "script", "textarea", "http-equiv", "cid:trap@x", "\n"]
        rng = random.Random(35)
        for n in range(3000):
            text = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 40)))
            with self.subTest(text=text):
                self.assertRebuilt(text, text)

    def test_hostile_html_costs_its_length(self):
        """A quadratic tokenizer (the stdlib's html.parser on '<a<a<a...' took 58 s for
        250 KB here) would not finish these 4 MiB pieces in hours; this one reads each
        in a few seconds at most."""
        for name, text in (("<a", "<a" * 2**21), ("</", "</" * 2**21), ("<?", "<?" * 2**21),
                           ("attributes", "<a" + " b=" * 1400000),
                           ("quotes", '<a x="' * 700000), ("tags", "<b>x</b>" * 2**19)):
            with self.subTest(name=name):
                started = time.process_time()
                mms.Preview(text, {})
                self.assertLess(time.process_time() - started, 30)

    def test_the_preview_alone_is_refused(self):
        key = self.key(self.send_message(self.raw(), bypass_message(BYPASSES["href after a "
                                                                             "quoted >"])))
        cookie = self.login("viewer")
        for headers in ({}, {"Sec-Fetch-Dest": "document"}):
            status, _, body = self.http("GET", f"/messages/{key}/preview", cookie=cookie,
                                        headers=headers)
            self.assertEqual(status, 403)
            self.assertNotIn(b"198.51.100.9", body)
            self.assertIn(f'href="/messages/{key}"'.encode(), body)
        status, _, body = self.http("GET", f"/messages/{key}/preview", cookie=cookie,
                                    headers={"Sec-Fetch-Dest": "iframe"})
        self.assertEqual(status, 200)
        self.assertIn(b"read", body)

    def test_in_chromium_no_bypass_asks_or_navigates(self):
        keys = {name: self.key(self.send_message(self.raw(), bypass_message(text)))
                for name, text in BYPASSES.items()}
        page = self.browser()
        asked = []
        page.on("request", lambda request: asked.append(request.url))
        base = self.log_in(page, "viewer")
        for name, key in keys.items():
            with self.subTest(name=name):
                page.goto(f"{base}/messages/{key}")
                frame = page.frame_locator("iframe.preview")
                frame.locator("body").wait_for()
                for link in frame.locator("a").all():
                    link.click(timeout=2000, force=True)
                page.wait_for_timeout(100)
                self.assertEqual(page.url, f"{base}/messages/{key}")
                answer = page.goto(f"{base}/messages/{key}/preview")     # on its own
                self.assertEqual(answer.status, 403)
                self.assertNotIn("198.51.100.9", page.content())
        self.assertEqual([url for url in asked if "198.51.100.9" in url], [])
        self.assertEqual(self.dialogs, [])


class TestConsoleRoles(WebCase):
    """viewer reads, reviewer holds and releases (never a virus or banned mail),
    admin does everything; a user scoped to domains finds, counts and opens only
    their mail, by page, by URL and by API alike."""

    PASSWORDS = {**WebCase.PASSWORDS, "reviewer": "tr0ub4dor", "scoped": "hunter2 hunter2"}

    def more_users(self):
        return [f"reviewer:{mms.hash_password(self.PASSWORDS['reviewer'])}:reviewer\n",
                f"scoped:{mms.hash_password(self.PASSWORDS['scoped'])}:reviewer:"
                f"example.net,example.org\n"]

    def setUp(self):
        super().setUp()
        self.virus = self.key(self.send_message(self.raw(), amavis_copy(
            "invoice", ["alice@example.com"], alert="INFECTED, message contains virus: Eicar"),
            rcpts=("virus-quarantine@example.net",)))
        self.theirs = self.key(self.send_message(self.raw(), SIMPLE, rcpts=("c@example.org",)))

    def act(self, cookie, key, action):
        return self.http("POST", f"/messages/{key}/{action}", {"csrf": self.csrf(cookie)},
                         cookie=cookie)[0]

    def test_a_reviewer_holds_and_releases_but_no_virus(self):
        cookie = self.login("reviewer")
        self.assertEqual(self.act(cookie, self.plain, "hold"), 303)
        self.assertEqual(self.act(cookie, self.plain, "unhold"), 403)
        self.assertEqual(self.act(cookie, self.plain, "delete"), 403)
        self.assertEqual(self.act(cookie, self.virus, "release"), 403)
        self.assertEqual(self.down.messages, [])
        page = self.http("GET", f"/messages/{self.virus}", cookie=cookie)[2].decode()
        self.assertIn('value="hold"', page)
        self.assertNotIn('value="release"', page)
        self.assertNotIn('value="delete"', page)
        viewer = self.login("viewer")
        self.assertEqual(self.act(viewer, self.plain, "hold"), 403)
        self.assertNotIn("<button", self.http("GET", f"/messages/{self.plain}",
                                              cookie=viewer)[2].decode().split("</header>")[1])

    def test_a_scoped_user_sees_only_their_domains(self):
        cookie = self.login("scoped")
        listed = set(re.findall(r'href="/messages/([0-9a-f]{64})"',
                                self.http("GET", "/messages", cookie=cookie)[2].decode()))
        self.assertEqual(listed, {self.virus, self.theirs})   # example.net and example.org
        for key in (self.plain, self.hostile):                 # example.com: not there
            with self.subTest(key=key):
                self.assertEqual(self.http("GET", f"/messages/{key}", cookie=cookie)[0], 404)
                self.assertEqual(self.http("GET", f"/messages/{key[:12]}", cookie=cookie)[0], 404)
                self.assertEqual(self.http("GET", f"/api/messages/{key}", cookie=cookie)[0], 404)
                self.assertEqual(self.http("GET", f"/messages/{key}/raw", cookie=cookie)[0], 404)
                self.assertEqual(self.act(cookie, key, "hold"), 404)
        api = json.loads(self.http("GET", "/api/messages", cookie=cookie)[2])
        self.assertEqual({d["store_key"] for d in api["messages"]}, {self.virus, self.theirs})
        self.assertEqual(self.http("GET", "/", cookie=cookie)[0], 200)        # their quarantine
        self.assertEqual(self.http("GET", "/dashboard", cookie=cookie)[0], 403)  # all the mail
        self.assertEqual(self.http("GET", "/api/stats", cookie=cookie)[0], 403)

    def test_a_scoped_reviewer_releases_only_into_their_domains(self):
        cookie = self.login("scoped")
        both = self.key(self.send_message(self.raw(), SIMPLE,
                                          rcpts=("c@example.org", "d@example.com")))

        def release(key, to):
            return self.http("POST", f"/messages/{key}/release", {
                "csrf": self.csrf(cookie), "to": to, "again": "1"}, cookie=cookie)
        status, _, body = release(self.theirs, "attacker@evil.example")
        self.assertEqual(status, 403)
        self.assertIn(b"not to attacker@evil.example: ask an administrator", body)
        self.assertEqual(release(self.theirs, "c@example.org, x@Example.NET")[0], 303)
        self.assertEqual(release(both, "")[0], 303)          # its recipients in their domains
        admin = self.login()
        self.assertEqual(self.http("POST", f"/messages/{self.theirs}/release", {
            "csrf": self.csrf(admin), "to": "attacker@evil.example", "again": "1"},
            cookie=admin)[0], 303)                          # an admin of all domains may
        self.assertEqual([c.split("<")[1].rstrip(">") for c in self.down.commands
                          if c.upper().startswith("RCPT")],
                         ["c@example.org", "x@Example.NET", "c@example.org",
                          "attacker@evil.example"])
        self.web.audit.flush()
        refused = self.db["message_audit"].find_one({"action": "release", "user": "scoped",
                                                     "result": {"$regex": "^refused"}})
        self.assertEqual(refused["result"], "refused: to attacker@evil.example, outside the "
                                            "user's domains")

    def test_a_key_prefix_names_no_message_outside_the_scope(self):
        cookie = self.login("scoped")
        for key in (self.plain, self.hostile):
            for prefix in (key[:8], key[:12], key[:63]):
                with self.subTest(prefix=prefix):
                    status, _, body = self.http("GET", f"/messages/{prefix}", cookie=cookie)
                    self.assertEqual(status, 404)
                    self.assertNotIn(key.encode(), body)
                    self.assertIn(f"no message with store_key {prefix}".encode(), body)
        # two keys that share a prefix, one theirs: theirs is found, the other never named
        doc = self.db["message"].find_one({"store_key": self.theirs}, {"_id": 0})
        shared = "f00dcafe"
        mine, other = shared + "1" * 56, shared + "2" * 56
        self.db["message"].insert_many([dict(doc, store_key=mine), dict(
            doc, store_key=other, rcpt=["z@example.com"], rcpt_domain=["example.com"])])
        status, headers, body = self.http("GET", f"/messages/{shared}", cookie=cookie)
        self.assertEqual((status, headers.get("Location")), (303, f"/messages/{mine}"))
        status, _, body = self.http("GET", f"/messages/{shared}", cookie=self.login())
        self.assertEqual(status, 400)                       # an admin sees both named
        self.assertIn(other.encode(), body)

    def test_web_user_writes_the_role_and_the_domains(self):
        def line(*args):
            done = subprocess.run([sys.executable, MMS, "web-user", "helpdesk", *args],
                                  input="pw\n", capture_output=True, text=True, timeout=60)
            name, digest, *rest = done.stdout.strip().split(":")
            self.assertEqual(name, "helpdesk")
            self.assertTrue(digest.startswith("scrypt$"))
            return rest
        self.assertEqual(line("--role", "reviewer", "--domains", "Example.com, example.net"),
                         ["reviewer", "example.com,example.net"])
        self.assertEqual(line("--timezone", "Europe/Paris"), ["admin", "", "Europe/Paris"])
        self.assertEqual(line(), [])


class TestConsoleLists(WebCase):
    """The reviewer's judgement teaches, from the console and the API: release and
    always allow a sender, block one, teach SpamAssassin (real spamd, with
    --allow-tell); each for the recipients in the user's scope, audited; a Lists
    page to see and remove entries. Viewers see none of it."""

    PASSWORDS = {**WebCase.PASSWORDS, "reviewer": "tr0ub4dor", "scoped": "hunter2 hunter2",
                 "two": "correct horse"}

    def more_users(self):
        return [f"reviewer:{mms.hash_password(self.PASSWORDS['reviewer'])}:reviewer\n",
                f"scoped:{mms.hash_password(self.PASSWORDS['scoped'])}:reviewer:example.org\n",
                f"two:{mms.hash_password(self.PASSWORDS['two'])}:reviewer:"
                "example.org,example.net\n"]

    def web_args(self):
        return ["--spamd", LearningSpamd.get().address]

    def setUp(self):
        super().setUp()
        unique = uuid.uuid4().hex.encode()           # spamd's Bayes learns a text once
        self.partner = self.key(self.send_message(self.raw(), SIMPLE + unique + b"\r\n",
                                                  sender="Partner@x.org",
                                                  rcpts=("bob@example.org", "carol@example.com")))

    def post(self, user, path, fields=None):
        cookie = self.login(user)
        return self.http("POST", path, {"csrf": self.csrf(cookie), **(fields or {})},
                         cookie=cookie)

    def entries(self):
        return sorted((e["kind"], e["sender"], e["rcpt"], e["by"], e["message"])
                      for e in self.db["message_lists"].find())

    def test_the_buttons_are_a_reviewers(self):
        page = self.http("GET", f"/messages/{self.partner}", cookie=self.login("reviewer"))[2]
        for label in (b"Release and always allow this sender", b"Block this sender",
                      b"Spam (teach SpamAssassin)", b"Not spam (teach SpamAssassin)"):
            self.assertIn(label, page)
        page = self.http("GET", f"/messages/{self.partner}", cookie=self.login("viewer"))[2]
        self.assertNotIn(b"Block this sender", page)
        self.assertEqual(self.post("viewer", f"/messages/{self.partner}/block")[0], 403)
        self.assertEqual(self.http("GET", "/lists", cookie=self.login("viewer"))[0], 403)

    def test_release_and_allow_then_block_in_scope(self):
        self.assertEqual(self.post("reviewer", f"/messages/{self.partner}/allow")[0], 303)
        self.assertEqual(self.entries(), [
            ("allow", "partner@x.org", "bob@example.org", "reviewer", self.partner),
            ("allow", "partner@x.org", "carol@example.com", "reviewer", self.partner)])
        self.assertEqual(len(self.down.messages), 1)                     # released too
        self.assertEqual(self.post("scoped", f"/messages/{self.partner}/block")[0], 303)
        self.assertEqual(self.entries()[0], ("allow", "partner@x.org", "carol@example.com",
                                             "reviewer", self.partner))
        self.assertEqual(self.entries()[1][:3], ("block", "partner@x.org", "bob@example.org"))
        page = self.http("GET", "/lists", cookie=self.login("scoped"))[2].decode()
        self.assertIn('<td data-label="For">bob@example.org</td>', page)
        self.assertNotIn("carol@example.com", page)                       # not theirs
        status, _, _ = self.post("scoped", "/lists/remove", {"sender": "partner@x.org",
                                                             "rcpt": "carol@example.com"})
        self.assertEqual(status, 403)
        self.assertEqual(self.post("scoped", "/lists/remove", {
            "sender": "partner@x.org", "rcpt": "bob@example.org"})[0], 303)
        self.assertEqual(len(self.entries()), 1)
        self.web.audit.flush()
        said = [(e["user"], e["action"], e["result"]) for e in self.db["message_audit"].find(
            {"action": {"$in": ["allow", "block", "unlist"]}}).sort("at", 1)]
        self.assertEqual([s[:2] for s in said], [("reviewer", "allow"), ("scoped", "block"),
                                                 ("scoped", "unlist"), ("scoped", "unlist")])
        self.assertTrue(said[2][2].startswith("refused"))

    def test_not_spam_teaches_spamd(self):
        spamd = LearningSpamd.get()
        before = spamd.learned()
        self.assertEqual(self.post("reviewer", f"/messages/{self.partner}/learn",
                                   {"class": "ham"})[0], 303)
        self.assertEqual(spamd.learned()["nham"], before["nham"] + 1)
        doc = self.db["message"].find_one({"store_key": self.partner})
        self.assertEqual((doc["learned"]["class"], doc["learned"]["by"]), ("ham", "reviewer"))
        self.assertEqual(self.post("reviewer", f"/messages/{self.partner}/learn",
                                   {"class": "eggs"})[0], 400)

    def test_in_chromium(self):
        page = self.browser()
        base = self.log_in(page, "reviewer")
        page.goto(f"{base}/messages/{self.partner}")
        page.click("button:text('Block this sender')")
        page.wait_for_load_state()
        self.assertEqual(page.locator("main p.muted").first.inner_text(), "blocked "
                         "partner@x.org for bob@example.org, carol@example.com")
        page.click("button:text('Not spam (teach SpamAssassin)')")
        page.wait_for_load_state()
        self.assertEqual(page.locator("main p.muted").first.inner_text(),
                         f"learned {self.partner} as ham")
        page.click("header >> text=Lists")
        self.assertEqual(page.locator("main table tr:not(.head)").count(), 2)
        self.shoot(page, "lists.png")
        page.locator("button:text('Remove')").first.click()
        page.wait_for_load_state()
        self.assertIn("unlisted partner@x.org", page.locator("main p.muted").first.inner_text())
        self.assertEqual(page.locator("main table tr:not(.head)").count(), 1)
        self.assertEqual(self.dialogs, [])

    def test_the_api(self):
        auth = {"Content-Type": "application/json", "Authorization": "Basic " +
                base64.b64encode(b"scoped:" + self.PASSWORDS["scoped"].encode()).decode()}

        def api(method, path, payload):
            import http.client
            conn = http.client.HTTPConnection("127.0.0.1", self.web_port, timeout=60)
            self.addCleanup(conn.close)
            conn.request(method, path, json.dumps(payload).encode(), auth)
            answer = conn.getresponse()
            return answer.status, json.loads(answer.read() or b"{}")
        self.assertEqual(api("POST", "/api/lists", {"kind": "block", "sender": "@spam.example",
                                                    "for": "@example.org"}),
                         (200, {"kind": "block", "sender": "@spam.example",
                                "for": "@example.org", "replaced": None}))
        self.assertEqual(api("POST", "/api/lists", {"kind": "block", "sender": "@spam.example",
                                                    "for": "@example.com"})[0], 403)
        self.assertEqual(api("POST", "/api/lists", {"kind": "allow", "sender": "*"})[0], 400)
        self.assertEqual(api("DELETE", "/api/lists", {"sender": "@spam.example",
                                                      "for": "@example.org"})[0], 200)
        self.assertEqual(api("DELETE", "/api/lists", {"sender": "@spam.example",
                                                      "for": "@example.org"})[0], 404)
        status, answer = api("POST", f"/api/messages/{self.partner}/learn", {"class": "spam"})
        self.assertEqual((status, answer["result"]), (200, f"learned {self.partner} as spam"))
        status, answer = api("POST", "/api/bulk", {"action": "block", "keys": [self.partner]})
        self.assertEqual(answer["results"], [{"key": self.partner, "result":
                                              "blocked partner@x.org for bob@example.org"}])
        import jsonschema
        spec = json.loads(self.http("GET", "/api/openapi.json", cookie=self.login())[2])
        for path, method, payload in (
                ("/api/lists", "post", {"kind": "allow", "sender": "a@x.org", "for": "@example.org"}),
                ("/api/lists", "delete", {"sender": "a@x.org", "for": "@example.org"})):
            status, answer = api(method.upper(), path, payload)
            operation = spec["paths"][path][method]
            jsonschema.validate(payload, operation["requestBody"]["content"][
                "application/json"]["schema"])
            jsonschema.validate(answer, operation["responses"][str(status)]["content"][
                "application/json"]["schema"])
        self.assertIn("post", spec["paths"]["/api/messages/{key}/learn"])


class TestAuditLog(WebCase):
    """Every login and its failure, read, download and change, with who, as what,
    from where and how it went, in a collection of its own kept --audit-retention
    days; searched in the console by admins and with `mms.py audit`."""

    PASSWORDS = {**WebCase.PASSWORDS, "reviewer": "tr0ub4dor"}

    def more_users(self):
        return [f"reviewer:{mms.hash_password(self.PASSWORDS['reviewer'])}:reviewer\n"]

    def test_who_did_what(self):
        self.assertEqual(self.post_login("admin", "wrong")[0], 401)
        admin, reviewer = self.login(), self.login("reviewer")
        self.http("GET", f"/messages/{self.plain}", cookie=admin)
        self.http("GET", f"/messages/{self.plain}/raw", cookie=admin)
        self.http("POST", f"/messages/{self.plain}/hold", {"csrf": self.csrf(admin)}, cookie=admin)
        self.assertEqual(self.http("POST", f"/messages/{self.plain}/delete",
                                   {"csrf": self.csrf(reviewer)}, cookie=reviewer)[0], 403)
        self.web.audit.flush()
        trail = [(e["user"], e["role"], e["client"], e["action"], e.get("key"), e["result"])
                 for e in self.db["message_audit"].find().sort("at", 1)]
        self.assertEqual(trail, [
            ("admin", None, "127.0.0.1", "login", None, "failed"),
            ("admin", "admin", "127.0.0.1", "login", None, "ok"),
            ("reviewer", "reviewer", "127.0.0.1", "login", None, "ok"),
            ("admin", "admin", "127.0.0.1", "view", self.plain, "ok"),
            ("admin", "admin", "127.0.0.1", "download", self.plain, "the message"),
            ("admin", "admin", "127.0.0.1", "hold", self.plain, "legal hold placed"),
            ("reviewer", "reviewer", "127.0.0.1", "delete", self.plain,
             "refused: not for a reviewer")])
        page = self.http("GET", "/audit?action=hold", cookie=admin)[2].decode()
        self.assertEqual(page.count(f'<td data-label="Key">{self.plain}</td>'), 1)
        self.assertEqual(self.http("GET", "/audit", cookie=reviewer)[0], 403)
        done = self.archive_command("audit", "--user", "reviewer", "--since", "1h")
        self.assertEqual(done.returncode, 0, done.stderr)
        lines = done.stdout.splitlines()
        self.assertEqual(len(lines), 2)
        self.assertTrue(lines[0].endswith(f"(reviewer) from 127.0.0.1 delete {self.plain}: "
                                          f"refused: not for a reviewer"), lines[0])

    def test_a_name_cannot_forge_a_line_of_the_log(self):
        forged = "x\x1b[2J\u202e\r\n2026-12-07 03:40:00 alice (admin) delete"   # as stored: 64
        self.assertEqual(self.post_login(forged, "wrong")[0], 401)
        self.web.audit.flush()
        done = self.archive_command("audit", "--action", "login")
        self.assertEqual(done.returncode, 0, done.stderr)
        [line] = done.stdout.splitlines()
        self.assertRegex(line, r"^[0-9-]{10} [0-9:]{8} x\\x1b\[2J\[U\+202E\]\\x0d\\x0a2026-12-07 "
                               r"03:40:00 alice \(admin\) delete \(-\) from 127.0.0.1 login -: "
                               r"failed$")
        page = self.http("GET", "/audit?action=login", cookie=self.login())[2].decode()
        self.assertIn('<td data-label="User">x\\x1b[2J[U+202E]\\x0d\\x0a2026-12-07 03:40:00 alice',
                      page)
        self.assertNotIn("\x1b", page)

    def test_reads_through_the_api_are_audited(self):
        cookie = self.login("viewer")
        self.assertEqual(self.http("GET", f"/api/messages/{self.plain}", cookie=cookie)[0], 200)
        self.assertEqual(self.http("GET", "/api/messages?sender=%40example.org",
                                   cookie=cookie)[0], 200)
        self.web.audit.flush()
        trail = [(e["user"], e["action"], e.get("key"), e["result"])
                 for e in self.db["message_audit"].find({"action": {"$in": ["view", "list"]}})]
        self.assertEqual(trail, [("viewer", "view", self.plain, "by the API"),
                                 ("viewer", "list", None, "2 message(s) by the API: "
                                                          "sender=%40example.org")])

    def test_the_log_has_its_own_retention(self):
        ttl = {spec["name"]: spec for spec in self.db["message_audit"].list_indexes()}
        if os.environ.get("MMS_TEST_MONGODB_URI"):    # nx-27017 keeps no TTL option
            self.assertEqual(ttl["audit_at"]["expireAfterSeconds"], 400 * 86400)
        self.assertLessEqual({("user", "at"), ("action", "at")},
                             {tuple(spec["key"]) for spec in ttl.values()})


class BulkCase(WebCase):
    """120 more messages, and a reviewer."""

    PASSWORDS = {**WebCase.PASSWORDS, "reviewer": "tr0ub4dor"}

    def more_users(self):
        return [f"reviewer:{mms.hash_password(self.PASSWORDS['reviewer'])}:reviewer\n"]

    def setUp(self):
        super().setUp()
        client = self.raw()
        self.bulk = [self.key(self.send_message(client, f"Subject: bulk {n}\r\n\r\nx\r\n"
                                                .encode())) for n in range(120)]



class TestBulkActions(BulkCase):
    """Rows ticked, or all a search finds once their number is confirmed: one POST,
    done a message at a time through the same calls as one by one, each result said."""

    def post(self, cookie, fields):
        return self.http("POST", "/messages/bulk", {"csrf": self.csrf(cookie), **fields},
                         cookie=cookie)

    def test_the_rows_ticked(self):
        cookie = self.login()
        page = self.http("GET", "/messages", cookie=cookie)[2].decode()
        self.assertEqual(len(re.findall(r'<input type="checkbox" name="key" value="[0-9a-f]{64}" '
                                        r'form="bulk"', page)), mms.WEB_PAGE)
        status, _, body = self.http("POST", "/messages/bulk", [
            ("csrf", self.csrf(cookie)), ("action", "hold"), ("key", self.plain),
            ("key", self.hostile)], cookie=cookie)
        self.assertEqual(status, 200)
        self.assertEqual(body.decode().count(">legal hold placed</td>"), 2)
        self.assertEqual(self.db["message"].count_documents({"held": True}), 2)
        reviewer = self.login("reviewer")
        status, _, body = self.http("POST", "/messages/bulk", [
            ("csrf", self.csrf(reviewer)), ("action", "delete"), ("key", self.plain)],
            cookie=reviewer)
        self.assertIn(b">refused: not for a reviewer</td>", body)
        self.assertNotIn(b'name="key"', self.http("GET", "/messages",
                                                  cookie=self.login("viewer"))[2])

    def test_older_then_newer_comes_back_to_the_same_page(self):
        cookie = self.login("viewer")

        def visit(path):
            page = self.http("GET", path, cookie=cookie)[2].decode()
            links = dict((name, html.unescape(href)) for href, name in re.findall(
                r'<a href="(/messages\?[^"]+)">(Newer|Older) messages</a>', page))
            return re.findall(r'href="/messages/([0-9a-f]{64})"', page), links
        first, links = visit("/messages")
        self.assertEqual((len(first), set(links)), (mms.WEB_PAGE, {"Older"}))
        second, links = visit(links["Older"])
        self.assertEqual((len(second), set(links)), (mms.WEB_PAGE, {"Newer", "Older"}))
        self.assertFalse(set(first) & set(second))
        again, links = visit(links["Newer"])
        self.assertEqual((again, set(links)), (first, {"Older"}))

    def test_sorted_by_size_or_by_score_one_page(self):
        cookie = self.login("viewer")
        big = self.key(self.send_message(self.raw(), b"Subject: bulk big\r\n\r\n" +
                                          b"bulk words here\r\n" * 500))
        page = self.http("GET", "/messages?sort=size", cookie=cookie)[2].decode()
        keys = re.findall(r'href="/messages/([0-9a-f]{64})"', page)
        self.assertEqual(keys[0], big)
        sizes = [self.db["message"].find_one({"store_key": k})["size"] for k in keys]
        self.assertEqual(sizes, sorted(sizes, reverse=True))
        self.assertNotIn("Older messages", page)                  # the largest: one page
        page = self.http("GET", "/messages?text=bulk&sort=score", cookie=cookie)[2].decode()
        # nx-27017 ranks by its own score (it ignores the weights): the page, not its order
        self.assertEqual(len(re.findall(r'href="/messages/[0-9a-f]{64}"', page)), mms.WEB_PAGE)
        self.assertEqual(self.http("GET", "/messages?sort=score", cookie=cookie)[0], 400)
        self.assertEqual(self.http("GET", "/messages?sort=name", cookie=cookie)[0], 400)
        code, out, _ = self.command_line("list", "--sort", "size", "--limit", "1")
        self.assertEqual((code, out.split()[0]), (0, big))

    def test_all_a_search_finds_once_confirmed(self):
        cookie = self.login()
        status, _, body = self.post(cookie, {"action": "release", "all": "1",
                                             "subject": "bulk"})
        self.assertEqual(status, 200)
        self.assertIn(b"Release 120 message(s)?", body)
        self.assertIn(b'name="expect" value="120"', body)
        self.assertEqual(self.down.messages, [])
        self.send_message(self.raw(), b"Subject: bulk late\r\n\r\nx\r\n")
        status, _, body = self.post(cookie, {"action": "release", "all": "1",
                                             "subject": "bulk", "expect": "120"})
        self.assertIn(b"Release 121 message(s)?", body)   # the number changed: asked again
        self.assertEqual(self.down.messages, [])
        status, _, body = self.post(cookie, {"action": "release", "all": "1",
                                             "subject": "bulk", "expect": "121"})
        self.assertEqual(status, 200)
        self.assertEqual(body.decode().count(">released: 250"), 121)
        self.assertEqual(len(self.down.messages), 121)
        self.web.audit.flush()
        self.assertEqual(self.db["message_audit"].count_documents({"action": "release"}), 121)
        [bulk] = self.db["message_audit"].find({"action": "bulk"})
        self.assertEqual(bulk["result"], "release of 121: released")


class TestApiBulk(BulkCase):
    """POST /api/bulk: JSON only, with a session's CSRF token or HTTP Basic."""

    def api(self, payload, kind="application/json", cookie=None, token=None, user=None):
        import http.client
        conn = http.client.HTTPConnection("127.0.0.1", self.web_port, timeout=60)
        self.addCleanup(conn.close)
        headers = {"Content-Type": kind}
        if cookie:
            headers["Cookie"] = cookie
        if token:
            headers["X-CSRF-Token"] = token
        if user:
            headers["Authorization"] = "Basic " + base64.b64encode(
                f"{user}:{self.PASSWORDS[user]}".encode()).decode()
        conn.request("POST", "/api/bulk", json.dumps(payload).encode(), headers)
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read() or b"{}")

    def test_an_unknown_filter_is_a_400_not_the_whole_archive(self):
        everything = self.db["message"].count_documents({})
        status, answer = self.api({"action": "delete", "filters": {"bogus": "x"},
                                   "expect": everything}, user="admin")
        self.assertEqual(status, 400)
        self.assertIn("no such filter: bogus", answer["error"])
        self.assertEqual(self.db["message"].count_documents({}), everything)

    def test_every_answer_is_what_the_openapi_document_says(self):
        """Each answer of the API, validated against the document the API serves."""
        import jsonschema
        cookie = self.login()
        status, _, body = self.http("GET", "/api/openapi.json", cookie=cookie)
        spec = json.loads(body)
        self.assertEqual((status, spec["openapi"]), (200, "3.1.0"))

        def check(path, method, status, answer):
            schema = spec["paths"][path][method]["responses"][str(status)]["content"][
                "application/json"]["schema"]
            jsonschema.Draft202012Validator(schema).validate(answer)
        for path, template in (("/api/messages?subject=bulk&since=1d", "/api/messages"),
                               (f"/api/messages/{self.plain}", "/api/messages/{key}"),
                               ("/api/stats?since=1d&by=verdict", "/api/stats"),
                               ("/api/messages?quarantine=spma", "/api/messages"),
                               (f"/api/messages/{'0' * 64}", "/api/messages/{key}")):
            with self.subTest(path):
                status, _, body = self.http("GET", path, cookie=cookie)
                check(template, "get", status, json.loads(body))
        for payload in ({"action": "hold", "keys": [self.plain]},
                        {"action": "hold", "filters": {"subject": "bulk"}}):
            status, answer = self.api(payload, user="admin")
            check("/api/bulk", "post", status, answer)
        status, answer = self.api({"action": "hold"}, "text/plain", user="admin")
        check("/api/bulk", "post", status, answer)

    def test_keys_by_session_and_by_basic(self):
        cookie = self.login()
        payload = {"action": "hold", "keys": [self.plain, "0" * 64]}
        self.assertEqual(self.api(payload, cookie=cookie)[0], 403)              # no token
        self.assertEqual(self.api(payload, "application/x-www-form-urlencoded",
                                  cookie=cookie, token=self.csrf(cookie))[0], 415)
        status, answer = self.api(payload, cookie=cookie, token=self.csrf(cookie))
        self.assertEqual(status, 200)
        self.assertEqual(answer["results"], [{"key": "0" * 64, "result": "not found"},
                                             {"key": self.plain, "result": "legal hold placed"}])
        status, answer = self.api({"action": "delete", "keys": [self.hostile]}, user="reviewer")
        self.assertEqual(answer["results"][0]["result"], "refused: not for a reviewer")
        self.assertEqual(self.api({"action": "hold", "keys": []}, user="viewer")[0], 403)

    def test_filters_with_the_count_expected(self):
        payload = {"action": "hold", "filters": {"subject": "bulk"}}
        status, answer = self.api(payload, user="admin")
        self.assertEqual((status, answer["count"]), (409, 120))
        one = {"action": "hold", "filters": {"subject": "bulk 119"}}
        for unsaid in (True, 1.0, "1"):                  # a count is a JSON integer
            self.assertEqual(self.api({**one, "expect": unsaid}, user="admin")[0], 409, unsaid)
        status, answer = self.api({**payload, "expect": 120}, user="admin")
        self.assertEqual((status, len(answer["results"])), (200, 120))
        self.assertEqual(self.db["message"].count_documents({"held": True}), 120)


class TestConsoleDownloads(WebCase):
    """A download that breaks off mid-stream, and a client that hangs up: the
    connection ends, and the log gets one line, never a traceback."""

    def setUp(self):
        super().setUp()
        body = base64.encodebytes(random.Random(5).randbytes(600_000)).replace(b"\n", b"\r\n")
        self.big = self.key(self.send_message(self.raw(), b"Subject: big\r\n\r\n" + body))

    def test_a_damaged_message_ends_the_download_without_a_second_status(self):
        doc = self.db["message"].find_one({"store_key": self.big})
        self.db["fs.chunks"].delete_many({"files_id": doc["message"], "n": 2})
        cookie = self.login("viewer")
        sock = socket.create_connection(("127.0.0.1", self.web_port), timeout=10)
        self.addCleanup(sock.close)
        with self.assertLogs("mms", "ERROR") as logs:
            sock.sendall(f"GET /messages/{self.big}/raw HTTP/1.0\r\nCookie: {cookie}\r\n\r\n"
                         .encode())
            answer = http_answer(sock)
        self.assertTrue(answer.startswith(b"HTTP/1.0 200"), answer[:40])
        self.assertEqual(answer.count(b"HTTP/1.0 "), 1)
        self.assertEqual(len(logs.output), 1, logs.output)
        self.assertIn(f"/messages/{self.big}/raw failed", logs.output[0])
        self.assertNotIn("Traceback", logs.output[0])

    def test_a_client_that_hangs_up_is_one_line_at_most(self):
        cookie = self.login("viewer")
        with contextlib.redirect_stderr(io.StringIO()) as err, \
                self.assertLogs("mms", "INFO") as logs:
            for _ in range(5):
                sock = socket.create_connection(("127.0.0.1", self.web_port), timeout=10)
                sock.sendall(f"GET /messages/{self.big}/raw HTTP/1.0\r\nCookie: {cookie}\r\n\r\n"
                             .encode())
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()                              # a reset, mid-answer
            deadline = time.monotonic() + 10
            while self.web.held and time.monotonic() < deadline:   # every handler is done
                time.sleep(0.05)
            mms.log.info("test: done")
        self.assertNotIn("Traceback", err.getvalue())
        self.assertLessEqual(len(logs.output), 6)
        self.assertNotIn("Traceback", "\n".join(logs.output))


class TestWebConsoleTLS(WebCase):
    """--web-cert and --web-key: HTTPS with the standard library, and a Secure cookie."""

    def test_https_and_a_secure_cookie(self):
        import http.client
        import ssl
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        cert, key = os.path.join(folder, "cert.pem"), os.path.join(folder, "key.pem")
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", key, "-out", cert],
                       check=True, capture_output=True, timeout=60)
        port = free_port()
        cfg = mms.parse_config(["web", "--web", f"127.0.0.1:{port}", "--web-users",
                                self.web.cfg.web_users, "--web-cert", cert, "--web-key", key,
                                "--mongo-host", self.uri, "--mongo-database", self.dbname])
        archive = mms.Archive(cfg).connect()
        self.addCleanup(archive.close)
        web = mms.WebServer(cfg, archive)
        threading.Thread(target=web.serve_forever, daemon=True).start()
        self.addCleanup(web.server_close)
        self.addCleanup(web.shutdown)
        context = ssl.create_default_context(cafile=cert)
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
        self.addCleanup(conn.close)
        conn.request("GET", "/login")
        answer = conn.getresponse()
        form = answer.read().decode()
        self.assertIn("; Secure", answer.getheader("Set-Cookie"))      # the pre-session one
        self.assertEqual(answer.getheader("Strict-Transport-Security"), "max-age=31536000")
        token = re.search(r'name="csrf" value="([0-9a-f]+)"', form).group(1)
        conn.request("POST", "/login", body=urllib.parse.urlencode(
            {"user": "admin", "password": self.PASSWORDS["admin"], "csrf": token}),
            headers={"Content-Type": "application/x-www-form-urlencoded",
                     "Cookie": answer.getheader("Set-Cookie").split(";")[0]})
        answer = conn.getresponse()
        answer.read()
        self.assertEqual(answer.status, 303)
        self.assertIn("; Secure", answer.getheader("Set-Cookie"))


# Playwright's devices name no 360 px Android phone of today: this one is Chromium's
# own "Galaxy S8" as its emulation lists it (360 x 740 CSS pixels, scale 3).
PHONES = {"Android 360": {
    "viewport": {"width": 360, "height": 740}, "device_scale_factor": 3, "is_mobile": True,
    "has_touch": True, "user_agent": "Mozilla/5.0 (Linux; Android 13; SM-G950F) "
                                     "AppleWebKit/537.36 (KHTML, like Gecko) Chrome/120.0 "
                                     "Mobile Safari/537.36"}}


class TestWebConsoleInBrowser(WebCase):
    """Debian's Chromium, driven by Playwright: what a helpdesk sees. With
    MMS_SCREENSHOTS=DIR, the README's screenshots are taken here."""

    def test_a_helpdesk_session(self):
        spam = self.key(self.send_message(self.raw(), amavis_copy(
            "cheap pills", ["bob@example.com"]), rcpts=("spam-quarantine@example.net",)))
        self.server.mode.store.tally.flush()      # the daily counts, written each second
        page = self.browser()
        base = f"http://127.0.0.1:{self.web_port}"
        page.goto(base + "/")
        self.assertTrue(page.url.endswith("/login"), page.url)
        page.fill("input[name=user]", "admin")
        page.fill("input[name=password]", self.PASSWORDS["admin"])
        page.click("button[type=submit]")
        page.wait_for_url(base + "/")
        self.assertEqual(page.locator("h1").inner_text(), "Quarantine")   # where all land
        self.assertEqual(page.locator(f"a[href='/messages/{spam}']").inner_text(), "cheap pills")
        self.assertIn("1 message awaits judgement", page.locator("main").inner_text())
        self.shoot(page, "quarantine.png")
        page.click("header >> text=Dashboard")
        self.assertEqual(page.locator("svg rect").count() > 0, True)   # the chart
        self.shoot(page, "dashboard.png")
        page.click("header >> text=Search")
        page.fill("input[name=sender]", "evil@example.org")
        page.click("form[action='/messages'] button")
        self.assertIn("1 message", page.locator("main strong").first.inner_text())
        self.shoot(page, "search.png")
        page.click(f"a[href='/messages/{self.hostile}']")
        page.wait_for_url(f"{base}/messages/{self.hostile}")
        self.assertEqual(page.locator("h1").inner_text(), HOSTILE_SUBJECT)   # text, not script
        self.shoot(page, "message.png")
        page.click("button[value=hold]")
        page.wait_for_load_state()
        self.assertEqual(page.locator("main p.muted").first.inner_text(), "legal hold placed")
        self.assertIn("On legal hold since", page.locator("main p.warning").first.inner_text())
        page.click("button[value=release]")
        page.wait_for_load_state()
        self.assertIn("released: 250", page.locator("main p.muted").first.inner_text())
        self.assertEqual(self.dialogs, [])              # no script ran, from any message
        doc = self.db["message"].find_one({"store_key": self.hostile})
        self.assertEqual((doc["held"], doc["released"][0]["by"]), (True, "admin"))
        self.assertEqual(len(self.down.messages), 1)

    def test_phones_and_dark_screens(self):
        """On an iPhone 13 and a 360 px Android, as Playwright emulates them (their
        viewport, scale and user agent, not a narrowed window), light and dark: every
        page fits the screen (no horizontal scroll), every value in a table is
        labelled, every control has a label. At 1280 px too."""
        spam = self.key(self.send_message(self.raw(), amavis_copy(
            "cheap pills", ["bob@example.com"]), rcpts=("spam-quarantine@example.net",)))
        self.server.mode.store.tally.flush()
        self.browser()
        pages = {"quarantine": "/", "dashboard": "/dashboard", "search": "/messages",
                 "message": f"/messages/{self.hostile}", "spam": f"/messages/{spam}",
                 "audit": "/audit"}
        for device in ("iPhone 13", "Android 360", "Desktop Chrome"):
            for scheme in ("light", "dark"):
                page = self.phone(device, scheme)
                if device == "Desktop Chrome":
                    page.set_viewport_size({"width": 1280, "height": 900})
                base = self.log_in(page, "admin")
                for name, path in pages.items():
                    with self.subTest(device=device, scheme=scheme, page=name):
                        self.assertEqual(page.goto(base + path).status, 200)
                        self.assertLessEqual(      # a phone would zoom out to fit it
                            page.evaluate("document.documentElement.scrollWidth"),
                            page.viewport_size["width"])
                        self.assertEqual(page.evaluate(UNLABELLED_VALUES), [])
                        self.assertEqual(page.evaluate(UNLABELLED_CONTROLS), [])
                        background = page.evaluate(
                            "getComputedStyle(document.body).backgroundColor")
                        self.assertEqual(background, "rgb(18, 18, 18)" if scheme == "dark"
                                         else "rgba(0, 0, 0, 0)")
                        if name == "message":        # the preview's frame, loaded, seen
                            page.frame_locator("iframe.preview").locator("b").wait_for()
                            page.locator("iframe.preview").scroll_into_view_if_needed()
                            page.evaluate("window.scrollTo(0, 0)")
                        if name in ("quarantine", "search", "message", "dashboard"):
                            self.shoot(page, f"{name}-{SHOTS[device]}-{scheme}.png")


SHOTS = {"iPhone 13": "iphone", "Android 360": "android", "Desktop Chrome": "1280"}
# The values in a table that nothing names: a cell with no data-label (which a phone
# shows beside it) and no header cell of its own row (a summary's th).
UNLABELLED_VALUES = """[...document.querySelectorAll('main td')]
    .filter(td => td.textContent.trim() && !td.dataset.label &&
                  !td.parentElement.querySelector('th'))
    .map(td => td.textContent.trim().slice(0, 40))"""
UNLABELLED_CONTROLS = """[...document.querySelectorAll('main input, main select')]
    .filter(e => e.type != 'hidden' && !e.closest('label') && !e.getAttribute('aria-label'))
    .map(e => e.name)"""


###############################################################################
# Quarantine reports ##########################################################
###############################################################################

def amavis_copy(subject, rcpts, alert=None, score="12.5"):
    """A quarantine copy as amavisd-new 2.13 writes it: its fields above its Received:."""
    fields = [b"X-Envelope-From: <spammer@bad.example>",
              b"X-Envelope-To: " + ", ".join(f"<{r}>" for r in rcpts).encode(),
              b"X-Quarantine-ID: <" + uuid.uuid4().hex[:12].encode() + b">"]
    fields += [b"X-Amavis-Alert: " + alert.encode()] if alert else [
        b"X-Spam-Flag: YES", b"X-Spam-Score: " + score.encode()]
    return b"\r\n".join(fields + [b"Received: from amavis by mx.example.com",
                                   b"Subject: " + subject.encode(), b"", b"body", b""])


class ReportCase(WebCase):
    """Three amavisd-new quarantine copies (two spam, one virus) for local and other
    recipients, and the digest's capture server."""

    def web_args(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        self.secret = os.path.join(folder, "web-secret")
        with mms.private(self.secret) as f:
            f.write(base64.b64encode(os.urandom(32)))
        return ["--web-secret", self.secret]

    def setUp(self):
        super().setUp()
        self.server.shutdown()   # a quarantine-mode mms with --real-rcpt instead
        self.server.server_close()
        self.start_mongo("--real-rcpt")
        quarantine = ("spam-quarantine@example.net",)
        self.spam1 = self.key(self.send_message(self.raw(), amavis_copy(
            "<b>cheap</b> pills", ["alice@example.com", "bob@example.com", "carol@elsewhere.net"]),
            rcpts=quarantine))
        self.spam2 = self.key(self.send_message(self.raw(), amavis_copy(
            "more pills", ["alice@example.com"]), rcpts=quarantine))
        self.virus = self.key(self.send_message(self.raw(), amavis_copy(
            "invoice", ["alice@example.com"], alert="INFECTED, message contains virus: Eicar"),
            rcpts=("virus-quarantine@example.net",)))

    def digest(self, *args):
        return self.archive_command(
            "digest", "--url", f"http://127.0.0.1:{self.web_port}", "--web-secret", self.secret,
            "--rcpt-domain", "example.com", "--via", f"127.0.0.1:{self.down.server_address[1]}",
            "--hostname", "mx.example.com", *args)

    def reports(self):
        """{recipient: the report as an email message}, from the capture server."""
        import email
        import email.policy
        rcpts = [c.split("<", 1)[1].rstrip(">") for c in self.down.commands
                 if c.upper().startswith("RCPT")]
        return {rcpt: email.message_from_bytes(wire[:-3].replace(b"\r\n..", b"\r\n."),
                                               policy=email.policy.default)
                for rcpt, wire in zip(rcpts, self.down.messages)}

    def link(self, key, rcpt="alice@example.com", expires=60):
        with open(self.secret, "rb") as f:
            return "/q/" + mms.sign_link(f.read().strip(), key, rcpt, time.time() + expires)


class TestQuarantineReports(ReportCase):
    """mms.py digest: each local recipient gets a report of their own spam, with links
    signed by --web-secret that show a message and release it to them, once."""

    def test_one_report_each_with_their_own_spam_and_no_virus(self):
        done = self.digest("--dry-run")
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertEqual(self.down.messages, [])                     # dry: nothing sent
        self.assertIn("alice@example.com: 2 message(s)", done.stdout)
        self.assertIn("bob@example.com: 1 message(s)", done.stdout)
        done = self.digest()
        self.assertEqual(done.returncode, 0, done.stderr)
        self.assertIn("digest: 2 report(s) sent, 0 failed", done.stdout)
        reports = self.reports()
        self.assertEqual(sorted(reports), ["alice@example.com", "bob@example.com"])  # no carol
        alice = reports["alice@example.com"]
        text = alice.get_body(("plain",)).get_content()
        page = alice.get_body(("html",)).get_content()
        self.assertIn("<b>cheap</b> pills", text)
        self.assertIn("&lt;b&gt;cheap&lt;/b&gt; pills", page)        # escaped in the HTML
        self.assertIn("more pills", text)
        self.assertNotIn("invoice", text)                             # no virus
        self.assertEqual(len(re.findall(r"/q/\S+", text)), 4)       # review; release and allow
        self.assertEqual(len(re.findall(r"/q/\S+\?allow=1", text)), 2)
        self.assertNotIn("more pills", reports["bob@example.com"].get_body(("plain",)).get_content())
        self.assertEqual(alice["Auto-Submitted"], "auto-generated")
        done = self.digest("--include", "virus", "--dry-run")
        self.assertIn("alice@example.com: 3 message(s)", done.stdout)

    def test_a_link_opened_in_a_browser_releases_on_the_button_only_once(self):
        self.assertEqual(self.digest().returncode, 0)
        text = self.reports()["alice@example.com"].get_body(("plain",)).get_content()
        link = re.search(r"(http://\S+/q/\S+)", text.split("cheap")[1]).group(1)
        reports = len(self.down.messages)
        page = self.browser()
        page.goto(link)                                 # a link scanner's GET: nothing sent
        self.assertIn("<b>cheap</b> pills", page.locator("main table").inner_text())
        self.assertEqual(len(self.down.messages), reports)
        page.click("button[type=submit]")
        page.wait_for_load_state()
        self.assertIn("on its way to alice@example.com", page.locator("main").inner_text())
        self.assertEqual(len(self.down.messages), reports + 1)
        self.assertEqual([c for c in self.down.commands if c.upper().startswith("RCPT")][-1]
                         .upper(), "RCPT TO:<ALICE@EXAMPLE.COM>")
        [record] = self.db["message"].find_one({"store_key": self.spam1})["released"]
        self.assertEqual(record["to"], ["alice@example.com"])
        self.assertIn("alice@example.com, from a quarantine report, at 127.0.0.1", record["by"])
        page.goto(link)
        self.assertIn("delivered to alice@example.com already", page.locator("main").inner_text())
        status, _, _ = self.http("POST", urllib.parse.urlparse(link).path, {})
        self.assertEqual(status, 409)                   # once
        self.assertEqual(len(self.down.messages), reports + 1)
        self.assertEqual(self.dialogs, [])

    def test_release_and_always_allow_from_the_report(self):
        self.assertEqual(self.digest().returncode, 0)
        text = self.reports()["alice@example.com"].get_body(("plain",)).get_content()
        link = re.search(r"always allow this sender: (http://\S+)", text.split("more pills")[1]
                         ).group(1)
        reports = len(self.down.messages)
        path = urllib.parse.urlparse(link)
        page = self.http("GET", f"{path.path}?{path.query}")[2].decode()
        self.assertIn("always allow mail from <bdi>a@example.org</bdi> to "
                      "<bdi>alice@example.com</bdi>", page)
        self.assertEqual(self.db["message_lists"].count_documents({}), 0)   # a GET does nothing
        self.assertEqual(self.http("POST", path.path, {"allow": "1"})[0], 200)
        self.assertEqual(len(self.down.messages), reports + 1)
        [entry] = self.db["message_lists"].find()
        self.assertEqual((entry["kind"], entry["sender"], entry["rcpt"], entry["message"]),
                         ("allow", "a@example.org", "alice@example.com", self.spam2))
        self.assertTrue(entry["by"].startswith("alice@example.com, from a quarantine report"))

    def test_tampered_expired_and_virus_links(self):
        with open(self.secret, "rb") as f:
            secret = f.read().strip()
        good = mms.sign_link(secret, self.spam2, "alice@example.com", time.time() + 60)
        self.assertEqual(self.http("GET", f"/q/{good}")[0], 200)
        payload, mac = good.split(".")
        for tampered in (mms.sign_link(b"another secret, not the one", self.spam2,
                                       "alice@example.com", time.time() + 60),
                         payload[:-2] + "AA." + mac, "garbage"):
            self.assertEqual(self.http("GET", f"/q/{tampered}")[0], 403)
        other = mms.sign_link(secret, self.spam2, "bob@example.com", time.time() + 60)
        self.assertEqual(self.http("GET", f"/q/{other}")[0], 403)     # not bob's message
        expired = mms.sign_link(secret, self.spam2, "alice@example.com", time.time() - 1)
        self.assertEqual(self.http("GET", f"/q/{expired}")[0], 410)
        self.assertEqual(self.http("POST", f"/q/{expired}", {})[0], 410)
        virus = mms.sign_link(secret, self.virus, "alice@example.com", time.time() + 60)
        self.assertEqual(self.http("GET", f"/q/{virus}")[0], 403)
        self.assertEqual(self.http("POST", f"/q/{virus}", {})[0], 403)
        self.assertEqual(self.down.messages, [])

    def test_a_secret_others_can_read_is_refused(self):
        os.chmod(self.secret, 0o644)
        done = self.digest("--dry-run")
        self.assertEqual(done.returncode, 2)
        self.assertIn(f"can be read by others: chmod 600 {self.secret}", done.stderr)
        self.assertEqual(self.archive_command("digest", "--dry-run").returncode, 1)  # no --url


class TestReportsUnderAttack(ReportCase):
    """What a sender writes reaches a report's reader only as one line of text; one
    recipient never costs the others their report; a link shows that recipient's
    message and nobody else's, and never releases what an administrator holds."""

    def test_one_recipient_never_costs_the_others_their_report(self):
        self.send_message(self.raw(), amavis_copy("for j\u00f6hn", [
            "aaron@example.com", "j\u00f6hn@example.com", "zed@example.com"]),
            rcpts=("spam-quarantine@example.net",))
        done = self.digest()
        self.assertEqual(done.returncode, 1)                  # one failed, and said so
        self.assertIn("digest: 4 report(s) sent, 1 failed, 5 recipient(s)", done.stdout)
        self.assertIn("j\u00f6hn@example.com: not sent: ", done.stdout)
        self.assertIn("SMTPUTF8", done.stdout)
        self.assertEqual(sorted(self.reports()), ["aaron@example.com", "alice@example.com",
                                                  "bob@example.com", "zed@example.com"])
        self.down.commands.clear()
        self.down.messages.clear()
        self.down.replies["EHLO"] = "250-down.test\r\n250-SMTPUTF8\r\n250 8BITMIME"
        done = self.digest()
        self.assertEqual(done.returncode, 0, done.stdout + done.stderr)
        self.assertIn("digest: 5 report(s) sent, 0 failed", done.stdout)
        self.assertIn("mail FROM:<quarantine@mx.example.com> SMTPUTF8", self.down.commands)
        self.assertIn("j\u00f6hn@example.com", self.reports())

    def test_a_subject_is_one_line_in_a_report(self):
        fake = "real one\r\n\r\n2026-12-04 09:00  it@example.com  Password expiry\r\n  " \
               "http://phish.example/q/x\r\n"
        encoded = "=?utf-8?b?" + base64.b64encode(fake.encode()).decode() + "?="
        self.send_message(self.raw(), amavis_copy(encoded, ["dave@example.com"]),
                          rcpts=("spam-quarantine@example.net",))
        self.assertEqual(self.digest().returncode, 0)
        text = self.reports()["dave@example.com"].get_body(("plain",)).get_content()
        entry = [line for line in text.splitlines() if "phish.example" in line]
        self.assertEqual(len(entry), 1, text)
        self.assertIn("real one 2026-12-04 09:00 it@example.com Password expiry", entry[0])
        self.assertLessEqual(len(entry[0]), 2 * mms.REPORT_VALUE_MAX + 40)
        self.assertIn("held as spam, score 12.5", text)

    def test_each_entry_names_its_own_verdict(self):
        self.send_message(self.raw(), amavis_copy("banned one", ["erin@example.com"],
                                                  alert="BANNED, message contains .exe"),
                          rcpts=("banned-quarantine@example.net",))
        self.assertEqual(self.digest("--include", "virus").returncode, 0)
        text = self.reports()["alice@example.com"].get_body(("plain",)).get_content()
        self.assertIn("held as virus\n", text)                 # no score where none is
        self.assertNotIn("score \n", text)
        erin = self.reports()["erin@example.com"].get_body(("plain",)).get_content()
        self.assertIn("held as banned\n", erin)

    def test_no_report_goes_where_a_percent_or_bang_would_route_it(self):
        self.send_message(self.raw(), amavis_copy("route me", [
            "x%attacker.example@example.com", "a!b@example.com", "fred@example.com"]),
            rcpts=("spam-quarantine@example.net",))
        done = self.digest()
        self.assertEqual(done.returncode, 0)
        self.assertNotIn("attacker", " ".join(self.reports()))
        self.assertNotIn("a!b@example.com", self.reports())
        self.assertIn("fred@example.com", self.reports())
        self.assertIn("may route it elsewhere", done.stderr)

    def test_a_link_shows_only_its_recipient_and_releases_without_amavis_fields(self):
        link = self.link(self.spam1)
        status, _, body = self.http("GET", link)
        self.assertEqual(status, 200)
        page = body.decode()
        for secret in ("bob@example.com", "carol@elsewhere.net", "X-Envelope-To",
                       "X-Quarantine-ID", "X-MMS-RCPT", "spam-quarantine"):
            self.assertNotIn(secret, page)
        self.assertIn("alice@example.com", page)
        self.assertIn("&lt;b&gt;cheap&lt;/b&gt; pills", page)
        self.assertIn("12.5", page)
        before = self.stored(self.spam1)[1]
        self.assertEqual(self.http("POST", link, {})[0], 200)
        [wire] = self.down.messages
        for field in (b"X-Envelope-To", b"X-Envelope-From", b"X-Quarantine-ID", b"X-Spam-",
                      b"X-MMS-RCPT"):
            self.assertNotIn(field, wire)
        self.assertTrue(wire.startswith(b"Received: from amavis by mx.example.com\r\n"), wire)
        self.assertIn(b"Subject: <b>cheap</b> pills", wire)
        self.assertEqual(self.stored(self.spam1)[1], before)       # byte-exact still

    def test_a_held_message_is_not_released_from_a_link(self):
        self.assertEqual(self.archive_command("hold", self.spam2).returncode, 0)
        link = self.link(self.spam2)
        page = self.http("GET", link)[2].decode()
        self.assertIn("on legal hold: only an administrator can release it", page)
        self.assertNotIn("<button", page.split("</header>")[1])
        status, _, body = self.http("POST", link, {})
        self.assertEqual(status, 409)
        self.assertIn(b"on legal hold", body)
        self.assertEqual(self.down.messages, [])


###############################################################################
# The command line: logging, systemd, signals and workers ####################
###############################################################################

class TestTry(unittest.TestCase):
    """`mms.py try`, as a newcomer runs it: one command prints the console's address
    and a login, SMTP answers, the sample mail is on the first page, a release
    reaches the catch-all, and SIGTERM leaves nothing running."""

    def start_try(self, *args):
        data = tempfile.mkdtemp(prefix="mms-try-")
        self.addCleanup(shutil.rmtree, data, True)
        self.smtp_port, self.web_port = free_port(), free_port()
        process = subprocess.Popen(
            [sys.executable, MMS, "try", "--data", data, "--port", str(self.smtp_port),
             "--web", f"127.0.0.1:{self.web_port}", *args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self.addCleanup(process.stdout.close)
        self.addCleanup(lambda: process.poll() is None and (process.kill(), process.wait()))
        lines, deadline = [], time.monotonic() + 90
        while time.monotonic() < deadline and not (lines and lines[-1].startswith(
                ("sent", "Ctrl-C") if not args else "sent")):
            line = process.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
        return process, data, "\n".join(lines)

    def test_one_command_runs_it_all_and_stops_it_all(self):
        process, data, said = self.start_try("--sample")
        self.assertIn("not for production", said)
        found = re.search(rf"console   http://127.0.0.1:{self.web_port}/  user admin  "
                          rf"password ([0-9a-f]{{24}})", said)
        self.assertIsNotNone(found, said)
        self.assertIn("sent 7 sample messages", said)
        parts = children(process.pid)
        self.assertEqual(len(parts), 4, parts)        # the store, the catch-all, SMTP, console
        with smtplib.SMTP("127.0.0.1", self.smtp_port, timeout=30) as smtp:
            self.assertEqual(smtp.sendmail("a@example.org", ["b@example.com"],
                                           b"Subject: hello\r\n\r\nhi\r\n"), {})
        web = WebClient(self.web_port)
        self.assertEqual(web.login("admin", found.group(1)), 303)
        page = web.get("/")
        for subject in ("Replica watches, 90% off", "Your invoice", "Scanned document",
                        "Your account is locked"):
            self.assertIn(html.escape(subject), page)
        self.assertIn("4 messages await judgement.", page)
        spam = re.search(r'href="/messages/([0-9a-f]{64})">Replica watches', page).group(1)
        self.assertEqual(web.post(f"/messages/{spam}/release"), 303)
        with open(os.path.join(data, "released.log"), "rb") as f:
            released = f.read()
        self.assertIn(b"Subject: Replica watches, 90% off", released)
        self.assertNotIn(b"X-Spam-Flag", released)       # the quarantine's fields dropped
        process.send_signal(signal.SIGTERM)
        self.assertEqual(process.wait(30), 0)
        self.assertIn("stopped", process.stdout.read())
        self.assertEqual([pid for pid in parts if os.path.exists(f"/proc/{pid}")], [])

    def test_without_nx_27017_one_line_says_what_to_install(self):
        bare = tempfile.mkdtemp(prefix="mms-bare-")        # a Python with no nx-27017 beside
        self.addCleanup(shutil.rmtree, bare)               # it, and none on PATH
        os.symlink(sys.executable, os.path.join(bare, "python3"))
        done = subprocess.run([os.path.join(bare, "python3"), MMS, "try", "--port",
                               str(free_port()), "--web", f"127.0.0.1:{free_port()}"],
                              capture_output=True, text=True, timeout=30,
                              env={**os.environ, "PATH": "/usr/bin:/bin"})
        self.assertEqual((done.returncode, done.stderr.strip()), (2, (
            "mms.py: error: try keeps its mail in nx-27017, an embedded MongoDB-wire store, "
            "which is not installed: pip install nx-27017")))

    def test_loopback_only(self):
        done = subprocess.run([sys.executable, MMS, "try", "--web", "0.0.0.0:8025"],
                              capture_output=True, text=True, timeout=30)
        self.assertEqual(done.returncode, 2)
        self.assertIn("try serves on loopback only, not 0.0.0.0:8025", done.stderr)


def children(pid):
    """The pids whose parent is pid, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
    return found


class WebClient:
    """A browser's session with the console, over http.client: its cookie and token."""

    def __init__(self, port):
        import http.client
        self.connect = lambda: http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.cookie, self.csrf = "", ""

    def request(self, method, path, fields=None):
        conn = self.connect()
        headers = {"Cookie": self.cookie}
        body = None
        if fields is not None:
            body = urllib.parse.urlencode(fields)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body, headers)
        answer = conn.getresponse()
        data = answer.read().decode()
        conn.close()
        return answer, data

    def login(self, user, password):
        answer, page = self.request("GET", "/login")
        self.cookie = answer.getheader("Set-Cookie").split(";")[0]
        token = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
        answer, _ = self.request("POST", "/login", {"user": user, "password": password,
                                                   "csrf": token})
        self.cookie = answer.getheader("Set-Cookie").split(";")[0]
        return answer.status

    def get(self, path):
        page = self.request("GET", path)[1]
        self.csrf = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)
        return page

    def post(self, path, fields=()):
        return self.request("POST", path, {"csrf": self.csrf, **dict(fields)})[0].status



class TestLogging(unittest.TestCase):
    """The log as an administrator reads it: under supervisord, or in a file logrotate moves."""

    def serve(self, *args):
        """Returns once mms greets: the port listens a moment before mms has logged
        its start and serves, and a signal in that moment only stops it."""
        server = MmsProcess("--server", "debug", *args)
        self.addCleanup(server.stop)
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as probe:
            self.assertTrue(probe.recv(512).startswith(b"220 "))
        return server

    def finish(self, server):
        server.proc.send_signal(signal.SIGTERM)
        return server.proc.communicate(timeout=10)[1].decode(errors="replace")

    def send(self, server):
        with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
            client.sendmail("a@example.org", ["b@example.com"], SIMPLE)

    def test_sighup_reopens_the_log_file(self):
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "mms.log")
        server = self.serve("--log-file", path)
        os.rename(path, path + ".1")                     # what logrotate does
        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.send(server)
        self.finish(server)
        with open(path) as f:
            new = f.read()
        with open(path + ".1") as f:
            old = f.read()
        self.assertIn("starting mms", old)
        self.assertIn("reopened", new)
        self.assertIn("queued as", new)
        self.assertIn("stopped", new)

    def test_sighup_without_a_log_file_is_ignored(self):
        server = self.serve()
        server.proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        self.send(server)
        self.assertIsNone(server.proc.poll())
        err = self.finish(server)
        self.assertIn("SIGHUP: no --log-file to reopen, ignored", err)
        self.assertIn("queued as", err)

    def test_control_characters_from_clients_are_escaped(self):
        server = self.serve()
        client = Raw(server.port)
        self.addCleanup(client.close)
        for line in ["EHLO client.test", "MAIL FROM:<evil\u009b31m@example.org>",
                     "RCPT TO:<b@example.com>", "DATA"]:
            client.reply()
            client.send(line.encode() + b"\r\n")
        client.reply()
        client.send(SIMPLE + b".\r\n")
        self.assertEqual(client.reply()[0], 250)
        err = self.finish(server)
        self.assertIn("from=<evil\\x9b31m", err)
        self.assertNotIn("\u009b", err)

    def test_debug_logs_mms_dialogue_not_the_driver(self):
        server = MmsProcess("--server", "mongo-quarantine", "--debug", "--mongo-host",
                            MongoServer.get_uri(), "--mongo-database", "mms_test_debug_log")
        self.addCleanup(server.stop)
        self.send(server)
        err = self.finish(server)
        self.assertIn("FROM:<a@example.org>", err)
        self.assertIn("> 250-PIPELINING\n", err)
        self.assertIn("queued as", err)
        self.assertNotIn("pymongo", err.lower())
        self.assertNotIn('"message":', err)        # the driver's JSON event lines

    def test_listening_beyond_loopback_without_allow_is_warned(self):
        err = self.finish(self.serve("--host", "0.0.0.0"))
        self.assertIn("listening on 0.0.0.0 with no --allow: any client that reaches it "
                      "may send mail", err)
        err = self.finish(self.serve("--host", "0.0.0.0", "--allow", "127.0.0.1",
                                     "--plugin", "plugins.mark_bounces"))
        self.assertNotIn("no --allow", err)
        self.assertIn("clients allowed: 127.0.0.1/32, plugins: plugins.mark_bounces", err)


class TestSystemdNotify(unittest.TestCase):
    """Type=notify: what systemd's own socket would receive, read from a datagram
    socket of the test's (systemd itself cannot run here)."""

    def notifications(self, *args, until):
        folder = tempfile.mkdtemp(prefix="mms-notify-")
        self.addCleanup(shutil.rmtree, folder)
        path = os.path.join(folder, "notify")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(path)
        sock.settimeout(10)
        self.addCleanup(sock.close)
        server = MmsProcess("--server", "debug", "--grace", "1", *args,
                            env={"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000"})
        self.addCleanup(server.stop)
        states = []
        while until not in states:
            states.append(sock.recv(4096).decode())
            if states[-1] == "READY=1":
                with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
                    self.assertEqual(client.noop()[0], 250)   # serving once it says so
                server.proc.send_signal(signal.SIGTERM)
        self.assertEqual(server.proc.wait(30), 0)
        return states

    def test_ready_watchdog_and_stopping(self):
        for args in ((), ("--workers", "2")):
            with self.subTest(args=args):
                states = self.notifications(*args, until="STOPPING=1")
                self.assertIn("READY=1", states)
                self.assertIn("WATCHDOG=1", states)
                self.assertLess(states.index("READY=1"), states.index("STOPPING=1"))
                self.assertEqual(states.count("READY=1"), 1, states)


class TestShutdown(ServerCase):
    """What supervisord's SIGTERM does: finish transactions, close idle sessions, exit 0."""

    def test_sigterm_lets_a_transaction_finish(self):
        server = MmsProcess("--server", "debug", "--grace", "5")
        self.addCleanup(server.stop)
        idle, busy = Raw(server.port), Raw(server.port)
        self.addCleanup(idle.close)
        self.addCleanup(busy.close)
        idle.reply(), busy.reply()
        idle.cmd("EHLO idle")
        busy.cmd("EHLO busy")
        busy.cmd("MAIL FROM:<a@x>")
        busy.cmd("RCPT TO:<b@y>")
        busy.cmd("DATA")
        busy.send(b"Subject: in flight\r\n\r\nfirst half\r\n")
        server.proc.send_signal(signal.SIGTERM)
        self.assertReply(idle.reply(), "shutdown")        # the drain has begun
        busy.send(b"second half\r\n.\r\n")
        self.assertReply(busy.reply(), "queued")
        self.assertReply(busy.reply(), "shutdown")
        self.assertEqual(server.proc.wait(10), 0)
        with self.assertRaises(OSError):
            socket.create_connection(("127.0.0.1", server.port), timeout=2)
        out = server.proc.stdout.read()
        self.assertEqual(parse_debug_output(out)[0][1],
                         b"Subject: in flight\r\n\r\nfirst half\r\nsecond half\r\n")

    def test_workers_share_the_socket_and_stop_together(self):
        server = MmsProcess("--server", "debug", "--workers", "2", "--grace", "2")
        self.addCleanup(server.stop)

        def workers():
            with open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children") as f:
                return [int(pid) for pid in f.read().split()]

        deadline = time.monotonic() + 10
        while len(workers()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        first = workers()
        self.assertEqual(len(first), 2)
        for n in range(10):
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
                client.sendmail("a@x", [f"r{n}@y"], SIMPLE)
        os.kill(first[0], signal.SIGKILL)
        while (len(workers()) < 2 or first[0] in workers()) and time.monotonic() < deadline + 10:
            time.sleep(0.05)
        self.assertEqual(len(workers()), 2, "a dead worker is replaced")
        # a worker stopped on its own leaves the shared socket listening
        second = workers()
        os.kill(second[0], signal.SIGTERM)
        while (len(workers()) < 2 or second[0] in workers()) and time.monotonic() < deadline + 20:
            time.sleep(0.05)
        for n in range(4):
            with smtplib.SMTP("127.0.0.1", server.port, timeout=10) as client:
                client.sendmail("a@x", [f"last{n}@y"], SIMPLE)
        server.proc.send_signal(signal.SIGTERM)
        self.assertEqual(server.proc.wait(15), 0)
        out, err = server.proc.communicate()
        self.assertEqual(len(parse_debug_output(out)), 14)
        self.assertIn(b"all workers stopped", err)

    def test_a_worker_that_dies_young_comes_back_later_each_time(self):
        server = MmsProcess("--server", "debug", "--workers", "2")
        self.addCleanup(server.stop)

        def workers():
            with open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children") as f:
                return [int(pid) for pid in f.read().split()]

        for _ in range(3):                     # both rows, three times: 1 s, 2 s, 4 s
            deadline = time.monotonic() + 15
            while len(workers()) < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            for pid in workers():
                os.kill(pid, signal.SIGKILL)
            time.sleep(0.2)
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)   # while they wait: a prompt stop
        self.assertEqual(server.proc.wait(15), 0)
        self.assertLess(time.monotonic() - started, 3)
        err = server.proc.communicate()[1].decode()
        for delay in (1, 2, 4):
            self.assertEqual(err.count(f"starting another in {delay} s"), 2, err)

    def test_a_spool_it_cannot_use_stops_the_master_before_any_fork(self):
        done = subprocess.run([sys.executable, MMS, "--server", "mongo-proxy", "--workers", "2",
                               "--spool-dir", "/proc/mms-none", "--host", "127.0.0.1",
                               "--port", str(free_port())],
                              capture_output=True, text=True, timeout=30)
        self.assertEqual(done.returncode, 2)
        self.assertEqual(done.stderr.count("mms.py: error: --spool-dir /proc/mms-none"), 1)
        self.assertNotIn("worker", done.stderr)

    def test_serves_at_once_and_stops_cleanly_while_mongodb_is_down(self):
        started = time.monotonic()
        server = MmsProcess("--server", "mongo-quarantine", "--mongo-timeout", "5",
                            "--mongo-host", f"mongodb://127.0.0.1:{free_port()}/")
        try:
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
                self.assertTrue(sock.recv(100).startswith(b"220 "))
            self.assertLess(time.monotonic() - started, 3)   # not after --mongo-timeout
            server.proc.send_signal(signal.SIGTERM)
            _, err = server.proc.communicate(timeout=20)
        finally:
            server.stop()
        self.assertEqual(server.proc.returncode, 0, err)
        self.assertIn(b"received SIGTERM, stopping", err)
        self.assertIn(b"stopped", err)

    def test_signals_while_starting_do_not_kill_mms(self):
        """A plugin that takes 3 s to import holds mms in its start-up: SIGHUP is
        handled there, and SIGTERM stops it with 0, as supervisord expects."""
        folder = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, folder)
        with open(os.path.join(folder, "slow_start.py"), "w") as f:
            f.write("import time\ntime.sleep(3)\n\n\ndef apply(metadata=None, data=None):\n"
                    "    return metadata\n")
        proc = subprocess.Popen([sys.executable, MMS, "--server", "debug", "--host", "127.0.0.1",
                                 "--port", str(free_port()), "--plugin", "slow_start"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env={**os.environ, "PYTHONPATH": folder})
        self.addCleanup(proc.kill)
        time.sleep(1.5)
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=10)
        self.assertEqual(proc.returncode, 0, err)
        self.assertIn(b"SIGHUP: no --log-file to reopen, ignored", err)
        self.assertIn(b"received SIGTERM while starting, stopped", err)

    def test_sigint_stops_too(self):
        server = MmsProcess("--server", "debug")
        self.addCleanup(server.stop)
        server.proc.send_signal(signal.SIGINT)
        self.assertEqual(server.proc.wait(10), 0)


###############################################################################
# Running it: the container ###################################################
###############################################################################

def podman(*args, check=True, timeout=120):
    """podman as the README runs it; runc, since crun refuses this machine's cgroups."""
    return subprocess.run(["podman", "--runtime", "runc", *args], capture_output=True,
                          text=True, timeout=timeout, check=check)


class TestContainer(unittest.TestCase):
    """The image that .ci/container built from the Dockerfile, unchanged, run as the
    README shows it, against nx-27017 on the host's end of podman's bridge.
    MMS_TEST_CONTAINER=1 says the image is there (CI builds it)."""

    ULIMITS = ("--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096")

    @classmethod
    def setUpClass(cls):
        if not os.environ.get("MMS_TEST_CONTAINER"):
            raise missing("no image: bash .ci/container, then MMS_TEST_CONTAINER=1")
        cls.names = []

    def run_mms(self, *args, port=None, env=()):
        """The README's line: a spool volume, the URI, an allow-list with the bridge's
        gateway, SMTP and metrics published on loopback. (id, smtp, metrics ports)."""
        name = "mms-test-" + uuid.uuid4().hex[:8]
        smtp, metrics = free_port(), free_port()
        uri = getattr(self, "uri", "mongodb://10.88.0.1:1/message")
        podman("run", "-d", "--name", name, *self.ULIMITS, "-v", f"{name}:/var/spool/mms",
               "-e", f"MMS_MONGODB_URI={uri}", "-e", "MMS_ALLOW=127.0.0.1,10.88.0.1,172.17.0.1",
               *[item for pair in env for item in ("-e", pair)],
               "-p", f"127.0.0.1:{smtp}:{port or 14001}", "-p", f"127.0.0.1:{metrics}:9425",
               "mms", *args)
        self.addCleanup(podman, "volume", "rm", "-f", name, check=False)
        self.addCleanup(podman, "rm", "-f", "-t", "2", name, check=False)
        wait_port(smtp, seconds=30)
        return name, smtp, metrics

    def start_mongo(self, name):
        """nx-27017 on the gateway of the bridge the first container made."""
        gateway = podman("inspect", name, "--format",
                         "{{.NetworkSettings.Gateway}}").stdout.strip()
        port = free_port()
        exe = (shutil.which("nx-27017", path=os.path.dirname(sys.executable))
               or shutil.which("nx-27017"))
        run = tempfile.mkdtemp(prefix="mms-nx-")
        self.addCleanup(shutil.rmtree, run, True)
        nx = subprocess.Popen([exe, "--host", gateway, "-p", str(port), "--data-dir", "memory",
                               "--pid-file", f"{run}/pid", "--log-file", f"{run}/log"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(nx.wait, 10)
        self.addCleanup(nx.terminate)
        wait_port(port, host=gateway)
        import pymongo
        client = pymongo.MongoClient(f"mongodb://{gateway}:{port}/", serverSelectionTimeoutMS=5000)
        self.addCleanup(client.close)
        return nx, client["message"], f"mongodb://{gateway}:{port}/message"

    def health(self, name):
        return podman("healthcheck", "run", name, check=False).returncode

    def test_the_image_as_the_readme_runs_it(self):
        volumes = podman("image", "inspect", "mms", "--format", "{{json .Config.Volumes}}")
        self.assertIn("/var/spool/mms", volumes.stdout)        # spooled mail outlives it
        name, smtp, metrics = self.run_mms()
        nx, db, self.uri = self.start_mongo(name)
        podman("rm", "-f", "-t", "2", name)
        name, smtp, metrics = self.run_mms()
        deadline = time.monotonic() + 30
        while self.health(name) != 0:                    # MongoDB found, indexes made
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.5)
        with smtplib.SMTP("127.0.0.1", smtp, timeout=30) as client:  # through the bridge
            self.assertEqual(client.sendmail("a@example.org", ["b@example.com"], SIMPLE), {})
        for _ in range(3):
            self.assertEqual(self.health(name), 0)       # healthy: exit 0
        self.assertEqual(db["message"].count_documents({}), 1)   # probes leave nothing
        _, _, values = scrape(metrics)
        self.assertEqual(values['mms_messages_total{result="stored"}'], 1)
        self.assertGreaterEqual(values["mms_probes_total"], 4)
        logs = podman("logs", name).stderr + podman("logs", name).stdout
        self.assertEqual(logs.count("queued as"), 1, logs)
        self.assertNotIn("mms-check", logs)
        nx.terminate()
        nx.wait(10)
        self.assertEqual(self.health(name), 1)           # unhealthy is 1, never 2
        stopped = podman("stop", "-t", "10", name)
        self.assertEqual(podman("inspect", name, "--format", "{{.State.ExitCode}}").stdout.strip(),
                         "0", stopped.stderr)

    def test_the_health_check_finds_a_server_started_with_flags(self):
        name, smtp, metrics = self.run_mms("--server", "debug", "--port", "14025", port=14025)
        self.assertEqual(self.health(name), 0)


###############################################################################
# Fuzzing: generated sessions against every mode ##############################
###############################################################################

FUZZ_SESSIONS = int(os.environ.get("MMS_FUZZ_SESSIONS", "2000"))
FUZZ_SEED = int(os.environ.get("MMS_FUZZ_SEED", "1"))
FUZZ_REPLAY = os.environ.get("MMS_FUZZ_REPLAY")     # one session's seed, as a failure prints it
REPLY_LINE_RE = re.compile(rb"([2-5][0-9][0-9])([ -])[^\r\n]*\r\n\Z")
MARKER_RE = re.compile(rb"fuzz-marker-([0-9]+-[0-9]+)")


class SessionGrammar:
    """Seeded SMTP sessions from a grammar, with mutations: verbs in any case, ESMTP
    parameters valid and broken, address forms, XFORWARD with xtext, pipelined
    batches, messages with encoded words, folding, NUL, 8-bit, bare CR and LF and a
    missing blank line, and disconnects anywhere."""

    GOOD_ADDRESSES = ["a@example.org", "B.C+d@Example.COM", "\u00fcser@ex\u00e4mple.de",
                      '"a b"@example.com', '"q\\"uote"@example.com', "a@[192.0.2.1]",
                      "a@[IPv6:2001:db8::1]", "postmaster", "x@sub.domain.example."]
    BAD_ADDRESSES = ["@@", "a@", "a@b@c", "a@.", "a@[1.2.3.4", "a b@c", "a@b..c", '"open@x',
                     "\x01@x", "a" * 300 + "@example.com", "a@" + "d." * 200 + "com"]
    PARAMS = ["SIZE=123", "SIZE=\u00b2", "SIZE=\u0663\u0663", "SIZE=99999999999999", "SIZE=",
              "BODY=8BITMIME", "BODY=7BIT", "BODY=BINARYMIME", "SMTPUTF8", "RET=HDRS",
              "ENVID=x+2Bid", "NOTIFY=NEVER", "NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;a@b",
              "X=", "=", "UNKNOWN=1", "AUTH=<>"]
    XFORWARD_VALUES = ["mx.example.org", "[UNAVAILABLE]", "[unavailable]", "192.0.2.7",
                       "IPV6:2001:db8::7", "999.1.1.1", "x+2By+3D", "+4", "ESMTP", "SMTP",
                       "LOCAL", "n" * 300, "caf\u00e9"]
    JUNK = ["FOO", "STARTTLS", "BDAT 10", "AUTH PLAIN AAAA", "EXPN list", "TURN", "",
            "M\u00c4IL FROM:<a@b>", "NOOP \x00", "RSET\rRSET", "HELO", "EHLO", "VRFY",
            "X" * 2000, "MAIL FROM:<a@b> " + "P=" * 800]
    SUBJECTS = [b"plain", b"=?utf-8?q?caf=C3=A9?=", b"=?x?q?a" * 200, b"=?utf-8?b?w6k=?=",
                b"folded\r\n continued\r\n\tagain", b"8-bit \xe9\xff", b"nul \x00 inside",
                b"bare\rcr", b"x" * 3000, b"=?unknown?q?x?= =?utf-8?B?####?="]
    DATES = [b"Thu, 26 Nov 2026 02:27:17 +0000", b"Fri, 31 Dec 9999 23:59:59 -1200",
             b"Mon, 1 Jan 0001 00:00:00 +1400", b"garbage", b"", b"31 Feb 2026 25:61:61 +9999"]

    def __init__(self, seed, marker):
        self.rng, self.marker = random.Random(seed), marker
        self.messages = 0

    def pick(self, items, *weights):
        return self.rng.choices(items, weights or None)[0]

    def case(self, verb):
        return "".join(ch.lower() if self.rng.random() < 0.3 else ch for ch in verb)

    def path(self):
        address = self.pick([self.pick(self.GOOD_ADDRESSES), self.pick(self.BAD_ADDRESSES)], 8, 2)
        form = self.pick(["<{}>", "{}", "<{}", " <{}>", "<@relay.example:{}>", "<{}> "], 10, 2, 1, 1, 1, 1)
        params = self.rng.sample(self.PARAMS, self.pick([0, 1, 2, 3], 6, 2, 1, 1))
        return " ".join([form.format(address), *params])

    def command(self):
        kind = self.pick(["MAIL", "RCPT", "NOOP", "RSET", "VRFY", "HELP", "XFORWARD", "EHLO",
                          "junk"], 3, 6, 1, 1, 1, 1, 2, 1, 2)
        if kind == "MAIL":
            line = f"{self.case('MAIL')} {self.case('FROM')}:{self.path() if self.rng.random() < 0.9 else '<>'}"
        elif kind == "RCPT":
            line = f"{self.case('RCPT')} {self.case('TO')}:{self.path()}"
        elif kind == "XFORWARD":
            names = self.rng.sample(["NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE",
                                     "BOGUS"], self.rng.randint(1, 4))
            line = self.case("XFORWARD") + "".join(
                f" {self.case(name)}={self.pick(self.XFORWARD_VALUES)}" for name in names)
        elif kind == "EHLO":
            line = f"{self.case(self.pick(['EHLO', 'HELO']))} {self.pick(['client.test', '[192.0.2.1]', 'x' * 300])}"
        elif kind == "junk":
            line = self.pick(self.JUNK)
        else:
            line = self.case(kind) + self.pick(["", " arg", " <a@b>"], 6, 1, 1)
        return self.mutate(line.encode("utf-8", "surrogateescape"))

    def mutate(self, line):
        roll = self.rng.random()
        if roll < 0.04 and line:
            at = self.rng.randrange(len(line))
            line = line[:at] + bytes([self.rng.choice(b"\x00\x7f\xff\r\t <>:=@\"\\")]) + line[at:]
        elif roll < 0.06:
            line = line[:self.rng.randrange(len(line) + 1)]
        return line.replace(b"\n", b"") + self.pick([b"\r\n", b"\n"], 19, 1)

    def message(self):
        """A message, and its text as the server must store it."""
        self.messages += 1
        eol = self.pick([b"\r\n", b"\n"], 9, 1)
        fields = [b"Subject: " + self.pick(self.SUBJECTS), b"Date: " + self.pick(self.DATES),
                  b"Message-ID: <%d@fuzz.test>" % self.rng.randrange(10**9),
                  b"X-Envelope-To: <real@example.com>,\r\n <other@example.com>",
                  b"From: a@example.org", b"X-Raw: \x00\x01\xfe"]
        head = eol.join(self.rng.sample(fields, self.rng.randint(0, len(fields))))
        lines = [self.pick([b"text", b".leading dot", b"..two", b".", b"", b"x" * 2000,
                            bytes(self.rng.randrange(256) for _ in range(20)).replace(b"\n", b""),
                            b"bare\rcr", b"\tindented"]) for _ in range(self.rng.randint(0, 12))]
        gap = self.pick([eol, b""], 9, 1)          # sometimes no blank line after the header
        body = head + eol + gap + eol.join(lines)
        if b"\r\n.\r\n" in b"\r\n" + body + b"\r\n":
            body = body.replace(b"\r\n.\r\n", b"\r\n..\r\n")
        return body + b"\r\nfuzz-marker-%s-%d\r\n" % (self.marker.encode(), self.messages)

    def session(self):
        """[(kind, payload)]: 'batch' lines pipelined in one write, 'data' a message
        after DATA, 'cut' a message cut short, 'quit', 'close'."""
        steps = []
        if self.rng.random() < 0.9:
            steps.append(("batch", [self.mutate(f"{self.case(self.pick(['EHLO', 'HELO'], 4, 1))} client.test".encode())]))
        for _ in range(self.rng.randint(1, 4)):
            batch = [self.command() for _ in range(self.pick([1, 2, 4, 8], 4, 3, 2, 1))]
            if self.rng.random() < 0.8:
                batch.insert(0, f"MAIL FROM:{self.path()}\r\n".encode())
                batch += [f"RCPT TO:{self.path()}\r\n".encode() for _ in range(self.rng.randint(1, 3))]
            steps.append(("batch", batch))
            if self.rng.random() < 0.8:
                steps.append(("data", self.message()))
        steps.append(self.pick([("quit", None), ("close", None), ("cut", self.message())], 7, 2, 1))
        return steps


class TestParserFuzz(unittest.TestCase):
    """The MIME reader on generated, mutated messages: never an exception, the same
    fields whatever pieces the message comes in, and within its bounds."""

    PARTS = [b"Content-Type: text/plain; charset=utf-8\r\n\r\nplain words",
             b"Content-Type: text/html; charset=\"iso-8859-1\"\r\n\r\n<p>html <script>x</script>",
             b"Content-Type: text/plain; charset=idna\r\nContent-Transfer-Encoding: base64"
             b"\r\n\r\n!!not base64",
             b"Content-Type: application/pdf; name*=utf-8''%E2%82%AC.pdf\r\n"
             b"Content-Transfer-Encoding: base64\r\n\r\nJVBERi0xLjQ=",
             b"Content-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\ninner body",
             b"Content-Type: message/delivery-status\r\n\r\nAction: failed",
             b"Content-Disposition: attachment; filename=\"a\\\"b.exe\"\r\n"
             b"Content-Transfer-Encoding: quoted-printable\r\n\r\n=E9t=\r\n=C3=A9",
             b"Content-Type: multipart/mixed\r\n\r\nno boundary", b"", b"\r\n\r\n"]

    def message(self, rng, depth=0):
        if depth > 3 or rng.random() < 0.4:
            return rng.choice(self.PARTS)
        boundary = rng.choice(["b", "=_x", "a b", "", "--", "b" * 80])
        parts = [self.message(rng, depth + 1) for _ in range(rng.randint(0, 4))]
        return mime(*parts, boundary=boundary, kind=rng.choice(
            ["mixed", "alternative", "report; report-type=delivery-status"]))

    def mutate(self, rng, data):
        for _ in range(rng.randint(0, 3)):
            at = rng.randrange(len(data) + 1)
            data = data[:at] + rng.choice([b"", b"\r\n", b"\n", b"--b", b"=", b"\x00\xff",
                                           b";", b'"', b"*0*="]) + data[at + rng.randint(0, 5):]
        return data

    def test_any_message_in_any_pieces(self):
        rng = random.Random(FUZZ_SEED)
        for n in range(max(1, FUZZ_SESSIONS // 2)):
            data = self.mutate(rng, b"Subject: fuzz\r\n" + self.message(rng))
            whole = mms.completed_fields([data], 200, "a@example.org")
            cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, 5)))
            pieces = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
            with self.subTest(n=n, data=data[:300]):
                self.assertEqual(mms.completed_fields(pieces, 200, "a@example.org"), whole)
                self.assertLessEqual(len(whole.get("text", "")), 200)
                self.assertEqual(whole["errors_count"], len(whole["parsing_errors"]))
                self.assertFalse([e for e in whole["parsing_errors"] if "parse failed" in e])
                for f in whole["files"]:
                    self.assertEqual(set(f), {"filename", "ext", "size", "content_type",
                                              "sha256"})


class FuzzDownstream(ScriptedDownstream):
    """A downstream that misbehaves now and then, by seeded chance: refusals, replies
    with mixed codes, codes no command may get, garbage, and hang-ups."""

    class Replies(dict):
        def __init__(self, base, rng):
            super().__init__(base)
            self.rng, self.lock = rng, threading.Lock()

        def get(self, verb, default=None):
            usual = super().get(verb, default)
            if verb in ("QUIT", "EHLO") and usual:
                return usual
            with self.lock:
                roll = self.rng.random()
            if roll < 0.85:
                return usual
            return [None, "451 4.3.0 try later", "550 5.7.1 refused",
                    "250-2.1.5 ok\r\n550 5.1.1 no", "354 odd", "999 what", "100 continue",
                    "hello there", "250-multi\r\n250 line"][int((roll - 0.85) / 0.15 * 9)]

        def __getitem__(self, verb):  # the end-of-data reply: never a hang-up here
            return self.get(verb) or "421 4.4.2 closing"

    def __init__(self, seed):
        super().__init__()
        self.replies = self.Replies(self.replies, random.Random(seed))


class TracebackCatcher(logging.Handler):
    """Every log record that carries a traceback: a bug, never a client's fault."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        if record.exc_info or record.levelno >= logging.CRITICAL:
            self.records.append(self.format(record))


class TestFuzz(ProxyCase):
    """Generated sessions in debug, quarantine, --real-rcpt and proxy modes. Oracles:
    the server stays up, logs no traceback, answers every command with a well-formed
    reply within 5 s, stores every message it answered 250 byte-exact, and keeps
    its memory bounded. MMS_FUZZ_SESSIONS (2000) and MMS_FUZZ_SEED (1) set the run;
    a failure prints the session's seed and what was sent, and MMS_FUZZ_REPLAY=SEED
    runs that one session again."""

    def run_session(self, seed, marker):
        grammar = SessionGrammar(seed, marker)
        steps, sent, accepted = grammar.session(), [], {}
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        reader = sock.makefile("rb")
        try:
            self.read_reply(reader, sent)
            for kind, payload in steps:
                if kind == "batch":
                    sent.append(b"".join(payload))
                    sock.sendall(sent[-1])
                    for _ in payload:
                        self.read_reply(reader, sent)
                elif kind in ("data", "cut"):
                    sent.append(b"DATA\r\n")
                    sock.sendall(sent[-1])
                    if self.read_reply(reader, sent)[0] != b"354":
                        continue
                    wire = dot_stuff(payload)
                    if kind == "cut":
                        sock.sendall(wire[:grammar.rng.randrange(len(wire))])
                        return accepted
                    sent.append(wire + b".\r\n")
                    sock.sendall(sent[-1])
                    code, text = self.read_reply(reader, sent)
                    if code == b"250":
                        accepted[MARKER_RE.search(payload).group(1)] = (payload, text)
                elif kind == "quit":
                    sock.sendall(b"QUIT\r\n")
                    self.read_reply(reader, sent)
                else:
                    return accepted
            return accepted
        except (AssertionError, OSError) as exc:
            raise AssertionError(f"session seed {seed} ({self.mode}): {exc}\nsent: "
                                 + repr(b"".join(sent)[-3000:])) from None
        finally:
            reader.close()
            sock.close()

    @staticmethod
    def read_reply(reader, sent):
        lines = []
        while True:
            line = reader.readline(4096)
            match = REPLY_LINE_RE.match(line)
            if not match:
                raise AssertionError(f"not a reply line: {line!r}")
            lines.append(match)
            if match.group(2) == b" ":
                break
        if len({m.group(1) for m in lines}) != 1:
            raise AssertionError(f"reply mixes codes: {[m.group(0) for m in lines]}")
        sent.append(b"# " + b"".join(m.group(0) for m in lines).replace(b"\r\n", b" | "))
        return lines[0].group(1), lines[-1].group(0)

    def stored_by_marker(self):
        if self.mode == "debug":
            pairs = [body for _, body in self.messages()]
        else:  # chunks by files_id: GridFS.get scans all of fs.files on nx-27017
            pairs = [zlib.decompress(base64.b64decode(b"".join(
                chunk["data"] for chunk in self.db["fs.chunks"].find(
                    {"files_id": doc["message"]}).sort("n", 1))))
                for doc in self.db["message"].find({}, {"message": 1})]
        return {MARKER_RE.search(body).group(1): body for body in pairs}

    def fuzz(self, mode_index):
        catcher = TracebackCatcher()
        logging.getLogger("mms").addHandler(catcher)
        self.addCleanup(logging.getLogger("mms").removeHandler, catcher)
        rss_before = rss()
        accepted = {}
        seeds = [FUZZ_SEED * 1_000_000 + mode_index * 100_000 + n
                 for n in range(max(1, FUZZ_SESSIONS // 4))]
        if FUZZ_REPLAY:
            seeds = [int(FUZZ_REPLAY)] if int(FUZZ_REPLAY) // 100_000 % 10 == mode_index else []
        for seed in seeds:
            accepted.update(self.run_session(seed, f"{seed}"))
        self.assertEqual(catcher.records, [], "tracebacks were logged")
        self.assertReply(self.raw().cmd("NOOP"), "ok")   # still up
        kept = len(self.output.getbuffer()) if self.mode == "debug" else 0  # the test's own copy
        self.assertLess(rss() - rss_before - kept, 150 * 2**20, "RSS grew by more than 150 MB")
        stored = self.stored_by_marker()
        for marker, (body, reply) in accepted.items():
            self.assertIn(marker, stored, f"answered {reply!r} but not stored: {body[:200]!r}")
            got = stored[marker]
            prefix = got[:len(got) - len(body)]
            self.assertTrue(got.endswith(body) and (not prefix or prefix.startswith(b"X-MMS-RCPT: ")),
                            f"stored {got[:300]!r}, sent {body[:300]!r}")
        if len(seeds) >= 100:
            self.assertGreater(len(accepted), len(seeds) // 10, "the sessions hardly reach DATA")

    def test_debug(self):
        self.mode = "debug"
        self.start()
        self.fuzz(0)

    def test_quarantine(self):
        self.mode = "mongo-quarantine"
        self.start_mongo("--data-size-limit", "200000")
        self.fuzz(1)

    def test_real_rcpt(self):
        self.mode = "mongo-quarantine"
        self.start_mongo("--real-rcpt", "--max-recipients", "5")
        self.fuzz(2)

    def test_proxy_with_a_misbehaving_downstream(self):
        self.mode = "mongo-proxy"
        down = FuzzDownstream(FUZZ_SEED)
        self.addCleanup(down.close)
        self.start_proxy(down.server_address[1], "--remote-timeout", "1")
        self.fuzz(3)


def rss():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


if __name__ == "__main__":
    unittest.main()
