#!/usr/bin/env python3
"""Mongo Mail Server: an SMTP server that records every message it receives in MongoDB.

The promise, to the mail administrator who puts it behind Postfix or amavisd-new:

* a message is answered ``250 ... queued as <store_key>`` only once it is stored
  (or, in proxy mode, accepted by the downstream server); any storage or
  downstream failure answers 4xx, so the sending MTA keeps it and retries;
* the bytes stored are the bytes received, after un-dot-stuffing, and nothing else;
* every input is bounded (command lines, data lines, message size, recipients,
  connections, idle time), and a misbehaving client never hurts other sessions.

Modes: mongo-quarantine (amavisd-new's quarantine and archive target),
mongo-proxy (a Postfix before-queue filter that records what the after-filter
accepts), mongo-filter (the same, asking clamd and spamd first) and debug.

One file, one runtime dependency (pymongo). Copy it to a mail host and run::

    python mms.py --server debug

The sections below follow the data: configuration, the SMTP session, the
message pipeline (metadata and plugins, scanners, relay, store), the modes,
and the command line.
"""

import argparse
import base64
import contextlib
import copy
import datetime
import email.header
import email.parser
import email.policy
import email.utils
import importlib
import ipaddress
import json
import logging
import os
import queue
import re
import secrets
import signal
import socket
import socketserver
import struct
import sys
import tempfile
import threading
import zlib

__version__ = "1.0.0"

log = logging.getLogger("mms")

###############################################################################
# Configuration ###############################################################
###############################################################################

COMMAND_LINE_MAX = 512          # RFC 5321 4.5.3.1.4, CRLF included
PARAMS_ROOM = 1024              # extra room on MAIL/RCPT for ESMTP parameters
DATA_LINE_MAX = 1000            # RFC 5321 4.5.3.1.6, CRLF included
PATH_MAX = 256                  # RFC 5321 4.5.3.1.3
XFORWARD_VALUE_MAX = 255        # Postfix XFORWARD_README
RECV_SIZE = 64 * 1024
SPOOL_THRESHOLD = 4 * 2**20     # larger messages wait in a temporary file while they arrive
END_OF_DATA = b"\r\n.\r\n"

XFORWARD_ATTRS = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
MODES = ("mongo-quarantine", "mongo-proxy", "mongo-filter", "debug")
COMMANDS = ("start", "count", "list", "show", "headers", "replay")

# Every reply the session sends that is not built from a downstream answer.
R_MAIL_OK = "250 2.1.0 Ok"
R_RCPT_OK = "250 2.1.5 Ok"
R_OK = "250 2.0.0 Ok"
R_QUEUED = "250 2.0.0 Ok: queued as {}"
R_DATA_GO = "354 End data with <CR><LF>.<CR><LF>"
R_BYE = "221 2.0.0 Bye"
R_VRFY = "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"
R_HELP = "214 2.0.0 Commands: EHLO HELO MAIL RCPT DATA RSET NOOP QUIT HELP VRFY XFORWARD"
R_UNKNOWN = "500 5.5.2 Error: command not recognized"
R_LINE_TOO_LONG = "500 5.5.6 Error: line too long"
R_SYNTAX = "501 5.5.4 Syntax: {}"
R_BAD_SENDER = "501 5.1.7 Bad sender address syntax"
R_BAD_RCPT = "501 5.1.3 Bad recipient address syntax"
R_SEQUENCE = "503 5.5.1 Error: {}"
R_TOO_BIG = "552 5.3.4 Error: message size exceeds fixed limit"
R_TOO_MANY_RCPTS = "452 4.5.3 Error: too many recipients"
R_NO_RCPTS = "554 5.5.1 Error: no valid recipients"
R_XFORWARD_DENIED = "550 5.7.0 Error: insufficient authorization"
R_ACCESS_DENIED = "554 5.7.1 Error: access denied for {}"
R_TIMEOUT = "421 4.4.2 {} Error: timeout exceeded"
R_TOO_MANY_CONN = "421 4.7.0 {} Error: too many connections"
R_SHUTDOWN = "421 4.3.2 {} Service shutting down, try again later"
R_STORE_FAILED = "451 4.3.0 Error: message not stored, try again later"
R_RELAY_FAILED = "451 4.4.1 Error: downstream server unavailable, try again later"
R_SCAN_FAILED = "451 4.7.1 Error: message could not be scanned, try again later"
R_VIRUS = "554 5.7.1 Virus found: {}"
R_SPAM = "554 5.7.1 Message rejected as spam"


def _flag(value):
    if isinstance(value, bool):
        return value
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("", "0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a yes/no value: {value!r}")


def _port(value):
    port = int(value)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port: {value!r}")
    return port


def _positive(value):
    number = float(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0: {value!r}")
    return number


def _workers(value):
    number = int(value)
    if not 1 <= number <= 256:
        raise argparse.ArgumentTypeError(f"must be 1 to 256: {value!r}")
    return number


def _count(value):
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more: {value!r}")
    return number


def _networks(value):
    """A comma-separated list of IPs or CIDRs, as MMS_ALLOW and MMS_XFORWARD_HOSTS hold."""
    if isinstance(value, list):
        return value
    try:
        return [ipaddress.ip_network(item.strip(), strict=False)
                for item in value.split(",") if item.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _scanner(value):
    """HOST:PORT, [IPv6]:PORT, or 'none'."""
    if isinstance(value, tuple) or value is None:
        return value
    if value.strip().lower() in ("", "none", "off"):
        return None
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"not HOST:PORT or none: {value!r}")
    return host.strip("[]"), _port(port)


def _choice(*choices):
    def check(value):
        if value not in choices:
            raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(choices)}")
        return value
    check.__name__ = "choice"
    return check


def _names(value):
    return value if isinstance(value, list) else [v.strip() for v in value.split(",") if v.strip()]


# (flag, variable, default, type, help). The variable gives the default; the flag wins.
OPTIONS = [
    ("--server", "MMS_SERVER", "mongo-quarantine", str,
     "mode: " + " | ".join(MODES)),
    ("--host", "MMS_HOST", "0.0.0.0", str, "address to listen on (IPv4 or IPv6)"),
    ("--port", "MMS_PORT", "14001", _port, "port to listen on"),
    ("--hostname", "MMS_HOSTNAME", "", str,
     "name in the greeting and EHLO reply (default: this machine's FQDN)"),
    ("--timeout", "MMS_TIMEOUT", "600", _positive,
     "idle timeout in seconds for each read from a client"),
    ("--data-size-limit", "MMS_DATA_SIZE_LIMIT", "0", _count,
     "largest message in bytes, 0 for no limit"),
    ("--max-recipients", "MMS_MAX_RECIPIENTS", "1000", _count,
     "recipients per message; more answer 452 4.5.3"),
    ("--max-connections", "MMS_MAX_CONNECTIONS", "256", _count,
     "connections in service at once; one more gets 421 4.7.0"),
    ("--allow", "MMS_ALLOW", "", _networks,
     "clients allowed to connect, IPs or CIDRs (repeatable; default: everyone)"),
    ("--xforward-hosts", "MMS_XFORWARD_HOSTS", "127.0.0.0/8,::1", _networks,
     "clients allowed to send XFORWARD, IPs or CIDRs"),
    ("--plugin", "MMS_PLUGINS", "", _names,
     "module whose apply(metadata=None, data=None) runs on each message (repeatable)"),
    ("--workers", "MMS_WORKERS", "1", _workers,
     "processes sharing the listening socket, each with its own MongoDB client"),
    ("--grace", "MMS_GRACE", "8", _positive,
     "seconds that SIGTERM waits for transactions in progress"),
    ("--debug", "MMS_DEBUG", "0", _flag, "log the SMTP dialogue"),
    ("--mongo-host", "MMS_MONGODB_URI", "mongodb://localhost/message", str,
     "MongoDB connection string"),
    ("--mongo-database", "MMS_MONGODB_DATABASE", "message", str, "database name"),
    ("--mongo-collection", "MMS_MONGODB_COLLECTION", "message", str,
     "collection of metadata documents"),
    ("--mongo-timeout", "MMS_MONGODB_TIMEOUT", "5", _positive,
     "seconds to find a MongoDB server before answering 451"),
    ("--mongo-write-concern", "MMS_MONGODB_WRITE_CONCERN", "1", str,
     "write concern w: a number or 'majority'"),
    ("--remote-host", "MMS_REMOTE_HOST", "127.0.0.1", str,
     "proxy and filter modes: the SMTP server that mail is relayed to"),
    ("--remote-port", "MMS_REMOTE_PORT", "14002", _port, "port of --remote-host"),
    ("--remote-timeout", "MMS_REMOTE_TIMEOUT", "60", _positive,
     "seconds to wait for each reply of --remote-host (keep it under Postfix's "
     "smtpd_proxy_timeout of 100 s)"),
    ("--spool-dir", "MMS_SPOOL_DIR", "/var/spool/mms", str,
     "proxy and filter modes: where delivered messages wait for `replay` when MongoDB fails"),
    ("--clamd", "MMS_CLAMD", "127.0.0.1:3310", _scanner,
     "filter mode: clamd's TCP address, or 'none'"),
    ("--spamd", "MMS_SPAMD", "127.0.0.1:783", _scanner,
     "filter mode: spamd's TCP address, or 'none'"),
    ("--scan-timeout", "MMS_SCAN_TIMEOUT", "30", _positive,
     "filter mode: seconds each scanner may take"),
    ("--scan-max-size", "MMS_SCAN_MAX_SIZE", str(25 * 2**20), _count,
     "filter mode: larger messages are delivered unscanned, marked is_unchecked"),
    ("--virus-action", "MMS_VIRUS_ACTION", "quarantine", _choice("quarantine", "reject"),
     "filter mode: what a virus gets"),
    ("--spam-action", "MMS_SPAM_ACTION", "quarantine", _choice("quarantine", "reject", "deliver"),
     "filter mode: what spam gets"),
    ("--on-scan-error", "MMS_ON_SCAN_ERROR", "tempfail", _choice("tempfail", "deliver"),
     "filter mode: what a message gets when a scanner is down or too slow"),
    ("--real-rcpt", "MMS_REAL_RCPT", "0", _flag,
     "record the X-Envelope-To recipients of amavisd-new quarantine copies"),
]


def build_parser():
    parser = argparse.ArgumentParser(
        prog="mms.py",
        description="Mongo Mail Server: an SMTP server that records every message in MongoDB.",
        epilog="Every option can be set by the MMS_* variable shown; the flag wins.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    for flag, variable, default, kind, text in OPTIONS:
        shown = default or "none"
        extra = {"action": "append"} if kind in (_networks, _names) else {}
        if kind is _flag:
            extra = {"action": "store_const", "const": True}
        if kind is not _flag:
            extra.update(type=kind, metavar=variable.replace("MMS_", ""))
        parser.add_argument(flag, default=None, help=f"{text} [{variable}, default: {shown}]",
                            **extra)
    parser.add_argument("command", nargs="?", default="start", choices=COMMANDS,
                        help="start the server (default), or read the archive")
    parser.add_argument("key", nargs="?", help="store_key, for show and headers")
    reader = parser.add_argument_group("reader options (list)")
    reader.add_argument("--limit", type=int, default=20, help="messages to list (default 20)")
    reader.add_argument("--sender", help="only this sender")
    reader.add_argument("--rcpt", help="only this recipient")
    reader.add_argument("--since", type=datetime.datetime.fromisoformat,
                        help="only messages received since this ISO date")
    reader.add_argument("--virus", action="store_true", help="only messages with a virus")
    reader.add_argument("--spam", action="store_true", help="only spam")
    reader.add_argument("--json", action="store_true", help="one JSON document per line")
    return parser


def parse_config(argv=None):
    """Flags first, then MMS_* variables, then defaults: all checked the same way."""
    parser = build_parser()
    cfg = parser.parse_args(argv)
    for flag, variable, default, kind, _ in OPTIONS:
        dest = flag[2:].replace("-", "_")
        value = getattr(cfg, dest)
        if value is None:
            try:
                value = kind(os.environ.get(variable, default))
            except (ValueError, argparse.ArgumentTypeError) as exc:
                parser.error(f"{variable}: {exc}")
        elif kind in (_networks, _names):
            value = [item for part in value for item in part]
        setattr(cfg, dest, value)
    if cfg.server not in MODES:
        parser.error(f"unknown mode {cfg.server!r}: choose one of {', '.join(MODES)}")
    if cfg.command in ("show", "headers") and not cfg.key:
        parser.error(f"{cfg.command} needs a store_key")
    if cfg.real_rcpt and cfg.server not in ("mongo-quarantine", "debug"):
        parser.error("--real-rcpt rewrites the message: it is for mongo-quarantine mode only")
    cfg.hostname = cfg.hostname or socket.getfqdn()
    return cfg


def fail(message):
    """Start-up errors: one clear line and exit 2, as argparse does for bad flags."""
    print(f"mms.py: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def redact(uri):
    """A MongoDB URI fit for a log line: no password."""
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", uri)


def in_networks(address, networks):
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return False
    if ip.version == 6 and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return any(ip in net for net in networks)


###############################################################################
# The SMTP session ############################################################
###############################################################################

class ClientGone(Exception):
    """The client closed the connection: nothing to answer."""


class CloseSession(Exception):
    """Say a last reply (421) and close."""

    def __init__(self, reply):
        super().__init__(reply)
        self.reply = reply


class Transaction:
    """One MAIL ... DATA exchange; a new one starts after the final dot or RSET."""

    def __init__(self, sender, params):
        self.sender = sender
        self.mail_params = params     # ESMTP parameters verbatim, for proxy mode
        self.rcpts = []               # accepted recipients
        self.rcpt_params = []         # their parameters verbatim
        self.refused = {}             # address -> [code, text], from a downstream
        self.relay = None             # proxy mode's downstream session


ADDRESS_RE = re.compile(r"^(?:<(?P<bracketed>[^<>]*)>|(?P<bare>[^<>\s]+))(?:\s+(?P<params>.*))?$")
PARAM_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*(=[^=\s]+)?$")
XTEXT_RE = re.compile(r"\+([0-9A-F]{2})")


def parse_path(arg, keyword):
    """Split 'FROM:<a@b> SIZE=10' into ('a@b', ['SIZE=10']); None on bad syntax."""
    if not arg[:len(keyword)].upper() == keyword:
        return None
    match = ADDRESS_RE.match(arg[len(keyword):].lstrip())
    if not match:
        return None
    address = match.group("bracketed")
    if address is None:
        address = match.group("bare")
    # A source route (@a,@b:user@c) is allowed by RFC 5321 and ignored.
    address = address.rsplit(":", 1)[-1] if address.startswith("@") else address
    params = (match.group("params") or "").split()
    if any(not PARAM_RE.match(p) for p in params):
        return None
    return address, params


def valid_address(address):
    return (len(address.encode()) <= PATH_MAX
            and not any(ch.isspace() or ord(ch) < 32 or ch == "\x7f" for ch in address))


def xtext_decode(value):
    return XTEXT_RE.sub(lambda m: chr(int(m.group(1), 16)), value)


def xtext_encode(value):
    return "".join(f"+{ord(ch):02X}" if ch in "+=" or not 33 <= ord(ch) <= 126 else ch
                   for ch in value)


def reply_text(reply):
    """The text of a (multi-line) reply, without its codes: '550 5.1.1 a' -> '5.1.1 a'."""
    return " ".join(line[4:] for line in reply.split("\r\n"))


class SMTPSession(socketserver.BaseRequestHandler):
    """One client connection: a line reader, smtp_<VERB> dispatch and a DATA reader."""

    def setup(self):
        self.cfg = self.server.cfg
        self.peer = self.client_address[0]
        self.buf = bytearray()
        self.helo = None
        self.xforward = {}
        self.tx = None
        self.trusted = in_networks(self.peer, self.cfg.xforward_hosts)
        self.waiting = False
        # The kernel times reads and writes out, so no call waits on a poll first.
        whole = int(self.cfg.timeout)
        limit = struct.pack("ll", whole, int((self.cfg.timeout - whole) * 1e6))
        self.request.settimeout(None)
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)

    # -- the connection ------------------------------------------------------

    def handle(self):
        refusal = self.refusal()
        if refusal:
            with contextlib.suppress(ClientGone):
                self.reply(refusal)
            return
        try:
            self.reply(f"220 {self.cfg.hostname} ESMTP Mongo Mail Server")
            while self.dispatch(self.read_command()):
                pass
        except CloseSession as close:
            with contextlib.suppress(ClientGone):
                self.reply(close.reply)
        except (ClientGone, OSError):
            pass
        except Exception:  # a bug must cost one session, never the server
            log.exception("session with %s failed", self.peer)
        finally:
            self.abort_transaction()
            self.server.leave(self)

    def refusal(self):
        """The 5xx or 4xx for a client that is not to be served, logged; None to serve it."""
        if self.cfg.allow and not in_networks(self.peer, self.cfg.allow):
            log.warning("reject connection from %s: not in --allow", self.peer)
            return R_ACCESS_DENIED.format(self.peer)
        if not self.server.enter(self):
            log.warning("reject connection from %s: too many connections", self.peer)
            return R_TOO_MANY_CONN.format(self.cfg.hostname)
        return None

    def reply(self, text):
        if self.cfg.debug:
            log.debug("%s > %s", self.peer, text)
        try:
            self.request.sendall(text.encode() + b"\r\n")
        except OSError:
            raise ClientGone() from None

    def fill(self, idle=False):
        """Wait for more bytes, as long as --timeout allows (SO_RCVTIMEO: no poll call
        per read). A session idle between transactions says so, so that a draining
        server can wake it by shutting down its reading side."""
        if idle:
            self.waiting = True
            if self.server.draining:
                raise CloseSession(R_SHUTDOWN.format(self.cfg.hostname))
        try:
            chunk = self.request.recv(RECV_SIZE)
        except BlockingIOError:
            raise CloseSession(R_TIMEOUT.format(self.cfg.hostname)) from None
        except OSError:
            raise ClientGone() from None
        finally:
            self.waiting = False
        if not chunk:
            if idle and self.server.draining:
                raise CloseSession(R_SHUTDOWN.format(self.cfg.hostname))
            raise ClientGone()
        return chunk

    def read_command(self):
        """The next command line, without its line ending; None if it was too long."""
        limit = COMMAND_LINE_MAX + PARAMS_ROOM
        overlong = False
        while True:
            if self.tx is None and self.server.draining:
                raise CloseSession(R_SHUTDOWN.format(self.cfg.hostname))
            end = self.buf.find(b"\n")
            if end >= 0:
                line = bytes(self.buf[:end + 1])
                del self.buf[:end + 1]
                return None if overlong or len(line) > limit else line
            if len(self.buf) > limit:
                overlong = True
                self.buf.clear()
            self.buf += self.fill(idle=self.tx is None)

    # -- dispatch ------------------------------------------------------------

    def dispatch(self, line):
        """Answer one command; False ends the session."""
        if line is None:
            self.reply(R_LINE_TOO_LONG)
            return True
        if self.cfg.debug:
            log.debug("%s < %r", self.peer, line)
        line = line.rstrip(b"\n")
        line = line[:-1] if line.endswith(b"\r") else line
        verb, _, arg = line.partition(b" ")
        verb = verb.upper().decode("ascii", "replace")
        if len(line) + 2 > COMMAND_LINE_MAX and verb not in ("MAIL", "RCPT"):
            self.reply(R_LINE_TOO_LONG)
            return True
        handler = getattr(self, "smtp_" + verb, None) if verb.isalpha() else None
        if handler is None:
            self.reply(R_UNKNOWN)
            return True
        if b"\r" in arg or b"\0" in arg:
            self.reply(R_SYNTAX.format("bare CR or NUL in command"))
            return True
        try:
            arg = arg.decode("utf-8").strip()
        except UnicodeDecodeError:
            self.reply(R_SYNTAX.format("command is not UTF-8"))
            return True
        return handler(arg) is not False

    # -- verbs ---------------------------------------------------------------

    def smtp_HELO(self, arg):
        if not arg:
            return self.reply(R_SYNTAX.format("HELO hostname"))
        self.greet(arg)
        self.reply(f"250 {self.cfg.hostname}")

    def smtp_EHLO(self, arg):
        if not arg:
            return self.reply(R_SYNTAX.format("EHLO hostname"))
        self.greet(arg)
        limit = self.cfg.data_size_limit
        lines = [self.cfg.hostname, "PIPELINING", f"SIZE {limit}" if limit else "SIZE",
                 "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8"]
        if self.trusted:
            lines.append("XFORWARD " + " ".join(XFORWARD_ATTRS))
        lines.append("HELP")
        self.reply("\r\n".join(f"250-{text}" for text in lines[:-1]) + f"\r\n250 {lines[-1]}")

    def greet(self, name):
        """RFC 5321 4.1.4: a new EHLO ends any transaction; XFORWARD attributes stay."""
        self.end_transaction()
        self.helo = name

    def smtp_MAIL(self, arg):
        if self.helo is None:
            return self.reply(R_SEQUENCE.format("send HELO/EHLO first"))
        if self.tx is not None:
            return self.reply(R_SEQUENCE.format("nested MAIL command"))
        parsed = parse_path(arg, "FROM:")
        if parsed is None:
            return self.reply(R_SYNTAX.format("MAIL FROM:<address> [parameters]"))
        sender, params = parsed
        if not valid_address(sender):
            return self.reply(R_BAD_SENDER)
        problem = self.check_mail_params(params)
        if problem:
            return self.reply(problem)
        tx = Transaction(sender, params)
        answer = self.server.mode.on_mail(self, tx)
        if answer is None or answer.startswith("2"):
            self.tx = tx
        self.reply(answer or R_MAIL_OK)

    def check_mail_params(self, params):
        """Unknown parameters are kept and relayed: Postfix passes its clients' through."""
        for param in params:
            name, _, value = param.partition("=")
            name = name.upper()
            if name == "SIZE":
                if not value.isdigit():
                    return R_SYNTAX.format("SIZE=<number>")
                if self.cfg.data_size_limit and int(value) > self.cfg.data_size_limit:
                    return R_TOO_BIG
            elif name == "BODY" and value.upper() not in ("7BIT", "8BITMIME"):
                return R_SYNTAX.format("BODY=7BIT or BODY=8BITMIME")
        return None

    def smtp_RCPT(self, arg):
        if self.tx is None:
            return self.reply(R_SEQUENCE.format("need MAIL command"))
        parsed = parse_path(arg, "TO:")
        if parsed is None:
            return self.reply(R_SYNTAX.format("RCPT TO:<address> [parameters]"))
        rcpt, params = parsed
        if not rcpt or not valid_address(rcpt):
            return self.reply(R_BAD_RCPT)
        if self.cfg.max_recipients and len(self.tx.rcpts) >= self.cfg.max_recipients:
            return self.reply(R_TOO_MANY_RCPTS)
        answer = self.server.mode.on_rcpt(self, self.tx, rcpt, params)
        if answer is None or answer.startswith("2"):
            self.tx.rcpts.append(rcpt)
            self.tx.rcpt_params.append(params)
        else:
            self.tx.refused[rcpt] = [int(answer[:3]), reply_text(answer)]
        self.reply(answer or R_RCPT_OK)

    def smtp_DATA(self, arg):
        if arg:
            return self.reply(R_SYNTAX.format("DATA"))
        if self.tx is None:
            return self.reply(R_SEQUENCE.format("need MAIL command"))
        if not self.tx.rcpts:
            return self.reply(R_SEQUENCE.format("need RCPT command") if not self.tx.refused
                              else R_NO_RCPTS)
        answer = self.server.mode.on_data(self, self.tx)
        if answer and not answer.startswith("3"):
            return self.reply(answer)
        self.reply(R_DATA_GO)
        data, problem = self.read_data()
        tx, self.tx, xforward, self.xforward = self.tx, None, self.xforward, {}
        if problem:
            self.server.mode.on_reset(self, tx)
            return self.reply(problem)
        self.reply(receive_message(self, tx, xforward, data))

    def smtp_RSET(self, arg):
        self.abort_transaction()
        self.reply(R_OK)

    def smtp_NOOP(self, arg):
        self.reply(R_OK)

    def smtp_QUIT(self, arg):
        self.reply(R_BYE)
        return False

    def smtp_HELP(self, arg):
        self.reply(R_HELP)

    def smtp_VRFY(self, arg):
        if not arg:
            return self.reply(R_SYNTAX.format("VRFY address"))
        self.reply(R_VRFY)

    def smtp_XFORWARD(self, arg):
        if not self.trusted:
            return self.reply(R_XFORWARD_DENIED)
        if self.tx is not None:
            return self.reply(R_SEQUENCE.format("MAIL transaction in progress"))
        attrs = parse_xforward(arg)
        if attrs is None:
            return self.reply(R_SYNTAX.format("XFORWARD attribute=value..."))
        for name, value in attrs.items():
            if value is None:
                self.xforward.pop(name, None)
            else:
                self.xforward[name] = value
        self.reply(R_OK)

    def abort_transaction(self):
        """RSET, QUIT or a lost client: forget the envelope and the XFORWARD attributes."""
        self.end_transaction()
        self.xforward = {}

    def end_transaction(self):
        if self.tx is not None:
            self.server.mode.on_reset(self, self.tx)
        self.tx = None

    # -- DATA ----------------------------------------------------------------

    def read_data(self):
        """The message up to <CRLF>.<CRLF>, un-dot-stuffed, and a problem reply if any.

        Work stays linear: a block is searched once, and only the short tail of an
        unfinished line is carried to the next block. A pending buffer always starts
        with the CRLF that ended the previous line, so a line-leading '.' is found
        as '\\r\\n.'. Once a problem is found, the rest is drained in constant memory.
        A message past SPOOL_THRESHOLD goes to a temporary file while it arrives, so
        that many slow large messages do not sit in memory at once.
        """
        body, problem = MessageBuffer(), None
        pending = b"\r\n" + bytes(self.buf)
        self.buf.clear()
        try:
            while True:
                end = pending.find(END_OF_DATA)
                cut = end if end >= 0 else pending.rfind(b"\r\n")
                if not problem:
                    problem = self.take_lines(pending[:cut + 2], body)
                if end >= 0:
                    self.buf += pending[end + len(END_OF_DATA):]
                    return (None if problem else body.getvalue()), problem
                if not problem:
                    pending = pending[cut:]
                    if len(pending) - 2 >= DATA_LINE_MAX:
                        problem = R_LINE_TOO_LONG
                if problem:
                    body.close()
                    pending = pending[-4:]
                pending += self.fill()
        finally:
            body.close()

    def take_lines(self, block, body):
        """Un-dot-stuff complete lines that start after a CRLF; check their length and the total."""
        if max(map(len, block.split(b"\r\n"))) > DATA_LINE_MAX - 2:
            return R_LINE_TOO_LONG
        body.write(block.replace(b"\r\n.", b"\r\n")[2:])
        limit = self.cfg.data_size_limit
        return R_TOO_BIG if limit and body.size > limit else None


class MessageBuffer:
    """Message bytes in memory, moved to a temporary file once past SPOOL_THRESHOLD."""

    def __init__(self):
        self.parts, self.size, self.file = [], 0, None

    def write(self, block):
        self.size += len(block)
        if self.file is not None:
            self.file.write(block)
            return
        self.parts.append(block)
        if self.size > SPOOL_THRESHOLD:
            self.file = tempfile.TemporaryFile(prefix="mms-")
            self.file.writelines(self.parts)
            self.parts = []

    def getvalue(self):
        if self.file is None:
            return b"".join(self.parts)
        self.file.seek(0)
        return self.file.read()

    def close(self):
        self.parts = []
        if self.file is not None:
            self.file.close()
            self.file = None


def without_ipv6_prefix(address):
    """XFORWARD writes IPv6 client addresses as 'IPV6:2001:db8::1'."""
    return address[5:] if address.upper().startswith("IPV6:") else address


def parse_xforward(arg):
    """{NAME: value or None for [UNAVAILABLE]}; None on bad syntax."""
    attrs = {}
    if not arg:
        return None
    for item in arg.split():
        name, eq, value = item.partition("=")
        name = name.upper()
        if not eq or name not in XFORWARD_ATTRS:
            return None
        value = xtext_decode(value)
        if len(value) > XFORWARD_VALUE_MAX:
            return None
        if value.upper() == "[UNAVAILABLE]":
            attrs[name] = None
            continue
        if name == "ADDR":
            address = without_ipv6_prefix(value)
            try:
                ipaddress.ip_address(address)
            except ValueError:
                return None
        attrs[name] = value
    return attrs


class SMTPServer(socketserver.ThreadingTCPServer):
    """Counts sessions, so that --max-connections and a graceful SIGTERM can see them."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, cfg, mode):
        self.cfg = cfg
        self.mode = mode
        self.address_family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
        self.sessions = set()
        self.lock = threading.Lock()
        self.emptied = threading.Condition(self.lock)
        self.draining = False
        super().__init__((cfg.host, cfg.port), SMTPSession)
        # Workers share this socket: all wake for one connection, one accepts it,
        # and the others must find nothing rather than block in accept().
        self.socket.setblocking(False)

    def start(self):
        """What each serving process does for itself, after any fork."""
        self.mode.start()

    def enter(self, session):
        with self.lock:
            if self.cfg.max_connections and len(self.sessions) >= self.cfg.max_connections:
                return False
            self.sessions.add(session)
            return True

    def leave(self, session):
        with self.lock:
            self.sessions.discard(session)
            self.emptied.notify_all()

    def drain(self, grace):
        """Stop listening, close idle sessions with 421, give the others `grace` seconds.

        An idle session is blocked in recv(); shutting down its reading side wakes
        it, and it answers 421. Sessions in a transaction are left to finish.
        """
        self.server_close()
        self.draining = True
        with self.lock:
            for session in self.sessions:
                if session.waiting:
                    with contextlib.suppress(OSError):
                        session.request.shutdown(socket.SHUT_RD)
            self.emptied.wait_for(lambda: not self.sessions, timeout=grace)
            left = len(self.sessions)
        if left:
            log.warning("stopping with %d session(s) still open after %.0fs", left, grace)


###############################################################################
# The message pipeline: metadata and plugins ##################################
###############################################################################

def receive_message(session, tx, xforward, data):
    """From the final dot to the reply: metadata, then plugins, then the mode."""
    metadata = make_metadata(session, tx, xforward, data)
    if session.cfg.real_rcpt:
        data = apply_real_rcpt(metadata, data)
    run_plugins(session.server.plugins, metadata, data)
    answer = session.server.mode.on_message(session, tx, metadata, data)
    queued = answer.startswith("250")
    log.log(logging.INFO if queued else logging.WARNING, "%s from=<%s> to=<%s> size=%d client=%s",
            f"queued as {metadata['store_key']}" if queued else f"not queued ({answer})",
            metadata["sender"], ",".join(metadata["rcpt"]), len(data), metadata["client_address"])
    return answer


def make_metadata(session, tx, xforward, data):
    """The seed's metadata document, plus fields that are cheap to search on."""
    addr = without_ipv6_prefix(xforward.get("ADDR", ""))
    metadata = {
        "store_key": secrets.token_hex(32),
        "sender": tx.sender.strip().lower(),
        "rcpt": [r.strip().lower() for r in tx.rcpts],
        "rcpt_count": len(tx.rcpts),
        "rcpt_refused": dict(tx.refused),
        "client_address": addr or session.peer,
        "xforward": dict(xforward),
        "server": session.peer,
        "received": datetime.datetime.now(datetime.timezone.utc),
        "message": None,
        "size": len(data),
    }
    metadata.update(header_fields(data))
    return metadata


HEADER_PARSER = email.parser.BytesHeaderParser(policy=email.policy.compat32)
HEADER_BLOCK_MAX = 256 * 1024
SEARCHED_HEADERS_RE = re.compile(rb"^(subject|message-id|date):[ \t]*(.*(?:\r?\n[ \t].*)*)",
                                 re.IGNORECASE | re.MULTILINE)


def header_block(data):
    end = data.find(b"\r\n\r\n", 0, HEADER_BLOCK_MAX)
    return data[:end + 2] if end >= 0 else data[:HEADER_BLOCK_MAX]


def header_fields(data):
    """subject, message_id and sent, each left out when absent or unreadable.

    Only the header block is read, with one regular expression rather than a MIME
    parser (it costs a tenth), and every failure is swallowed: a broken header
    must never cost a message.
    """
    found = {}
    for match in SEARCHED_HEADERS_RE.finditer(header_block(data)):
        name = match.group(1).lower()
        if name not in found:
            found[name] = re.sub(rb"\r?\n[ \t]", b" ", match.group(2)).strip()
    fields = {}
    with contextlib.suppress(Exception):
        if b"subject" in found:
            fields["subject"] = decode_header_value(found[b"subject"])
    with contextlib.suppress(Exception):
        if found.get(b"message-id"):
            fields["message_id"] = found[b"message-id"].decode("utf-8", "replace").strip("<> ")
    with contextlib.suppress(Exception):
        sent = email.utils.parsedate_to_datetime(found[b"date"].decode("ascii", "replace"))
        fields["sent"] = sent if sent.tzinfo else sent.replace(tzinfo=datetime.timezone.utc)
    return fields


def decode_header_value(raw):
    """RFC 2047 encoded words, or raw UTF-8 (RFC 6532); never an exception."""
    text = raw.decode("utf-8", "replace")
    if "=?" in text:
        with contextlib.suppress(Exception):
            text = str(email.header.make_header(email.header.decode_header(text)))
    return text


def apply_real_rcpt(metadata, data):
    """amavisd-new quarantine copies: the real recipients are in X-Envelope-To.

    The envelope recipients (the quarantine addresses) are kept in a prepended
    X-MMS-RCPT header: the one change mms ever makes to a message.
    """
    try:
        values = HEADER_PARSER.parsebytes(header_block(data)).get_all("X-Envelope-To") or []
    except Exception:
        values = []
    text = " ".join(str(v) for v in values)
    real = re.findall(r"<([^<>\s]+)>", text) or [a for a in re.split(r"[\s,]+", text) if a]
    if not real:
        return data
    eol = b"\r\n" if b"\r\n" in data[:4096] or not data else b"\n"
    line = "X-MMS-RCPT: " + ", ".join(f"<{r}>" for r in metadata["rcpt"])
    data = line.encode() + eol + data
    metadata.update(rcpt=[r.lower() for r in real], rcpt_count=len(real), size=len(data))
    return data


def load_plugins(names):
    """Import every plugin at start-up, so a typo stops the server, not a message."""
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    plugins = []
    for name in names:
        try:
            module = importlib.import_module(name)
        except Exception as exc:
            fail(f"plugin {name!r} cannot be imported: {exc}")
        if not callable(getattr(module, "apply", None)):
            fail(f"plugin {name!r} has no apply(metadata, data)")
        plugins.append(module)
    return plugins


def run_plugins(plugins, metadata, data):
    """A plugin that raises, or leaves metadata that MongoDB could not store, is
    logged and its edits are undone: the message goes on as if it had not run."""
    for plugin in plugins:
        before = copy.deepcopy(metadata)
        try:
            plugin.apply(metadata=metadata, data=data)
            check_storable(metadata)
        except Exception:
            log.exception("plugin %s failed on %s; its changes are undone, the message goes on",
                          plugin.__name__, metadata.get("store_key"))
            metadata.clear()
            metadata.update(before)


def check_storable(metadata):
    try:
        import bson
    except ImportError:  # debug mode without pymongo: nothing will be stored
        return
    bson.encode(metadata)


###############################################################################
# The message pipeline: scanners ##############################################
###############################################################################

class ScanError(Exception):
    """A scanner is down, too slow, or answered something unexpected."""


SCANNER_REPLY_MAX = 64 * 1024


def ask(address, request, timeout):
    """Send a request and read the whole answer: both daemons close after replying."""
    try:
        with socket.create_connection(address, timeout=timeout) as sock:
            sock.settimeout(timeout)
            for part in request:
                sock.sendall(part)
            answer = b""
            while len(answer) < SCANNER_REPLY_MAX and (chunk := sock.recv(4096)):
                answer += chunk
                if answer.endswith(b"\0"):
                    break
            return answer
    except OSError as exc:
        raise ScanError(f"{address[0]}:{address[1]}: {exc}") from None


def clamd_request(data, chunk=64 * 1024):
    yield b"zINSTREAM\0"
    for at in range(0, len(data), chunk):
        piece = data[at:at + chunk]
        yield len(piece).to_bytes(4, "big") + piece
    yield b"\0\0\0\0"


def clamd_scan(address, data, timeout):
    """clamd's INSTREAM: 'stream: OK' or 'stream: <Name> FOUND'."""
    raw = ask(address, clamd_request(data), timeout).rstrip(b"\0").decode("utf-8", "replace")
    if raw.endswith(" FOUND"):
        return {"virus": [raw[:-len(" FOUND")].split(": ", 1)[-1]], "raw": raw}
    if raw.endswith(": OK"):
        return {"virus": [], "raw": raw}
    raise ScanError(f"clamd answered {raw!r}")


SPAMD_RESULT_RE = re.compile(r"^Spam: (True|False|Yes|No) ; (-?[\d.]+) / (-?[\d.]+)\s*$",
                             re.MULTILINE | re.IGNORECASE)


def spamd_scan(address, data, timeout):
    """SPAMC/1.5 SYMBOLS: the verdict in a 'Spam:' header, the rule names in the body."""
    head = f"SYMBOLS SPAMC/1.5\r\nContent-length: {len(data)}\r\n\r\n".encode()
    raw = ask(address, [head, data], timeout).decode("utf-8", "replace")
    status, _, rest = raw.partition("\r\n")
    match = SPAMD_RESULT_RE.search(rest)
    if not status.startswith("SPAMD/") or " 0 " not in status or not match:
        raise ScanError(f"spamd answered {status!r}")
    body = rest.split("\r\n\r\n", 1)[1] if "\r\n\r\n" in rest else ""
    return {"is_spam": match.group(1).lower() in ("true", "yes"),
            "score": float(match.group(2)), "required": float(match.group(3)),
            "symbols": [s for s in body.strip().split(",") if s], "raw": match.group(0).strip()}


def scan(cfg, data):
    """Ask clamd and spamd at the same time, so the wait is the slower of the two.

    Returns the metadata fields mongo-mail-web knows, plus 'scan' with each
    scanner's own answer or error.
    """
    fields = {"is_virus": 0, "virus": [], "is_spam": 0, "is_unchecked": 0, "scan": {}}
    if len(data) > cfg.scan_max_size:
        fields["is_unchecked"] = 1
        fields["scan"]["skipped"] = f"message over --scan-max-size ({cfg.scan_max_size} bytes)"
        return fields
    results = {}

    def run(name, scanner, address):
        try:
            results[name] = scanner(address, data, cfg.scan_timeout)
        except ScanError as exc:
            results[name] = exc

    jobs = [("clamd", clamd_scan, cfg.clamd), ("spamd", spamd_scan, cfg.spamd)]
    threads = [threading.Thread(target=run, args=job, daemon=True) for job in jobs if job[2]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, result in results.items():
        if isinstance(result, ScanError):
            fields["is_unchecked"] = 1
            fields["scan"][name] = f"error: {result}"
            continue
        fields["scan"][name] = result["raw"]
        if name == "clamd":
            fields.update(is_virus=int(bool(result["virus"])), virus=result["virus"])
        else:
            fields.update(is_spam=int(result["is_spam"]), spam_score=result["score"],
                          spam_required=result["required"], spam_symbols=result["symbols"])
    return fields


###############################################################################
# The message pipeline: relay #################################################
###############################################################################

class DownstreamError(Exception):
    """The downstream server is down, timed out or broke the protocol."""


class Downstream:
    """One SMTP client session to --remote-host, opened at MAIL for one transaction."""

    REPLY_LINE_MAX = 4096
    REPLY_LINES_MAX = 100

    def __init__(self, cfg):
        self.cfg = cfg
        try:
            self.sock = socket.create_connection((cfg.remote_host, cfg.remote_port),
                                                 timeout=cfg.remote_timeout)
        except OSError as exc:
            raise DownstreamError(f"connect to {cfg.remote_host}:{cfg.remote_port}: {exc}") from None
        self.file = self.sock.makefile("rb")
        self.in_data = False
        self.expect(self.reply(), "greeting")
        self.extensions = self.ehlo()

    def reply(self):
        """A whole reply, multi-line included, exactly as the server sent it (CRLF joined)."""
        lines = []
        try:
            while len(lines) < self.REPLY_LINES_MAX:
                line = self.file.readline(self.REPLY_LINE_MAX)
                if not line.endswith(b"\n"):
                    raise DownstreamError("connection closed or reply line too long")
                text = line.rstrip(b"\r\n").decode("utf-8", "replace")
                if len(text) < 3 or not text[:3].isdigit() or text[3:4] not in ("", " ", "-"):
                    raise DownstreamError(f"not an SMTP reply: {text!r}")
                lines.append(text)
                if text[3:4] != "-":
                    return "\r\n".join(lines)
        except OSError as exc:
            raise DownstreamError(str(exc)) from None
        raise DownstreamError("reply has too many lines")

    def command(self, line):
        self.send(line.encode() + b"\r\n")
        return self.reply()

    def send(self, data):
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise DownstreamError(str(exc)) from None

    @staticmethod
    def expect(reply, what):
        if not reply.startswith("2"):
            raise DownstreamError(f"{what} answered {reply_text(reply)!r}")

    def ehlo(self):
        reply = self.command(f"EHLO {self.cfg.hostname}")
        self.expect(reply, "EHLO")
        return {line[4:].split(" ")[0].upper(): line[4:].split()[1:]
                for line in reply.split("\r\n")[1:]}

    def xforward(self, attrs):
        """Only the attributes the server announced, in commands under 512 characters."""
        offered = set(self.extensions.get("XFORWARD", []))
        items = [f"{name}={xtext_encode(value)}" for name, value in attrs.items()
                 if name in offered]
        lines = ["XFORWARD"] if items else []
        for item in items:
            if lines[-1] != "XFORWARD" and len(lines[-1]) + 1 + len(item) + 2 > COMMAND_LINE_MAX:
                lines.append("XFORWARD")
            lines[-1] += " " + item
        for line in lines:
            reply = self.command(line)
            if not reply.startswith("2"):
                log.warning("downstream refused %s: %s", line, reply_text(reply))

    def mail(self, xforward, tx):
        self.xforward(xforward)
        return self.command(" ".join([f"MAIL FROM:<{tx.sender}>", *tx.mail_params]))

    def data(self):
        answer = self.command("DATA")
        self.in_data = answer.startswith("3")
        return answer

    def data_and_message(self, data):
        answer = self.data()
        return self.message(data) if self.in_data else answer

    def message(self, data):
        """Send DATA content, dot-stuffed after every LF: a downstream that ends lines on
        a bare LF must not see '<LF>.<CRLF>' as the end of data (SMTP smuggling)."""
        stuffed = (b"\n" + data).replace(b"\n.", b"\n..")[1:]
        if stuffed and not stuffed.endswith(b"\r\n"):
            stuffed += b"\r\n"
        self.send(stuffed + b".\r\n")
        self.in_data = False
        return self.reply()

    def close(self):
        """QUIT politely, but never wait long for it. In the middle of DATA a QUIT would
        be message text: hanging up there is what makes the server drop the message."""
        try:
            self.sock.settimeout(min(5, self.cfg.remote_timeout))
            if not self.in_data:
                self.command("QUIT")
        except (DownstreamError, OSError):
            pass
        finally:
            self.file.close()
            self.sock.close()


###############################################################################
# The message pipeline: store #################################################
###############################################################################

def gridfs_content(data, chunk_size):
    """base64(zlib(data)), cut in GridFS chunks, made piece by piece: a large message
    is never held compressed and encoded in full beside itself."""
    raw = chunk_size // 4 * 3              # raw bytes behind one full base64 chunk
    compressor = zlib.compressobj()
    view, pending = memoryview(data), bytearray()
    for at in range(0, len(data), 2**20):
        pending += compressor.compress(view[at:at + 2**20])
        while len(pending) >= raw:
            yield base64.b64encode(pending[:raw])
            del pending[:raw]
    pending += compressor.flush()
    for at in range(0, len(pending), raw):
        yield base64.b64encode(pending[at:at + raw])


class StoreJob:
    """One message on its way to MongoDB, and the answer its session waits for."""

    __slots__ = ("chunks", "file", "metadata", "size", "done", "error")

    def __init__(self, chunks, file, metadata, size):
        self.chunks, self.file, self.metadata, self.size = chunks, file, metadata, size
        self.done = threading.Event()
        self.error = None


class MongoStore:
    """The archive: GridFS holds base64(zlib(raw message)) named by store_key, and the
    collection holds one metadata document pointing at it.

    GridFS documents are written directly, in the standard layout that pymongo's
    GridFS and mongofiles read: chunks first, then the file, then the metadata, so
    that a failure part-way can leave an orphan chunk but never a metadata document
    that points at nothing. Concurrent messages are written together, three
    commands a batch. One MongoClient per process, made after any fork.
    """

    CHUNK_SIZE = 255 * 1024
    BATCH_COUNT = 256
    BATCH_BYTES = 16 * 2**20
    CHUNKS_PER_INSERT = 16

    def __init__(self, cfg):
        self.cfg = cfg
        self.client = None
        self.indexed = False
        self.queue = None

    def connect(self):
        import pymongo  # imported here so that debug mode runs without pymongo
        ms = int(self.cfg.mongo_timeout * 1000)
        concern = self.cfg.mongo_write_concern
        self.client = pymongo.MongoClient(
            self.cfg.mongo_host, tz_aware=True, appname="mms", serverSelectionTimeoutMS=ms,
            connectTimeoutMS=ms, socketTimeoutMS=max(4 * ms, 20000),
            w=int(concern) if concern.isdigit() else concern)
        self.db = self.client[self.cfg.mongo_database]
        self.collection = self.db[self.cfg.mongo_collection]
        return self

    def start(self):
        """A MongoDB that is down at start-up is not fatal: messages get 451 until it is back."""
        self.connect()
        self.start_writer()
        try:
            self.ensure_indexes()
            version = self.client.server_info().get("version") or "unknown"
            log.info("connected to MongoDB %s (version %s), database %s, collection %s",
                     redact(self.cfg.mongo_host), version,
                     self.cfg.mongo_database, self.cfg.mongo_collection)
        except Exception as exc:
            log.warning("MongoDB at %s is unreachable (%s): messages will be answered 451 "
                        "until it is back", redact(self.cfg.mongo_host), exc)

    def ensure_indexes(self):
        self.collection.create_index("store_key", unique=True)
        for field in ("received", "sender", "rcpt", "message_id"):
            self.collection.create_index(field)
        self.db.fs.files.create_index([("filename", 1), ("uploadDate", 1)])
        self.db.fs.chunks.create_index([("files_id", 1), ("n", 1)], unique=True)
        self.indexed = True

    def close(self):
        if self.client is not None:
            self.client.close()

    def store(self, metadata, data):
        """Write the message and its metadata; any exception means 'not stored'.

        With the writer running, the message joins the next batch and this waits
        for that batch to be acknowledged; without it (replay), it is written alone.
        A large message writes its own chunks first, a few at a time.
        """
        job = self.prepare(metadata, data)
        if self.queue is None:
            self.write([job])
        else:
            self.queue.put(job)
            job.done.wait()
        if job.error is not None:
            raise job.error

    def prepare(self, metadata, data):
        from bson import Binary, ObjectId
        file_id = ObjectId()
        metadata["message"] = file_id
        chunks, length = [], 0
        for n, piece in enumerate(gridfs_content(data, self.CHUNK_SIZE)):
            chunks.append({"files_id": file_id, "n": n, "data": Binary(piece)})
            length += len(piece)
            if len(data) > SPOOL_THRESHOLD and len(chunks) == self.CHUNKS_PER_INSERT:
                self.db.fs.chunks.insert_many(chunks)
                chunks = []
        return StoreJob(
            chunks=chunks,
            file={"_id": file_id, "filename": metadata["store_key"], "contentType": "text/plain",
                  "length": length, "chunkSize": self.CHUNK_SIZE,
                  "uploadDate": datetime.datetime.now(datetime.timezone.utc)},
            metadata=metadata, size=length)

    def start_writer(self):
        self.queue = queue.SimpleQueue()
        threading.Thread(target=self.write_batches, name="mms-writer", daemon=True).start()

    def write_batches(self):
        """Group commit: whatever is ready when the last batch is done makes the next
        one. Nothing waits for company, so a lone session is not slowed down."""
        while True:
            batch = [self.queue.get()]
            size = batch[0].size
            while len(batch) < self.BATCH_COUNT and size < self.BATCH_BYTES:
                try:
                    job = self.queue.get_nowait()
                except queue.Empty:
                    break
                batch.append(job)
                size += job.size
            self.write(batch)
            for job in batch:
                job.done.set()

    def write(self, batch):
        """One insert_many per collection: chunks, then files, then metadata."""
        from pymongo.errors import BulkWriteError
        try:
            if not self.indexed:
                self.ensure_indexes()
            chunks = [chunk for job in batch for chunk in job.chunks]
            if chunks:
                self.db.fs.chunks.insert_many(chunks)
            self.db.fs.files.insert_many([job.file for job in batch])
            try:
                self.collection.insert_many([job.metadata for job in batch])
            except BulkWriteError as exc:  # ordered: the first nInserted are stored
                for job in batch[exc.details.get("nInserted", 0):]:
                    job.error = exc
        except Exception as exc:
            for job in batch:
                job.error = exc

    def find(self, store_key):
        return self.collection.find_one({"store_key": store_key})

    def read(self, metadata):
        import gridfs
        content = gridfs.GridFS(self.db).get(metadata["message"]).read()
        return zlib.decompress(base64.b64decode(content))


class Spool:
    """Messages that were delivered but could not be stored wait here for `replay`.

    Each is two files named by store_key: the raw message (.msg), then its
    metadata as BSON (.bson), written last and renamed into place, so that replay
    only ever sees complete pairs.
    """

    def __init__(self, path):
        self.path = path

    def check(self):
        try:
            os.makedirs(self.path, exist_ok=True)
            probe = os.path.join(self.path, ".probe")
            with open(probe, "w"):
                pass
            os.unlink(probe)
        except OSError as exc:
            fail(f"--spool-dir {self.path} is not writable: {exc}")

    def put(self, metadata, data):
        import bson
        key = metadata["store_key"]
        with open(os.path.join(self.path, key + ".msg"), "wb") as f:
            f.write(data)
            os.fsync(f.fileno())
        temporary = os.path.join(self.path, key + ".tmp")
        with open(temporary, "wb") as f:
            f.write(bson.encode(metadata))
            os.fsync(f.fileno())
        os.replace(temporary, os.path.join(self.path, key + ".bson"))

    def replay(self, store):
        """Store every spooled message; return (stored, failed)."""
        import bson
        from pymongo.errors import DuplicateKeyError
        stored = failed = 0
        for name in sorted(os.listdir(self.path)):
            if not name.endswith(".bson"):
                continue
            base = os.path.join(self.path, name[:-5])
            with open(base + ".bson", "rb") as f:
                metadata = bson.decode(f.read(), codec_options=bson.CodecOptions(tz_aware=True))
            with open(base + ".msg", "rb") as f:
                data = f.read()
            metadata.pop("_id", None)
            try:
                store.store(metadata, data)
            except DuplicateKeyError:
                pass  # stored by an earlier replay that was cut short
            except Exception as exc:
                log.error("replay of %s failed: %s", metadata["store_key"], exc)
                failed += 1
                continue
            os.unlink(base + ".bson")
            os.unlink(base + ".msg")
            stored += 1
        return stored, failed


###############################################################################
# The modes ###################################################################
###############################################################################

class Mode:
    """What a mode does at each step; None means 'carry on with the usual reply'."""

    def start(self):
        pass

    def close(self):
        pass

    def on_mail(self, session, tx):
        return None

    def on_rcpt(self, session, tx, rcpt, params):
        return None

    def on_data(self, session, tx):
        return None

    def on_reset(self, session, tx):
        pass

    def on_message(self, session, tx, metadata, data):
        raise NotImplementedError


class DebugMode(Mode):
    """Prints each message to stdout: its metadata as JSON, then the raw bytes."""

    def __init__(self, cfg, stream=None):
        self.stream = stream or sys.stdout.buffer
        self.lock = threading.Lock()

    def on_message(self, session, tx, metadata, data):
        head = json.dumps(metadata, default=str, ensure_ascii=False, sort_keys=True)
        text = b"".join([b"---------- MESSAGE FOLLOWS ----------\n", head.encode(), b"\n",
                         data, b"\n------------ END MESSAGE ------------\n"])
        with self.lock:
            self.stream.write(text)
            self.stream.flush()
        return R_QUEUED.format(metadata["store_key"])


class QuarantineMode(Mode):
    """amavisd-new's quarantine and archive target: store every message, answer 250."""

    def __init__(self, cfg):
        self.store = MongoStore(cfg)

    def start(self):
        self.store.start()

    def close(self):
        self.store.close()

    def on_message(self, session, tx, metadata, data):
        return stored_reply(self.store, metadata, data)


def stored_reply(store, metadata, data):
    """250 with the store_key once the message is stored; 451 otherwise, so that the
    sending MTA keeps it and retries."""
    try:
        store.store(metadata, data)
    except Exception as exc:
        log.error("storing %s failed: %s", metadata["store_key"], exc)
        return R_STORE_FAILED
    return R_QUEUED.format(metadata["store_key"])


class ProxyMode(Mode):
    """Postfix's before-queue filter: relay in step with the client, pass the replies
    through, and archive what the downstream accepted (the seed's rule)."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.store = MongoStore(cfg)
        self.spool = Spool(cfg.spool_dir)

    def start(self):
        self.spool.check()
        self.store.start()

    def close(self):
        self.store.close()

    def relayed(self, tx, step):
        """Run one step of the downstream session; a broken downstream becomes
        451 4.4.1, and the session is dropped."""
        try:
            return step()
        except DownstreamError as exc:
            log.error("downstream %s:%d failed: %s", self.cfg.remote_host,
                      self.cfg.remote_port, exc)
            self.on_reset(None, tx)
            return R_RELAY_FAILED

    @staticmethod
    def relay(tx):
        if tx.relay is None:
            raise DownstreamError("the downstream session was lost earlier in this transaction")
        return tx.relay

    def open_relay(self, session, tx):
        tx.relay = Downstream(self.cfg)
        return tx.relay.mail(session.xforward, tx)

    def on_mail(self, session, tx):
        answer = self.relayed(tx, lambda: self.open_relay(session, tx))
        if not answer.startswith("2"):
            self.on_reset(session, tx)
        return answer

    def on_rcpt(self, session, tx, rcpt, params):
        return self.relayed(tx, lambda: self.relay(tx).command(
            " ".join([f"RCPT TO:<{rcpt}>", *params])))

    def on_data(self, session, tx):
        return self.relayed(tx, lambda: self.relay(tx).data())

    def on_reset(self, session, tx):
        if tx.relay is not None:
            tx.relay.close()
            tx.relay = None

    def on_message(self, session, tx, metadata, data):
        return self.deliver(session, tx, metadata, data, lambda: self.relay(tx).message(data))

    def deliver(self, session, tx, metadata, data, send):
        """Send the message downstream, end the session, archive what was accepted."""
        answer = self.relayed(tx, send)
        self.on_reset(session, tx)
        if answer.startswith("2"):
            self.archive(metadata, data)
        return answer

    def archive(self, metadata, data):
        """The downstream has the message: refusing now would deliver it twice, so a
        failed store goes to the spool instead, and the client still gets the 250."""
        try:
            self.store.store(metadata, data)
        except Exception as exc:
            log.error("storing %s failed (%s): spooled to %s for `mms.py replay`",
                      metadata["store_key"], exc, self.spool.path)
            try:
                self.spool.put(metadata, data)
            except OSError as exc:
                log.critical("spooling %s failed (%s): delivered but not archived",
                             metadata["store_key"], exc)


class FilterMode(ProxyMode):
    """Scan, then deliver clean mail as proxy mode does, and keep the rest.

    MAIL and RCPT are relayed in step, as in proxy mode; DATA goes downstream
    only once the message is scanned and found fit to deliver, so a virus never
    reaches the downstream server. Every message is recorded, with its verdict.
    """

    def on_data(self, session, tx):
        return None

    def on_message(self, session, tx, metadata, data):
        metadata.update(scan(self.cfg, data))
        action = self.action(metadata)
        if action == "deliver":
            return self.deliver(session, tx, metadata, data,
                                lambda: self.relay(tx).data_and_message(data))
        self.on_reset(session, tx)
        if action == "tempfail":
            log.warning("%s not scanned: %s", metadata["store_key"], metadata["scan"])
            return R_SCAN_FAILED
        if action == "reject":
            self.archive(metadata, data)
            return R_VIRUS.format(", ".join(metadata["virus"])) if metadata["is_virus"] else R_SPAM
        return stored_reply(self.store, metadata, data)

    def action(self, metadata):
        if metadata["is_virus"]:
            return self.cfg.virus_action
        if metadata["is_spam"]:
            return self.cfg.spam_action
        if metadata["is_unchecked"] and "skipped" not in metadata["scan"]:
            return "deliver" if self.cfg.on_scan_error == "deliver" else "tempfail"
        return "deliver"


MODE_CLASSES = {"debug": DebugMode, "mongo-quarantine": QuarantineMode, "mongo-proxy": ProxyMode,
                "mongo-filter": FilterMode}


def make_mode(cfg):
    if cfg.server not in MODE_CLASSES:
        fail(f"mode {cfg.server!r} is not available in this version")
    return MODE_CLASSES[cfg.server](cfg)


###############################################################################
# The command line ############################################################
###############################################################################

def open_server(cfg, mode=None, start=True):
    """Everything that can fail at start-up fails here, before the first client."""
    mode = mode or make_mode(cfg)
    plugins = load_plugins(cfg.plugin)
    try:
        server = SMTPServer(cfg, mode)
    except OSError as exc:
        fail(f"cannot listen on {cfg.host}:{cfg.port}: {exc}")
    server.plugins = plugins
    if start:
        server.start()
    return server


def serve(cfg):
    """Run until SIGTERM or SIGINT, then drain: this is what supervisord expects."""
    server = open_server(cfg, start=False)
    host, port = server.server_address[:2]
    log.info("starting mms %s in %s mode on %s:%d (pid %d, %d worker(s))", __version__,
             cfg.server, host, port, os.getpid(), cfg.workers)
    if cfg.workers > 1:
        return run_workers(server, cfg.workers)
    return run_process(server)


def run_process(server):
    server.start()

    def stop(signum, frame):
        log.info("received %s, stopping", signal.Signals(signum).name)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    server.serve_forever(poll_interval=0.5)
    server.drain(server.cfg.grace)
    server.mode.close()
    log.info("stopped")
    return 0


def run_workers(server, count):
    """Fork workers that share the listening socket; the GIL then caps one worker, not
    the host. A worker that dies is replaced; SIGTERM is passed on to all of them."""
    workers, stopping = set(), False

    def spawn():
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            code = 1
            try:
                code = run_process(server)
            finally:
                os._exit(code)
        workers.add(pid)

    def stop(signum, frame):
        nonlocal stopping
        stopping = True
        for pid in workers:
            os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for _ in range(count):
        spawn()
    while workers:
        pid, status = os.wait()
        workers.discard(pid)
        if not stopping:
            log.error("worker %d ended (status %d), starting another", pid, status)
            spawn()
    server.server_close()
    log.info("all workers stopped")
    return 0


def read_archive(cfg):
    """count, list, show and headers: the archive from the shell, without mongo tools."""
    store = MongoStore(cfg).connect()
    try:
        return READERS[cfg.command](cfg, store)
    except LookupError as exc:
        print(f"mms.py: error: {exc.args[0]}", file=sys.stderr)
        return 1
    except Exception as exc:
        print(f"mms.py: error: cannot read the archive at {redact(cfg.mongo_host)}: {exc}",
              file=sys.stderr)
        return 1
    finally:
        store.close()


def read_replay(cfg, store):
    stored, failed = Spool(cfg.spool_dir).replay(store)
    print(f"replayed {stored} message(s) from {cfg.spool_dir}, {failed} failed")
    return 1 if failed else 0


def read_count(cfg, store):
    print(store.collection.count_documents({}))
    return 0


def read_list(cfg, store):
    query = {}
    if cfg.sender:
        query["sender"] = cfg.sender.lower()
    if cfg.rcpt:
        # $in, not equality: the same on MongoDB, and nx-27017 misses array
        # elements of an indexed field on plain equality.
        query["rcpt"] = {"$in": [cfg.rcpt.lower()]}
    if cfg.virus:
        query["is_virus"] = 1
    if cfg.spam:
        query["is_spam"] = 1
    if cfg.since:
        since = cfg.since
        query["received"] = {"$gte": since if since.tzinfo else
                             since.replace(tzinfo=datetime.timezone.utc)}
    out = sys.stdout
    for doc in store.collection.find(query).sort("received", -1).limit(cfg.limit):
        doc.pop("_id", None)
        if cfg.json:
            out.write(json.dumps(doc, default=str, ensure_ascii=False) + "\n")
        else:
            verdict = "".join(f" [{name}]" for name in ("virus", "spam")
                              if doc.get(f"is_{name}"))
            out.write(f"{doc['received']:%Y-%m-%d %H:%M:%S} {doc['store_key']} "
                      f"{doc.get('size', 0):>8} <{doc['sender']}> -> "
                      f"{','.join(doc['rcpt'])} {doc.get('subject', '')!r}{verdict}\n")
    return 0


def found(store, key):
    metadata = store.find(key)
    if metadata is None:
        raise LookupError(f"no message with store_key {key}")
    return store.read(metadata)


def read_show(cfg, store):
    sys.stdout.buffer.write(found(store, cfg.key))
    sys.stdout.flush()
    return 0


def read_headers(cfg, store):
    sys.stdout.buffer.write(header_block(found(store, cfg.key)))
    sys.stdout.flush()
    return 0


READERS = {"replay": read_replay, "count": read_count, "list": read_list, "show": read_show, "headers": read_headers}


def main(argv=None):
    cfg = parse_config(argv)
    logging.basicConfig(level=logging.DEBUG if cfg.debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s mms[%(process)d]: %(levelname)s %(message)s")
    if cfg.command == "start":
        return serve(cfg)
    return read_archive(cfg)


if __name__ == "__main__":
    sys.exit(main())
