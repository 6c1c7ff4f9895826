#!/usr/bin/env python3
"""Mongo Mail Server: an SMTP server that records every message it receives in MongoDB.

The promise, to the mail administrator who puts it behind Postfix or amavisd-new:

* a message is answered ``250 ... queued as <store_key>`` only once it is stored
  (or, in proxy mode, accepted by the downstream server); any storage or
  downstream failure answers 4xx, so the sending MTA keeps it and retries;
* the bytes stored are the bytes received, after un-dot-stuffing, and nothing else;
* every input is bounded (command lines, message size, recipients, connections,
  connections per client, time per read, per command line and per message, and
  the memory a message costs), and a misbehaving client never hurts other sessions;
* in proxy and filter modes only the front Postfix may connect: no open relay.

Modes: mongo-quarantine (amavisd-new's quarantine and archive target),
mongo-proxy (a Postfix before-queue filter that records what the after-filter
accepts), mongo-filter (the same, asking clamd and spamd first) and debug.

One file, one runtime dependency (pymongo). Copy it to a mail host and run::

    python mms.py --server debug

The sections follow the data, and each begins with a banner; to go from a
symptom to a line, grep for the name on the right:

* configuration: OPTIONS (every flag and MMS_* variable), parse_config,
  COMMANDS and @command (the archive commands' one registry), the error types
  (MMSError and its kinds, each with its exit and HTTP status);
* the SMTP session: SMTPSession, one smtp_VERB method per verb (HELP lists them);
* the message pipeline: receive_message, make_metadata, completed_fields and
  MimeScan (the seed's completed document, and the words), run_plugins (plugins),
  scan (clamd, spamd), Downstream (relay), MongoStore, Tally (the dashboard's
  daily counts) and Spool (store);
* the modes: Mode and its on_* steps; DebugMode, QuarantineMode, ProxyMode,
  FilterMode and the allow and block lists it holds (SenderLists) (MODE_CLASSES);
* observability: Metrics, Statsd, MetricsServer (/metrics, /healthz), and the
  HTTP servers' bounds (BoundedHTTPServer, HeadReader, BoundedHandler);
* the archive: Archive, the one class that asks and writes MongoDB (INDEXES),
  verdict, and search_fields (what the searches ask, in a form an index serves);
* the archive commands: archive_NAME, each registered by @command beside it;
  Filters, the value every search is made of;
* the web console: WebServer, WebHandler, one handler per page registered by
  @route beside it; ROLES and may (who may do what), AuditLog, MimeView and
  Preview (a message as a reviewer sees it), render_* (the HTML), openapi;
* quarantine reports: archive_digest, sign_link and open_link;
* the command line: main, serve, run_workers, setup_logging; `mms.py try`
  (archive_try, TryParts, SAMPLES).
"""

import argparse
import base64
import bisect
import binascii
import codecs
import collections
import contextlib
import copy
import dataclasses
import datetime
import difflib
import errno
import email.utils
import hashlib
import heapq
import hmac
import html
import http.server
import importlib
import io
import itertools
import ipaddress
import json
import logging
import mmap
import operator
import os
import queue
import re
import select
import signal
import smtplib
import socket
import socketserver
import stat
import struct
import sys
import tempfile
import threading
import time
import typing
import urllib.parse
import zlib

__version__ = "1.1.0"

log = logging.getLogger("mms")

###############################################################################
# Configuration ###############################################################
###############################################################################

COMMAND_LINE_MAX = 512          # RFC 5321 4.5.3.1.4, CRLF included
PARAMS_ROOM = 1024              # extra room on MAIL/RCPT for ESMTP parameters
PATH_MAX = 256                  # RFC 5321 4.5.3.1.3
XFORWARD_VALUE_MAX = 255        # Postfix XFORWARD_README
RECV_SIZE = 64 * 1024
ACCEPT_TICK = 1.0               # how often a thread waiting for a connection looks up
SPOOL_THRESHOLD = 4 * 2**20     # larger messages wait in a temporary file while they arrive
END_OF_DATA = b"\r\n.\r\n"
SECONDS_MAX = 86400             # the longest timeout an option takes
DAYS_MAX = 36500                # the longest time ago, or retention, in days (100 years)

XFORWARD_ATTRS = ("NAME", "ADDR", "PORT", "PROTO", "HELO", "IDENT", "SOURCE")
MODES = ("mongo-quarantine", "mongo-proxy", "mongo-filter", "debug")

# Every reply the session sends that is not built from a downstream answer.
# Control characters, as each place that shows text from outside escapes them.
CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")                # C0, DEL, C1: a log line
ADDRESS_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")             # never in an address
TEXT_CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # but tab and LF: a terminal
BYTES_CONTROL_RE = re.compile(rb"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # but tab, LF, CR
C1_RE = re.compile(r"[\x7f-\x9f]")                              # what json leaves as it is
BIDI_CONTROL_RE = re.compile("[\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")  # 'gnp.exe'

R_MAIL_OK = "250 2.1.0 Ok"
R_RCPT_OK = "250 2.1.5 Ok"
R_OK = "250 2.0.0 Ok"
R_QUEUED = "250 2.0.0 Ok: queued as {}"
R_DATA_GO = "354 End data with <CR><LF>.<CR><LF>"
R_BYE = "221 2.0.0 Bye"
R_VRFY = "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery"
R_HELP = "214 2.0.0 Commands: {}"
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
R_BLOCKED = "550 5.7.1 <{}>: Sender address rejected: blocked for this recipient"


def _flag(value):
    if isinstance(value, bool):
        return value
    if value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if value.strip().lower() in ("", "0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a yes/no value: {value!r}")


def _number(value, kind=int):
    """ASCII only: int() and float() also take other scripts' digits, such as '٣٣'."""
    text = str(value).strip()
    if not text.isascii():
        raise argparse.ArgumentTypeError(f"not a number: {value!r}")
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {value!r}") from None


def _port(value):
    port = _number(value)
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"not a TCP port (1-65535): {value!r}")
    return port


def _positive(value):
    """Seconds to wait: more than 0, at most a day (a socket's timeout has a range)."""
    number = _number(value, float)
    if not 0 < number <= SECONDS_MAX:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most {SECONDS_MAX}: "
                                         f"{value!r}")
    return number


def _days(value):
    number = _count(value)
    if number > DAYS_MAX:
        raise argparse.ArgumentTypeError(f"days: 0 to {DAYS_MAX}: {value!r}")
    return number


def _workers(value):
    if str(value).strip().lower() == "auto":
        return os.cpu_count() or 1
    number = _number(value)
    if not 1 <= number <= 256:
        raise argparse.ArgumentTypeError(f"must be 1 to 256: {value!r}")
    return number


def _count(value):
    number = _number(value)
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


def _address(value):
    """HOST:PORT to listen on, or empty for none."""
    if not value.strip():
        return ""
    host, sep, port = value.strip().rpartition(":")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"not HOST:PORT: {value!r}")
    _port(port)
    return value.strip()


def _when(value):
    """An ISO date (UTC unless it says otherwise) from 1970 to 2999, or a time ago
    of at most DAYS_MAX days: 30m, 24h, 7d, 2w."""
    text = value.strip()
    match = re.fullmatch(r"([0-9]{1,12})\s*([mhdw])", text)
    if match:
        minutes = int(match.group(1)) * {"m": 1, "h": 60, "d": 1440, "w": 10080}[match.group(2)]
        if minutes > DAYS_MAX * 1440:
            raise argparse.ArgumentTypeError(f"a time ago is at most {DAYS_MAX}d: {value!r}")
        return datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=minutes)
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO date, nor a time ago (30m, 24h, 7d, 2w): {value!r}") from None
    if not 1970 <= when.year <= 2999:
        raise argparse.ArgumentTypeError(f"a date from 1970 to 2999: {value!r}")
    return when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)


def _choice(*choices):
    def check(value):
        if value not in choices:
            raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(choices)}")
        return value
    return check


def _zone(value):
    """A time zone by its IANA name, from the system's tz database."""
    import zoneinfo
    if not isinstance(value, str):
        return value
    try:
        return UTC if value.strip().upper() == "UTC" else zoneinfo.ZoneInfo(value.strip())
    except (ValueError, zoneinfo.ZoneInfoNotFoundError):
        raise argparse.ArgumentTypeError(f"not a time zone of /usr/share/zoneinfo: {value!r}") \
            from None


def _names(value):
    return value if isinstance(value, list) else [v.strip() for v in value.split(",") if v.strip()]


def _write_concern(value):
    """w: a number of members or a tag set name; never 0, which acknowledges writes
    MongoDB may never make, and so would answer 250 for mail that is not stored."""
    text = value.strip()
    if not text:
        return None
    if text.isascii() and text.isdigit():
        if int(text) == 0:
            raise argparse.ArgumentTypeError(
                "0 would answer 250 for messages MongoDB never stored: use 1 or more, or majority")
        return int(text)
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.-]*", text):
        raise argparse.ArgumentTypeError(f"not a number, 'majority' or a tag set name: {value!r}")
    return text


INDEX_TEXT = 8 * 1024    # --index-text: a message's words kept for searches (README, "Words")

# (flag, variable, default, type, help). The variable gives the default; the flag wins.
OPTIONS = [
    ("--server", "MMS_SERVER", "mongo-quarantine", str,
     "mode: " + " | ".join(MODES)),
    ("--host", "MMS_HOST", "0.0.0.0", str, "address to listen on (IPv4 or IPv6)"),
    ("--port", "MMS_PORT", "14001", _port, "port to listen on"),
    ("--hostname", "MMS_HOSTNAME", "", str,
     "name in the greeting and EHLO reply (default: this machine's FQDN)"),
    ("--timeout", "MMS_TIMEOUT", "600", _positive,
     "seconds a client may take for each read, and for each whole command line"),
    ("--data-timeout", "MMS_DATA_TIMEOUT", "1800", _positive,
     "seconds a client may take for a whole message, from DATA to the final dot"),
    ("--data-size-limit", "MMS_DATA_SIZE_LIMIT", str(50 * 2**20), _count,
     "largest message in bytes, announced in EHLO SIZE; 0 for no limit (default: 50 MiB, "
     "five times Postfix's message_size_limit)"),
    ("--max-recipients", "MMS_MAX_RECIPIENTS", "1000", _count,
     "recipients per message; more answer 452 4.5.3"),
    ("--max-connections", "MMS_MAX_CONNECTIONS", "256", _count,
     "connections in service at once; one more gets 421 4.7.0"),
    ("--max-connections-per-client", "MMS_MAX_CONNECTIONS_PER_CLIENT", "32", _count,
     "connections in service at once from one IP address, but for --xforward-hosts "
     "(a front Postfix opens one per client); one more gets 421 4.7.0"),
    ("--allow", "MMS_ALLOW", "", _networks,
     "clients allowed to connect, IPs or CIDRs (repeatable; default: everyone, but in "
     "proxy and filter modes only --xforward-hosts)"),
    ("--xforward-hosts", "MMS_XFORWARD_HOSTS", "127.0.0.1,::1", _networks,
     "clients allowed to send XFORWARD, IPs or CIDRs: the front Postfix"),
    ("--plugin", "MMS_PLUGINS", "", _names,
     "module whose apply(metadata=None, data=None) runs on each message (repeatable)"),
    ("--plugin-timeout", "MMS_PLUGIN_TIMEOUT", "10", _positive,
     "seconds a plugin may take; past it the message goes on without its changes"),
    ("--workers", "MMS_WORKERS", "1", _workers,
     "processes sharing the listening socket, each with its own MongoDB client; "
     "'auto' for one per CPU"),
    ("--grace", "MMS_GRACE", "8", _positive,
     "seconds that SIGTERM waits for transactions in progress"),
    ("--debug", "MMS_DEBUG", "0", _flag, "log the SMTP dialogue"),
    ("--metrics", "MMS_METRICS", "", _address,
     "serve Prometheus /metrics and /healthz on this HOST:PORT (e.g. 127.0.0.1:9425)"),
    ("--metrics-allow", "MMS_METRICS_ALLOW", "127.0.0.0/8,::1", _networks,
     "clients allowed to scrape --metrics, IPs or CIDRs; others are disconnected"),
    ("--web", "MMS_WEB", "127.0.0.1:8025", _address,
     "`mms.py web`: serve the web console on this HOST:PORT"),
    ("--web-users", "MMS_WEB_USERS", "", str,
     "`mms.py web`: the users file, lines name:hash[:role] from `mms.py web-user NAME`"),
    ("--web-cert", "MMS_WEB_CERT", "", str, "`mms.py web`: serve HTTPS with this certificate"),
    ("--web-key", "MMS_WEB_KEY", "", str, "`mms.py web`: the key of --web-cert, if apart"),
    ("--web-secret", "MMS_WEB_SECRET", "", str,
     "`mms.py web` and `digest`: the file of the key that signs quarantine report links"),
    ("--audit-retention", "MMS_AUDIT_RETENTION", "400", _days,
     "`mms.py web`: days the console's audit log is kept (0: forever), apart from the mail"),
    ("--web-timezone", "MMS_WEB_TIMEZONE", "UTC", _zone,
     "`mms.py web`: the time zone the console shows times in, e.g. Europe/Paris"),
    ("--web-allow", "MMS_WEB_ALLOW", "", _networks,
     "`mms.py web`: clients allowed to connect, IPs or CIDRs (default: everyone)"),
    ("--statsd", "MMS_STATSD", "", _scanner,
     "send counters and timings to this statsd HOST:PORT by UDP"),
    ("--log-file", "MMS_LOG_FILE", "", str,
     "append the log to this file instead of stderr; SIGHUP reopens it (for logrotate)"),
    ("--mongo-host", "MMS_MONGODB_URI", "mongodb://localhost/message", str,
     "MongoDB connection string"),
    ("--mongo-database", "MMS_MONGODB_DATABASE", "message", str,
     "database name (default: the one the URI names, else message)"),
    ("--mongo-collection", "MMS_MONGODB_COLLECTION", "message", str,
     "collection of metadata documents"),
    ("--mongo-timeout", "MMS_MONGODB_TIMEOUT", "5", _positive,
     "seconds to find a MongoDB server before answering 451"),
    ("--mongo-write-concern", "MMS_MONGODB_WRITE_CONCERN", "", _write_concern,
     "write concern w: a number (1 or more), 'majority' or a tag set name (default: the "
     "URI's w, else majority)"),
    ("--mongo-journal", "MMS_MONGODB_JOURNAL", "", _flag,
     "write concern j: answer 250 only once MongoDB's journal has the message (default: "
     "the URI's journal, else the server's default)"),
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
    ("--retention", "MMS_RETENTION", "0", _days,
     "days a message is kept: once an hour, older ones not on legal hold are purged (0: forever)"),
    ("--local-domains", "MMS_LOCAL_DOMAINS", "", _names,
     "this site's domains: is_in is 1 for mail from outside them to one of them, else 0 "
     "(not written without them)"),
    ("--real-rcpt", "MMS_REAL_RCPT", "0", _flag,
     "record the X-Envelope-To recipients of amavisd-new quarantine copies"),
    ("--index-text", "MMS_INDEX_TEXT", str(INDEX_TEXT), _count,
     "bytes of each message's words kept for `--text` searches (0: none)"),
    ("--text-search", "MMS_TEXT_SEARCH", "index", _choice("index", "atlas"),
     "how `--text` finds words: MongoDB's text index, or Atlas Search ($search on the "
     "index mms_words)"),
]


class ArgumentParser(argparse.ArgumentParser):
    """A bad option is one line and exit 2, not a usage block that hides it."""

    def error(self, message):
        raise ConfigError(f"{message} (see mms.py --help)")


@dataclasses.dataclass(frozen=True)
class Command:
    """An archive command: what it does and the options it reads (for its --help),
    whether it takes a KEY (a store key, or a NAME), whether it opens the archive,
    and whether it answers within bounds (the SMTP path's socket timeout)."""
    run: typing.Callable
    what: str
    reads: tuple
    key: str = ""
    opens_archive: bool = True
    bounded: bool = False


COMMANDS = {}   # name: Command, each registered by @command beside its code


def command(name, what, reads=(), key="", opens_archive=True, bounded=False):
    """Register an archive command: `mms.py NAME`, run as run(cfg, archive)."""
    def register(run):
        COMMANDS[name] = Command(run, what, tuple(reads), key, opens_archive, bounded)
        return run
    return register


FILTERS = ("sender", "rcpt", "since", "until", "subject", "text", "message_id", "quarantine_id",
           "client", "quarantine", "verdict", "virus", "spam", "attachment", "attachment_type",
           "attachment_sha256", "country", "bounce", "held", "released")
VERDICT_FIELDS = ("virus", "banned", "spam", "unchecked")   # the first that is set wins
VERDICTS = VERDICT_FIELDS + ("clean",)
AWAITING = ("virus", "banned", "spam")       # the verdicts a quarantine holds for review
MONGO = ("config", "mongo_host", "mongo_database", "mongo_collection", "mongo_timeout")


def build_parser():
    parser = ArgumentParser(
        prog="mms.py", add_help=False,
        description="Mongo Mail Server: an SMTP server that records every message in MongoDB.",
        epilog="Every option can be set by the MMS_* variable shown; the flag wins.",
    )
    parser.add_argument("-h", "--help", action=OverviewHelp, nargs=0,
                        help="the commands and the server's options")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="a file of MMS_NAME=value lines, as for systemd's EnvironmentFile= "
                             "[MMS_CONFIG]; flags and variables win over it")
    for flag, variable, default, kind, text in OPTIONS:
        shown = default or "none"
        extra = {"action": "append"} if kind in (_networks, _names) else {}
        if kind is _flag:
            extra = {"action": "store_const", "const": True}
        if kind is not _flag:
            extra.update(type=kind, metavar=variable.replace("MMS_", ""))
        # SUPPRESS: an option not given is absent, so that '--clamd none' (None) is
        # told apart from no --clamd at all, which falls back to MMS_CLAMD.
        parser.add_argument(flag, default=argparse.SUPPRESS,
                            help=f"{text} [{variable}, default: {shown}]", **extra)
    parser.add_argument("command", nargs="?", default="start", choices=["start", *COMMANDS],
                        help="start the server (default), or read the archive")
    parser.add_argument("key", nargs="?",
                        help="store_key or a unique prefix of 8 or more, for "
                             + ", ".join(name for name, c in COMMANDS.items() if c.key))
    group = parser.add_argument_group("archive options (list, count, purge)")
    parser.archive_actions = []

    def archive(*args, **kwargs):
        parser.archive_actions.append(group.add_argument(*args, **kwargs))

    archive("--limit", type=_count, default=20, help="messages to list (default 20)")
    archive("--sender", help="this sender, @domain for a domain, <> for none")
    archive("--rcpt", help="this recipient, or @domain for a domain")
    archive("--since", type=_when, help="received since: an ISO date, or 24h, 7d")
    archive("--until", type=_when, help="received before: an ISO date, or 24h, 7d")
    archive("--subject", help="Subject contains this, in any case")
    archive("--text", help="words: each word and \"phrase\" must be in the subject, the "
            "text, the From name or an attachment's name; -word must not")
    archive("--sort", choices=("date", "size", "score"), default="date",
            help="list, export: newest first (date), largest first (size), or best --text "
                 "match first (score)")
    archive("--message-id", help="this Message-ID")
    archive("--quarantine-id", help="this amavisd-new quarantine id (X-Quarantine-ID)")
    archive("--client", help="client address: an IP or a CIDR")
    archive("--quarantine", help="quarantine type: virus, banned, spam, ...")
    archive("--verdict", choices=VERDICTS, help="only messages judged so (virus wins over "
            "banned, banned over spam, spam over unchecked)")
    archive("--virus", action="store_true", help="--verdict virus")
    archive("--spam", action="store_true", help="--verdict spam; learn: as spam")
    archive("--ham", dest="learn_ham", action="store_true", help="learn: as not spam")
    archive("--attachment", help="an attachment named so: a name, or *.zip, invoice*")
    archive("--attachment-type", help="an attachment of this declared type: application/zip")
    archive("--attachment-sha256", help="an attachment with this sha256: who else got it?")
    archive("--country", help="client's country, ISO code (CN): with the geoip_country plugin")
    archive("--bounce", action="store_true", help="only bounces: <> or a delivery report")
    archive("--held", action="store_true", help="only messages on legal hold")
    archive("--released", action="store_true", help="only released messages")
    archive("--older-than", type=_when, help="purge: received before, e.g. 90d")
    archive("--dry-run", action="store_true", help="purge: count, delete nothing")
    archive("--orphans", action="store_true", help="verify: also look for files and chunks "
            "no message points at (reads every GridFS file)")
    archive("--repair", action="store_true",
                         help="verify --orphans: remove orphans older than an hour")
    archive("--json", action="store_true", help="one JSON document per line")
    archive("--batch", type=_count, default=1000, help="reindex: messages a batch (default "
            "1000)")
    archive("--by", choices=list(STATS_GROUPS), help="stats: count by this")
    archive("--top", type=_count, default=10, help="stats: the N largest groups")
    archive("--to", action="append", default=[],
                         help="release: to this address instead (repeatable)")
    archive("--via", type=_scanner, default=None,
                         help="release: the SMTP server to send through (default 127.0.0.1:25; "
                              "in filter mode --remote-host and --remote-port)")
    archive("--force", action="store_true", help="release: again")
    archive("--for", dest="for_rcpt", default="", help="allow, block, unlist, lists: for "
            "this recipient (an address or @domain) only; default: everyone")
    archive("--amavis", metavar="DIR", help="lists: write the lists for everyone as "
            "amavisd-new's read_hash() files in DIR")
    archive("--user", help="audit: this console user's entries")
    archive("--action", help="audit: login, view, preview, download, hold, unhold, release, "
            "delete, report-release")
    archive("--timezone", type=_zone, help="web-user: the time zone the console shows this "
            "user times in (default: --web-timezone)")
    archive("--domains", help="web-user: only mail for these domains (example.com,example.net)")
    archive("--role", choices=("admin", "reviewer", "viewer"), default="admin",
            help="web-user: admin (the default) may hold, release and delete; viewer reads")
    archive("--format", choices=("mbox", "eml"), default="mbox",
            help="export: one mbox on stdout (mboxrd), or one .eml per message in --output")
    archive("--output", help="export --format eml: the directory")
    archive("--data", help=f"try: where the embedded store keeps its files (default {TRY_DATA})")
    archive("--sample", action="store_true", help="try: send sample mail of every kind")
    archive("--url", help="digest: the web console's address, as recipients reach it")
    archive("--from", dest="mail_from", help="digest: the reports' sender "
                                              "(default quarantine@ this host's name)")
    archive("--expire-days", type=_positive, default=14.0,
            help="digest: days a report's links work (default 14; decimals allowed)")
    archive("--include", choices=("virus",), help="digest: list viruses too (never released "
                                                   "from a link)")
    archive("--rcpt-domain", help="digest: the local domains, comma-separated, whose "
                                  "recipients get reports")
    return parser


def parse_config(argv=None):
    """Flags first, then MMS_* variables, then the --config file, then defaults: all
    checked the same way. cfg.given names the options set, cfg.source where."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    check_flags(parser, argv)
    cfg = parser.parse_intermixed_args(argv)   # `show --mongo-host URI KEY` as meant
    config = getattr(cfg, "config", None) or os.environ.get("MMS_CONFIG", "")
    settings = read_config(config) if config else {}
    cfg.given, cfg.source = set(), {}
    for flag, variable, default, kind, _ in OPTIONS:
        dest = flag[2:].replace("-", "_")
        for source, values in (("flag", None), (variable, os.environ),
                               (f"{variable} in {config}", settings)):
            if (hasattr(cfg, dest) if values is None else variable in values):
                cfg.given.add(dest)
                cfg.source[dest] = flag if values is None else source
                break
        if hasattr(cfg, dest):
            value = getattr(cfg, dest)
            if kind in (_networks, _names):
                value = [item for part in value for item in part]
        else:
            try:
                value = kind(os.environ.get(variable, settings.get(variable, default)))
            except (ValueError, argparse.ArgumentTypeError) as exc:
                raise ConfigError(f"{cfg.source.get(dest, variable)}: {exc}")
        setattr(cfg, dest, value)
    if cfg.server not in MODES:
        raise ConfigError(f"unknown mode {cfg.server!r}: choose one of {', '.join(MODES)}")
    if cfg.command == "start":
        check_server_options(cfg, parser)
    if cfg.command in COMMANDS and COMMANDS[cfg.command].key and not cfg.key:
        raise ConfigError(f"{cfg.command} needs a {COMMANDS[cfg.command].key}")
    if cfg.server != "debug" or cfg.command != "start":
        check_mongo_options(cfg)
    cfg.hostname = cfg.hostname or socket.getfqdn()
    try:
        cfg.filters = Filters.parse(vars(cfg))     # what the archive commands search by
    except UsageError as exc:
        raise ConfigError(f"--{exc}") from None
    cfg.warnings = unknown_variables(os.environ) + [
        f"{warning} (in {config})" for warning in unknown_variables(settings)]
    return cfg


def check_flags(parser, argv):
    """An unknown --flag is named, with the closest real one (argparse would first
    say "invalid choice" of the word after it), and `COMMAND --help` is that
    command's own help."""
    known = [flag for action in parser._actions for flag in action.option_strings]
    for arg in argv:
        if arg == "--":
            break
        flag = arg.split("=", 1)[0]
        if flag.startswith("--") and flag not in known:
            close = difflib.get_close_matches(flag, known, n=1, cutoff=0.75)
            raise ConfigError(
                f"unknown option {flag}" + (f"; did you mean {close[0]}?" if close else "")
                + " (see mms.py --help)")
    words = [arg for arg in argv if arg in COMMANDS]
    if words and ("-h" in argv or "--help" in argv):
        print(command_help(parser, words[0]))
        raise SystemExit(0)


class OverviewHelp(argparse.Action):
    """`mms.py --help`: what each command does, in a line, and the server's own
    options; a command's options are `mms.py help COMMAND`."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(overview_help(parser))
        raise SystemExit(0)


def overview_help(parser):
    width = max(map(len, COMMANDS)) + 2
    lines = ["usage: mms.py [options]               start the server (the options below)",
             "       mms.py COMMAND [KEY] [options]  run a command", "",
             parser.description, "", "commands (mms.py help COMMAND for its options):",
             f"  {'start':<{width}}the SMTP server (the default)",
             *(f"  {name:<{width}}{command.what}" for name, command in COMMANDS.items()),
             "", "options:", "  --config FILE", "      a file of MMS_NAME=value lines, as for "
             "systemd's EnvironmentFile= [MMS_CONFIG]", "  --version", "  -h, --help"]
    for flag, variable, default, _, text in OPTIONS:
        lines += [f"  {flag} {variable.replace('MMS_', '')}",
                  f"      {text} [{variable}, default: {default or 'none'}]"]
    return "\n".join(lines + ["", parser.epilog])


@command("help", "the commands; help COMMAND: that command's options", opens_archive=False)
def archive_help(cfg, _):
    """`mms.py help` is `mms.py --help`; `mms.py help list` is `mms.py list --help`."""
    parser = build_parser()
    if cfg.key in (None, "", "start"):
        print(overview_help(parser))
    elif cfg.key in COMMANDS:
        print(command_help(parser, cfg.key))
    else:
        close = difflib.get_close_matches(cfg.key, list(COMMANDS), n=1)
        raise UsageError(f"no command {cfg.key!r}" + (f"; did you mean {close[0]}?" if close
                                                        else "") + " (mms.py help lists them)")
    return 0


def command_help(parser, name):
    command = COMMANDS[name]
    key = "" if not command.key else " KEY" if command.key == "store_key" else \
        f" {command.key.upper()}"
    lines = [f"usage: mms.py {name}{key} [options]", "", f"{name}: {command.what}.", "",
             "options:"]
    for action in parser._actions:
        if action.dest in command.reads and action.option_strings:
            flag = ", ".join(action.option_strings)
            meta = f" {action.metavar or action.dest.upper()}" if action.nargs != 0 else ""
            lines.append(f"  {flag}{meta}")
            lines.append(f"      {action.help}" if action.help else "")
    return "\n".join(lines)


def file_lines(option, path):
    """(number, line) of a settings file's lines, but for blank ones and comments."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{option} {path}: {exc}")
    for number, line in enumerate(lines, 1):
        if line.strip() and not line.strip().startswith(("#", ";")):
            yield number, line.strip()


def read_config(path):
    """MMS_NAME=value lines, # comments: the file systemd's EnvironmentFile= and
    Docker's --env-file read too (quotes around a value are taken off, as systemd does)."""
    settings = {}
    for number, line in file_lines("--config", path):
        name, equals, value = line.partition("=")
        name, value = name.strip(), value.strip()
        if not equals or not re.fullmatch(r"[A-Z_][A-Z0-9_]*", name):
            raise ConfigError(f"--config {path}, line {number}: not NAME=value: {line[:60]!r}")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        settings[name] = value
    return settings


# What only some modes use: set for another mode, it is a mistake (a forgotten
# --server), and the server does not start. Archive commands take them all.
MODE_OPTIONS = {
    **dict.fromkeys(("remote_host", "remote_port", "remote_timeout", "spool_dir"),
                    ("mongo-proxy", "mongo-filter")),
    **dict.fromkeys(("clamd", "spamd", "scan_timeout", "scan_max_size", "virus_action",
                     "spam_action", "on_scan_error"), ("mongo-filter",)),
    "real_rcpt": ("mongo-quarantine", "debug"),
    "retention": ("mongo-quarantine", "mongo-proxy", "mongo-filter"),
}


def check_server_options(cfg, parser):
    """One line and exit 2 for an option the server would silently ignore."""
    for dest, modes in MODE_OPTIONS.items():
        if dest in cfg.given and cfg.server not in modes and getattr(cfg, dest) is not False:
            raise ConfigError(
                f"{cfg.source[dest]} is for {' and '.join(modes)} mode, not {cfg.server}: "
                f"set --server, or leave it out")
    for dest in ("web", "web_users", "web_cert", "web_key", "web_allow", "web_secret"):
        if cfg.source.get(dest, "").startswith("--"):
            raise ConfigError(f"{cfg.source[dest]} is for `mms.py web`, not the server")
    for action in parser.archive_actions:
        if getattr(cfg, action.dest) != action.default:
            raise ConfigError(
                f"{action.option_strings[0]} is for the archive commands, not the server "
                f"(mms.py list, purge, ... {action.option_strings[0]})")


def closest_variable(name, known):
    """A known name whose words all stand in this one (MMS_LISTEN_PORT: MMS_PORT),
    else the most alike (MMS_MONGO_URI: MMS_MONGODB_URI)."""
    words = name.split("_")
    inside = [k for k in known if all(word in words for word in k.split("_"))]
    if inside:
        return max(inside, key=len)
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return close[0] if close else None


def unknown_variables(environ):
    """MMS_PLUGIN for MMS_PLUGINS is silently nothing: say so, and name the real one."""
    known = [variable for _, variable, *_ in OPTIONS] + ["MMS_CONFIG"]
    warnings = []
    for name in sorted(environ):
        if name.startswith("MMS_") and name not in known and not name.startswith(
                ("MMS_TEST_", "MMS_FUZZ_")):
            close = closest_variable(name, known)
            hint = f"; did you mean {close}?" if close else ""
            warnings.append(f"unknown variable {name} is ignored{hint}")
    return warnings


def check_mongo_options(cfg):
    """A bad URI or write concern is a start-up error, not a 451 for every message."""
    try:
        import pymongo.uri_parser
        from pymongo.write_concern import WriteConcern
    except ImportError:
        raise ConfigError("this mode needs pymongo: pip install -r requirements.txt")
    try:
        parsed = pymongo.uri_parser.parse_uri(cfg.mongo_host, connect_timeout=1)
        WriteConcern(**write_concern(cfg, parsed["options"]))
    except Exception as exc:
        raise ConfigError(f"--mongo-host {redact(cfg.mongo_host)}: {exc}")
    if "mongo_database" not in cfg.given and parsed.get("database"):
        cfg.mongo_database = parsed["database"]


def write_concern(cfg, uri_options):
    """w, j and wtimeout: an option given beats the URI (Atlas hands out URIs with
    w=majority), which beats majority; wtimeout is --mongo-timeout unless the URI
    says. A 250 is only as durable as this: w: 1 can be rolled back in a failover."""
    given = lambda name: name in cfg.given and getattr(cfg, name) is not None
    concern = {"w": cfg.mongo_write_concern if given("mongo_write_concern")
               else uri_options.get("w", "majority"),
               "wtimeout": uri_options.get("wTimeoutMS", int(cfg.mongo_timeout * 1000))}
    journal = cfg.mongo_journal if given("mongo_journal") else uri_options.get("journal")
    if journal is not None:
        concern["j"] = journal
    return concern


class MMSError(Exception):
    """What mms tells the person who asked, not a bug: the text is the whole message.
    Each kind has the exit status of a command and the HTTP status of the console."""
    exit_status, http_status = 1, 400


class ConfigError(MMSError):
    """A setting mms cannot start with: one line, and exit 2 as for a bad flag."""
    exit_status, http_status = 2, 500


class UsageError(MMSError):
    """A command or a request asked for something it cannot have as asked."""


class NotFound(MMSError):
    http_status = 404


class Conflict(MMSError):
    """The message is not in a state that allows it (held, released, gone)."""
    http_status = 409


class AlreadyReleased(Conflict):
    """Each surface names its own way to send a message again."""

    def __init__(self, key, times):
        super().__init__(f"{key} was released already ({times} time(s)): --force to send it "
                         f"again")
        self.in_console = (f"{key} was released already ({times} time(s)): tick \"again\" to "
                           f"send it again")


class VirusRelease(Conflict):
    """A virus goes out only when asked explicitly; each surface names its own way."""

    def __init__(self, doc):
        self.names = ", ".join(map(str, doc.get("virus") or [])) or "a virus"
        super().__init__(f"{doc['store_key']} holds {self.names}: --force to release it all "
                         f"the same")


class DeliveryError(MMSError):
    """A release or a report the relay did not take."""
    http_status = 502


def bug(exc):
    """Whether no outage, no peer and no user explains an exception: then its
    traceback belongs in the log, once."""
    import pymongo.errors
    return not isinstance(exc, (MMSError, OSError, pymongo.errors.PyMongoError))


def redact(uri):
    """A MongoDB URI fit for a log line: no password."""
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", uri)


def in_networks(address, networks):
    try:
        ip = ipaddress.ip_address(plain_address(address).split("%")[0])
    except ValueError:
        return False
    return any(ip in net for net in networks)


def address_family(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def plain_address(address):
    """'::ffff:192.0.2.1', as a socket on '::' sees IPv4 clients, is '192.0.2.1'."""
    if address.lower().startswith("::ffff:") and "." in address:
        return address[7:]
    return address


def kernel_time(seconds):
    """A struct timeval for SO_RCVTIMEO/SO_SNDTIMEO; never 0, which means 'no limit'."""
    seconds = max(seconds, 0.001)
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))


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


class Client(typing.NamedTuple):
    """What the pipeline and the modes know of the client: a value the session makes
    at each step, never the session itself (a tuple: half a frozen dataclass's cost,
    and four are made a message)."""
    peer: str            # the connecting address
    port: int
    helo: str
    proto: str           # SMTP or ESMTP
    xforward: dict       # what a trusted front Postfix said of its own client


class Transaction:
    """One MAIL ... DATA exchange; a new one starts after the final dot or RSET."""

    def __init__(self, sender, params):
        self.sender = sender
        self.mail_params = params     # ESMTP parameters verbatim, for proxy mode
        self.rcpts = []               # accepted recipients
        self.rcpt_params = []         # their parameters verbatim
        self.refused = {}             # address -> [code, text], from a downstream
        self.relay = None             # proxy mode's downstream session
        self.outcome = None           # filter mode's, when it kept the message instead
        self.allowed = set()          # filter mode: recipients whose list allows the sender


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


QUOTED_LOCAL_RE = re.compile(r'"(?:[^"\\]|\\.)*"')
BARE_LOCAL_BAD_RE = re.compile(r'[\s"]')               # outside quotes
LITERAL_RE = re.compile(r"\[[^\[\]\\\s]+\]\Z")           # [192.0.2.1], [IPv6:...]
DOMAIN_RE = re.compile(r'[^()<>\[\]@,;:\\"\s.]+(?:\.[^()<>\[\]@,;:\\"\s.]+)*\.?\Z')


def valid_address(address):
    """RFC 5321's Mailbox, as leniently as Postfix reads it: a dot-string or quoted
    local part, then '@' and a domain of non-empty labels or a closed address
    literal. An address with no domain (postmaster) is accepted, as Postfix does.
    Refused: an empty local part or domain, a second '@' outside quotes, an
    unclosed literal, control characters, and white space outside quotes."""
    if len(address.encode()) > PATH_MAX or ADDRESS_CONTROL_RE.search(address):
        return False
    quoted = QUOTED_LOCAL_RE.match(address)
    local = quoted.group(0) if quoted else address.partition("@")[0]
    rest = address[len(local):]
    if not local or (not quoted and BARE_LOCAL_BAD_RE.search(local)):
        return False
    if not rest:
        return True
    domain = rest[1:] if rest[0] == "@" else ""
    return bool((LITERAL_RE if domain[:1] == "[" else DOMAIN_RE).match(domain))


def xtext_decode(value):
    return XTEXT_RE.sub(lambda m: chr(int(m.group(1), 16)), value)


def xtext_encode(value):
    return "".join(f"+{ord(ch):02X}" if ch in "+=" or not 33 <= ord(ch) <= 126 else ch
                   for ch in value)


def reply_text(reply):
    """The text of a (multi-line) reply, without its codes: '550 5.1.1 a' -> '5.1.1 a'."""
    return " ".join(line[4:] for line in reply.split("\r\n"))


# A socket call that cannot wait keeps the GIL. The socket module lets the GIL go
# around every call; at 20 sessions a client's next command is nearly always there
# already, and each call handed the GIL to another session thread and waited in a
# futex to get it back: of mms's context switches in debug mode (perf's
# sched_switch), five in eight were on the GIL and one in twenty in recv(). libc's
# recv() and send() with MSG_DONTWAIT, called through ctypes.PyDLL (which keeps
# the GIL), take what is there at once; only a call that would wait, or fails, goes
# through the socket module, which lets the GIL go, times it out and raises its
# error. Measured in the README (Performance). Without ctypes, or on a system
# without these flags, every call goes through the socket module.
RECV_FLAGS = int(getattr(socket, "MSG_DONTWAIT", 0))   # ints: an IntFlag's | costs more
SEND_FLAGS = RECV_FLAGS | int(getattr(socket, "MSG_NOSIGNAL", 0))  # than the call


def held_socket_calls():
    """(recv, send, close) of libc with the GIL kept, or None."""
    if not RECV_FLAGS or SEND_FLAGS == RECV_FLAGS:
        return None
    try:
        import ctypes
        libc = ctypes.PyDLL(None, use_errno=True)
        recv, send, close = libc.recv, libc.send, libc.close
    except (ImportError, OSError, AttributeError):
        return None
    for call in (recv, send):
        call.restype = ctypes.c_ssize_t
    recv.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    send.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_int)
    close.argtypes = (ctypes.c_int,)
    return recv, send, close


HELD = held_socket_calls()
HELD_INBOXES = threading.local()


def held_inbox():
    """This thread's buffer for recv(): session threads are kept, so it is made once
    a thread. An anonymous map, so that the pages the kernel never writes cost no
    memory: a thousand idle sessions do not hold 64 MiB."""
    inbox = getattr(HELD_INBOXES, "inbox", None)
    if inbox is None:
        import ctypes
        area = mmap.mmap(-1, RECV_SIZE)
        inbox = HELD_INBOXES.inbox = (area, ctypes.addressof(ctypes.c_char.from_buffer(area)))
    return inbox


def recv_now(sock):
    """The bytes there already (b"" at the end of the stream), or None: nothing yet,
    an error, or no held calls."""
    if HELD is None:
        return None
    area, address = held_inbox()
    got = HELD[0](sock.fileno(), address, RECV_SIZE, RECV_FLAGS)
    return area[:got] if got >= 0 else None


def send_now(sock, data):
    """How many bytes of data the kernel took at once: 0 if none, on an error, or
    with no held calls."""
    if HELD is None:
        return 0
    return max(HELD[1](sock.fileno(), data, len(data), SEND_FLAGS), 0)


def close_now(sock):
    """close(2) of a TCP socket with no linger does not wait."""
    if HELD is None:
        sock.close()
    else:
        HELD[2](sock.detach())


class SMTPSession(socketserver.BaseRequestHandler):
    """One client connection: a line reader, smtp_<VERB> dispatch and a DATA reader."""

    def setup(self):
        self.cfg = self.server.cfg
        self.peer = plain_address(self.client_address[0])
        self.buf, self.out = bytearray(), bytearray()
        self.helo = self.proto = None
        self.xforward = {}
        self.tx = None
        self.trusted = self.server.member(self.peer, self.cfg.xforward_hosts)
        self.waiting = False
        # The kernel times reads and writes out (SO_RCVTIMEO and SO_SNDTIMEO): no
        # poll before each call. The send timeout and ACCEPT_TICK come from the
        # listening socket (recv).
        self.read_timeout = ACCEPT_TICK

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
            with contextlib.suppress(ClientGone):
                self.flush()
            self.abort_transaction()
            self.server.leave(self)

    def refusal(self):
        """The 5xx or 4xx for a client that is not to be served, logged; None to serve it."""
        metrics = self.server.metrics
        if self.server.draining:  # accepted as the listening socket was being closed
            return R_SHUTDOWN.format(self.cfg.hostname)
        if self.server.allow and not self.server.member(self.peer, self.server.allow):
            log.warning("reject connection from %s: not in %s", self.peer, self.server.allow_source)
            metrics.count("mms_connections_total", "refused_allow")
            return R_ACCESS_DENIED.format(self.peer)
        refused = self.server.enter(self)
        if refused:
            log.warning("reject connection from %s: too many connections%s", self.peer,
                        f" from {self.peer}" if refused == "refused_client_limit" else "")
            metrics.count("mms_connections_total", refused)
            return R_TOO_MANY_CONN.format(self.cfg.hostname)
        metrics.count("mms_connections_total", "served")
        return None

    def reply(self, text):
        """Replies to pipelined commands go out together (RFC 2920 section 3.2), once
        no whole command is left to answer: one write, and no reply held back by
        Nagle's algorithm until the client's delayed ACK."""
        if self.cfg.debug:
            for line in text.split("\r\n"):
                log.debug("%s > %s", self.peer, line)
        self.out += text.encode() + b"\r\n"
        if b"\n" not in self.buf:
            self.flush()

    def flush(self):
        if self.out:
            try:
                out = bytes(self.out)
                sent = send_now(self.request, out)
                if sent < len(out):
                    self.request.sendall(out[sent:])
            except OSError:
                raise ClientGone() from None
            finally:
                self.out.clear()

    def fill(self, idle=False, deadline=None):
        """Wait for more bytes, as long as --timeout and the deadline allow.
        A session idle between transactions says so, so that a draining server can
        wake it by shutting down its reading side."""
        self.flush()
        if idle:
            self.waiting = True
            if self.server.draining:
                raise CloseSession(R_SHUTDOWN.format(self.cfg.hostname))
        wait = self.cfg.timeout
        if deadline is not None:
            wait = min(wait, deadline - time.monotonic())
            if wait <= 0:
                raise CloseSession(R_TIMEOUT.format(self.cfg.hostname))
        try:
            chunk = self.recv(wait)
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

    def recv(self, wait):
        """Bytes within `wait` seconds, else BlockingIOError. The kernel times the read
        (SO_RCVTIMEO): no poll call before it. The socket starts with the listening
        socket's ACCEPT_TICK, and a read that outlasts it is given the rest of its
        time then: a client that answers within a second, as nearly all do, costs
        no setsockopt call. What is there already is taken with the GIL kept."""
        chunk = recv_now(self.request)
        if chunk is not None:
            return chunk
        if wait < self.read_timeout:
            self.set_read_timeout(wait)
        try:
            return self.request.recv(RECV_SIZE)
        except BlockingIOError:
            if self.read_timeout >= wait:
                raise
        self.set_read_timeout(wait - self.read_timeout)
        return self.request.recv(RECV_SIZE)

    def set_read_timeout(self, seconds):
        self.request.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, kernel_time(seconds))
        self.read_timeout = seconds

    def read_command(self):
        """The next command line, without its line ending; None if it was too long.
        Once a line has begun, all of it must arrive within --timeout: a byte now and
        then does not hold the session open (slowloris)."""
        limit = COMMAND_LINE_MAX + PARAMS_ROOM
        overlong, deadline = False, None
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
            if deadline is None and (self.buf or overlong):
                deadline = time.monotonic() + self.cfg.timeout
            self.buf += self.fill(idle=self.tx is None, deadline=deadline)

    # -- dispatch ------------------------------------------------------------

    def dispatch(self, line):
        """Answer one command; False ends the session."""
        if line is None:
            self.reply(R_LINE_TOO_LONG)
            return True
        if self.cfg.debug:
            log.debug("%s < %r", self.peer, line)
        line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        verb, _, arg = line.partition(b" ")
        verb = verb.upper()
        if len(line) + 2 > COMMAND_LINE_MAX and verb not in (b"MAIL", b"RCPT"):
            self.reply(R_LINE_TOO_LONG)
            return True
        handler = self.HANDLERS.get(verb)
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
        return handler(self, arg) is not False

    # -- verbs ---------------------------------------------------------------

    def smtp_HELO(self, arg):
        if not arg:
            return self.reply(R_SYNTAX.format("HELO hostname"))
        self.greet(arg, "SMTP")
        self.reply(f"250 {self.cfg.hostname}")

    def smtp_EHLO(self, arg):
        if not arg:
            return self.reply(R_SYNTAX.format("EHLO hostname"))
        self.greet(arg, "ESMTP")
        limit = self.cfg.data_size_limit
        lines = [self.cfg.hostname, "PIPELINING", f"SIZE {limit}" if limit else "SIZE",
                 "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8"]
        if self.trusted:
            lines.append("XFORWARD " + " ".join(XFORWARD_ATTRS))
        lines.append("HELP")
        self.reply("\r\n".join(f"250-{text}" for text in lines[:-1]) + f"\r\n250 {lines[-1]}")

    def greet(self, name, proto):
        """RFC 5321 4.1.4: a new EHLO ends any transaction; XFORWARD attributes stay."""
        self.end_transaction()
        self.helo, self.proto = name, proto

    def smtp_MAIL(self, arg):
        if self.helo is None:
            return self.reply(R_SEQUENCE.format("send HELO/EHLO first"))
        if self.tx is not None:
            return self.reply(R_SEQUENCE.format("nested MAIL command"))
        parsed = parse_path(arg, "FROM:")
        if parsed is None:
            return self.reply(R_SYNTAX.format("MAIL FROM:<address> [parameters]"))
        sender, params = parsed
        if sender and not valid_address(sender):
            return self.reply(R_BAD_SENDER)
        problem = self.check_mail_params(params)
        if problem:
            return self.reply(problem)
        tx = Transaction(sender, params)
        answer = self.server.mode.on_mail(self.client(), tx)
        if answer is None or answer.startswith("2"):
            self.tx = tx
        self.reply(answer or R_MAIL_OK)

    def check_mail_params(self, params):
        """Unknown parameters are kept and relayed: Postfix passes its clients' through."""
        for param in params:
            name, _, value = param.partition("=")
            name = name.upper()
            if name == "SIZE":
                if not (value.isascii() and value.isdigit()):
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
        if (self.cfg.max_recipients
                and len(self.tx.rcpts) + len(self.tx.refused) >= self.cfg.max_recipients):
            return self.reply(R_TOO_MANY_RCPTS)
        answer = self.server.mode.on_rcpt(self.client(), self.tx, rcpt, params)
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
        answer = self.server.mode.on_data(self.client(), self.tx)
        if answer and not answer.startswith("3"):
            return self.reply(answer)
        self.reply(R_DATA_GO)
        message, problem = self.read_data()
        tx, self.tx, xforward, self.xforward = self.tx, None, self.xforward, {}
        if problem:
            self.server.mode.on_reset(self.client(xforward), tx)
            self.server.metrics.count("mms_messages_total", "too_big")
            return self.reply(problem)
        try:
            answer = receive_message(self.server, self.client(xforward), tx, message)
        finally:
            message.close()
        self.reply(answer)

    def smtp_RSET(self, arg):
        self.abort_transaction()
        self.reply(R_OK)

    def client(self, xforward=None):
        return Client(self.peer, self.client_address[1], self.helo, self.proto,
                      dict(self.xforward if xforward is None else xforward))

    def smtp_NOOP(self, arg):
        self.reply(R_OK)

    def smtp_QUIT(self, arg):
        self.reply(R_BYE)
        return False

    def smtp_HELP(self, arg):
        self.reply(R_HELP.format(self.VERBS))

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
            self.server.mode.on_reset(self.client(), self.tx)
        self.tx = None

    # The verbs: those with an smtp_VERB method above, in their order, for HELP; and
    # each one's method by the verb's bytes, for dispatch.
    HANDLERS = {name[5:].encode(): method for name, method in list(locals().items())
                if name.startswith("smtp_")}
    VERBS = " ".join(verb.decode() for verb in HANDLERS)

    # -- DATA ----------------------------------------------------------------

    def read_data(self):
        """The message up to <CRLF>.<CRLF>, un-dot-stuffed, and a problem reply if any.

        Lines may be of any length: behind Postfix or amavisd-new a long line is
        message content, and refusing it would lose mail. Work and memory stay
        linear: each block is searched once and written out whole, but for a tail
        that may be the start of <CRLF>.<CRLF> (at most 4 bytes), carried to the next
        block. The buffer starts with a virtual CRLF, so that a '.' leading the first
        line is found as '\r\n.'. Once a problem is found, the rest is drained in
        constant memory. The whole message must arrive within --data-timeout.
        """
        message, problem = Message(), None
        pending, skip = b"\r\n" + bytes(self.buf), 2
        self.buf.clear()
        deadline = time.monotonic() + self.cfg.data_timeout
        try:
            while True:
                end = pending.find(END_OF_DATA)
                cut = end + 2 if end >= 0 else len(pending) - partial_end(pending)
                if not problem and cut >= skip:
                    message.write(pending[:cut].replace(b"\r\n.", b"\r\n")[skip:])
                    skip = 0
                    limit = self.cfg.data_size_limit
                    if limit and message.size > limit:
                        problem = R_TOO_BIG
                        message.close()
                if end >= 0:
                    self.buf += pending[end + len(END_OF_DATA):]
                    return (None, problem) if problem else (message.finish(), None)
                pending = pending[cut:] + self.fill(deadline=deadline)
        except ClientGone:
            log.warning("lost connection after DATA (%d bytes) from %s", message.size,
                        self.xforward.get("ADDR") or self.peer)
            message.close()
            raise
        except BaseException:
            message.close()
            raise


def partial_end(block):
    """How many bytes at the end of block could begin <CRLF>.<CRLF>."""
    for n in (4, 3, 2, 1):
        if block.endswith(END_OF_DATA[:n]):
            return n
    return 0


def digest_of(pieces):
    """(sha256 as hex, size) of bytes that come in pieces: a message, stored or not."""
    digest, size = hashlib.sha256(), 0
    for piece in pieces:
        digest.update(piece)
        size += len(piece)
    return digest.hexdigest(), size


class Message:
    """The bytes of one message: in memory, or past SPOOL_THRESHOLD in a temporary
    file, so that many large messages never sit in memory at once. Every reader
    (store, relay, scanners, spool, debug output) takes it piece by piece."""

    PIECE = 2**20

    def __init__(self, data=b""):
        self.buffer, self.data, self.file, self.map = bytearray(), data, None, None
        self.size = len(data)

    @classmethod
    def from_file(cls, path):
        message = cls()
        message.file = open_regular(path)
        message.size = os.fstat(message.file.fileno()).st_size
        return message

    def write(self, block):
        self.size += len(block)
        if self.file is not None:
            self.file.write(block)
            return
        self.buffer += block
        if self.size > SPOOL_THRESHOLD:
            self.file = tempfile.TemporaryFile(prefix="mms-")
            self.file.write(self.buffer)
            self.buffer = bytearray()

    def finish(self):
        if self.file is None:
            self.data, self.buffer = bytes(self.buffer), bytearray()
        else:
            self.file.flush()
        return self

    def pieces(self, size=PIECE):
        """The bytes in order; os.pread, so that two readers (clamd and spamd) may
        read the same file at once."""
        if self.file is None:
            for at in range(0, self.size, size):
                yield self.data if self.size <= size else self.data[at:at + size]
            return
        fd, at = self.file.fileno(), 0
        while at < self.size and (piece := os.pread(fd, size, at)):
            at += len(piece)
            yield piece

    def sha256(self):
        """Of the bytes stored, so that `verify` can prove the archive unchanged."""
        return digest_of(self.pieces())[0]

    def head(self, limit):
        if self.file is None:
            return self.data[:limit]
        return os.pread(self.file.fileno(), limit, 0)

    def view(self):
        """What a plugin gets as data: bytes, or for a message in a file a read-only
        mmap of it, which slices and searches like bytes without filling memory."""
        if self.file is None:
            return self.data
        if self.map is None:
            self.map = mmap.mmap(self.file.fileno(), 0, access=mmap.ACCESS_READ)
        return self.map

    def prepend(self, line):
        """--real-rcpt's one header; a message in a file is copied once to a new file."""
        if self.file is None:
            self.data = line + self.data
        else:
            copied = tempfile.TemporaryFile(prefix="mms-")
            copied.write(line)
            for piece in self.pieces():
                copied.write(piece)
            copied.flush()
            self.close()
            self.file = copied
        self.size += len(line)

    def close(self):
        self.buffer, self.data = bytearray(), b""
        if self.map is not None:
            with contextlib.suppress(BufferError):
                self.map.close()
            self.map = None
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


RELAY_MODES = ("mongo-proxy", "mongo-filter")
PASSING_ACCEPT_ERRORS = (errno.ECONNABORTED, errno.EMFILE, errno.ENFILE, errno.ENOBUFS,
                         errno.ENOMEM)
CLOSED = "closed"   # what accept() returns once the listening socket is shut down


class SMTPServer(socketserver.ThreadingTCPServer):
    """Counts sessions, so that --max-connections, --max-connections-per-client and a
    graceful SIGTERM can see them, and holds the allow-list in force.

    In proxy and filter modes the allow-list defaults to --xforward-hosts: the
    after-filter sees every relayed message coming from mms's own address, and an
    after-filter set up as SMTPD_PROXY_README shows (permit_mynetworks with
    127.0.0.0/8) relays for it, so any other client would have an open relay.
    """

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, cfg, mode, metrics, plugins=()):
        self.cfg = cfg
        self.mode = mode
        self.metrics = metrics
        self.plugins = list(plugins)
        self.address_family = address_family(cfg.host)
        self.sessions = set()
        self.accepting = 0          # session threads waiting in accept()
        self.per_client = {}
        self.allow, self.allow_source = cfg.allow, "--allow"
        if not cfg.allow and cfg.server in RELAY_MODES:
            self.allow, self.allow_source = cfg.xforward_hosts, "--xforward-hosts"
        self.lock = threading.Lock()
        self.emptied = threading.Condition(self.lock)
        self.stopped = threading.Event()
        self.draining = False
        self.probe_token = None   # set by serve(), which writes it to its state file (state_path)
        super().__init__((cfg.host, cfg.port), SMTPSession)
        self.socket_family, self.socket_kind = int(self.socket.family), int(self.socket.type)
        self.member_cache = {}
        # accept() gives up after ACCEPT_TICK, so that a waiting thread sees a stop or
        # its idle time; a connection inherits the send timeout, and its session sets
        # its own read timeout once.
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, kernel_time(ACCEPT_TICK))
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, kernel_time(cfg.timeout))

    def start(self, row=0):
        """What each serving process does for itself, after any fork."""
        self.metrics.start(row)
        self.mode.start()

    # -- session threads -----------------------------------------------------

    IDLE_THREADS_MAX = 64       # session threads kept waiting for a connection
    IDLE_THREAD_SECONDS = 60    # and for how long, before one exits

    def serve_forever(self, poll_interval=0.5):
        """Session threads accept connections themselves (leader/follower): the
        kernel wakes one waiting thread, which serves the connection it accepted.
        Handing each connection from an accept loop to another thread cost two
        wake-ups and the GIL twice, and halved the rate at 20 sessions. The
        caller's thread only waits, looking up every poll_interval, since a wait
        without a timeout would hold back the signal handlers."""
        with self.lock:
            self.accepting += 1
        self.start_session_thread()
        while not self.stopped.wait(poll_interval):
            pass

    def shutdown(self):
        """Stop accepting; the sessions go on until drain()."""
        self.stopped.set()

    def start_session_thread(self):
        """Out of threads, the caller's session goes on, and connections wait in the
        listen queue until a session thread comes back to accept()."""
        try:
            threading.Thread(target=self.session_thread, name="mms-session", daemon=True).start()
        except RuntimeError as exc:
            with self.lock:
                self.accepting -= 1
            log.error("cannot start a session thread: %s", exc)

    def session_thread(self):
        """Accept and serve one connection after another. One thread always waits in
        accept(); at most IDLE_THREADS_MAX do, and one that has waited
        IDLE_THREAD_SECONDS for nothing exits, unless it is the last."""
        waiting_since = time.monotonic()
        while True:
            accepted = self.accept()
            if accepted is None or accepted is CLOSED:
                with self.lock:
                    if (accepted is CLOSED or self.stopped.is_set() or self.accepting > 1 and
                            time.monotonic() - waiting_since > self.IDLE_THREAD_SECONDS):
                        self.accepting -= 1
                        return
                continue
            with self.lock:
                spare = self.accepting == 1 and not self.stopped.is_set()
                self.accepting -= not spare  # the last one counts for its successor
            if spare:
                self.start_session_thread()
            self.serve(*accepted)
            with self.lock:
                if self.accepting >= self.IDLE_THREADS_MAX or self.stopped.is_set():
                    return
                self.accepting += 1
            waiting_since = time.monotonic()

    def accept(self):
        """(connection, address); None after ACCEPT_TICK or a passing error; CLOSED
        once the listening socket is shut down. The socket module's accept()
        converts the family and type to enums, which costs more than the system
        call."""
        try:
            fd, address = self.socket._accept()
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno not in PASSING_ACCEPT_ERRORS:
                return CLOSED
            if exc.errno != errno.ECONNABORTED:
                log.warning("cannot accept a connection: %s", exc.strerror)
                time.sleep(0.1)
            return None
        return socket.socket(self.socket_family, self.socket_kind, 0, fileno=fd), address

    def shutdown_request(self, request):
        """close() alone: nothing else holds the socket, and the shutdown(SHUT_WR)
        that socketserver adds was one more system call for each connection."""
        close_now(request)

    def serve(self, request, client_address):
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)

    def member(self, peer, networks):
        """Whether peer is in --allow or --xforward-hosts (lists that live as long as
        the server): asked on every connection, so answered from a cache."""
        key = (peer, id(networks))
        found = self.member_cache.get(key)
        if found is None:
            found = in_networks(peer, networks)
            if len(self.member_cache) < 10_000:
                self.member_cache[key] = found
        return found

    def handle_error(self, request, client_address):
        """A connection reset before its session began is no error; anything else is
        a bug, logged, and costs that connection only."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        log.exception("connection from %s failed", client_address[0])

    def enter(self, session):
        """None if the session may start, else why not."""
        cfg, peer = self.cfg, session.peer
        with self.lock:
            if cfg.max_connections and len(self.sessions) >= cfg.max_connections:
                return "refused_limit"
            count = self.per_client.get(peer, 0)
            if (cfg.max_connections_per_client and count >= cfg.max_connections_per_client
                    and not session.trusted):
                return "refused_client_limit"
            self.per_client[peer] = count + 1
            self.sessions.add(session)
            self.metrics.set("sessions", len(self.sessions))
            return None

    def leave(self, session):
        with self.lock:
            if session in self.sessions:
                self.sessions.discard(session)
                count = self.per_client.pop(session.peer) - 1
                if count:
                    self.per_client[session.peer] = count
                self.metrics.set("sessions", len(self.sessions))
            self.emptied.notify_all()

    def server_close(self):
        """Closing the descriptor would leave the threads waiting in accept() with
        the socket still listening. A worker shares it, and leaves that to the
        master; its threads see the stop within ACCEPT_TICK."""
        if self.cfg.workers == 1:
            self.stop_listening()
        super().server_close()

    def stop_listening(self):
        """Wakes the threads waiting in accept(), and frees the port at once."""
        with contextlib.suppress(OSError):
            self.socket.shutdown(socket.SHUT_RDWR)

    def drain(self, grace):
        """Stop listening, close idle sessions with 421, give the others `grace` seconds.

        An idle session is blocked in recv(); shutting down its reading side wakes
        it, and it answers 421. Sessions in a transaction are left to finish.
        """
        self.draining = True
        self.shutdown()
        self.server_close()
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

def receive_message(server, client, tx, message):
    """From the final dot to the reply: metadata, then plugins, then the mode, with
    the services the server holds (its settings, mode, metrics and plugins)."""
    cfg, metrics, mode = server.cfg, server.metrics, server.mode
    metadata = make_metadata(client, tx, message)
    if cfg.real_rcpt:
        apply_real_rcpt(metadata, message, cfg.max_recipients)
    metadata["sha256"] = message.sha256()
    if cfg.server != "debug":
        metadata.update(completed_fields(message.pieces(), cfg.index_text, metadata["sender"]))
    run_plugins(server.plugins, metadata, message, cfg.plugin_timeout, metrics)
    if is_probe(client, message, server.probe_token):   # `mms.py check`: stored, then
        metadata["probe"] = True                         # deleted by check
    answer = mode.on_message(client, tx, metadata, message)
    outcome = mode.outcome(tx, answer)
    queued = answer.startswith("250")
    if metadata.get("probe"):
        metrics.count("mms_probes_total")
        log.debug("probe %s: %s", metadata["store_key"], answer)
        return answer
    metrics.count("mms_received_bytes_total", amount=message.size)
    metrics.count("mms_messages_total", outcome)
    downstream = metadata.get("downstream_reply")
    log.log(logging.INFO if queued else logging.WARNING,
            "%s from=<%s> to=<%s> size=%d client=%s result=%s%s",
            f"queued as {metadata['store_key']}" if queued else f"not queued ({answer})",
            metadata["sender"], logged_rcpts(metadata["rcpt"]), message.size,
            metadata["client_address"], outcome,
            f" downstream=({downstream})" if downstream else "")
    return answer


PROBE_RE = re.compile(rb"X-MMS-Probe: ([0-9a-f]{32})\r\n")  # check's probe begins with it


def is_probe(client, message, token):
    """The probe of `mms.py check`: from loopback, with the token this server wrote to
    its state file (state_path), which only the user mms runs as can read."""
    found = token and PROBE_RE.match(message.head(4096))   # in C, for every message
    if not found or not ipaddress.ip_address(client.peer).is_loopback:
        return False
    return hmac.compare_digest(found.group(1), token.encode())


LOGGED_RCPTS = 5   # a line stays under rsyslog's 8 KB with 1,000 recipients


def logged_rcpts(rcpts):
    more = f",... and {len(rcpts) - LOGGED_RCPTS} more" if len(rcpts) > LOGGED_RCPTS else ""
    return ",".join(rcpts[:LOGGED_RCPTS]) + more


class StoreKeys:
    """Store keys nobody can guess, without a system call each: BLAKE2b of a counter,
    keyed with 32 random bytes that each process draws for itself. os.urandom per
    message was a getrandom call, and every system call hands the GIL over."""

    def __init__(self):
        self.reseed()
        os.register_at_fork(after_in_child=self.reseed)

    def reseed(self):
        self.key, self.counter = os.urandom(32), itertools.count()

    def __call__(self):
        return hashlib.blake2b(next(self.counter).to_bytes(8, "big"), key=self.key,
                               digest_size=32).hexdigest()


new_store_key = StoreKeys()


def make_metadata(client, tx, message):
    """The seed's metadata document, plus fields that are cheap to search on."""
    addr = plain_address(without_ipv6_prefix(client.xforward.get("ADDR", "")))
    metadata = {
        "store_key": new_store_key(),
        "sender": tx.sender.strip().lower(),
        "rcpt": [r.strip().lower() for r in tx.rcpts],
        "rcpt_count": len(tx.rcpts),
        "rcpt_refused": dict(tx.refused),
        "client_address": addr or client.peer,
        "xforward": client.xforward,
        "server": client.peer,
        "received": datetime.datetime.now(datetime.timezone.utc),
        "message": None,
        "size": message.size,
    }
    metadata.update(header_fields(message.head(HEADER_BLOCK_MAX)))
    return metadata


HEADER_BLOCK_MAX = 256 * 1024   # header fields mms reads must begin within this
HEADER_VALUE_MAX = 16 * 1024    # and no more of one field than this is decoded
SENT_MAX = 256                  # a Date: longer than this is no date
UTC = datetime.timezone.utc
DAY = datetime.timedelta(days=1)


def header_values(head, names):
    """{name: value} for the first field of each name."""
    return {name: values[0] for name, values in header_lists(head, names).items()}


def header_lists(head, names, stop=None):
    """{name: [value, ...]} for the fields of these names, unfolded and cut at
    HEADER_VALUE_MAX, in time linear in the header's size; up to a field named
    `stop`, if given.

    Lines end at LF or CRLF only, for every field alike: a bare CR inside a
    Subject never starts an X-Envelope-To. The header ends at the first empty
    line, or at a line that is not a field (a missing blank line).
    """
    found, current = {}, None
    for line in header_block(head).split(b"\n"):
        if line.startswith((b" ", b"\t")):
            if current is not None and len(current) < HEADER_VALUE_MAX:
                current += b" " + line[1:].removesuffix(b"\r")
            continue
        name, colon, value = line.partition(b":")
        name = name.rstrip(b" \t")
        if not colon or not name or b" " in name:
            break
        name = name.lower()
        if name == stop:
            break
        current = None
        if name in names:
            current = bytearray(value.removesuffix(b"\r"))
            found.setdefault(name, []).append(current)
    return {name: [bytes(value[:HEADER_VALUE_MAX]).strip() for value in values]
            for name, values in found.items()}


def header_block(data):
    """The header up to and with the line ending before the first empty line."""
    ends = [at + 1 for at in (data.find(b"\n\n", 0, HEADER_BLOCK_MAX),
                              data.find(b"\n\r\n", 0, HEADER_BLOCK_MAX)) if at >= 0]
    return data[:min(ends)] if ends else data[:HEADER_BLOCK_MAX]


def header_fields(head):
    """subject, message_id and sent, each left out when absent or unreadable:
    a broken header never costs a message."""
    found = header_values(head, (b"subject", b"message-id", b"date"))
    fields = {}
    if b"subject" in found:
        fields["subject"] = decode_header_value(found[b"subject"])
    if found.get(b"message-id"):
        fields["message_id"] = found[b"message-id"].decode("utf-8", "replace").strip("<> ")
    if b"date" in found:
        sent = parse_date(found[b"date"])
        if sent is not None:
            fields["sent"] = sent
    return fields


DATE_RE = re.compile(r"(?:[A-Za-z]{3}, *)?(\d{1,2}) ([A-Za-z]{3}) (\d{4}) (\d\d):(\d\d):(\d\d) "
                     r"([+-])(\d\d)(\d\d)(?: \(.*\))?")
MONTHS = {name: number for number, name in enumerate(
    ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"), 1)}


def parse_date(raw):
    """The Date: in UTC, or None; a date that UTC cannot hold (31 Dec 9999 -1200) is none.
    The form that MTAs write (Postfix pads the day with a space: 'Mon,  7 Dec') is
    read by one regular expression, in 6 us where the email package takes 10; that
    package reads all the others, and two-digit years."""
    text = raw[:SENT_MAX].decode("ascii", "replace")
    try:
        match = DATE_RE.fullmatch(text)
        month = match and MONTHS.get(match.group(2).lower())
        if month and match.group(3) >= "0100":
            day, _, year, hour, minute, second, sign, zone_h, zone_m = match.groups()
            offset = datetime.timedelta(hours=int(zone_h), minutes=int(zone_m))
            if offset >= DAY:
                return None
            sent = datetime.datetime(int(year), month, int(day), int(hour), int(minute),
                                     int(second), tzinfo=UTC)
            return sent - offset if sign == "+" else sent + offset
        sent = email.utils.parsedate_to_datetime(text)
        return (sent if sent.tzinfo else sent.replace(tzinfo=UTC)).astimezone(UTC)
    except Exception:
        return None


ENCODED_WORD_RE = re.compile(r"=\?([^?\s*]+)(?:\*[^?\s]*)?\?([bBqQ])\?([^?\s]*)\?=")


def decode_header_value(raw):
    """RFC 2047 encoded words, or raw UTF-8 (RFC 6532); never an exception.

    One regular expression pass, linear in the value: the email package's decoder
    is quadratic on an unclosed '=?x?q?a' run and holds the GIL while it works.
    Whitespace between two encoded words is dropped, as RFC 2047 6.2 says.
    """
    text = raw.decode("utf-8", "replace")
    if "=?" not in text:
        return text
    parts, at, after_word = [], 0, False
    for match in ENCODED_WORD_RE.finditer(text):
        between = text[at:match.start()]
        if not (after_word and not between.strip()):
            parts.append(between)
        parts.append(decode_word(*match.groups()) or match.group(0))
        at, after_word = match.end(), True
    parts.append(text[at:])
    return "".join(parts)


def decode_word(charset, encoding, payload):
    with contextlib.suppress(Exception):
        if encoding in "qQ":
            raw = binascii.a2b_qp(payload.encode("ascii"), header=True)
        else:
            raw = base64.b64decode(payload + "=" * (-len(payload) % 4))
        return raw.decode(charset, "replace")
    return None


ADDRESS_IN_ANGLES_RE = re.compile(r"<([^<>\s]+)>")


def apply_real_rcpt(metadata, message, max_recipients):
    """amavisd-new quarantine copies: the real recipients are in the X-Envelope-To
    that amavisd-new prepends above its own Received:, the first one. Below it,
    the header is the sender's: an X-Envelope-To there would let a sender choose
    where `release` sends. Each address passes RCPT TO's check and counts toward
    --max-recipients; the rest are left out, and said so in the log.

    The envelope recipients (the quarantine addresses) are kept in a prepended
    X-MMS-RCPT header: the one change mms ever makes to a message.
    """
    head = message.head(HEADER_BLOCK_MAX)
    found = header_lists(head, (b"x-envelope-to",), stop=b"received").get(b"x-envelope-to")
    text = found[0].decode("utf-8", "replace") if found else ""
    named = ADDRESS_IN_ANGLES_RE.findall(text) or [a for a in re.split(r"[\s,]+", text) if a]
    real = [address for address in named if valid_address(address)]
    if max_recipients:
        real = real[:max_recipients]
    if len(real) < len(named):
        log.warning("%s: %d of the %d X-Envelope-To recipients left out (not an address, or "
                    "over --max-recipients)", metadata["store_key"], len(named) - len(real),
                    len(named))
    if not real:
        return
    eol = b"\r\n" if b"\r\n" in head[:4096] or not head else b"\n"
    line = "X-MMS-RCPT: " + ", ".join(f"<{r}>" for r in metadata["rcpt"])
    message.prepend(line.encode() + eol)
    metadata.update(rcpt=[r.lower() for r in real], rcpt_count=len(real), size=message.size,
                    quarantine_to=metadata["rcpt"])


AMAVIS_FIELDS = (b"x-quarantine-id", b"x-amavis-alert", b"x-envelope-from",
                 b"x-envelope-to-blocked", b"x-spam-flag", b"x-spam-score")
# An alert's first words, and the quarantine it means, in amavisd-new's own order.
AMAVIS_ALERTS = (("INFECTED", "virus"), ("BANNED", "banned"), ("SPAM", "spam"),
                 ("BAD HEADER", "bad-header"))
QUARANTINES = tuple(kind for _, kind in AMAVIS_ALERTS) + ("archive",)   # --quarantine


def amavis_fields(head):
    """What amavisd-new 2.13 says of a quarantine or archive copy, in the fields it
    prepends above its own Received: (the ones below are the sender's to write).
    Seen from it: a virus copy carries 'X-Amavis-Alert: INFECTED, message contains
    virus: NAME', a banned one 'BANNED, message contains TYPE,NAME', a spam one
    'X-Spam-Flag: YES' and no alert, and any of them 'BAD HEADER SECTION, ...'; one
    copy goes to the type's quarantine and the archive address at once."""
    found = {name: [value.decode("utf-8", "replace") for value in values]
             for name, values in header_lists(head, AMAVIS_FIELDS, stop=b"received").items()}
    if b"x-quarantine-id" not in found and b"x-envelope-from" not in found:
        return {}
    alerts = found.get(b"x-amavis-alert", [])
    spam = found.get(b"x-spam-flag", [""])[0].strip().upper() == "YES"
    kinds = {kind for alert in alerts for word, kind in AMAVIS_ALERTS
             if alert.upper().startswith(word)} | ({"spam"} if spam else set())
    fields = {"quarantine": next((kind for _, kind in AMAVIS_ALERTS if kind in kinds), "archive"),
              "is_virus": int("virus" in kinds), "is_banned": int("banned" in kinds),
              "is_spam": int(spam),
              "virus": [name.strip() for alert in alerts if alert.upper().startswith("INFECTED")
                        for name in alert.partition("virus:")[2].split(",") if name.strip()]}
    if b"x-quarantine-id" in found:
        fields["quarantine_id"] = found[b"x-quarantine-id"][0].strip("<> ")
    for name, field in ((b"x-envelope-from", "envelope_from"),
                        (b"x-envelope-to-blocked", "rcpt_blocked")):
        if name in found:
            addresses = [a.lower() for a in ADDRESS_IN_ANGLES_RE.findall(" ".join(found[name]))]
            fields[field] = addresses[0] if field == "envelope_from" and addresses else addresses
    with contextlib.suppress(KeyError, ValueError):
        fields["spam_score"] = float(found[b"x-spam-score"][0])
    return fields


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
            raise ConfigError(f"plugin {name!r} cannot be imported: {exc}")
        if not callable(getattr(module, "apply", None)):
            raise ConfigError(f"plugin {name!r} has no apply(metadata, data)")
        plugins.append(module)
    return plugins


PLUGIN_HUNG_MAX = 16   # threads of one plugin past --plugin-timeout, before it is skipped


def run_plugins(plugins, metadata, message, timeout, metrics):
    """Each plugin edits a copy of the metadata, in a thread of its own. What it left
    is copied again the moment it returns (a thread of its own may go on changing
    its copy), and kept only if the plugin returned within --plugin-timeout and
    left metadata that mms can still store and log; otherwise the message goes on
    as if the plugin had not run. A plugin that hangs keeps its thread, never the
    session, and past PLUGIN_HUNG_MAX such threads it is skipped until some return;
    one that raises SystemExit has failed, like any other."""
    for plugin in plugins:
        edited, outcome = copy.deepcopy(metadata), []
        hung = f"plugin-{plugin.__name__}-hung"
        if sum(thread.name == hung for thread in threading.enumerate()) >= PLUGIN_HUNG_MAX:
            metrics.count("mms_plugin_errors_total", plugin.__name__)
            log.warning("plugin %s skipped on %s: %d of its threads never returned",
                        plugin.__name__, metadata["store_key"], PLUGIN_HUNG_MAX)
            continue

        def apply(plugin=plugin, edited=edited, outcome=outcome):
            try:
                plugin.apply(metadata=edited, data=message.view())
                taken = copy.deepcopy(edited)
                check_storable(taken, metadata)
                outcome.append((taken, None))
            except BaseException as exc:
                outcome.append((None, exc))

        worker = threading.Thread(target=apply, name=f"plugin-{plugin.__name__}", daemon=True)
        worker.start()
        worker.join(timeout)
        if outcome and outcome[0][1] is None:
            metadata.clear()
            metadata.update(outcome[0][0])
            continue
        metrics.count("mms_plugin_errors_total", plugin.__name__)
        if not outcome:
            worker.name = hung        # counted until it returns, if ever
            log.warning("plugin %s took more than %gs on %s; the message goes on without it",
                        plugin.__name__, timeout, metadata["store_key"])
        else:
            error = outcome[0][1]
            log.error("plugin %s failed on %s (%s: %s); its changes are undone, the message "
                      "goes on", plugin.__name__, metadata["store_key"], type(error).__name__,
                      error, exc_info=error)


def check_storable(edited, before):
    """The fields mms itself needs stay as they were made, and the rest stays BSON."""
    for field in ("store_key", "message"):
        if edited.get(field, "missing") != before[field]:
            raise ValueError(f"{field} must not change")
    if not (isinstance(edited.get("sender"), str) and isinstance(edited.get("rcpt"), list)
            and all(isinstance(r, str) for r in edited["rcpt"])
            and isinstance(edited.get("client_address"), str)):
        raise ValueError("sender, rcpt and client_address must stay strings")
    try:
        import bson
    except ImportError:  # debug mode without pymongo: nothing will be stored
        return
    bson.encode(edited)


###############################################################################
# The message pipeline: parsing ###############################################
###############################################################################

MIME_DEPTH_MAX = 50          # multiparts and messages inside one another (here and in
MIME_PARTS_MAX = 5000        # the console's message view); past it, the rest are not
PART_HEAD_MAX = 64 * 1024    # of one part's header
PARSE_SECONDS = 5            # a parse that takes longer stops, and says so
DECODE_BLOCK = 64 * 1024     # encoded bytes decoded at a time
NOT_BASE64_RE = re.compile(rb"[^A-Za-z0-9+/]")
WORD_RE = re.compile(r"\w+")   # a word, as the text field keeps it and --text finds it
NOT_WORD_RE = re.compile(r"\W+")
UNSAFE_CODECS = {"idna", "punycode", "unicode_escape", "raw_unicode_escape", "undefined",
                 "uu_codec"}   # codecs no mail is in (idna: CVE-2022-45061)


def completed_fields(pieces, text_max, sender):
    """The seed's "completed" document (files, files_count, is_bounce,
    parsing_errors, errors_count, completed: 1) and the words to index (text, up
    to text_max bytes, and index_text, that limit), from one pass over the
    message's bytes (MimeScan). A message that cannot be parsed is stored all the
    same, with what went wrong in parsing_errors."""
    scan = MimeScan(text_max)
    try:
        for piece in pieces:
            scan.feed(piece)
        scan.close()
    except StopParse as exc:
        scan.error(str(exc))
    except Exception as exc:        # a parser bug must never cost a message
        scan.error(f"parse failed: {type(exc).__name__}")
    fields = scan.fields()
    fields["is_bounce"] = int(scan.bounce or sender == "")
    return fields


class StopParse(Exception):
    pass


class MimePart:
    """One entity of the message: its header, then how its body is read."""

    def __init__(self, depth):
        self.depth = depth
        self.head = bytearray()
        self.in_head = True
        self.encoded = bytearray()  # a leaf's body, not yet decoded
        self.encoding = ""
        self.file = None            # the files entry of an attachment
        self.sha = None
        self.text = None            # "plain" or "html": the body's words
        self.charset = "utf-8"


class MimeScan:
    """A streaming MIME reader: lines in, the parts' structure out, in time linear
    in the message and memory bounded by its limits (depth, parts, a part's
    header, the text kept), not by the message's size. Attachments are hashed
    as they are decoded; text and HTML parts are kept up to text_max bytes."""

    def __init__(self, text_max):
        self.text_max = text_max
        self.files, self.errors, self.texts = [], [], []
        self.text_size = 0
        self.parts = 0
        self.bounce = False
        self.from_name = self.subject = self.headers = None
        self.boundaries = []        # (--boundary, depth) of the open multiparts, outermost first
        self.part = MimePart(0)
        self.rest = b""
        self.lines = 0
        self.deadline = time.monotonic() + PARSE_SECONDS

    def error(self, text):
        if len(self.errors) < 20 and text not in self.errors:
            self.errors.append(text)

    def feed(self, piece):
        """Headers a line at a time; a body in runs of lines up to the next one that
        may be a boundary (it begins with --), or to the end of what came when no
        multipart is open: a 100 KB body is a few slices, not 1,300 lines."""
        data, at = self.rest + piece if self.rest else piece, 0
        while (end := data.find(b"\n", at)) >= 0:
            if (self.part is None or not self.part.in_head) and data[at:at + 2] != b"--":
                following = data.find(b"\n--", at) if self.boundaries else -1
                end = following if following >= 0 else data.rfind(b"\n")
                self.body(data, at, end + 1)
            else:
                self.line(data[at:end + 1])
            at = end + 1
            self.lines += 1
            if self.lines % 10000 == 0 and time.monotonic() > self.deadline:
                raise StopParse(f"parsing stopped after {PARSE_SECONDS} s: the rest is "
                                f"not looked into")
        self.rest = data[at:]
        if len(self.rest) > PART_HEAD_MAX:       # a line with no end: read in pieces
            self.line(self.rest)
            self.rest = b""

    def close(self):
        if self.rest:
            self.line(self.rest)
        self.end_part()
        if self.boundaries:
            self.error("a multipart is not closed (the message is cut short?)")

    def line(self, line):
        if self.boundaries and line[:2] == b"--":
            marker = line.rstrip(b"\r\n\t ")
            for at in range(len(self.boundaries) - 1, -1, -1):
                boundary = self.boundaries[at][0]
                if marker == boundary or marker == boundary + b"--":
                    return self.boundary(at, marker != boundary)
        part = self.part
        if part is not None and part.in_head:
            if line in (b"\n", b"\r\n"):
                return self.body_begins(part)
            if len(part.head) < PART_HEAD_MAX:
                part.head += line
            return
        self.body(line, 0, len(line))

    def body(self, data, start, stop):
        """Whole lines of the open part's body, data[start:stop] (of a preamble or an
        epilogue: none), taken a DECODE_BLOCK at a time, cut at a line's end; of a
        text part, only what text_max can keep."""
        part = self.part
        if part is None or (part.sha is None and not part.text):
            return
        if part.sha is None:
            stop = min(stop, start + 2 * (self.text_max - self.text_size) - len(part.encoded))
        while start < stop:
            cut = stop if stop - start <= DECODE_BLOCK else \
                (data.rfind(b"\n", start, start + DECODE_BLOCK) + 1 or start + DECODE_BLOCK)
            part.encoded += memoryview(data)[start:cut]
            start = cut
            if len(part.encoded) >= DECODE_BLOCK:
                self.decode(part)

    def boundary(self, at, last):
        """A line --boundary (or --boundary--) of the open multipart `at`: what was
        open inside it ends."""
        self.end_part()
        del self.boundaries[at + 1:]
        if last:
            self.boundaries.pop()
            self.part = None
        else:
            self.part = self.new_part(self.boundaries[at][1] + 1)

    def new_part(self, depth):
        self.parts += 1
        if self.parts == MIME_PARTS_MAX + 1:
            self.error(f"more than {MIME_PARTS_MAX} parts: the rest are not looked into")
        return MimePart(depth) if self.parts <= MIME_PARTS_MAX else None

    def body_begins(self, part):
        part.in_head = False
        fields = header_values(bytes(part.head) + b"\n", (
            b"content-type", b"content-disposition", b"content-transfer-encoding",
            *((b"from", b"subject") if self.from_name is None else ())))
        ctype, params = content_type(fields.get(b"content-type"), "text/plain")
        disposition, dparams = content_type(fields.get(b"content-disposition"), "")
        if self.from_name is None:                      # the message's own header
            self.from_name = display_name(fields.get(b"from"))
            self.subject = decode_header_value(fields.get(b"subject", b""))
            self.headers = headers_document(bytes(part.head), self.error)
        part.encoding = fields.get(b"content-transfer-encoding", b"").decode(
            "ascii", "replace").strip().lower()
        if ctype == "multipart/report" and params.get("report-type", "").lower() == \
                "delivery-status" or ctype == "message/delivery-status":
            self.bounce = True
        if ctype.startswith("multipart/") or ctype == "message/rfc822":
            if part.depth >= MIME_DEPTH_MAX:
                self.error(f"parts nested deeper than {MIME_DEPTH_MAX}: not looked into")
                self.part = None
                return
        if ctype.startswith("multipart/"):
            boundary = params.get("boundary", "")
            if not boundary:
                self.error(f"a {ctype} without a boundary")
            else:
                self.boundaries.append((b"--" + boundary.encode("utf-8", "replace")[:200],
                                        part.depth))
                self.part = None                      # its preamble, until a boundary
                return
        if ctype == "message/rfc822" and part.encoding in ("", "7bit", "8bit", "binary"):
            self.part = MimePart(part.depth + 1)     # the message inside: its header next
            return
        name = dparams.get("filename") or params.get("name")
        text = ctype in ("text/plain", "text/html") and not name and \
            disposition != "attachment"
        if text:
            part.text = ctype[5:]
            part.charset = params.get("charset") or "us-ascii"
        else:
            part.file = {"filename": name or "", "ext": extension(name), "size": 0,
                         "content_type": ctype}
            part.sha = hashlib.sha256()

    def decode(self, part, last=False):
        """Decode what has gathered, to the last whole line (base64: whole quanta)."""
        data, part.encoded = bytes(part.encoded), bytearray()
        if part.encoding == "base64":
            data = NOT_BASE64_RE.sub(b"", data)
            cut = len(data) if last else len(data) - len(data) % 4
            data, rest = data[:cut], data[cut:]
            part.encoded += rest
            if last and len(data) % 4 == 1:
                self.error("a part's base64 is cut short")
                data = data[:-1]
            data = binascii.a2b_base64(data + b"=" * (-len(data) % 4))
        elif part.encoding == "quoted-printable":
            data = binascii.a2b_qp(data)
        if part.sha is not None:
            part.sha.update(data)
            part.file["size"] += len(data)
        elif self.text_size < self.text_max:
            kept = data[:self.text_max - self.text_size]
            self.text_size += len(kept)
            self.texts.append((part.text, part.charset, kept))

    def end_part(self):
        part, self.part = self.part, None
        if part is None or part.in_head:   # a multipart or a message is never self.part
            return
        if part.sha is not None or part.text:
            self.decode(part, last=True)
        if part.sha is not None:
            part.file["sha256"] = part.sha.hexdigest()
            self.files.append(part.file)

    def fields(self):
        """text: the words of the subject, the From name, the text parts and the
        attachments' names, one space apart (so that every server splits them
        alike: Quarterly.PDF is two words)."""
        words = [self.subject or "", self.from_name or ""] + [
            plain_text(kind, charset, data) for kind, charset, data in self.texts]
        words += [f["filename"] for f in self.files if f["filename"]]
        text = NOT_WORD_RE.sub(" ", " ".join(words)).strip()[:self.text_max]
        return {"headers": self.headers or {}, "files": self.files, "files_count": len(self.files),
                "is_bounce": int(self.bounce), "parsing_errors": self.errors,
                "errors_count": len(self.errors), "completed": 1,
                "index_text": self.text_max, **({"text": text} if text else {})}


MIME_PARAM_RE = re.compile(r'\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)\s*(?:;|$)')
HEADERS_MAX = 200                # fields of the message's own header kept in `headers`
HEADERS_SIZE_MAX = 32 * 1024     # and their decoded names and values, in all (README)
STRUCTURED_FIELDS = (b"content-type", b"content-disposition", b"content-transfer-encoding")


def headers_document(head, error):
    """The seed's `headers`: each field of the message's own header, its name as
    the seed writes it (Mime-Version), its value decoded (RFC 2047), the
    structured ones as [value, {parameter: value}], and a field that appears
    several times as a list of its values. At most HEADERS_MAX fields and
    HEADERS_SIZE_MAX of text: what is past them is left out, and said."""
    found, repeated, size, left = {}, set(), 0, 0
    for name, raw in header_pairs(head):
        if len(found) >= HEADERS_MAX or size >= HEADERS_SIZE_MAX:
            left += 1
            continue
        key = field_key("-".join(word.capitalize() for word in name.strip().split("-")))
        if name.strip().lower().encode() in STRUCTURED_FIELDS:
            kind, params = content_type(raw, "")
            value = [kind, {field_key(k): v for k, v in params.items()}]
            size += len(key) + len(kind) + sum(len(k) + len(str(v)) for k, v in params.items())
        else:
            value = decode_header_value(raw[:HEADER_VALUE_MAX])
            size += len(key) + len(value)
        if key not in found:
            found[key] = value
            continue
        if key not in repeated:
            found[key] = [found[key]]
            repeated.add(key)
        found[key].append(value)
    if left:
        error(f"headers: {left} field(s) past {HEADERS_MAX} fields or {HEADERS_SIZE_MAX} "
              f"bytes are not in headers")
    if len(head) >= PART_HEAD_MAX:
        error(f"headers: the header is over {PART_HEAD_MAX} bytes; the rest is not in headers")
    return found


def field_key(name):
    """A name as a MongoDB field's: no '.', no leading '$' (RFC 5322 allows both)."""
    name = name.replace(".", "_").replace("\0", "")
    return "_" + name[1:] if name.startswith("$") else name or "_"


def content_type(raw, default):
    """(type, {param: value}) of a Content-Type or Content-Disposition, lower-cased
    type, with RFC 2231 (filename*=utf-8''...) and RFC 2047 (name="=?utf-8?...")
    values decoded: what mail clients send and read."""
    text = (raw or b"").decode("utf-8", "replace")
    value, _, rest = text.partition(";")
    kind = value.strip().lower()[:100] or default
    params, pieces = {}, {}
    for match in itertools.islice(MIME_PARAM_RE.finditer(rest), 100):
        name, value = match.group(1).lower(), match.group(2).strip()
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        if "*" in name:                      # RFC 2231: name*=, name*0=, name*1*=
            base, _, index = name.partition("*")
            number = index.rstrip("*")
            pieces.setdefault(base, []).append(
                (int(number) if number.isdigit() else 0, value, name.endswith("*")))
            continue
        params[name] = decode_header_value(value.encode("utf-8", "replace"))
    for name, values in pieces.items():
        params[name] = rfc2231_value(sorted(values))
    return kind, params


def rfc2231_value(pieces):
    """charset'language'percent-encoded, over its numbered pieces."""
    charset, raw = "us-ascii", b""
    for n, (_, value, encoded) in enumerate(pieces):
        if encoded:
            if n == 0 and value.count("'") >= 2:
                charset, _, value = value.split("'", 2)
            raw += urllib.parse.unquote_to_bytes(value)
        else:
            raw += value.encode("utf-8", "replace")
    return decoded(raw, charset or "us-ascii")[:1000]


def decoded(raw, charset):
    """Bytes in a charset a sender named: an unknown one, or one no mail is in
    (idna and punycode are for host names), is read as UTF-8."""
    try:
        info = codecs.lookup(charset.strip().strip('"'))
        if info.name in UNSAFE_CODECS or not getattr(info, "_is_text_encoding", True):
            raise LookupError(charset)
        return raw.decode(info.name, "replace")
    except (LookupError, ValueError):
        return raw.decode("utf-8", "replace")


HTML_HIDDEN_RE = re.compile(rb"<(script|style)\b", re.I)
HTML_TAG_RE = re.compile(r"<[^>]*>")


def plain_text(kind, charset, data):
    """The words of a text part: HTML without its tags, scripts and styles."""
    if kind == "html":
        data = html_words(data)
    text = decoded(data, charset)
    if kind == "html":
        text = html.unescape(HTML_TAG_RE.sub(" ", text))
    return " ".join(text.split())


def html_words(data):
    """HTML without what is between <script> and </script> (and style), in one pass."""
    kept, at, lowered = [], 0, data.lower()
    while (found := HTML_HIDDEN_RE.search(data, at)) is not None:
        kept.append(data[at:found.start()])
        end = lowered.find(b"</" + found.group(1).lower(), found.end())
        if end < 0:
            return b" ".join(kept)
        at = end
    kept.append(data[at:])
    return b" ".join(kept)


def extension(name):
    """invoice.PDF.exe: exe, lower-cased, as --attachment '*.exe' looks it up."""
    base, dot, ext = (name or "").rpartition(".")
    return ext.strip().lower()[:20] if dot and base else ""


def display_name(raw):
    """The name of From: "Bertrand Auger" <a@example.org>, decoded; '' if none."""
    if not raw:
        return ""
    name, _ = email.utils.parseaddr(decode_header_value(raw[:1000]))
    return name[:200]


###############################################################################
# The message pipeline: scanners ##############################################
###############################################################################

class ScanError(Exception):
    """A scanner is down, too slow, or answered something unexpected."""


SCANNER_REPLY_MAX = 64 * 1024


def ask(address, request, timeout):
    """Send a request and read the whole answer, within `timeout` seconds in all (a
    scanner that trickles is as late as a silent one): both daemons close after
    replying."""
    deadline = time.monotonic() + timeout

    def within(sock):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no answer within {timeout:g} s")
        sock.settimeout(left)
        return sock

    try:
        with socket.create_connection(address, timeout=timeout) as sock:
            for part in request:
                within(sock).sendall(part)
            answer = b""
            while len(answer) < SCANNER_REPLY_MAX and (chunk := within(sock).recv(4096)):
                answer += chunk
                if answer.endswith(b"\0"):
                    break
            return answer
    except OSError as exc:
        raise ScanError(f"{address[0]}:{address[1]}: {exc}") from None


# What `check` and filter mode's start ask each scanner, and the answer that says it is up.
SCANNER_PINGS = (("clamd", [b"zPING\0"], b"PONG"), ("spamd", [b"PING SPAMC/1.5\r\n\r\n"], b"PONG"))


def clamd_request(message, chunk=64 * 1024):
    yield b"zINSTREAM\0"
    for piece in message.pieces(chunk):
        yield len(piece).to_bytes(4, "big") + piece
    yield b"\0\0\0\0"


def clamd_scan(address, message, timeout):
    """clamd's INSTREAM: 'stream: OK' or 'stream: <Name> FOUND'."""
    raw = ask(address, clamd_request(message), timeout).rstrip(b"\0").decode("utf-8", "replace")
    if raw.endswith(" FOUND"):
        return {"virus": [raw[:-len(" FOUND")].split(": ", 1)[-1]], "raw": raw}
    if raw.endswith(": OK"):
        return {"virus": [], "raw": raw}
    raise ScanError(f"clamd answered {raw!r}")


SPAMD_RESULT_RE = re.compile(r"^Spam: (True|False|Yes|No) ; (-?[\d.]+) / (-?[\d.]+)\s*$",
                             re.MULTILINE | re.IGNORECASE)


def spamd_tell(address, data, kind, timeout):
    """SPAMC/1.5 TELL, as `spamc -L spam|ham` sends it: spamd's Bayes learns the
    message as spam or ham (Set: local). ScanError says why it did not."""
    head = (f"TELL SPAMC/1.5\r\nMessage-class: {kind}\r\nSet: local\r\n"
            f"Content-length: {len(data)}\r\n\r\n").encode()
    status = ask(address, [head, data], timeout).decode("utf-8", "replace").partition("\r\n")[0]
    if not status.startswith("SPAMD/") or " 0 " not in status:
        more = " (spamd runs without --allow-tell)" if "allow-tell" in status else ""
        raise ScanError(f"spamd at {address[0]}:{address[1]} did not learn it: "
                        f"{status.strip()!r}{more}")
    return status


def spamd_scan(address, message, timeout):
    """SPAMC/1.5 SYMBOLS: the verdict in a 'Spam:' header, the rule names in the body."""
    head = f"SYMBOLS SPAMC/1.5\r\nContent-length: {message.size}\r\n\r\n".encode()
    raw = ask(address, itertools.chain([head], message.pieces()), timeout).decode("utf-8", "replace")
    status, _, rest = raw.partition("\r\n")
    match = SPAMD_RESULT_RE.search(rest)
    if not status.startswith("SPAMD/") or " 0 " not in status or not match:
        raise ScanError(f"spamd answered {status!r}")
    body = rest.split("\r\n\r\n", 1)[1] if "\r\n\r\n" in rest else ""
    return {"is_spam": match.group(1).lower() in ("true", "yes"),
            "score": float(match.group(2)), "required": float(match.group(3)),
            "symbols": [s for s in body.strip().split(",") if s], "raw": match.group(0).strip()}


def scan(cfg, message, metrics, spam=True):
    """Ask clamd and spamd (unless not spam) at the same time, so the wait is the
    slower of the two.

    Returns the metadata fields mongo-mail-web knows, plus 'scan' with each
    scanner's own answer or error.
    """
    fields = {"is_virus": 0, "virus": [], "is_spam": 0, "is_unchecked": 0, "scan": {}}
    if message.size > cfg.scan_max_size:
        fields["is_unchecked"] = 1
        fields["scan"]["skipped"] = f"message over --scan-max-size ({cfg.scan_max_size} bytes)"
        return fields
    results = {}

    def run(name, scanner, address):
        started = time.monotonic()
        try:
            results[name] = scanner(address, message, cfg.scan_timeout)
        except Exception as exc:  # whatever went wrong, the message was not scanned
            results[name] = exc if isinstance(exc, ScanError) else ScanError(
                f"{name} at {address[0]}:{address[1]}: {type(exc).__name__}: {exc}")
        metrics.observe("mms_scan_seconds", time.monotonic() - started, name)

    jobs = [("clamd", clamd_scan, cfg.clamd), ("spamd", spamd_scan, cfg.spamd if spam else None)]
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


# The positive replies RFC 5321 4.3.2 names for each step; any well-formed 4xx or
# 5xx is a refusal and passes through. Anything else is a broken downstream.
POSITIVE_REPLIES = {"greeting": ("220",), "EHLO": ("250",), "XFORWARD": ("250",),
                    "MAIL": ("250",), "RCPT": ("250", "251", "252"), "DATA": ("354",),
                    "end of data": ("250",), "QUIT": ("221",)}
REPLY_CODE_RE = re.compile(r"[2-5][0-5][0-9]\Z")


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
        try:
            self.expect(self.reply("greeting"), "greeting")
            self.extensions = self.ehlo()
        except BaseException:
            self.file.close()
            self.sock.close()
            raise

    def reply(self, step):
        """A whole reply, multi-line included, exactly as the server sent it (CRLF
        joined), once it is known to be a reply that `step` may get."""
        lines = []
        try:
            while len(lines) < self.REPLY_LINES_MAX:
                line = self.file.readline(self.REPLY_LINE_MAX)
                if not line.endswith(b"\n"):
                    raise DownstreamError("connection closed or reply line too long")
                text = line.rstrip(b"\r\n").decode("utf-8", "replace")
                if len(text) < 3 or text[3:4] not in ("", " ", "-"):
                    raise DownstreamError(f"not an SMTP reply: {text!r}")
                lines.append(text)
                if text[3:4] != "-":
                    return self.checked("\r\n".join(lines), step)
        except OSError as exc:
            raise DownstreamError(str(exc)) from None
        raise DownstreamError("reply has too many lines")

    @staticmethod
    def checked(reply, step):
        """RFC 5321 4.2.1: every line of a reply carries the same code. A reply read by
        its first line and passed on to be read by its last must not differ."""
        code = reply[:3]
        if any(line[:3] != code for line in reply.split("\r\n")):
            raise DownstreamError(f"reply to {step} mixes codes: {reply!r}")
        if not REPLY_CODE_RE.match(code) or (code[0] in "23" and code not in POSITIVE_REPLIES[step]):
            raise DownstreamError(f"{code} is no reply to {step}: {reply!r}")
        return reply

    def command(self, line):
        """Send a command; its reply, checked against what its verb may get."""
        self.send(line.encode() + b"\r\n")
        return self.reply(line.split(" ", 1)[0].upper())

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

    def data_and_message(self, message):
        answer = self.data()
        return self.message(message) if self.in_data else answer

    def message(self, message):
        """Send DATA content piece by piece, dot-stuffed after every LF: a downstream
        that ends lines on a bare LF must not see '<LF>.<CRLF>' as the end of data
        (SMTP smuggling)."""
        last, pending = b"\r\n", b""
        for piece in message.pieces():
            if pending:
                self.send(pending)
            pending = piece.replace(b"\n.", b"\n..")
            if last.endswith(b"\n") and piece.startswith(b"."):
                pending = b"." + pending
            last = piece[-2:] if len(piece) >= 2 else (last + piece)[-2:]
        self.send(pending + (b".\r\n" if last == b"\r\n" else b"\r\n.\r\n"))
        self.in_data = False
        return self.reply("end of data")

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

def gridfs_content(message, chunk_size):
    """base64(zlib(message)), cut in GridFS chunks, made piece by piece: a large
    message is never held whole, compressed or encoded, in memory.

    The window is no larger than the message needs (512 bytes to zlib's 32 KiB):
    the same compressed bytes, but a 1 KB message took 51 us to compress with a
    32 KiB window, and 17 us with 2 KiB. zlib.decompress reads any window size."""
    raw = chunk_size // 4 * 3              # raw bytes behind one full base64 chunk
    window = min(max(message.size.bit_length(), 9), zlib.MAX_WBITS)
    pending = bytearray()
    if message.file is None:  # one call: zlib lets the GIL go at each, to the next thread
        pending += zlib.compress(message.data, 6, window)
    else:
        compressor = zlib.compressobj(6, zlib.DEFLATED, window)
        for piece in message.pieces():
            pending += compressor.compress(piece)
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
    """The SMTP path's way into the archive: group commit, and MongoDB's health.

    Concurrent messages are written together, three commands a batch (see
    Archive.insert). Index builds and pings run in a thread of their own, never in
    the write path: a missing index on a large collection, or a role without
    createIndex, must not turn every message into 451. One MongoClient per
    process, made after any fork.
    """

    BATCH_COUNT = 256
    BATCH_BYTES = 16 * 2**20
    PING_SECONDS = 5        # how often the keeper asks MongoDB (indexes, and /healthz)
    RETENTION_SECONDS = 3600  # how often --retention purges
    INDEX_RETRY_SECONDS = 600   # how often an index MongoDB refused is asked for again

    def __init__(self, cfg, metrics=None):
        self.cfg = cfg
        self.archive = Archive(cfg)
        self.tally = Tally(self.archive)
        self.indexes_tried, self.indexes_said = 0.0, set()
        self.queue = None
        self.metrics = metrics or NO_METRICS
        self.contacted = threading.Event()

    def start(self):
        """Serve from the first second: MongoDB is first asked in the background, and
        one that is down is not fatal: messages get 451 until it is back."""
        self.archive.connect(watch=index_watch(self))
        self.start_writer()
        threading.Thread(target=self.keep, name="mms-mongo", daemon=True).start()
        threading.Thread(target=self.tally.keep, name="mms-tally", daemon=True).start()
        if self.cfg.retention and self.metrics.row == 0:  # one worker purges
            threading.Thread(target=self.keep_retention, name="mms-retention", daemon=True).start()

    def keep_retention(self):
        while True:
            time.sleep(self.RETENTION_SECONDS)
            cut = datetime.datetime.now(UTC) - datetime.timedelta(days=self.cfg.retention)
            try:
                count = self.archive.purge({"received": {"$lt": cut}})
            except Exception as exc:
                log.error("--retention purge failed: %s", mongo_error(exc))
                continue
            if count:
                log.info("--retention: purged %d message(s) received before %s", count,
                         f"{cut:%Y-%m-%d %H:%M:%S} UTC")

    def keep(self):
        """First contact, then indexes whenever they may be gone, and pings."""
        self.greet()
        self.contacted.set()
        while True:
            time.sleep(self.PING_SECONDS)
            if self.archive.indexed is False or not self.archive.indexed and \
                    time.monotonic() - self.indexes_tried > self.INDEX_RETRY_SECONDS:
                self.build_indexes()
            if self.cfg.metrics:
                self.ping()

    def greet(self):
        try:
            version = self.archive.client.server_info().get("version") or "unknown"
            self.metrics.set("mongo_ok_at", time.time())
            log.info("connected to MongoDB %s (version %s), database %s, collection %s, "
                     "write concern %s", redact(self.cfg.mongo_host), version,
                     self.cfg.mongo_database, self.cfg.mongo_collection,
                     self.archive.write_concern())
        except Exception as exc:
            self.metrics.set("mongo_failed_at", time.time())
            log.warning("MongoDB at %s is unreachable (%s): messages will be answered 451 "
                        "until it is back", redact(self.cfg.mongo_host), mongo_error(exc))
            return
        self.build_indexes()

    def build_indexes(self):
        """Each index MongoDB refuses is logged once, with what goes without it, and
        asked for again every INDEX_RETRY_SECONDS; mail is stored all the same."""
        import pymongo.errors
        self.indexes_tried = time.monotonic()
        try:
            self.archive.ensure_indexes()
        except pymongo.errors.ConnectionFailure as exc:
            if "unreachable" not in self.indexes_said:
                log.error("MongoDB cannot be reached to create the archive's indexes (%s): "
                          "%s until it is back; retrying every %ds", mongo_error(exc),
                          "mail is spooled" if self.cfg.server in RELAY_MODES else
                          "mail is answered 451", self.PING_SECONDS)
            self.indexes_said.add("unreachable")
            return
        except Exception as exc:          # hello refused: a role without clusterMonitor
            self.archive.missing = {"all": mongo_error(exc)}
            self.archive.indexed = None
        for name, cost in self.archive.missing.items():
            if name not in self.indexes_said:
                log.error("cannot create the index on %s: mail is stored, but %s; asked again "
                          "every %ds", name, cost, self.INDEX_RETRY_SECONDS)
        self.indexes_said = set(self.archive.missing)

    def ping(self):
        try:
            self.archive.ping()
            self.metrics.set("mongo_ok_at", time.time())
        except Exception:
            self.metrics.set("mongo_failed_at", time.time())

    def close(self):
        self.tally.flush()
        self.archive.close()

    def store(self, metadata, message):
        """Write the message and its metadata; any exception means 'not stored'.

        The message joins the next batch and this waits for that batch to be
        acknowledged. A large message writes its own chunks first, a few at a time.
        """
        started = time.monotonic()
        try:
            job = self.archive.prepare(metadata, message)
            self.queue.put(job)
            job.done.wait()
            if job.error is not None:
                raise job.error
        except Exception:
            self.metrics.count("mms_store_errors_total")
            self.metrics.set("mongo_failed_at", time.time())
            raise
        else:
            self.metrics.set("mongo_ok_at", time.time())
        finally:
            self.metrics.observe("mms_store_seconds", time.monotonic() - started)

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
            self.archive.insert(batch)
            for job in batch:
                job.done.set()
            self.tally.add(job.metadata for job in batch if job.error is None)


class Tally:
    """The dashboard's daily counts, kept as mail is stored: per day (UTC), messages
    and bytes by verdict, sender domain, recipient domain and client, so that the
    dashboard reads a few hundred counters, never the messages of 30 days.

    The writer adds each stored batch here, in memory, after its messages are
    acknowledged; this thread writes what has gathered once a second, one upsert
    per counter, in one command: SMTP never waits for it. While MongoDB is away the
    counts wait (up to PENDING_MAX counters); a kill loses at most a second's."""

    FLUSH_SECONDS = 1
    PENDING_MAX = 100_000

    def __init__(self, archive):
        self.archive = archive
        self.pending = {}
        self.lock = threading.Lock()
        self.flushing = threading.Lock()   # a flush returns once any under way is written
        self.failing = False

    def add(self, docs):
        self.merge(tallied(docs))

    def keep(self):
        while True:
            time.sleep(self.FLUSH_SECONDS)
            self.flush()

    def flush(self):
        with self.flushing:
            with self.lock:
                counts, self.pending = self.pending, {}
            if counts:
                self.write(counts)

    def write(self, counts):
        """A counter whose upsert failed is kept for the next flush; one that was
        written is not written again (an $inc twice would count twice)."""
        from pymongo.errors import BulkWriteError
        try:
            self.archive.add_counts(counts)
            self.failing = False
            return
        except BulkWriteError as exc:
            keys = list(counts)
            errors = exc.details.get("writeErrors") or []
            counts = {keys[error["index"]]: counts[keys[error["index"]]] for error in errors}
            trouble = errors[0].get("errmsg") if errors else \
                f"write concern: {exc.details.get('writeConcernErrors')}"
        except Exception as exc:
            trouble = mongo_error(exc)
        if not self.failing:
            log.warning("the daily counts wait: %s", trouble)
        self.failing = True
        self.merge(counts)

    def merge(self, counts):
        with self.lock:
            for key, (messages, size) in counts.items():
                counted = self.pending.setdefault(key, [0, 0])
                counted[0] += messages
                counted[1] += size
            if len(self.pending) > self.PENDING_MAX:   # MongoDB away for long: drop, and say
                log.error("the daily counts could not be written for a while: %d counters "
                          "dropped, and the dashboard counts less for those days",
                          len(self.pending))
                self.pending = {}


TALLIES = ("verdict", "sender-domain", "rcpt-domain", "client", "attachment-type")


def tallied(docs):
    """{(by, day, group): [messages, bytes]} that these stored messages add."""
    counts = {}
    for doc in docs:
        if not isinstance(doc.get("received"), datetime.datetime):
            continue                        # another tool's document: no day to count in
        size = doc["size"] if isinstance(doc.get("size"), int) else 0
        for key in tally_keys(doc):
            counted = counts.setdefault(key, [0, 0])
            counted[0] += 1
            counted[1] += size
    return counts


def tally_keys(doc):
    """(by, day, group) for each counter a stored message adds one to."""
    day = f"{doc['received'].astimezone(UTC):%Y-%m-%d}"
    yield "verdict", day, doc.get("verdict") or verdict(doc)
    yield "sender-domain", day, doc.get("sender_domain") or "<>"
    for rcpt_domain in doc.get("rcpt_domain") or ():
        yield "rcpt-domain", day, rcpt_domain
    yield "client", day, str(doc.get("client_address") or "-")[:64]
    files = doc.get("files") if isinstance(doc.get("files"), list) else ()
    for kind in {str(f.get("content_type"))[:100] for f in files if isinstance(f, dict)}:
        yield "attachment-type", day, kind
    if doc.get("is_allowed"):
        yield "list", day, "allowed"


def mongo_error(exc):
    """pymongo's message without the topology description it appends (a screenful)."""
    return str(exc).split(", Timeout: ", 1)[0].split(" (configured timeouts", 1)[0]


def index_watch(store):
    """A MongoDB found again after it was lost (restarted empty, or replaced) may
    have no indexes: the keeper creates them again, the unique store_key first."""
    from pymongo import monitoring

    class IndexWatch(monitoring.ServerListener):
        def opened(self, event):
            pass

        def description_changed(self, event):
            if not event.new_description.is_server_type_known:
                store.archive.indexed = False

        def closed(self, event):
            pass

    return IndexWatch()


CORE_FIELDS = ("store_key", "sender", "rcpt", "rcpt_count", "rcpt_refused", "client_address",
               "xforward", "server", "received", "message", "size", "sha256")


def storable(metadata, max_size=16 * 2**20):
    """Metadata that BSON can hold, within the server's maxBsonObjectSize: if a header
    or a plugin left something else, the message keeps mms's own fields and loses
    the rest, with a warning. Refused by the server, it would be 451 on every retry."""
    import bson
    try:
        if len(bson.encode(metadata)) > max_size:
            raise ValueError(f"the document is over the server's {max_size} bytes")
    except Exception as exc:
        log.warning("metadata of %s cannot be stored (%s): keeping only %s",
                    metadata.get("store_key"), exc, ", ".join(CORE_FIELDS))
        kept = {field: metadata[field] for field in CORE_FIELDS if field in metadata}
        metadata.clear()
        metadata.update(kept)
    return metadata


class Refused(Exception):
    """A spooled pair that replay will not store as it is: why, in a few words."""


STORE_KEY_RE = re.compile(r"[0-9a-f]{64}")
SPOOLED_METADATA_MAX = 17 * 2**20   # a BSON document is at most 16 MiB


def open_regular(path):
    """A regular file, opened without following a link (O_NOFOLLOW), for reading."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Refused("a symbolic link, not a regular file") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise Refused("not a regular file")
    return os.fdopen(fd, "rb")


def private(path):
    """A new file of mode 0600, never one that a link put there."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW,
                             0o600), "wb")


def read_private(option, path, size=16 * 2**20):
    """The bytes of a file that holds secrets, refused when others may read it."""
    try:
        with open_regular(path) as f:
            if os.fstat(f.fileno()).st_mode & 0o077:
                raise ConfigError(f"{option} {path} can be read by others: chmod 600 {path}")
            return f.read(size)
    except (OSError, Refused) as exc:
        raise ConfigError(f"{option} {path}: {exc}")


class Spool:
    """Messages that were delivered but could not be stored wait here for `replay`.

    Each is two files named by store_key: the raw message (.msg), then its
    metadata as BSON (.bson), written last and renamed into place, so that replay
    only ever sees complete pairs.
    """

    def __init__(self, path):
        self.path = path

    def check(self):
        """Writable by the user mms runs as. Made by root, it would be root's, and the
        same mms started later as its own user could not write there."""
        if not os.path.isdir(self.path) and os.geteuid() == 0:
            raise ConfigError(
                f"--spool-dir {self.path} does not exist: make it for the user mms runs as "
                f"(install -d -o mms -g mms {self.path})")
        try:
            os.makedirs(self.path, exist_ok=True)
            probe = os.path.join(self.path, ".probe")
            with open(probe, "w"):
                pass
            os.unlink(probe)
        except OSError as exc:
            raise ConfigError(f"--spool-dir {self.path} is not writable: {exc}")
        mode = stat.S_IMODE(os.stat(self.path).st_mode)
        if mode & 0o007:
            log.warning("--spool-dir %s is open to other users (mode %o): spooled mail is "
                        "private, chmod o-rwx it", self.path, mode)

    def waiting(self):
        """How many messages wait for `replay` (0 where the folder cannot be read)."""
        with contextlib.suppress(OSError):
            return sum(name.endswith(".bson") for name in os.listdir(self.path))
        return 0

    def put(self, metadata, message):
        """Both files, or neither (a full disk leaves no half pair behind); readable
        by the user mms runs as only, as Postfix keeps its queue."""
        import bson
        base = os.path.join(self.path, metadata["store_key"])
        try:
            with private(base + ".msg") as f:
                for piece in message.pieces():
                    f.write(piece)
                os.fsync(f.fileno())
            with private(base + ".tmp") as f:
                f.write(bson.encode(storable(metadata)))
                os.fsync(f.fileno())
            os.replace(base + ".tmp", base + ".bson")
        except BaseException:
            for suffix in (".msg", ".tmp"):
                with contextlib.suppress(OSError):
                    os.unlink(base + suffix)
            raise

    def replay(self, archive):
        """Store every spooled message; return (stored, {why: count} of what was left).

        The file name is the store key, and must be one. A message already in the
        archive (an earlier replay stored it, then died before removing its files)
        counts as stored, and its files go, only if the archived one has the same
        sha256. A message whose metadata never reached the disk (mms was killed
        between the two files) is stored with metadata rebuilt from its header:
        the envelope is lost, the message is not. replay is often run as root: a
        link or anything but a regular file is refused, never followed.
        """
        if not os.path.isdir(self.path):
            raise UsageError(f"spool directory {self.path} does not exist")
        stored, left = 0, collections.Counter()
        for key in sorted({name.rsplit(".", 1)[0] for name in os.listdir(self.path)
                           if name.endswith((".bson", ".msg"))}):
            try:
                if self.replay_one(archive, key):
                    stored += 1
            except Exception as exc:
                why = exc.args[0] if isinstance(exc, Refused) else "could not be stored"
                log.error("replay of %s: %s (%s); its files are left in %s", key, why, exc,
                          self.path)
                left[why] += 1
        return stored, left

    def replay_one(self, archive, key):
        """True once stored (or found archived already); False to wait (a .msg alone
        that a running server may still be writing)."""
        if not STORE_KEY_RE.fullmatch(key):
            raise Refused("not named by a store key")
        base = os.path.join(self.path, key)
        metadata = self.metadata(base)
        if metadata is None:
            return False
        if metadata.get("store_key") != key:
            raise Refused("its .bson names another store key")
        with contextlib.closing(Message.from_file(base + ".msg")) as message:
            archived = archive.find(key)
            if archived is None:
                archive.store(metadata, message)
            elif archive.sha256(archived) != message.sha256():
                raise Refused("another message is archived under its store key")
        for suffix in (".bson", ".tmp", ".msg"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(base + suffix)
        return True

    @staticmethod
    def metadata(base, settled=60):
        """The spooled metadata; rebuilt for a .msg alone once it is `settled` seconds
        old (younger, a running server may still be writing it); None to skip."""
        import bson
        if os.path.lexists(base + ".bson"):
            with open_regular(base + ".bson") as f:
                metadata = bson.decode(f.read(SPOOLED_METADATA_MAX),
                                       codec_options=bson.CodecOptions(tz_aware=True))
            metadata.pop("_id", None)
            return metadata
        if time.time() - os.lstat(base + ".msg").st_mtime < settled:
            return None
        log.warning("%s.msg has no metadata: storing it with metadata rebuilt from its "
                    "header (the envelope is lost)", base)
        with contextlib.closing(Message.from_file(base + ".msg")) as message:
            return {"store_key": os.path.basename(base), "sender": "", "rcpt": [],
                    "rcpt_count": 0, "rcpt_refused": {}, "client_address": "", "xforward": {},
                    "server": "", "size": message.size, "message": None, "rebuilt": True,
                    "sha256": message.sha256(),
                    "received": datetime.datetime.fromtimestamp(
                        os.path.getmtime(base + ".msg"), UTC),
                    **header_fields(message.head(HEADER_BLOCK_MAX))}


###############################################################################
# The modes ###################################################################
###############################################################################

class Mode:
    """What a mode does at each step; None means 'carry on with the usual reply'."""

    ACCEPTED = "stored"         # what a 2xx after the final dot means, for the metrics

    def __init__(self, cfg, metrics=None):
        self.cfg = cfg
        self.metrics = metrics or NO_METRICS

    def outcome(self, tx, answer):
        if answer[0] == "2":
            return tx.outcome or self.ACCEPTED
        return "tempfail" if answer[0] == "4" else "rejected"

    def start(self):
        pass

    def close(self):
        pass

    def missing_indexes(self):
        """{index: what goes without it} for the indexes MongoDB refused."""
        return {}

    def on_mail(self, client, tx):
        return None

    def on_rcpt(self, client, tx, rcpt, params):
        return None

    def on_data(self, client, tx):
        return None

    def on_reset(self, client, tx):
        pass

    def on_message(self, client, tx, metadata, message):
        raise NotImplementedError


class DebugMode(Mode):
    """Prints each message to stdout: its metadata as JSON, then the raw bytes.

    A message in memory is one write(2). The kernel keeps a write to a file or a
    device whole, so there no lock is held across it: a lock held while the write
    has let go of the GIL made the other sessions queue behind it in a futex. A
    message in a temporary file is written piece by piece, so it waits for the
    writes in flight and holds back new ones. Into a pipe, where a write over
    PIPE_BUF can be split, every record takes its turn."""

    ACCEPTED = "printed"        # nothing is stored: debug mode counts no "stored"

    JSON = json.JSONEncoder(default=str, ensure_ascii=False, sort_keys=True)

    def __init__(self, cfg, metrics=None, stream=None):
        super().__init__(cfg, metrics)
        self.stream = stream or sys.stdout.buffer
        self.lock = threading.Lock()
        self.quiet = threading.Condition(self.lock)  # no whole write in flight
        self.in_flight = 0
        self.fd = whole_writes(self.stream)

    def on_message(self, client, tx, metadata, message):
        start = (b"---------- MESSAGE FOLLOWS ----------\n"
                 + self.JSON.encode(metadata).encode() + b"\n")
        end = b"\n------------ END MESSAGE ------------\n"
        if message.file is None and self.fd is not None:
            self.write_whole(b"".join([start, message.data, end]))
        else:
            with self.lock:
                self.quiet.wait_for(lambda: not self.in_flight)
                self.stream.write(start)
                for piece in message.pieces():  # a large one never whole in memory
                    self.stream.write(piece)
                self.stream.write(end)
                self.stream.flush()
        return R_QUEUED.format(metadata["store_key"])

    def write_whole(self, record):
        with self.lock:
            self.in_flight += 1
        try:
            write_all(self.fd, record)
        finally:
            with self.lock:
                self.in_flight -= 1
                if not self.in_flight:
                    self.quiet.notify_all()


def whole_writes(stream):
    """The stream's descriptor if it is a file or a device, where the kernel keeps
    each write(2) whole; else None."""
    try:
        fd = stream.fileno()
        kind = os.fstat(fd).st_mode
    except (AttributeError, OSError, ValueError):
        return None
    return fd if stat.S_ISREG(kind) or stat.S_ISCHR(kind) else None


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class QuarantineMode(Mode):
    """amavisd-new's quarantine and archive target: store every message, with what
    amavisd-new says of it, and answer 250."""

    def __init__(self, cfg, metrics=None):
        super().__init__(cfg, metrics)
        self.store = MongoStore(cfg, self.metrics)

    def start(self):
        self.store.start()

    def close(self):
        self.store.close()

    def missing_indexes(self):
        return self.store.archive.missing

    def on_message(self, client, tx, metadata, message):
        metadata.update(amavis_fields(message.head(HEADER_BLOCK_MAX)))
        return stored_reply(self.store, metadata, message)


def stored_reply(store, metadata, message):
    """250 with the store_key once the message is stored; 451 otherwise, so that the
    sending MTA keeps it and retries."""
    try:
        store.store(metadata, message)
    except Exception as exc:
        log.error("storing %s failed: %s", metadata["store_key"], mongo_error(exc),
                  exc_info=bug(exc))
        return R_STORE_FAILED
    return R_QUEUED.format(metadata["store_key"])


class ProxyMode(Mode):
    """Postfix's before-queue filter: relay in step with the client, pass the replies
    through, and archive what the downstream accepted (the seed's rule)."""

    ACCEPTED = "delivered"

    def __init__(self, cfg, metrics=None):
        super().__init__(cfg, metrics)
        self.store = MongoStore(cfg, self.metrics)
        self.spool = Spool(cfg.spool_dir)
        self.spool.check()          # before any worker is forked: a setting, not a crash

    def start(self):
        self.store.start()
        threading.Thread(target=self.ask_peers, name="mms-peers", daemon=True).start()

    def ask_peers(self):
        """At start, in the background: a downstream or a scanner that does not answer
        is said in the log before the first message finds out."""
        peers = [("downstream", lambda: Downstream(self.cfg).close())]
        if self.cfg.server == "mongo-filter":
            peers += [(name, lambda address=getattr(self.cfg, name), request=request:
                       ask(address, request, self.cfg.scan_timeout))
                      for name, request, _ in SCANNER_PINGS if getattr(self.cfg, name)]
        for name, probe in peers:
            try:
                probe()
            except Exception as exc:
                log.warning("%s does not answer at start (%s)", name, exc)

    def close(self):
        self.store.close()

    def missing_indexes(self):
        return self.store.archive.missing

    def relayed(self, tx, step):
        """Run one step of the downstream session; a broken downstream becomes
        451 4.4.1, and the session is dropped."""
        try:
            return step()
        except DownstreamError as exc:
            self.metrics.count("mms_relay_errors_total")
            log.error("downstream %s:%d failed: %s", self.cfg.remote_host,
                      self.cfg.remote_port, exc)
            self.on_reset(None, tx)
            return R_RELAY_FAILED

    @staticmethod
    def relay(tx):
        if tx.relay is None:
            raise DownstreamError("the downstream session was lost earlier in this transaction")
        return tx.relay

    def open_relay(self, client, tx):
        tx.relay = Downstream(self.cfg)
        return tx.relay.mail(client.xforward or self.described(client), tx)

    @staticmethod
    def described(client):
        """A client that sent no XFORWARD is named to the after-filter all the same,
        so that its log shows who the mail came from, not only mms's address."""
        addr = client.peer
        return {"NAME": "[UNAVAILABLE]", "ADDR": f"IPV6:{addr}" if ":" in addr else addr,
                "PORT": str(client.port), "HELO": client.helo, "PROTO": client.proto}

    def on_mail(self, client, tx):
        answer = self.relayed(tx, lambda: self.open_relay(client, tx))
        if not answer.startswith("2"):
            self.on_reset(client, tx)
        return answer

    def on_rcpt(self, client, tx, rcpt, params):
        return self.relayed(tx, lambda: self.relay(tx).command(
            " ".join([f"RCPT TO:<{rcpt}>", *params])))

    def on_data(self, client, tx):
        return self.relayed(tx, lambda: self.relay(tx).data())

    def on_reset(self, client, tx):
        if tx.relay is not None:
            tx.relay.close()
            tx.relay = None

    def on_message(self, client, tx, metadata, message):
        return self.deliver(client, tx, metadata, message,
                            lambda: self.relay(tx).message(message))

    def deliver(self, client, tx, metadata, message, send):
        """Send the message downstream, end the session, archive what was accepted."""
        started = time.monotonic()
        answer = self.relayed(tx, send)
        self.metrics.observe("mms_relay_seconds", time.monotonic() - started)
        self.on_reset(client, tx)
        if answer.startswith("2"):
            metadata["downstream_reply"] = answer  # with the after-filter's queue id
            self.archive(metadata, message)
        return answer

    def archive(self, metadata, message):
        """The downstream has the message: refusing now would deliver it twice, so a
        failed store goes to the spool instead, and the client still gets the 250."""
        try:
            self.store.store(metadata, message)
        except Exception as exc:
            log.error("storing %s failed (%s): spooled to %s for `mms.py replay`",
                      metadata["store_key"], mongo_error(exc), self.spool.path,
                      exc_info=bug(exc))
            try:
                self.spool.put(metadata, message)
            except Exception as exc:
                log.critical("spooling %s failed (%s): delivered but not archived",
                             metadata["store_key"], exc)


class FilterMode(ProxyMode):
    """Scan, then deliver clean mail as proxy mode does, and keep the rest.

    MAIL and RCPT are relayed in step, as in proxy mode; DATA goes downstream
    only once the message is scanned and found fit to deliver, so a virus never
    reaches the downstream server. Every message is recorded, with its verdict.
    """

    def __init__(self, cfg, metrics=None):
        super().__init__(cfg, metrics)
        self.lists = SenderLists(self.store.archive)

    def start(self):
        super().start()
        self.lists.start()

    def close(self):
        self.lists.stop()
        super().close()

    def on_rcpt(self, client, tx, rcpt, params):
        """A sender the lists block for this recipient is refused here, before the
        downstream hears of it; one they allow is noted, and skips spamd."""
        entry = self.lists.entry(tx.sender, rcpt)
        if entry and entry[0] == "block":
            self.metrics.count("mms_list_decisions_total", "blocked")
            log.info("blocked from=<%s> to=<%s> client=%s: list entry %s -> %s", tx.sender,
                     rcpt, client.peer, entry[1], entry[2] or "everyone")
            self.store.tally.merge({("list", f"{datetime.datetime.now(UTC):%Y-%m-%d}",
                                     "blocked"): [1, 0]})
            return R_BLOCKED.format(tx.sender)
        if entry:
            tx.allowed.add(rcpt)
        return super().on_rcpt(client, tx, rcpt, params)

    def on_data(self, client, tx):
        return None

    def on_message(self, client, tx, metadata, message):
        allowed = sorted(tx.allowed & set(tx.rcpts))
        if allowed:                     # all allowed: no spam check; some: one for all
            metadata.update(allowed=allowed, is_allowed=1)
            self.metrics.count("mms_list_decisions_total", "allowed")
        metadata.update(scan(self.cfg, message, self.metrics,
                             spam=len(allowed) < len(tx.rcpts)))
        self.metrics.count("mms_scan_verdicts_total", verdict(metadata))
        action = self.action(metadata)
        if action == "deliver":
            return self.deliver(client, tx, metadata, message,
                                lambda: self.relay(tx).data_and_message(message))
        self.on_reset(client, tx)
        if action == "tempfail":
            log.warning("%s not scanned: %s", metadata["store_key"], metadata["scan"])
            return R_SCAN_FAILED
        if action == "reject":
            self.archive(metadata, message)
            return R_VIRUS.format(", ".join(metadata["virus"])) if metadata["is_virus"] else R_SPAM
        tx.outcome = "quarantined"
        metadata["quarantine"] = "virus" if metadata["is_virus"] else "spam"
        return stored_reply(self.store, metadata, message)

    def action(self, metadata):
        if metadata["is_virus"]:
            return self.cfg.virus_action
        if metadata["is_spam"]:
            return self.cfg.spam_action
        if metadata["is_unchecked"] and "skipped" not in metadata["scan"]:
            return "deliver" if self.cfg.on_scan_error == "deliver" else "tempfail"
        return "deliver"


class SenderLists:
    """The allow and block lists as filter mode asks them: read whole into memory at
    start and every LISTS_REFRESH seconds by a thread of its own, never on a
    message's path. The entry for a sender and a recipient is the most particular
    one: the recipient's own, then its domain's, then everyone's; for each, the
    sender's own, then its domain's. A reading that fails keeps the lists it had."""

    def __init__(self, archive):
        self.archive, self.entries = archive, {}
        self.stopped = threading.Event()

    def start(self):
        threading.Thread(target=self.run, name="mms-lists", daemon=True).start()

    def stop(self):
        self.stopped.set()

    def run(self):
        while True:
            try:
                self.entries = {(e["sender"], e["rcpt"]): e["kind"]   # strings: nothing for
                                for e in self.archive.list_entries()}   # the GC to walk
                wait = LISTS_REFRESH
            except Exception as exc:
                log.warning("the allow and block lists cannot be read (%s): the last ones "
                            "read stay in force", mongo_error(exc))
                wait = MongoStore.PING_SECONDS
            if self.stopped.wait(wait):
                return

    def entry(self, sender, rcpt):
        """(kind, sender, recipient) of the entry that decides, or None."""
        if not self.entries:
            return None
        sender, rcpt = sender.lower(), rcpt.lower()
        senders = (sender, "@" + sender.rpartition("@")[2]) if "@" in sender else (sender,)
        for who in (rcpt, "@" + rcpt.rpartition("@")[2], ""):
            for whom in senders:
                kind = self.entries.get((whom, who))
                if kind:
                    return kind, whom, who
        return None


MODE_CLASSES = {"debug": DebugMode, "mongo-quarantine": QuarantineMode, "mongo-proxy": ProxyMode,
                "mongo-filter": FilterMode}


def make_mode(cfg, metrics=None):
    if cfg.server not in MODE_CLASSES:
        raise ConfigError(f"mode {cfg.server!r} is not available in this version")
    return MODE_CLASSES[cfg.server](cfg, metrics)


###############################################################################
# Observability: metrics, statsd, health ######################################
###############################################################################

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class Metrics:
    """Counters, gauges and histograms in shared memory: each process (each worker)
    adds to its own row, with no lock between processes, and a scrape sums the rows.
    The parent maps the memory before it forks, so that it sees every worker's row.

    Counting is always on and costs a lock and an addition; --metrics serves the
    numbers over HTTP, --statsd also sends them by UDP.
    """

    COUNTERS = {
        "mms_connections_total": ("result", ("served", "refused_allow", "refused_limit",
                                             "refused_client_limit")),
        "mms_messages_total": ("result", ("stored", "delivered", "quarantined", "rejected",
                                          "tempfail", "too_big", "printed")),
        "mms_received_bytes_total": None, "mms_store_errors_total": None,
        "mms_relay_errors_total": None, "mms_probes_total": None,
        "mms_scan_verdicts_total": ("verdict", ("clean", "virus", "spam", "unchecked")),
        "mms_list_decisions_total": ("decision", ("allowed", "blocked")),
    }
    HISTOGRAMS = {"mms_store_seconds": None, "mms_relay_seconds": None,
                  "mms_scan_seconds": ("scanner", ("clamd", "spamd"))}
    HELP = {
        "mms_connections_total": "connections, by what became of them",
        "mms_sessions_active": "SMTP sessions in progress",
        "mms_messages_total": "messages after their final dot, by the answer they got",
        "mms_received_bytes_total": "bytes of messages received",
        "mms_store_seconds": "seconds to store a message in MongoDB",
        "mms_store_errors_total": "messages MongoDB did not take",
        "mms_relay_seconds": "seconds for the downstream server to take a message",
        "mms_relay_errors_total": "downstream sessions lost or broken",
        "mms_scan_seconds": "seconds each scanner took",
        "mms_scan_verdicts_total": "scanned messages, by verdict",
        "mms_list_decisions_total": "filter mode: recipients refused (blocked) and messages "
                                    "not spam-checked (allowed), by the lists",
        "mms_plugin_errors_total": "plugin runs that raised, hung or broke mms's fields",
        "mms_probes_total": "`mms.py check` probes taken (not counted as messages)",
        "mms_spooled_messages": "messages in --spool-dir waiting for `mms.py replay`",
        "mms_build_info": "the running version and mode",
        "mms_mongodb_up": "1 if the last MongoDB contact worked",
    }

    def __init__(self, cfg, rows=1, plugins=()):
        self.cfg, self.lock, self.row, self.width = cfg, threading.Lock(), 0, 0
        self.index, self.counters = {}, {**self.COUNTERS,
                                         "mms_plugin_errors_total": ("plugin", tuple(plugins))}
        for name, labels in self.counters.items():
            for value in values_of(labels):
                self.index[(name, value)] = self.take(1)
        for name, labels in self.HISTOGRAMS.items():
            for value in values_of(labels):
                self.index[(name, value, "buckets")] = self.take(len(BUCKETS) + 2)  # +Inf, sum
        for gauge in ("sessions", "mongo_ok_at", "mongo_failed_at"):
            self.index[(gauge,)] = self.take(1)
        self.rows = max(rows, 1)
        self.memory = mmap.mmap(-1, 8 * self.width * self.rows)
        self.values = memoryview(self.memory).cast("d")
        self.statsd = Statsd(cfg.statsd) if cfg.statsd else None

    def take(self, count):
        start, self.width = self.width, self.width + count
        return start

    def start(self, row=0):
        """In the serving process (a forked worker writes to a row of its own)."""
        self.row = row
        self.set("sessions", 0)
        if self.statsd:
            self.statsd.start()

    def count(self, name, label=None, amount=1):
        """Add to a counter; a label unknown at start (a plugin added since) is not kept."""
        at = self.index.get((name, label))
        if at is None:
            return
        at += self.row * self.width
        with self.lock:
            self.values[at] += amount
        if self.statsd:
            self.statsd.count(name, label, amount)

    def observe(self, name, seconds, label=None):
        at = self.row * self.width + self.index[(name, label, "buckets")]
        slot = bisect.bisect_left(BUCKETS, seconds)
        with self.lock:
            self.values[at + slot] += 1
            self.values[at + len(BUCKETS) + 1] += seconds
        if self.statsd:
            self.statsd.timing(name, label, seconds)

    def set(self, gauge, value):
        self.values[self.row * self.width + self.index[(gauge,)]] = value
        if self.statsd and gauge == "sessions":
            self.statsd.gauge("mms.sessions_active", value)

    def column(self, key, offset=0):
        """One value of every process."""
        at = self.index[key] + offset
        return [self.values[row * self.width + at] for row in range(self.rows)]

    def total(self, key, offset=0):
        return sum(self.column(key, offset))

    def mongo_up(self):
        return max(self.column(("mongo_ok_at",))) > max(self.column(("mongo_failed_at",)))

    def exposition(self, spooled=None):
        """The Prometheus text format."""
        out = []

        def head(name, kind):
            out.append(f"# HELP {name} {self.HELP[name]}\n# TYPE {name} {kind}")

        for name, labels in self.counters.items():
            head(name, "counter")
            for value in values_of(labels):
                label = f'{{{labels[0]}="{value}"}}' if labels else ""
                out.append(f"{name}{label} {self.total((name, value)):g}")
        for name, labels in self.HISTOGRAMS.items():
            head(name, "histogram")
            for value in values_of(labels):
                key = (name, value, "buckets")
                extra = f'{labels[0]}="{value}",' if labels else ""
                running = 0
                for n, bound in enumerate((*BUCKETS, "+Inf")):
                    running += self.total(key, n)
                    out.append(f'{name}_bucket{{{extra}le="{bound}"}} {running:g}')
                braces = f"{{{extra[:-1]}}}" if extra else ""
                out.append(f"{name}_sum{braces} {self.total(key, len(BUCKETS) + 1):g}")
                out.append(f"{name}_count{braces} {running:g}")
        head("mms_sessions_active", "gauge")
        out.append(f"mms_sessions_active {self.total(('sessions',)):g}")
        if self.cfg.server != "debug":
            head("mms_mongodb_up", "gauge")
            out.append(f"mms_mongodb_up {int(self.mongo_up())}")
        if spooled is not None:
            head("mms_spooled_messages", "gauge")
            out.append(f"mms_spooled_messages {spooled}")
        head("mms_build_info", "gauge")
        out.append(f'mms_build_info{{version="{__version__}",mode="{self.cfg.server}"}} 1')
        return "\n".join(out) + "\n"


def values_of(labels):
    """A series' label values, or (None,) for a series without labels."""
    return labels[1] if labels else (None,)


class NoMetrics:
    """Where nothing is counted: the archive commands, and stores made by tests."""

    row = 0

    def count(self, *args, **kwargs):
        pass

    observe = set = count


NO_METRICS = NoMetrics()


class Statsd:
    """statsd lines, sent in UDP packets by a thread of their own every FLUSH
    seconds: counters summed and gauges at their last value in between, as statsd
    clients do, and timings a line each. A session only adds to a dict, and a
    statsd that is down costs nothing. (A line for every count cost 15% of the
    rate with 20 sessions: formatting it, and the thread that packed them.)"""

    PACKET = 1400
    FLUSH = 0.2

    def __init__(self, address):
        self.address, self.lock, self.names = address, threading.Lock(), {}
        self.counts, self.gauges = {}, {}
        self.timings = collections.deque(maxlen=100_000)
        self.thread = None

    def start(self):
        self.thread = threading.Thread(target=self.run, name="mms-statsd", daemon=True)
        self.thread.start()

    def name(self, name, label):
        key = (name, label)
        if key not in self.names:
            base = "mms." + name[4:].removesuffix("_total").removesuffix("_seconds")
            self.names[key] = f"{base}.{label}" if label else base
        return self.names[key]

    def count(self, name, label, amount):
        name = self.name(name, label)
        with self.lock:
            self.counts[name] = self.counts.get(name, 0) + amount

    def gauge(self, name, value):
        with self.lock:
            self.gauges[name] = value

    def timing(self, name, label, seconds):
        self.timings.append(f"{self.name(name, label)}:{seconds * 1000:.3f}|ms")

    def lines(self):
        with self.lock:
            counts, self.counts = self.counts, {}
            gauges, self.gauges = self.gauges, {}
        lines = [f"{name}:{value:g}|c" for name, value in counts.items()]
        lines += [f"{name}:{value:g}|g" for name, value in gauges.items()]
        while self.timings:
            lines.append(self.timings.popleft())
        return lines

    def run(self):
        sock = socket.socket(address_family(self.address[0]),
                             socket.SOCK_DGRAM)
        sock.setblocking(False)
        while True:
            time.sleep(self.FLUSH)
            packet = ""
            for line in self.lines():
                if packet and len(packet) + 1 + len(line) > self.PACKET:
                    self.flush(sock, packet)
                    packet = ""
                packet = f"{packet}\n{line}" if packet else line
            if packet:
                self.flush(sock, packet)

    def flush(self, sock, packet):
        with contextlib.suppress(OSError):
            sock.sendto(packet.encode(), self.address)


class BoundedHTTPServer(http.server.ThreadingHTTPServer):
    """An HTTP server that shares the process's file descriptors with SMTP: only its
    allow-list may connect (others are disconnected unanswered; an empty list is
    everyone). Request heads are read by one thread over a selector (HeadReader),
    as nginx reads them, so that slow heads from any number of addresses hold no
    worker: at most HEADS wait at once and HEADS_PER_CLIENT from one address (past
    either, the one that has waited longest is closed). A complete head gets a
    thread: at most CONNECTIONS at once and PER_CLIENT from one address, the last
    RESERVED of them only for an address that holds none (one more is closed at
    once); the rest of each request is bounded by its handler (BoundedHandler)."""

    daemon_threads = True
    CONNECTIONS, PER_CLIENT, RESERVED = 8, 4, 2
    HEADS, HEADS_PER_CLIENT = 32, 4

    def __init__(self, option, address, handler, allow):
        self.option, self.allow = option, allow
        self.held, self.slots = collections.Counter(), threading.Lock()
        host, _, port = address.rpartition(":")
        self.host = host.strip("[]")
        self.address_family = address_family(self.host)
        try:
            super().__init__((self.host, int(port)), handler)
        except OSError as exc:
            raise ConfigError(f"{option} {address}: {exc}")
        self.heads = HeadReader(self)

    def serve_in_background(self, name):
        threading.Thread(target=self.serve_forever, name=name, daemon=True).start()

    def verify_request(self, request, client_address):
        return not self.allow or in_networks(client_address[0], self.allow)

    def admit(self, address):
        """A slot for this address, or False: a few clients that hold many
        connections never lock the others out."""
        with self.slots:
            mine, free = self.held[address], self.CONNECTIONS - self.held.total()
            if free <= 0 or mine >= self.PER_CLIENT or (mine and free <= self.RESERVED):
                return False
            self.held[address] += 1
            return True

    def leave(self, address):
        with self.slots:
            self.held[address] -= 1
            if self.held[address] <= 0:
                del self.held[address]

    def process_request(self, request, client_address):
        """Accepted: its head is read by the head reader, without a thread."""
        self.heads.add(request, client_address)

    def serve_head(self, request, client_address, head):
        """A complete head (or one over REQUEST_MAX): a thread for it, if a slot is
        free for its address."""
        if not self.admit(client_address[0]):
            self.shutdown_request(request)
            return
        try:
            request.setblocking(True)
            self.heads.read[request] = head
            super().process_request(request, client_address)
        except Exception:
            self.heads.read.pop(request, None)
            self.leave(client_address[0])
            self.shutdown_request(request)
            log.warning("%s: no thread for a request from %s", self.option,
                        client_address[0], exc_info=True)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.heads.read.pop(request, None)
            self.leave(client_address[0])

    def server_close(self):
        self.heads.close()
        super().server_close()

    def handle_error(self, request, client_address):
        """A client that hung up is one line in the log; anything else, a traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            log.info("%s: the connection from %s broke: %s", self.option, client_address[0], exc)
        else:
            log.error("%s: a request from %s failed", self.option, client_address[0],
                      exc_info=True)


class HeadReader:
    """Request heads, read by one thread from every connection that is sending one
    (non-blocking, over a selector; a TLS handshake too), each within its seconds
    in all; a complete head (or one over its size) goes to server.serve_head.
    What slowloris holds here is a file descriptor and a few KiB, never a thread."""

    def __init__(self, server):
        import selectors
        self.server, self.handler = server, server.RequestHandlerClass
        self.read = {}                      # socket: its head, for its handler
        self.waiting = {}                   # socket: Waiting, the longest-waiting first
        self.new, self.closed = queue.SimpleQueue(), threading.Event()
        self.selector = selectors.DefaultSelector()
        self.wake_r, self.wake_w = socket.socketpair()
        self.wake_r.setblocking(False)
        self.selector.register(self.wake_r, selectors.EVENT_READ)
        threading.Thread(target=self.run, name=f"mms-heads{server.option}", daemon=True).start()

    def add(self, sock, address):
        self.new.put((sock, address))
        with contextlib.suppress(OSError):
            self.wake_w.send(b"x")

    def close(self):
        self.closed.set()
        with contextlib.suppress(OSError):
            self.wake_w.send(b"x")

    def run(self):
        import ssl
        self.want = (BlockingIOError, InterruptedError, ssl.SSLWantReadError,
                     ssl.SSLWantWriteError)
        try:
            while not self.closed.is_set():
                first = next(iter(self.waiting.values()), None)
                wait = min(ACCEPT_TICK, max(0.0, first.deadline - time.monotonic())) \
                    if first else ACCEPT_TICK
                for key, _ in self.selector.select(wait):
                    if key.fileobj is self.wake_r:
                        self.take_new()
                    else:
                        self.advance(key.data)
                self.expire()
        finally:
            for waiting in list(self.waiting.values()):
                self.drop(waiting)
            self.selector.close()
            self.wake_r.close()
            self.wake_w.close()

    def take_new(self):
        import selectors
        import ssl
        with contextlib.suppress(OSError):
            while self.wake_r.recv(4096):
                pass
        while True:
            try:
                sock, address = self.new.get_nowait()
            except queue.Empty:
                return
            self.make_room(address[0])
            waiting = Waiting(sock, address, time.monotonic() + self.handler.HEAD_SECONDS,
                              isinstance(sock, ssl.SSLSocket))
            try:
                sock.setblocking(False)
                self.selector.register(sock, selectors.EVENT_READ, waiting)
            except (OSError, ValueError):
                self.server.shutdown_request(sock)
                continue
            self.waiting[sock] = waiting
            self.advance(waiting)

    def make_room(self, address):
        """Past HEADS_PER_CLIENT from this address, or HEADS in all, the head that has
        waited longest (this address's, else anyone's) goes: the slowest first."""
        mine = [w for w in self.waiting.values() if w.address[0] == address]
        if len(mine) >= self.server.HEADS_PER_CLIENT:
            self.drop(mine[0])
        elif len(self.waiting) >= self.server.HEADS:
            self.drop(next(iter(self.waiting.values())))

    def advance(self, waiting):
        """Read what has come; hand a head on once it is whole (or too long)."""
        import selectors
        sock = waiting.sock
        try:
            if waiting.handshaking:
                sock.do_handshake()
                waiting.handshaking = False
                self.selector.modify(sock, selectors.EVENT_READ, waiting)
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    return self.drop(waiting)
                waiting.data += chunk
                if HEAD_END_RE.search(waiting.data, max(0, len(waiting.data) - len(chunk) - 3)) \
                        or len(waiting.data) > self.handler.REQUEST_MAX:
                    break
        except self.want as exc:
            if waiting.handshaking:
                import ssl
                self.selector.modify(sock, selectors.EVENT_WRITE if isinstance(
                    exc, ssl.SSLWantWriteError) else selectors.EVENT_READ, waiting)
            return
        except (OSError, ValueError):        # a bad handshake, a reset
            return self.drop(waiting)
        self.forget(waiting)
        self.server.serve_head(sock, waiting.address, bytes(waiting.data))

    def expire(self):
        now = time.monotonic()
        for waiting in [w for w in self.waiting.values() if w.deadline <= now]:
            self.drop(waiting)

    def forget(self, waiting):
        self.waiting.pop(waiting.sock, None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self.selector.unregister(waiting.sock)

    def drop(self, waiting):
        self.forget(waiting)
        self.server.shutdown_request(waiting.sock)


@dataclasses.dataclass(eq=False)
class Waiting:
    """A connection whose request head is still coming."""
    sock: socket.socket
    address: tuple
    deadline: float
    handshaking: bool
    data: bytearray = dataclasses.field(default_factory=bytearray)


class MetricsServer(BoundedHTTPServer):
    """GET /metrics and GET /healthz, on --metrics, in a thread of their own, for
    --metrics-allow only."""

    CONNECTIONS = 8

    def __init__(self, cfg, metrics, smtp):
        self.cfg, self.metrics, self.smtp = cfg, metrics, smtp
        super().__init__("--metrics", cfg.metrics, MetricsHandler, cfg.metrics_allow)
        if not is_loopback(self.host) and "metrics_allow" not in cfg.given:
            log.warning("--metrics listens on %s, and only loopback may scrape it: name your "
                        "Prometheus with --metrics-allow", cfg.metrics)
        self.serve_in_background("mms-metrics")

    def health(self):
        """(200 or 503, why). Proxy and filter modes go on relaying while MongoDB is
        down, and spool what they cannot store: healthy, and they say so."""
        if self.smtp.draining or self.smtp.socket.fileno() < 0:
            return 503, "not accepting connections: stopping"
        if self.cfg.server in RELAY_MODES and not self.metrics.mongo_up():
            return 200, (f"ok, spooling: MongoDB's last contact failed, {self.spooled()} "
                         f"message(s) wait in {self.cfg.spool_dir} for `mms.py replay`")
        if self.cfg.server != "debug" and not self.metrics.mongo_up():
            return 503, "MongoDB: the last contact failed"
        missing = self.smtp.mode.missing_indexes()
        if missing:
            return 200, "ok, but MongoDB refused indexes: " + "; ".join(
                f"{name} ({cost})" for name, cost in missing.items())
        return 200, "ok"

    def spooled(self):
        if self.cfg.server not in RELAY_MODES:
            return None
        return Spool(self.cfg.spool_dir).waiting()


class BoundedHandler(http.server.BaseHTTPRequestHandler):
    """One request per connection: its head within REQUEST_MAX bytes and HEAD_SECONDS
    in all, however slowly it comes (slowloris); a body only as its handler reads it
    (read_body), within BODY_MAX bytes and BODY_SECONDS."""

    server_version, sys_version = f"mms/{__version__}", ""
    default_request_version = "HTTP/1.0"   # an error answers with its headers, never as 0.9
    timeout = 5                   # seconds for each write, and each read of a body
    HEAD_SECONDS = 5              # for the whole request head
    REQUEST_MAX = 8192            # request line and header block
    BODY_MAX, BODY_SECONDS = 0, 10

    def handle(self):
        """The request head the server's HeadReader read (414 for a longer request
        line, 431 for a longer header), parsed by the stdlib; what came after it is
        the body's."""
        data = self.server.heads.read.pop(self.request, b"")
        end = HEAD_END_RE.search(data)
        if not end or end.end() > self.REQUEST_MAX:
            self.command, self.requestline, self.request_version = None, "", "HTTP/1.0"
            self.send_error(431 if b"\n" in data[:self.REQUEST_MAX] else 414)
            return
        self.rest = data[end.end():]
        self.rfile = io.BytesIO(data[:end.end()])
        self.handle_one_request()

    def receive(self, deadline, size):
        """Some bytes, b"" at their end; TimeoutError once the deadline has passed."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        self.connection.settimeout(left)
        return self.connection.recv(size)

    def read_body(self):
        """The body: exactly Content-Length bytes, a length checked before any byte is
        read. HTTPError 400 for a length that is no number, 411 without one for a
        chunked body, 413 over BODY_MAX, 408 when it comes too slowly."""
        lengths = set(self.headers.get_all("Content-Length") or [])
        if self.headers.get("Transfer-Encoding"):
            raise HTTPError(411, "send the body with a Content-Length")
        if len(lengths) > 1 or not all(re.fullmatch(r"[0-9]{1,12}", v) for v in lengths):
            raise HTTPError(400, "Content-Length: not a length")
        length = int(lengths.pop()) if lengths else 0
        if length > self.BODY_MAX:
            raise HTTPError(413, f"the body is over {self.BODY_MAX} bytes")
        body, self.rest = bytearray(self.rest[:length]), b""
        deadline = time.monotonic() + self.BODY_SECONDS
        while len(body) < length:
            try:
                chunk = self.receive(deadline, min(65536, length - len(body)))
            except OSError:
                raise HTTPError(408, "the body came too slowly") from None
            if not chunk:
                raise HTTPError(400, "the body ended before its Content-Length")
            body += chunk
        return bytes(body)

    def send(self, code, data, kind, extra=()):
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


HEAD_END_RE = re.compile(rb"\r?\n\r?\n")


class HTTPError(MMSError):
    """An answer other than 200, with the text the client is shown."""

    def __init__(self, code, text):
        super().__init__(text)
        self.http_status = code


class MetricsHandler(BoundedHandler):

    def do_GET(self):
        server = self.server
        if self.path == "/metrics":
            code, body = 200, server.metrics.exposition(server.spooled())
            kind = "text/plain; version=0.0.4; charset=utf-8"
        elif self.path == "/healthz":
            code, body = server.health()
            body, kind = body + "\n", "text/plain; charset=utf-8"
        else:
            code, body, kind = 404, "not found: try /metrics or /healthz\n", "text/plain"
        self.send(code, body.encode(), kind)

    def log_message(self, format, *args):
        pass  # a scrape every 15 s is not news


###############################################################################
# The archive #################################################################
###############################################################################

# nx-27017, the MongoDB-wire server the tests run on, answers some queries wrongly,
# and some slowly. These forms are right on MongoDB and on nx-27017 alike; nowhere
# else does mms bend a query for it.
# - Not on hold: {held: {$nin: [true]}}, which MongoDB reads as {$ne: true}; nx-27017
#   answers $ne and $nor wrongly beside other conditions.
# - Conditions on fields go at the top, and an $or in an $and (all_of): nx-27017
#   applies a top-level $or alone, and reads a query with an $and row by row.
# - fs.files and fs.chunks are deleted one id per statement, many statements per
#   command: nx-27017 refuses $in on fs.files and deletes nothing with $in on fs.chunks.
# - held is written true, and read back through is_held: nx-27017 stores it as 1.
# - released[] is written whole, with $set, by the release that holds the claim:
#   nx-27017 stores a $push of a sub-document as a JSON string.
# - The release claim is compared by a string token: nx-27017 misses equality and
#   ranges on ObjectIds outside _id ({message: {$in: [...]}} works on both).
# - stats matches the received date twice: MongoDB uses the first (a date range,
#   served by the index), nx-27017 ignores it and needs the second (the same range
#   on the date written as an ISO string, which sorts as the time does).
# - The daily counts are read by an aggregation's $match on a range of _id: nx-27017
#   reads every counter for a find with that range (1.2 s of 187,000), not for the
#   $match (0.01 s); on MongoDB both are the same range of the _id index.
# - Newest first, a since is where reading stops (Archive.newest_since); a page of
#   a range with an end is read in windows of time (Archive.in_windows), and a word
#   search's page from an edge asks no date (WebHandler.edges): nx-27017 reads every
#   message for a date range, and row by row beside a $text. On MongoDB each is the
#   same index range, or the same text index entries, as the one query it replaces
#   (a since, at most a batch more). A search's page of a date range is the first
#   rows of its count's read (Archive.counted_page): one read there, not three.
# - An address, a domain and a scoped user's one domain are asked as equality, not
#   $in, and a scoped user's several domains beside an end date as one range each,
#   merged (each_domain): nx-27017 reads every message in Python for a $in beside a
#   date.
# - Equality on a field of one value is asked as the range [value, value]
#   (as_points): nx-27017 serves that from the field's index, and equality by
#   reading every message. MongoDB reads both as one point of the same index.
# - The terms of --text are one regular expression on `text` (text_clauses), at the
#   top beside the $text as any field is: nx-27017 tests a $text's matches in
#   Python, row by row, beside any $and, $or or $nor.
# - fs.chunks cannot be listed on nx-27017: orphan chunks are found on MongoDB only.
#   A find on fs.files gets every file at once, whatever its batchSize (and no range
#   or regular expression on it works): verify's memory grows with the files there.
NOT_HELD = {"held": {"$nin": [True]}}


def is_held(doc):
    """Whether a document read back is on hold: held is written as true, which
    nx-27017 stores as 1 (and its queries match both); the one place mms reads it so."""
    return doc.get("held") is True or type(doc.get("held")) is int and doc["held"] == 1


def all_of(*clauses):
    """The clauses as one query: each clause of fields alone at the top, where its
    fields are not already, and only the others (an $or, a second range of the same
    field) in one $and. MongoDB reads both forms alike. nx-27017 tests a query with
    an $and row by row in Python unless a date is in it (a reviewer of one domain
    searching a verdict: 7.5 s against 0.07 s at 200,000 messages), and a $text's
    matches beside any $and, $or or $nor; a $text goes at the top, where MongoDB
    takes it as it would inside, and nx-27017 finds nothing for a "phrase" in $and."""
    flat, top = [], {}
    for clause in clauses:
        clause = dict(clause)
        if "$text" in clause:
            top["$text"] = clause.pop("$text")
        flat += clause.pop("$and", [])
        if clause:
            flat.append(clause)
    rest = []
    for clause in flat:
        if not any(key.startswith("$") or key in top for key in clause):
            top.update(clause)
        else:
            rest.append(clause)
    if len(rest) == 1 and not set(rest[0]) & set(top) and (not top or "$text" in top):
        return {**top, **rest[0]}   # alone, or beside a $text: never an $or beside fields
    return {**top, **({"$and": rest} if rest else {})}


POINT_FIELDS = ("verdict", "quarantine", "sender", "sender_domain")   # one value a message


def as_points(query):
    """The query with equality on a field of POINT_FIELDS written as the range
    [value, value], as the archive sends its reads. MongoDB's planner reads both as
    one point of the (field, received) index, which then gives the date's order (a
    point interval is an equality). nx-27017's equality also looks into arrays in
    SQL, which no index serves: it read every message beside a date (0.7 to 1.1 s a
    query at 200,000 messages), and walked the date index past every message for a
    sparse match (1.4 to 1.9 s); a range it reads from the field's index (0.01 to
    0.06 s). Arrays (rcpt, rcpt_domain) stay equality: a range on one is wrong on
    nx-27017."""
    def points(clause):
        return {key: {"$gte": value, "$lte": value} if key in POINT_FIELDS and isinstance(
            value, str) else value for key, value in clause.items()}
    top = points({key: value for key, value in query.items() if key != "$and"})
    return {**top, **({"$and": [points(one) for one in query["$and"]]}
                      if "$and" in query else {})}


def date_span(query):
    """(the latest lower bound, the earliest upper bound) of received in a query's
    clauses, at its top or in its $and; None for a side without one."""
    low = high = None
    for clause in [query, *query.get("$and", ())]:
        bounds = clause.get("received")
        for op, when in (bounds.items() if isinstance(bounds, dict) else ()):
            if op in ("$gte", "$gt"):
                low = when if low is None else max(low, when)
            elif op in ("$lt", "$lte"):
                high = when if high is None else min(high, when)
    return low, high


def without_lower_dates(query):
    """(the query without its lower bounds on received, whether a date passes them,
    compared to the millisecond, as BSON holds dates and MongoDB's range compares)."""
    bounds, clauses = [], []
    top = {key: value for key, value in query.items() if key not in ("$and", "$text")}
    for clause in [top] * bool(top) + query.get("$and", []):
        received = clause.get("received")
        if isinstance(received, dict):
            bounds += [(op, received[op].replace(microsecond=received[op].microsecond
                                                 // 1000 * 1000))
                       for op in ("$gte", "$gt") if op in received]
            received = {op: when for op, when in received.items() if op not in ("$gte", "$gt")}
            clause = {**clause, "received": received} if received else {
                key: value for key, value in clause.items() if key != "received"}
        clauses.append(clause)
    words = {"$text": query["$text"]} if "$text" in query else {}
    stripped = all_of(words, *clauses)

    def keep(when):
        return isinstance(when, datetime.datetime) and all(
            when >= at if op == "$gte" else when > at for op, at in bounds)
    return stripped, keep


DOMAINS_SPLIT_MAX = 10    # a scoped user's domains read one range each, up to this many


def each_domain(query):
    """The query once for each domain of its rcpt_domain $in (a scoped user's
    several domains, up to DOMAINS_SPLIT_MAX), else [query]: MongoDB merges the
    ranges of a $in itself, and nx-27017 reads every message in Python for a $in
    beside a date."""
    for clause in [query, *query.get("$and", ())]:
        domains = clause.get("rcpt_domain")
        if isinstance(domains, dict) and list(domains) == ["$in"] and \
                1 < len(domains["$in"]) <= DOMAINS_SPLIT_MAX:
            if clause is query:
                return [{**query, "rcpt_domain": domain} for domain in domains["$in"]]
            return [{**query, "$and": [{**one, "rcpt_domain": domain} if one is clause else one
                                       for one in query["$and"]]} for domain in domains["$in"]]
    return [query]


def as_date(field):
    """A field as a date, or null where another tool wrote something else."""
    return {"$convert": {"input": field, "to": "date", "onError": None, "onNull": None}}


def as_number(field):
    return {"$convert": {"input": field, "to": "long", "onError": 0, "onNull": 0}}


def domain_of(address):
    return {"$arrayElemAt": [{"$split": [address, "@"]}, 1]}


def day_format(text):
    return {"$dateToString": {"format": text, "date": as_date("$received")}}


def verdict(doc):
    """A message's verdict, as stats, list, the console, the API and the reports all
    say it: virus, banned, spam, unchecked (in that order), or clean."""
    return next((name for name in VERDICT_FIELDS if doc.get(f"is_{name}") == 1), "clean")


def verdict_of(names):
    """verdict() in MongoDB: the first of is_virus, is_banned, is_spam, is_unchecked
    that is set, else clean, as a string (nx-27017 cannot group by a sub-document)."""
    if not names:
        return "clean"
    return {"$cond": [{"$eq": [{"$ifNull": [f"$is_{names[0]}", 0]}, 1]}, names[0],
                      verdict_of(names[1:])]}


WORDS_LEFT_OUT = {"text": 0}   # what a read of a message's document does not bring back
ORDERS = {"newest": [("received", -1)], "oldest": [("received", 1)],   # Archive.search
          "size": [("size", -1), ("received", -1)], "score": [("score", {"$meta": "textScore"})]}
ATLAS_INDEX = "mms_words"      # --text-search atlas: its definition is in the README


def search_fields(metadata):
    """What the searches ask of a message, written beside the seed's fields in the
    form an index serves: the domains (a suffix regex on an address reads the
    whole index), the verdict (four is_* flags have no index between them), the
    client address as a key that orders as the address does (a CIDR is a range)."""
    rcpts = [*(metadata.get("rcpt") or []), *(metadata.get("quarantine_to") or [])]
    return {"sender_domain": domain(metadata.get("sender")),
            "rcpt_domain": sorted({domain(rcpt) for rcpt in rcpts} - {""}),
            "verdict": verdict(metadata),
            "client_hex": client_hex(metadata.get("client_address"))}


# The seed's completed document holds these where mms has nothing to say: a reader
# of its model (mongo-mail-web's, strict) finds each, typed as the seed shows it.
SEED_DEFAULTS = {"events": [], "tags": [], "group_name": "DEFAULT", "queue": 1,
                 "mark_for_delete": 0, "internal_field": 0, "is_virus": 0, "is_banned": 0,
                 "is_spam": 0, "is_unchecked": 0}


def seed_fields(metadata, local_domains):
    """The seed's fields a message lacks, with the seed's defaults (another tool's
    value is kept), and is_in with --local-domains: 1 for mail from outside them
    to one of them."""
    fields = {name: copy.copy(value) for name, value in SEED_DEFAULTS.items()
              if name not in metadata}
    if local_domains:
        local = {d.lower().lstrip("@") for d in local_domains}
        rcpts = {domain(r) for r in metadata.get("rcpt") or []}
        fields["is_in"] = int(bool(rcpts & local) and domain(metadata.get("sender")) not in local)
    return fields


def domain(address):
    address = str(address or "")
    return address.rpartition("@")[2].strip("<> ").lower()[:255] if "@" in address else ""


def client_hex(address):
    """An address as the 32 hex digits of its IPv6 form (IPv4 as ::ffff:a.b.c.d):
    strings that sort as the addresses do, so a network is one range of an index."""
    try:
        ip = ipaddress.ip_address(plain_address(str(address or "")).split("%")[0])
    except ValueError:
        return None
    return f"{int(ip) | (0xFFFF << 32 if ip.version == 4 else 0):032x}"


def client_range(network):
    """A network as a range of client_hex."""
    return {"$gte": client_hex(network.network_address),
            "$lte": client_hex(network.broadcast_address)}


# --by: what each group is, and the array it counts the elements of (recipients,
# attachments) rather than messages.
STATS_GROUPS = {
    "day": (day_format("%Y-%m-%d"), None), "hour": (day_format("%Y-%m-%d %H:00"), None),
    "sender": ("$sender", None), "sender-domain": (domain_of("$sender"), None),
    "rcpt": ("$rcpt", "$rcpt"), "rcpt-domain": (domain_of("$rcpt"), "$rcpt"),
    "client": ("$client_address", None), "quarantine": ("$quarantine", None),
    "verdict": (verdict_of(VERDICT_FIELDS), None),
    "attachment-type": ("$files.content_type", "$files"),
    "country": ("$country", None),
}


class Damaged(MMSError):
    """A stored message cannot be read back whole: what is wrong with it."""


KEY_PREFIX_MIN = 8   # hex characters of a store key that name a message, as git takes a commit


class Archive:
    """Every query and write mms makes in MongoDB.

    The layout is the seed's: GridFS holds base64(zlib(raw message)) named by
    store_key, and the collection one metadata document pointing at it. GridFS
    documents are written directly, in the standard layout that pymongo's GridFS
    and mongofiles read: chunks first, then the file, then the metadata, so that
    a failure part-way leaves an orphan file, never a document that points at
    nothing. Deletes go the other way: metadata, chunks, file. Each change that
    depends on a message's state (on hold, not being released) says so in the
    write itself, so a hold placed meanwhile always wins.
    """

    CHUNK_SIZE = 255 * 1024
    CHUNKS_PER_INSERT = 16
    BATCH = 1000                  # documents per purge delete and per verify look-up
    CLAIM_LAPSES = datetime.timedelta(minutes=10)  # a release that died frees the message
    QUERIES_MAX = 4               # the console's queries at once (its connections)
    INDEXES = [  # (keys, options, what goes without it): README, "At scale"
        ([("store_key", 1)], {"unique": True}, "store keys are not unique; show, release, "
         "hold and delete read every message"),
        ([("received", -1)], {}, "date ranges, pages and purge read every message"),
        ([("sender", 1), ("received", -1)], {}, "searches by sender read every message"),
        ([("rcpt", 1), ("received", -1)], {}, "searches by recipient read every message"),
        ([("quarantine_to", 1), ("received", -1)], {}, "searches by recipient read every "
         "message"),
        ([("quarantine", 1), ("received", -1)], {}, "searches by quarantine type read every "
         "message"),
        ([("client_hex", 1), ("received", -1)], {}, "searches by client read every message"),
        ([("sender_domain", 1), ("received", -1)], {}, "searches by sender domain read every "
         "message"),
        ([("rcpt_domain", 1), ("received", -1)], {}, "searches by recipient domain read every "
         "message"),
        ([("verdict", 1), ("received", -1)], {}, "searches by verdict read every message"),
        ([("message_id", 1)], {}, "searches by Message-ID read every message"),
        ([("subject", "text"), ("text", "text")], {
            "name": "words", "weights": {"subject": 10, "text": 1}, "default_language": "none"},
         "--text searches fail: MongoDB answers $text only from a text index"),
        ([("files.ext", 1), ("received", -1)], {}, "searches by attachment name read every "
         "message"),
        ([("files.filename", 1)], {}, "searches by attachment name read every message"),
        ([("files.content_type", 1), ("received", -1)], {}, "searches by attachment type "
         "read every message"),
        ([("files.sha256", 1)], {}, "searches by attachment sha256 read every message"),
        ([("is_bounce", 1), ("received", -1)], {"partialFilterExpression": {"is_bounce": 1}},
         "searches for bounces read every message"),
        ([("quarantine_id", 1)], {}, "searches by quarantine ID read every message"),
        ([("country", 1), ("received", -1)], {"partialFilterExpression": {
            "country": {"$exists": True}}}, "searches by country read every message"),
        ([("held", 1)], {"partialFilterExpression": {"held": True}}, "counting held mail "
         "reads every message"),
        ([("released", 1)], {"partialFilterExpression": {"released": {"$exists": True}}},
         "counting released mail reads every message"),
        ([("message", 1)], {}, "verify --orphans reads every message for each file"),
    ]

    def __init__(self, cfg, server=True, max_time_ms=None):
        self.cfg, self.server, self.max_time_ms = cfg, server, max_time_ms
        self.client = None
        self.indexed = False
        self.missing = {}           # index name: what goes without it
        self.max_size = 16 * 2**20  # maxBsonObjectSize, until the server says

    def connect(self, watch=None):
        """The SMTP path bounds every wait; an archive command waits as long as a
        query over millions of messages takes (but finds its server as quickly)."""
        import pymongo  # imported here so that debug mode runs without pymongo
        ms = int(self.cfg.mongo_timeout * 1000)
        options = pymongo.uri_parser.parse_uri(self.cfg.mongo_host)["options"]
        self.concern = write_concern(self.cfg, options)
        self.client = pymongo.MongoClient(
            self.cfg.mongo_host, tz_aware=True, appname="mms", serverSelectionTimeoutMS=ms,
            connectTimeoutMS=ms, socketTimeoutMS=max(4 * ms, 20000) if self.server else None,
            w=self.concern["w"], wTimeoutMS=self.concern["wtimeout"],
            retryReads=not self.max_time_ms, maxPoolSize=self.QUERIES_MAX if self.max_time_ms
            else 100, event_listeners=[watch] if watch else [],
            **({"journal": self.concern["j"]} if "j" in self.concern else {}))
        self.db = self.client[self.cfg.mongo_database]
        self.collection = self.db[self.cfg.mongo_collection]
        self.files, self.chunks = self.db["fs.files"], self.db["fs.chunks"]
        self.counts = self.db[f"{self.cfg.mongo_collection}_daily"]
        self.audits = self.db[f"{self.cfg.mongo_collection}_audit"]
        self.lists = self.db[f"{self.cfg.mongo_collection}_lists"]
        return self

    def write_concern(self):
        return ", ".join(f"{name}: {value}" for name, value in self.concern.items())

    def close(self):
        if self.client is not None:
            self.client.close()

    def ping(self):
        hello = self.client.admin.command("hello")
        self.max_size = hello.get("maxBsonObjectSize", self.max_size)

    def ensure_indexes(self):
        """Each index on its own, so that one the cluster refuses (a unique store_key
        on a collection sharded on another key) leaves the others built; which are
        missing, with what that costs, is in self.missing. Built in the background
        on MongoDB 4.2 and later; never in the write path."""
        from pymongo.errors import ConnectionFailure, PyMongoError
        self.ping()
        wanted = [(self.collection, keys, options, cost) for keys, options, cost in self.INDEXES]
        wanted += [(self.files, [("filename", 1), ("uploadDate", 1)], {}, "GridFS reads "
                    "by name scan"),
                   (self.chunks, [("files_id", 1), ("n", 1)], {"unique": True}, "every "
                    "message read scans the chunks"),
                   (self.lists, [("rcpt", 1), ("sender", 1)], {}, "lists --for reads every "
                    "entry"),
                   (self.lists, [("rcpt_domain", 1)], {}, "a new list entry counts every "
                    "entry")]
        missing = {}
        for collection, keys, options, cost in wanted:
            name = f"{collection.name}: " + ", ".join(field for field, _ in keys)
            try:
                collection.create_index(keys, **options)
            except ConnectionFailure:
                raise
            except Exception as exc:
                missing[name] = f"{cost} ({mongo_error(exc)})"
        self.missing = missing
        self.indexed = True if not missing else None   # None: asked again, but not at once
        with contextlib.suppress(PyMongoError):       # if not, the dashboard counts them
            self.states()                              # counted here if missing

    def missing_indexes(self):
        """{index: what goes without it} for the archive's indexes MongoDB does not
        have, compared by their fields (nx-27017 names and orders them its own way);
        the text index by asking a $text query, which fails without one (its fields
        are _fts and _ftsx on MongoDB, and nx-27017 does not list it)."""
        have = {tuple(dict(index["key"])) for index in self.collection.list_indexes()}
        return {", ".join(field for field, _ in keys): cost for keys, options, cost
                in self.INDEXES if not (self.has_words() if options.get("name") == "words"
                                        else tuple(field for field, _ in keys) in have)}

    def has_words(self):
        from pymongo.errors import OperationFailure
        try:
            self.collection.find_one({"$text": {"$search": "mms"}}, {"_id": 1})
            return True
        except OperationFailure:
            return False

    def bound(self):
        """The console's limit on one query, as a command option (none for a command)."""
        return {"maxTimeMS": self.max_time_ms} if self.max_time_ms else {}

    def bounded(self, cursor):
        return cursor.max_time_ms(self.max_time_ms) if self.max_time_ms else cursor

    # Writes of the SMTP path ################################################

    def prepare(self, metadata, message):
        """The documents to write. The metadata is checked before anything is written,
        so that a document the server would refuse never leaves an orphan file."""
        from bson import Binary, Int64, ObjectId
        file_id = ObjectId()
        metadata["message"] = file_id
        metadata.update(search_fields(metadata))
        metadata.update(seed_fields(metadata, self.cfg.local_domains))
        storable(metadata, self.max_size)
        chunks, length = [], 0
        for n, piece in enumerate(gridfs_content(message, self.CHUNK_SIZE)):
            chunks.append({"files_id": file_id, "n": n, "data": Binary(piece)})
            length += len(piece)
            if message.size > SPOOL_THRESHOLD and len(chunks) == self.CHUNKS_PER_INSERT:
                self.chunks.insert_many(chunks)
                chunks = []
        return StoreJob(
            chunks=chunks,
            file={"_id": file_id, "filename": metadata["store_key"], "length": Int64(length),
                  "chunkSize": self.CHUNK_SIZE, "uploadDate": datetime.datetime.now(UTC),
                  "metadata": {"encoding": "base64(zlib(message))"}},
            metadata=metadata, size=length)

    def insert(self, batch):
        """One insert_many per collection: chunks, then files, then metadata.

        A write concern error on any of the three means the write may yet be rolled
        back, so no message of the batch is acknowledged. The metadata is inserted
        unordered: a document the server refuses (a schema validator, say) fails
        its own message only, not every later one of its batch.
        """
        from pymongo.errors import BulkWriteError, OperationFailure
        try:
            chunks = [chunk for job in batch for chunk in job.chunks]
            if chunks:
                self.chunks.insert_many(chunks)
            self.files.insert_many([job.file for job in batch])
            try:
                self.collection.insert_many([job.metadata for job in batch], ordered=False)
            except BulkWriteError as exc:
                refused = exc.details.get("writeErrors")
                if exc.details.get("writeConcernErrors") or not refused:
                    raise
                for error in refused:
                    batch[error["index"]].error = OperationFailure(
                        error.get("errmsg", "refused"), error.get("code"))
        except Exception as exc:
            for job in batch:
                job.error = exc

    def store(self, metadata, message):
        """One message on its own (replay): stored, or an exception."""
        job = self.prepare(metadata, message)
        self.insert([job])
        if job.error is not None:
            raise job.error

    # Reads ##################################################################

    def find(self, store_key):
        return next(self.bounded(self.collection.find({"store_key": store_key},
                                                      WORDS_LEFT_OUT).limit(1)), None)

    def resolve(self, key, scope=None):
        """The one message a store_key or a unique prefix of it names, as git takes a
        commit; an ambiguous prefix lists what it matches (a prefix regular
        expression is a range of the unique index). With a scope (a console user's
        domains), a message outside it is not there, and never named."""
        key = (key or "").strip().lower()
        if len(key) < KEY_PREFIX_MIN or not re.fullmatch(r"[0-9a-f]+", key):
            raise UsageError(f"a store_key is 8 to 64 hex characters: {key!r}")
        if len(key) == 64 and not scope:
            docs = [doc for doc in [self.find(key)] if doc]
        else:
            docs = list(self.bounded(self.collection.find(
                all_of({"store_key": {"$regex": "^" + key}}, scope or {}),
                WORDS_LEFT_OUT).limit(11)))
        if not docs:
            raise NotFound(f"no message with store_key {key}")
        if len(docs) > 1:
            keys = ", ".join(doc["store_key"] for doc in docs[:10])
            raise UsageError(f"store_key {key} is ambiguous: {keys}")
        return docs[0]

    def search(self, query, limit=0, projection=None, order="newest", first=None):
        """Newest first (or oldest), from the index: the limit goes to MongoDB, so the
        first line comes from the index, not from a sort of every match. By size, or
        by score (the best --text match first), MongoDB sorts what the filters find,
        keeping only the limit (the console bounds it by its maxTimeMS). The words
        kept for --text (up to 8 KiB a message) are left on the server unless asked."""
        if "$text" in query and self.cfg.text_search == "atlas":
            return self.aggregate(self.atlas(query) + [
                {"$sort": {"score": {"$meta": "searchScore"}} if order == "score" else
                 dict(ORDERS[order])}, *([{"$limit": limit}] if limit else []),
                {"$project": projection or WORDS_LEFT_OUT}])
        low, high = date_span(query) if limit and order in ("newest", "oldest") else (None,) * 2
        if order == "newest" and low is not None and (high is None or "$text" in query):
            return self.newest_since(query, limit, projection)
        if "$text" not in query and (low if order == "oldest" else low or high):
            return self.merged([self.in_windows(one, limit, projection, order, low, high,
                                                first or self.WINDOW_FIRST)
                                for one in each_domain(query)], limit, order)
        return self.ordered(query, limit, projection, order)

    @staticmethod
    def merged(reads, limit, order):
        """Reads in one order, merged by date, each message once (one for two of a
        scoped user's domains is in the read of each), at most limit of them."""
        if len(reads) == 1:
            return reads[0]
        seen = set()
        docs = heapq.merge(*reads, key=operator.itemgetter("received"),
                           reverse=order == "newest")
        return itertools.islice((doc for doc in docs if not (
            doc["_id"] in seen or seen.add(doc["_id"]))), limit or None)

    def ordered(self, query, limit, projection=None, order="newest", batch=None):
        """One find, in the order asked, the limit given to MongoDB."""
        # By score without the score in the projection (MongoDB 4.4 and later sort by
        # it as it is): nx-27017 would bring back the score alone.
        cursor = self.collection.find(as_points(query), projection or WORDS_LEFT_OUT).sort(
            ORDERS[order])
        return self.bounded(cursor.limit(limit).batch_size(batch or self.BATCH))  # never 16 MB

    WINDOW_FIRST = datetime.timedelta(hours=1)
    WINDOWS_MAX = 3

    def in_windows(self, query, limit, projection, order, low, high, first):
        """A page of a date range, read in windows of time from its start: `first`,
        then one as much wider as the rows found say the page still needs (2 to 32
        times), then the rest; a rest shorter than the window is read with it (a
        range a few seconds over a day, read from a day, is one window, not a day
        and then those seconds). On MongoDB each is a range of the same index as
        the whole, bounded by the limit, and the first fills a page of a busy
        archive.
        Where the first holds less than a sixteenth of what is needed, the rest is
        read at once: few messages, and one more date range, not two.
        nx-27017 reads every message of a date range before it sorts and limits:
        at 200,000 messages, 0.35 s for any date range plus 60 us a message in it
        (the search's second page: 8.1 s; its first hour: 0.38 s)."""
        newest, now = order == "newest", datetime.datetime.now(UTC)
        at, end = (high or now, low) if newest else (low, high or now)
        width, left, last_cut = first, limit, None
        for n in range(self.WINDOWS_MAX):
            try:
                cut = width and (at - width if newest else at + width)
            except OverflowError:   # past the year 1 or 9999: this window is the last
                cut = None
            final = cut is None or n == self.WINDOWS_MAX - 1 or end is not None and (
                cut - end < width if newest else end - cut < width)   # a shorter rest joins
            window = {} if last_cut is None else {"$lt" if newest else "$gte": last_cut}
            if not final:
                window["$gte" if newest else "$lt"] = cut
            found = 0
            for doc in self.ordered(all_of(query, {"received": window}) if window else query,
                                    left, projection, order):
                found += 1
                yield doc
            left -= found if limit else 0
            if final or limit and not left:
                return
            need = left if limit else found
            width = width * max(-(-2 * need // found), 2) if found and found * 16 >= need \
                else None
            at = last_cut = cut

    SINCE_BATCH = 101     # MongoDB's own first batch

    def newest_since(self, query, limit, projection):
        """Newest first, a lower bound on received is where reading stops, not a
        condition of the query. nx-27017 reads every message for a date range, 1.3 s
        at 200,000 whatever the range holds (row by row beside a $text: 27 s), and
        serves the same query without its date from its indexes, in order: 0.1 s for
        1,001 messages, 0.18 s for a reviewer's two domains. On MongoDB the same
        index keys, newest first, as the range's (the filter's (field, received)
        index, or received's); where the range holds fewer than the limit, past
        its bound the rest of one batch (up to SINCE_BATCH documents). The text index
        serves neither the date nor the order: there, the same matches are fetched
        and sorted for the same limit."""
        stripped, keep = without_lower_dates(query)
        for doc in self.ordered(stripped, limit, projection, batch=min(limit, self.SINCE_BATCH)):
            if not keep(doc.get("received")):
                return
            yield doc

    def count(self, query, limit=0):
        """How many messages the query finds; with a limit, at most that many (the
        index is read no further)."""
        if not query:  # the collection's own count, not a scan of every document
            return self.collection.estimated_document_count(**self.bound())
        if "$text" in query and self.cfg.text_search == "atlas":
            return next(self.aggregate(self.atlas(query) + [{"$count": "n"}]), {}).get("n", 0)
        if self.counts_newest(query, limit):
            return len(self.newest_keys(query, limit))
        if limit:
            # The _ids of at most `limit`, counted here: on MongoDB the same index
            # keys as count_documents with a limit, on nx-27017 (which answers a
            # count by an aggregation) 15 times faster: 0.09 s against 1.4 s for
            # 603 of 20,000 messages.
            return len(list(self.bounded(self.collection.find(
                as_points(query), {"_id": 1}).limit(limit).batch_size(limit))))
        return self.collection.count_documents(as_points(query), **self.bound())

    def counts_newest(self, query, limit):
        """Whether count reads the query's messages newest first, as a page does: with
        a date, whose range it reads in windows (in_windows), and a limit."""
        return bool(limit) and any(date_span(query)) and not (
            "$text" in query and self.cfg.text_search == "atlas")

    def newest_keys(self, query, limit):
        """The first `limit` messages' {_id, store_key, received}, newest first: to a
        since (newest_since), or, where the range has an end, in windows of time
        from a day (in_windows): a count's limit (1,001) is twenty pages. On MongoDB
        the same index keys as from an hour; on nx-27017 a window costs a read of
        every message's date."""
        return list(self.search(query, limit, {"store_key": 1, "received": 1}, first=DAY))

    def counted_page(self, query, size, limit, keep):
        """(the newest `size` messages that keep(row) passes, how many the query finds
        up to limit), for a query count reads newest first (counts_newest): the page is
        the count's first rows, read again by _id and store_key (the shard key). On
        MongoDB the same keys as a page's read and a count's, and `size` _id lookups on
        the shards that hold them: one read of the range, not two (on nx-27017, where
        a range with an end costs a read of every message's date, a page of one and
        its count took three such reads)."""
        rows = self.newest_keys(query, limit)
        first = [row for row in rows if keep(row)][:size]
        place = {row["_id"]: n for n, row in enumerate(first)}
        keys = [row.get("store_key") for row in first]   # null: another tool's, without one
        docs = list(self.bounded(self.collection.find(
            {"_id": {"$in": list(place)}, "store_key": {"$in": keys}}, WORDS_LEFT_OUT))) \
            if first else []
        return sorted(docs, key=lambda doc: place[doc["_id"]]), len(rows)

    def quarantine(self, scope=None):
        """What awaits a reviewer's judgement: spam, virus or banned, not released
        (a deleted message is gone), within a scoped user's domains. Served by the
        (verdict, received) index, three ranges merged newest first, so a page costs
        its size; released quarantined mail is the rare row read and passed over.

        One flat document, and `released: {$in: [null]}` (on MongoDB, as {$exists:
        false} here: released is an array or absent): nx-27017 took 4.1 s for a page
        of 200,000 messages with $and or $exists, 0.014 s in this form."""
        return {"verdict": {"$in": list(AWAITING)}, "released": {"$in": [None]},
                **(scope or {})}

    def quarantine_count(self, scope, limit):
        """How many messages await judgement, up to limit: a verdict at a time, each
        counted up to what the limit leaves. On MongoDB as many index keys as a
        count of the $in; nx-27017 reads a verdict from its index (as_points), and
        every message for the $in (a reviewer of one domain at 200,000 messages:
        1.36 s, against 0.20 s a verdict at a time)."""
        found = 0
        for verdict in AWAITING:
            found += self.count({**self.quarantine(scope), "verdict": verdict}, limit - found)
            if found >= limit:
                break
        return found

    def quarantine_page(self, scope, received, limit, order="newest"):
        """A page of the quarantine from an edge (received: its range): one range of
        the (verdict, received) index a verdict, merged by date, released messages
        passed over as they come (one_page passes over the rows shown already). MongoDB
        merges these ranges itself for a $in; nx-27017 reads every message for a
        range beside a $in, or beside released or _id conditions (9 to 11 s a page
        at 200,000), and only one verdict's messages for each of these. Each range is
        read in windows of time (in_windows), a day first: quarantined mail is a few
        in a hundred, and a page of it spans hours."""
        span = date_span({"received": received})
        ranges = [self.in_windows(query, 0, None, order, *span, DAY)
                  for verdict in AWAITING for query in each_domain(
                      {"verdict": verdict, "received": received, **(scope or {})})]
        return itertools.islice((doc for doc in self.merged(ranges, 0, order)
                                 if doc.get("released") is None), limit)

    def pieces(self, doc, file=None):
        """The raw message, a piece at a time, from its chunks in order: a message is
        never whole in memory. Damaged says what is wrong, once it is known."""
        file_id = doc.get("message")
        if file_id is None:
            raise Damaged("its document has no message field")
        expected = -(-file["length"] // file["chunkSize"]) if file else None
        inflate, pending, n = zlib.decompressobj(), b"", -1
        for n, chunk in enumerate(self.bounded(self.chunks.find({"files_id": file_id})
                                               .sort("n", 1))):
            if chunk.get("n") != n:
                raise Damaged(f"chunk {n + 1} of {expected or '?'} of its GridFS file is missing")
            data = pending + bytes(chunk["data"])
            cut = len(data) - len(data) % 4
            pending = data[cut:]
            yield from self.inflated(inflate, data[:cut])
        if n < 0:
            raise Damaged("its GridFS file is missing" if file is None or expected
                          else "its GridFS file is empty")
        if expected and n + 1 < expected:
            raise Damaged(f"chunk {n + 2} of {expected} of its GridFS file is missing")
        yield from self.inflated(inflate, pending)
        if not inflate.eof:
            raise Damaged("the stored file does not decode: it ends early")

    @staticmethod
    def inflated(inflate, encoded):
        try:
            data = base64.b64decode(encoded)
            while data:
                piece = inflate.decompress(data, Message.PIECE)
                data = inflate.unconsumed_tail
                yield piece
        except (zlib.error, binascii.Error, ValueError) as exc:
            raise Damaged(f"the stored file does not decode: {exc}") from None

    def read(self, doc):
        return b"".join(self.pieces(doc))

    def head(self, doc):
        """The stored message's header: only as many chunks as it takes."""
        data = bytearray()
        for piece in self.pieces(doc):
            data += piece
            if HEAD_END_RE.search(data) or len(data) > HEADER_BLOCK_MAX:
                break
        return header_block(bytes(data))

    def sha256(self, doc):
        """The recorded one, else that of the stored bytes."""
        if doc.get("sha256"):
            return doc["sha256"]
        return digest_of(self.pieces(doc))[0]

    def files_of(self, docs):
        """The GridFS files of these documents, by id: one query for the lot."""
        ids = [doc["message"] for doc in docs if doc.get("message") is not None]
        return ({f["_id"]: f for f in self.bounded(self.files.find({"_id": {"$in": ids}}))}
                if ids else {})

    def orphan_files(self):
        """(id, uploadDate, filename) of each file no document points at, a batch of
        files at a time against the index on message."""
        for files in batched(self.files.find({}, {"filename": 1, "uploadDate": 1})
                             .batch_size(self.BATCH), self.BATCH):
            ids = [f["_id"] for f in files]
            used = {doc["message"] for doc in self.collection.find(
                {"message": {"$in": ids}}, {"message": 1, "_id": 0})}
            for f in files:
                if f["_id"] not in used:
                    yield f["_id"], f.get("uploadDate"), f"file {f.get('filename')}"

    def orphan_chunks(self):
        """Chunks whose file is gone, read from the (files_id, n) index alone: the
        first chunk of each file, never the chunks' data."""
        from bson import MinKey
        first = self.chunks.find({"files_id": {"$gte": MinKey()}, "n": 0},
                                 {"files_id": 1, "_id": 0}).batch_size(self.BATCH)
        for chunks in batched(first, self.BATCH):
            ids = [chunk["files_id"] for chunk in chunks]
            known = {f["_id"] for f in self.files.find({"_id": {"$in": ids}}, {"_id": 1})}
            for file_id in ids:
                if file_id not in known:
                    made = getattr(file_id, "generation_time", None)
                    yield file_id, made, f"chunks of {file_id}"

    def stats(self, since=None, until=None, by=None, top=10, totals=True):
        """(totals, groups), counted by MongoDB from the received index's range."""
        head = self.window(since, until)
        sums = {"messages": {"$sum": 1}, "bytes": {"$sum": as_number("$size")}}
        counted = {"messages": 0, "bytes": 0, **dict.fromkeys(VERDICT_FIELDS + ("allowed",), 0)}
        for row in self.aggregate(head + [{"$group": {"_id": None, **sums, **{
                name: {"$sum": as_number(f"$is_{name}")} for name in (
                    *VERDICT_FIELDS, "allowed")}}}]) if totals else ():
            counted.update({key: row.get(key) or 0 for key in counted})
        if totals:      # refused at RCPT, never stored: the daily counts have them
            counted["blocked"] = self.blocked(since, until)
        totals = counted
        if not by:
            return totals, []
        key, each = STATS_GROUPS[by]
        order = {"_id": 1} if by in ("day", "hour") else {"messages": -1, "_id": 1}
        if each == "$files":                  # an attachment's bytes, not its message's
            sums["bytes"] = {"$sum": as_number("$files.size")}
        pipeline = head + ([{"$unwind": each}] if each else []) + [
            {"$group": {"_id": key, **sums}}, {"$sort": order}, {"$limit": top}]
        return totals, [{"group": group_name(row["_id"]), "messages": row.get("messages") or 0,
                         "bytes": row.get("bytes") or 0}
                        for row in self.aggregate(pipeline)]

    @staticmethod
    def atlas(query):
        """--text-search atlas: the word $text would look up, asked of Atlas Search
        first (a $search stage must be); the rest of the query, each term's test
        included, on what it finds."""
        rest = dict(query)
        word = rest.pop("$text")["$search"]
        return [{"$search": {"index": ATLAS_INDEX, "text": {"query": word,
                                                            "path": ["subject", "text"]}}},
                *([{"$match": rest}] if rest else [])]

    def aggregate(self, pipeline, collection=None):
        """A $group may pass its 100 MB of memory on a large window: it spills to disk."""
        return (collection if collection is not None else self.collection).aggregate(
            pipeline, allowDiskUse=True, **self.bound())

    @staticmethod
    def window(since, until=None):
        """The first stages of a pipeline over a time range: the range on the received
        index, then the same on the date as an ISO string, for nx-27017."""
        window, text = {}, {}
        for op, when in (("$gte", since), ("$lt", until)):
            if when:
                window[op] = when
                text[op] = f"{when.astimezone(UTC):%Y-%m-%dT%H:%M:%S}"
        if not window:
            return []
        return [{"$match": {"received": window}},
                {"$addFields": {"mms_at": day_format("%Y-%m-%dT%H:%M:%S")}},
                {"$match": {"mms_at": text}}]

    def daily(self, by, since):
        """{day: {group: [messages, bytes]}} from the daily counts (Tally): one range of
        the _id index, however much mail the days hold."""
        days = collections.defaultdict(dict)
        for row in self.aggregate([{"$match": self.counted(by, since)}], self.counts):
            days[row.get("day")][row.get("group")] = [row.get("messages") or 0,
                                                      row.get("bytes") or 0]
        return dict(days)

    def blocked(self, since, until):
        """Recipients filter mode refused by the block lists, from the daily counts of
        since's day to until's (days, UTC)."""
        days = self.daily("list", since or datetime.datetime(1970, 1, 1, tzinfo=UTC))
        last = f"{until:%Y-%m-%d}" if until else "~"
        return sum(groups.get("blocked", [0])[0] for day, groups in days.items()
                   if str(day) <= last)

    def top(self, by, since, top=10):
        """[{group, messages}], the groups with the most messages since then, summed by
        MongoDB: a busy MX sees a hundred thousand clients a day, and ten rows
        come back, not a row per client and day."""
        return [{"group": row["_id"], "messages": row["messages"]}
                for row in self.aggregate([
                    {"$match": self.counted(by, since)},
                    {"$group": {"_id": "$group", "messages": {"$sum": "$messages"}}},
                    {"$sort": {"messages": -1, "_id": 1}}, {"$limit": top}], self.counts)]

    @staticmethod
    def counted(by, since):
        """The daily counters by `by` from since's day on: a range of their _id."""
        return {"_id": {"$gte": f"{by}|{since:%Y-%m-%d}", "$lte": f"{by}|~"}}

    def reindex(self, docs, text_max):
        """Parse each message again (completed_fields) and write what its searches
        ask (search_fields), unless another reindex did; add those that had no
        verdict (stored before mms 1.1, so never counted) to the daily counts. How
        many were written."""
        from pymongo import UpdateOne
        fields = [{**self.parsed(doc, text_max), **search_fields(doc),
                   **seed_fields(doc, self.cfg.local_domains)} for doc in docs]
        result = self.collection.bulk_write([UpdateOne(    # $and: nx-27017 updates the
            {"$and": [self.its(doc), reindex_wanted(text_max)]}, {"$set": more})  # first
            for doc, more in zip(docs, fields)], ordered=False)   # $or match beside _id
        counts = tallied({**doc, **more} for doc, more in zip(docs, fields)
                         if "verdict" not in doc)
        if counts:
            self.add_counts(counts)
        return result.modified_count

    def parsed(self, doc, text_max):
        try:
            return completed_fields(self.pieces(doc), text_max, doc.get("sender"))
        except Damaged as exc:          # stored damaged: verify says more
            return {"completed": 1, "index_text": text_max, "parsing_errors": [
                f"the stored message cannot be read: {exc}"], "errors_count": 1}

    def add_counts(self, counts):
        """Add {(by, day, group): [messages, bytes]} to the daily counts: one upsert
        per group, one command for the lot."""
        from pymongo import UpdateOne
        self.counts.bulk_write([UpdateOne(
            {"_id": f"{by}|{day}|{group}"},
            {"$inc": {"messages": messages, "bytes": size},
             "$setOnInsert": {"by": by, "day": day, "group": group}}, upsert=True)
            for (by, day, group), (messages, size) in counts.items()], ordered=False)

    # The allow and block lists #############################################

    def list_entry(self, kind, sender, rcpt, by, message=None):
        """Allow or block mail from `sender` (an address or @domain) for `rcpt` (an
        address, @domain, or "" for everyone): one document by that pair, replaced
        whole. The entry it replaced, or None; Conflict past LISTS_MAX entries in
        all or LISTS_DOMAIN_MAX for one recipient domain (asked before a new one)."""
        key, domain = f"{sender} {rcpt}", rcpt.rpartition("@")[2]
        before = next(self.bounded(self.lists.find({"_id": key}).limit(1)), None)
        if before is None:
            if self.lists.estimated_document_count(**self.bound()) >= LISTS_MAX:
                raise Conflict(f"the lists hold {LISTS_MAX} entries, their most: unlist some")
            if rcpt and self.lists.count_documents(
                    {"rcpt_domain": domain}, limit=LISTS_DOMAIN_MAX, **self.bound()) \
                    >= LISTS_DOMAIN_MAX:
                raise Conflict(f"{domain} has {LISTS_DOMAIN_MAX} list entries, its most: "
                               f"unlist some")
        self.lists.replace_one({"_id": key}, {
            "_id": key, "kind": kind, "sender": sender, "rcpt": rcpt, "rcpt_domain": domain,
            "by": by, "at": datetime.datetime.now(UTC), "message": message}, upsert=True)
        return before

    def unlist(self, sender, rcpt):
        """Whether an entry for this pair was there, and is gone."""
        return self.lists.delete_one({"_id": f"{sender} {rcpt}"}).deleted_count == 1

    def list_entries(self, rcpt=None, domains=None):
        """The entries for one recipient (or @domain, or "" for everyone's), for the
        recipients of some domains, or all, by recipient then sender: on the (rcpt,
        sender) index (rcpt_domain for domains), at most LISTS_MAX."""
        query = {} if rcpt is None else {"rcpt": rcpt}
        if domains:
            query["rcpt_domain"] = {"$in": list(domains)}
        return self.lists.find(query).sort(
            [("rcpt", 1), ("sender", 1)]).limit(LISTS_MAX).max_time_ms(
            self.max_time_ms or LISTS_QUERY_MS)

    # The console's audit log ###############################################

    def audit_indexes(self, days):
        """at: a TTL index, the log's own retention (never purged with the mail);
        user and action for its searches. A retention changed since is set by collMod."""
        from pymongo.errors import OperationFailure
        self.audits.create_index([("user", 1), ("at", -1)])
        self.audits.create_index([("action", 1), ("at", -1)])
        ttl = {"expireAfterSeconds": days * 86400} if days else {}
        try:
            self.audits.create_index([("at", -1)], name="audit_at", **ttl)
        except OperationFailure as exc:
            if exc.code not in (85, 86):      # IndexOptionsConflict, IndexKeySpecsConflict
                raise
            self.db.command("collMod", self.audits.name,
                            index={"name": "audit_at", "expireAfterSeconds": days * 86400})

    def write_audits(self, entries):
        self.audits.insert_many(entries, ordered=False)

    def audit_trail(self, query, limit):
        return list(self.bounded(self.audits.find(query, {"_id": 0}).sort("at", -1)
                                 .limit(limit)))

    # Changes ################################################################

    def hold(self, doc, held=True, by=None):
        """held: true, or no held; `by` (who, when, how) is noted as held_by or unheld_by.
        The state before comes back from the same write, so the held counter moves
        only when the message's state did."""
        change = {"$set": {"held": True}} if held else {"$unset": {"held": ""}}
        if by:
            change.setdefault("$set", {})["held_by" if held else "unheld_by"] = by
        before = self.collection.find_one_and_update(self.its(doc), change, {"held": 1})
        if before is None:
            raise NotFound(f"{doc['store_key']} is gone: deleted or purged meanwhile")
        if is_held(before) != held:
            self.add_state({"held": 1 if held else -1})

    # The held and released figures: counters moved as holds, releases and deletes
    # happen (as the daily counts are as mail arrives), not a count over the archive:
    # one read of two documents however large it is. A missing counter (an archive
    # an earlier mms wrote) is counted once; `reindex` counts both again.
    STATES = ("held", "released")
    STATE_QUERIES = {"held": {"held": True}, "released": {"released": {"$exists": True}}}

    def add_state(self, changes):
        from pymongo import UpdateOne
        moved = [UpdateOne({"_id": f"state|{name}"}, {
            "$inc": {"messages": n}, "$setOnInsert": {"by": "state", "group": name}},
            upsert=True) for name, n in changes.items() if n]
        if moved:
            self.counts.bulk_write(moved, ordered=False)

    def states(self):
        """{"held": n, "released": n} from the counters; one missing is counted now."""
        found = {row["group"]: row.get("messages") or 0 for row in self.bounded(
            self.counts.find({"_id": {"$in": [f"state|{name}" for name in self.STATES]}}))}
        for name in self.STATES:
            if name not in found:
                found[name] = self.count_state(name, exact=False)
        return found

    def count_state(self, name, exact=True):
        """Count one figure over the archive and write it as its counter: exact (reindex)
        sets it; otherwise it is set only if no hold or release wrote it meanwhile."""
        n = self.count(self.STATE_QUERIES[name])
        self.counts.update_one({"_id": f"state|{name}"}, {"$set" if exact else "$setOnInsert": {
            "messages": n, "by": "state", "group": name}}, upsert=True)
        return n

    def learned(self, doc, kind, by):
        """Note what spamd was taught of the message: {class, by, at}."""
        if not self.collection.update_one(self.its(doc), {"$set": {"learned": {
                "class": kind, "by": by, "at": datetime.datetime.now(UTC)}}}).matched_count:
            raise NotFound(f"{doc['store_key']} is gone: deleted or purged meanwhile")

    def delete(self, doc):
        """Deleted only if not on hold, asked in the delete itself."""
        gone = self.collection.find_one_and_delete({**self.its(doc), **NOT_HELD},
                                                   {"released": 1})
        if gone is None:
            if self.collection.find_one(self.its(doc), {"_id": 1}) is not None:
                raise Conflict(f"{doc['store_key']} is on legal hold: `mms.py unhold` it first")
            raise NotFound(f"{doc['store_key']} is gone: deleted or purged meanwhile")
        self.add_state({"released": -1 if gone.get("released") else 0})
        self.remove_files([doc.get("message")])

    @staticmethod
    def its(doc):
        """The filter of a write to one message: its _id, and its store_key, the shard
        key the README suggests, so that a sharded cluster sends it to one shard."""
        return {"_id": doc["_id"], "store_key": doc.get("store_key")}

    def remove_files(self, file_ids):
        """Chunks, then files, one id per statement, one command for the lot."""
        from pymongo import DeleteMany, DeleteOne
        ids = [file_id for file_id in file_ids if file_id is not None]
        if ids:
            self.chunks.bulk_write([DeleteMany({"files_id": i}) for i in ids], ordered=False)
            self.files.bulk_write([DeleteOne({"_id": i}) for i in ids], ordered=False)

    def purge(self, query, dry_run=False):
        """Delete what the query finds, but what is on hold; the count. A batch of
        ids at a time, each deleted by one write that asks again that it is not
        held, so a hold placed meanwhile wins; then the files of those gone. The
        rest of the query is not asked again: `received` is written once, at
        receipt (and nx-27017 reads every document for a date range beside an $in
        on _id, 2.4 s a batch of 1,000 on 20,000 documents, against 0.02 s)."""
        query = all_of(query, NOT_HELD)
        if dry_run:
            return self.count(query)
        purged = 0
        cursor = self.collection.find(query, {"message": 1, "store_key": 1, "released": 1})
        for docs in batched(cursor.batch_size(self.BATCH), self.BATCH):
            ids = {"_id": {"$in": [doc["_id"] for doc in docs]},
                   "store_key": {"$in": [doc.get("store_key") for doc in docs]}}
            deleted = self.collection.delete_many({**ids, **NOT_HELD})
            if deleted.deleted_count < len(docs):  # some were held meanwhile: keep their files
                kept = {doc["_id"] for doc in self.collection.find(ids, {"_id": 1})}
                docs = [doc for doc in docs if doc["_id"] not in kept]
            self.remove_files([doc.get("message") for doc in docs])
            self.add_state({"released": -sum(1 for doc in docs if doc.get("released"))})
            purged += len(docs)
        return purged

    def claim_release(self, doc, force, unless_held=False):
        """The message is this release's alone until release_done: another release at
        the same time, or (without --force) one of a message released already, or
        (unless_held: a recipient's report link) one on hold, finds no match. A claim
        older than CLAIM_LAPSES (its release died) is taken over."""
        from pymongo import ReturnDocument
        claim = {"token": os.urandom(12).hex(), "at": datetime.datetime.now(UTC)}
        free = {"releasing": {"$exists": False}}
        stale = doc.get("releasing")
        if isinstance(stale, dict) and isinstance(stale.get("at"), datetime.datetime) \
                and claim["at"] - stale["at"] > self.CLAIM_LAPSES:
            free = {"releasing.token": stale.get("token")}
        condition = {**self.its(doc), **free}
        if not force:
            condition["released"] = {"$exists": False}
        if unless_held:
            condition.update(NOT_HELD)
        claimed = self.collection.find_one_and_update(
            condition, {"$set": {"releasing": claim}}, return_document=ReturnDocument.AFTER)
        if claimed is not None:
            return claimed, claim["token"]
        now = self.collection.find_one(self.its(doc))
        if now is None:
            raise NotFound(f"{doc['store_key']} is gone: deleted or purged meanwhile")
        if unless_held and is_held(now):
            raise Conflict(f"{doc['store_key']} is on legal hold: only an administrator can "
                           f"release it")
        if now.get("releasing"):
            raise Conflict(f"{doc['store_key']} is being released by another "
                           f"`mms.py release` since {now['releasing'].get('at')}")
        raise AlreadyReleased(doc["store_key"], len(now.get("released") or []))

    def release_done(self, claimed, token, record=None):
        """Give the claim back, with the release's record when it was sent."""
        change = {"$unset": {"releasing": ""}}
        if record is not None:
            change["$set"] = {"released": [*(claimed.get("released") or []), record]}
        done = self.collection.update_one({**self.its(claimed), "releasing.token": token},
                                          change)
        if record is not None and done.modified_count and not claimed.get("released"):
            self.add_state({"released": 1})


def batched(iterable, size):
    iterator = iter(iterable)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


###############################################################################
# The archive commands ########################################################
###############################################################################

class Escaped:
    """A text stream that writes control characters as \\xNN, but for line ends:
    what an archive command prints of a stored field (written by a sender) never
    acts on the terminal, as in the log. `buffer` is the raw stream, for `show`."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text):
        return self.stream.write(TEXT_CONTROL_RE.sub(hexed, text))

    def flush(self):
        self.stream.flush()

    @property
    def buffer(self):
        return self.stream.buffer

    def isatty(self):
        return self.stream.isatty()


def hexed(match):
    return f"\\x{ord(match.group()):02x}"


def audit_value(value):
    """An audit log's value as one line: a failed login's name is the stranger's
    own text, and a line break in it would print a line of their choosing."""
    return BIDI_CONTROL_RE.sub(named_char, CONTROL_RE.sub(hexed, str(value or "-")))


def json_line(doc):
    """JSON, with C1 controls and DEL escaped too (json escapes C0 only)."""
    text = json.dumps(doc, default=str, ensure_ascii=False)
    return C1_RE.sub(lambda m: f"\\u{ord(m.group()):04x}", text) + "\n"


def run_archive_command(cfg):
    """An archive command from the shell, as postqueue and postsuper run Postfix's
    queue: check and the web console answer within bounds, the others take as long
    as it takes."""
    command = COMMANDS[cfg.command]
    archive = Archive(cfg, server=command.bounded,
                      max_time_ms=WEB_QUERY_MS if command.bounded else None).connect()
    try:
        with contextlib.redirect_stdout(Escaped(sys.stdout)), \
                contextlib.redirect_stderr(Escaped(sys.stderr)):
            return command.run(cfg, archive)
    except MMSError as exc:
        print(f"mms.py: error: {exc}", file=sys.stderr)
        return exc.exit_status
    except Exception as exc:
        if bug(exc):
            raise                  # its traceback, once
        print(f"mms.py: error: cannot read the archive at {redact(cfg.mongo_host)}: "
              f"{mongo_error(exc)}", file=sys.stderr)
        return 1
    finally:
        archive.close()


@dataclasses.dataclass(frozen=True)
class Filters:
    """What list, count, export, purge, verify, the console and the API search by:
    a value, made by Filters.parse from the command line or a query string alike."""
    sender: str = None
    rcpt: str = None
    since: datetime.datetime = None
    until: datetime.datetime = None
    subject: str = None
    text: str = None
    message_id: str = None
    quarantine_id: str = None
    client: str = None
    quarantine: str = None
    verdict: str = None
    attachment: str = None
    attachment_type: str = None
    attachment_sha256: str = None
    country: str = None
    bounce: bool = False
    held: bool = None          # True: only held; False: only not held (purge); None: any
    released: bool = False
    older_than: datetime.datetime = None

    @classmethod
    def parse(cls, given):
        """From {name: value}: the command line's values (typed by argparse) or a
        query string's (text); UsageError names a value that is neither."""
        given = dict(given)
        for shorthand in ("virus", "spam"):     # --virus is --verdict virus
            if given.pop(shorthand, None) in (True, "1", "on", "yes", "true"):
                given["verdict"] = shorthand
        values = {}
        for field in dataclasses.fields(cls):
            value = given.get(field.name)
            if isinstance(value, str):
                value = value.strip()[:256]
            if value is None or value == "" or value is False:
                continue          # not given (a flag not set is no filter)
            if field.type is bool:
                value = value in (True, "1", "on", "yes", "true")
            elif field.type is datetime.datetime and isinstance(value, str):
                try:
                    value = _when(value)
                except argparse.ArgumentTypeError as exc:
                    raise UsageError(f"{field.name}: {exc}") from None
            values[field.name] = value
        if values.get("verdict") and values["verdict"] not in VERDICTS:
            raise UsageError(f"verdict: one of {', '.join(VERDICTS)}")
        if values.get("quarantine") and values["quarantine"] not in QUARANTINES:
            raise UsageError(f"quarantine: one of {', '.join(QUARANTINES)}")
        if values.get("client"):
            try:
                ipaddress.ip_network(values["client"], strict=False)
            except ValueError:
                raise UsageError(f"client: not an IP address or CIDR: {values['client']}") \
                    from None
        return cls(**values)

    def query(self):
        """The MongoDB filter. Each clause has its index (README, "At scale"), but the
        subject's, which the console bounds by its maxTimeMS. An address or a domain
        is asked as equality, which MongoDB reads on an array as on a value: nx-27017
        reads every message in Python for a $in beside a date (0.65 s against 0.044 s
        at 20,000). nx-27017 needs `$elemMatch` for a regular expression on an
        element of an array; that form is right on MongoDB too."""
        clauses, received = [], {}
        if self.sender is not None:
            clauses.append(address_clause(self.sender, "sender", "sender_domain"))
        if self.rcpt is not None:  # a recipient, or a quarantine address --real-rcpt replaced
            clauses.append(address_clause(self.rcpt, ("rcpt", "quarantine_to"), "rcpt_domain"))
        if self.since:
            received["$gte"] = self.since
        if self.until:
            received["$lt"] = self.until
        if self.older_than:
            received["$lt"] = min(received.get("$lt", self.older_than), self.older_than)
        if received:
            clauses.append({"received": received})
        if self.subject:
            clauses.extend(subject_clauses(self.subject, narrowed=bool(self.text)))
        if self.text:
            clauses.extend(text_clauses(self.text))
        if self.message_id:
            clauses.append({"message_id": self.message_id.strip("<>")})
        if self.quarantine_id:
            clauses.append({"quarantine_id": self.quarantine_id.strip("<> ")})
        if self.quarantine:
            clauses.append({"quarantine": self.quarantine})
        if self.verdict:
            clauses.append({"verdict": self.verdict})
        if self.attachment:
            clauses.append(attachment_clause(self.attachment))
        if self.attachment_type:
            clauses.append(file_clause("content_type", self.attachment_type.lower()))
        if self.attachment_sha256:
            clauses.append(file_clause("sha256", self.attachment_sha256.lower()))
        if self.country:
            clauses.append({"country": self.country.upper()})
        if self.bounce:
            clauses.append({"is_bounce": 1})
        if self.held is not None:
            clauses.append({"held": True} if self.held else NOT_HELD)
        if self.released:
            clauses.append({"released": {"$exists": True}})
        if self.client:
            clauses.append({"client_hex": client_range(ipaddress.ip_network(self.client,
                                                                            strict=False))})
        return all_of(*clauses)


TEXT_TERM_RE = re.compile(r'(-?)(?:"([^"]*)"|(\S+))')


def text_clauses(search):
    """--text as clauses: every word and "phrase" must be there, as in piler and
    mailpit, and -word must not. The text index finds the messages with the
    longest word asked (one word: $text joins words with OR); the terms are then
    one test of `text` (which holds the subject's words first) on those messages
    alone. MongoDB reads the same documents for a "phrase" of $text; nx-27017
    answers one word right, but not a phrase beside another condition, two words,
    or -word; and it tests a $text's matches row by row in Python beside an $or,
    $nor or $and, and not beside conditions on fields (README, "Word searches on
    nx-27017")."""
    wanted, unwanted = [], []
    for minus, phrase, word in TEXT_TERM_RE.findall(search[:1000]):
        words = WORD_RE.findall(phrase or word)
        if words:
            (unwanted if minus else wanted).append(words)
    if not wanted:
        raise UsageError("text: at least one word to find (-word only leaves words out)")
    longest = max((word for words in wanted for word in words), key=len)
    return [{"$text": {"$search": longest}}, {"text": terms_found(wanted, unwanted)}]


def terms_found(wanted, unwanted=()):
    """Each of the wanted terms somewhere in `text`, and none of the unwanted, as one
    regular expression: one term is looked for where it is; several are lookaheads
    from the start, each stepping over whole words (`text` keeps them one space
    apart), which Python's re (nx-27017's) runs in 10 us for 1 KB of words, where
    `.*?` took 37."""
    if len(wanted) == 1 and not unwanted:
        return term_found(wanted[0])
    return any_case("^" + "".join(f"(?=(?:[^ ]* )*?{term_pattern(words)})" for words in wanted)
                    + "".join(f"(?!(?:[^ ]* )*?{term_pattern(words)})" for words in unwanted))


SUBJECT_WORD_MIN = 3     # letters of the longest word a subject search narrows by


def subject_clauses(subject, narrowed=False):
    """--subject as clauses: the text index finds the messages with the subject's
    longest word (as --text does), then the subject itself, in any case, is tested
    on those alone. A subject of only shorter words cannot be searched so (it would
    read most of the index): UsageError says so. With --text (one $text a query),
    its word narrows instead, and the subject is only tested."""
    test = {"subject": any_case(re.escape(subject))}
    if narrowed:
        return [test]
    longest = max(WORD_RE.findall(subject[:1000]) or [""], key=len)
    if len(longest) < SUBJECT_WORD_MIN:
        raise UsageError(f"subject: a word of {SUBJECT_WORD_MIN} letters or more, which the "
                         f"search finds on the text index: {subject!r} has none")
    return [{"$text": {"$search": longest}}, test]


def term_found(words):
    """The words, one after another, whole, in any case, in `text`."""
    return any_case(term_pattern(words))


def term_pattern(words):
    """Between spaces, or the ends, as `text` keeps words: not between \\w and \\W,
    which MongoDB's regular expressions read as ASCII (SERVER-23881), so that
    `den` would be a word of `Døden`."""
    return "(?<![^ ])" + " ".join(map(re.escape, words)) + "(?![^ ])"


def any_case(pattern):
    """A case-insensitive $regex, its flag inline: (?i) is PCRE's own and means on
    MongoDB what $options "i" does. nx-27017 turns this form into SQL beside a
    $text, but falls back to reading every message for $options (0.28 s against
    19 s for a subject search of 200,000 messages)."""
    return {"$regex": "(?i)" + pattern}


def attachment_clause(pattern):
    """*.zip is a look-up of files.ext, a name one of files.filename (both
    indexed); any other pattern (invoice*) a case-insensitive match, which no
    index serves (README, "At scale")."""
    extension = re.fullmatch(r"\*\.([^*?./]+)", pattern)
    if extension:
        return file_clause("ext", extension.group(1).lower())
    if "*" not in pattern and "?" not in pattern:
        return file_clause("filename", pattern)
    expression = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c)
                         for c in pattern)
    return file_clause("filename", any_case(f"^{expression}$"))


def file_clause(field, condition):
    """An attachment whose field is so: $elemMatch, which MongoDB serves from the
    index on files.<field> as it would files.<field>: value, and which nx-27017
    answers right where it misses a match of files.<field> on a one-field index."""
    return {"files": {"$elemMatch": {field: condition}}}


def address_clause(address, fields, domain_field):
    """'<>' the null sender, '@example.org' a whole domain (its own indexed field),
    else one address (in any of these fields)."""
    address = address.strip().lower()
    if address.startswith("@"):
        return {domain_field: address[1:]}
    value = "" if address == "<>" else address.strip("<>")
    if isinstance(fields, str):
        return {fields: value}
    return {"$or": [{field: value} for field in fields]}


@command("count", "how many messages the filters find", FILTERS + MONGO)
def archive_count(cfg, archive):
    print(archive.count(cfg.filters.query()))
    return 0


@command("list", "one line per message, newest first",
         FILTERS + ("limit", "json", "sort") + MONGO)
def archive_list(cfg, archive):
    out = sys.stdout
    for doc in archive.search(cfg.filters.query(), limit=cfg.limit, order=sort_order(cfg)):
        doc.pop("_id", None)
        if cfg.json:
            out.write(json_line(dict(doc, verdict=verdict(doc))))
        else:
            out.write(list_line(doc) + "".join(f" [{MARK_WORDS.get(mark, mark)}]"
                                               for mark in marks(doc)) + "\n")
    return 0


def sort_order(cfg):
    """--sort: date (newest first), size (largest first), or score (the best --text
    match first: a score there is only with --text)."""
    if cfg.sort == "score" and not cfg.filters.text:
        raise UsageError("--sort score ranks --text matches: give --text")
    return "newest" if cfg.sort == "date" else cfg.sort


MARK_WORDS = {"held": "legal hold"}          # the held field, as a person reads it


def marks(doc):
    """What list and the console's list say of a message beside its fields: its
    verdict unless clean, held, released."""
    kind = verdict(doc)
    return [mark for mark, shown in ((kind, kind != "clean"), ("held", is_held(doc)),
                                     ("released", doc.get("released"))) if shown]


def list_line(doc):
    """One line per message, whatever wrote the document: another tool's documents
    may lack any of mms's fields, or hold other types in them."""
    received = doc.get("received")
    when = (f"{received:%Y-%m-%d %H:%M:%S}" if isinstance(received, datetime.datetime)
            else str(received or "-")[:19].ljust(19))
    rcpt = doc.get("rcpt")
    rcpt = ",".join(map(str, rcpt)) if isinstance(rcpt, list) else str(rcpt or "")
    size = doc.get("size")
    return (f"{doc.get('store_key', '-')} {when} {size if isinstance(size, int) else '-':>8} "
            f"<{doc.get('sender', '')}> -> {rcpt} {str(doc.get('subject', ''))!r}")


def write_out(pieces):
    """Each piece as it is decoded: a 30 MB message is never whole in memory. The
    bytes as stored into a pipe or a file; to a terminal, control characters but
    line ends and tabs as \\xNN, as `less` shows them."""
    out = sys.stdout.buffer
    tty = out.isatty()
    for piece in pieces:
        out.write(BYTES_CONTROL_RE.sub(lambda m: b"\\x%02x" % m.group()[0], piece)
                  if tty else piece)
    out.flush()


@command("show", "the raw message of KEY", MONGO, key="store_key")
def archive_show(cfg, archive):
    write_out(archive.pieces(archive.resolve(cfg.key)))
    return 0


@command("headers", "the header of KEY", MONGO, key="store_key")
def archive_headers(cfg, archive):
    """Only as much of the message as its header takes."""
    write_out([archive.head(archive.resolve(cfg.key))])
    return 0


@command("release", "send KEY on to its recipients (or --to), as amavisd-release does",
         ("to", "via", "force", "hostname", "server", "remote_host", "remote_port") + MONGO,
         key="store_key")
def archive_release(cfg, archive):
    """Send a kept message on, as amavisd-release does for its own quarantines: with
    its stored sender, to its recipients (or --to), without the X-MMS-RCPT header
    that mms added, through the local Postfix; then note it on the document. The
    message is claimed first, so two releases at once send it once, and only the
    record is written afterwards, so a hold placed meanwhile stays."""
    doc = archive.resolve(cfg.key)
    refused, record = release_message(cfg, archive, doc, cfg.to, again=cfg.force,
                                      virus=cfg.force, by=os_user())
    for rcpt, answer in refused.items():
        print(f"{rcpt}: {answer}")
    if record is not None:
        print(f"released {doc['store_key']} to {', '.join(record['to'])} via "
              f"{record['via']}: {record['reply']}")
    return 0 if record is not None and record["reply"].startswith("2") and not refused else 1


MMS_QUEUED_RE = re.compile(r"queued as ([0-9a-f]{64})\b")
QUARANTINE_FIELD_RE = re.compile(
    rb"(?i)(x-mms-rcpt|x-envelope-[a-z-]*|x-quarantine-id|x-amavis-[a-z-]*|x-spam-[a-z-]*)[ \t]*:")


def os_user():
    """Who ran a command, as a release or a hold records it: the OS user's name."""
    import getpass
    try:
        return f"{getpass.getuser()} (command line)"
    except (KeyError, OSError):
        return f"uid {os.getuid()} (command line)"


def release_message(cfg, archive, doc, to=None, again=False, virus=False, by=None,
                    once_for=None):
    """({refused rcpt: reply}, the record noted on the document, or None), for the
    command and the web console alike. A message released already goes again only
    when asked (again), and a virus only when asked explicitly (virus). With
    once_for (a report's link), a release that reached that address already, or
    of a message on hold, is refused under the same claim."""
    if verdict(doc) == "virus" and not virus:
        raise VirusRelease(doc)
    doc, token = archive.claim_release(doc, again, unless_held=bool(once_for))
    record = None
    try:
        if once_for and released_to(doc, once_for):
            raise Conflict(f"{doc['store_key']} was released to {once_for} already")
        data = release_copy(archive.read(doc))
        via = cfg.via or ((cfg.remote_host, cfg.remote_port) if cfg.server == "mongo-filter"
                          else ("127.0.0.1", 25))
        rcpts = to or list(doc.get("rcpt") or [])
        refused, reply = send_message(via, doc.get("sender", ""), rcpts, data, cfg.hostname)
        stored_again = MMS_QUEUED_RE.search(reply or "")
        if stored_again and archive.find(stored_again.group(1)) is not None:
            raise Conflict(f"{via[0]}:{via[1]} answered {reply!r}, a key in this archive: "
                           f"the message went back into an archive, not on to its "
                           f"recipients; not recorded as released (--via the Postfix that "
                           f"delivers)")
        if reply is not None:
            record = {"at": datetime.datetime.now(UTC), "via": f"{via[0]}:{via[1]}",
                      "to": [r for r in rcpts if r not in refused], "reply": reply,
                      **({"by": by} if by else {})}
    finally:
        archive.release_done(doc, token, record)
    return refused, record




def released_to(doc, rcpt):
    """Whether a release of this message reached this address already."""
    return any(rcpt in (r.get("to") or []) for r in doc.get("released") or []
               if isinstance(r, dict))


def release_copy(data):
    """The message as a release sends it: without the fields that mms and amavisd-new
    prepended for the quarantine, above amavisd-new's own Received: (as --real-rcpt
    reads them). X-Envelope-To names every recipient, Bcc too. Below that Received:
    every field is the sender's, and stays; the stored copy is never changed."""
    kept, at, dropping = [], 0, False
    for line in io.BytesIO(header_block(data)):      # lines end at LF only
        if line[:9].lower() == b"received:":
            break
        if line[:1] not in (b" ", b"\t"):
            dropping = bool(QUARANTINE_FIELD_RE.match(line))
        if not dropping:
            kept.append(line)
        at += len(line)
    return b"".join(kept) + data[at:]


def send_message(via, sender, rcpts, data, hostname):
    """({refused rcpt: reply}, the end-of-data reply or None): every recipient is asked,
    and the message goes to those accepted."""
    try:
        with smtplib.SMTP(via[0], via[1], local_hostname=hostname, timeout=60) as client:
            client.ehlo_or_helo_if_needed()
            options = []
            if not all(address.isascii() for address in (sender, *rcpts)):
                if not client.has_extn("smtputf8"):
                    raise DeliveryError(f"{via[0]}:{via[1]} does not offer SMTPUTF8, which "
                                        f"an address here needs")
                options = ["SMTPUTF8"]
            code, text = client.mail(sender, options)
            if code != 250:
                return {rcpt: f"{code} {text.decode(errors='replace')}" for rcpt in rcpts}, None
            refused = {}
            for rcpt in rcpts:
                code, text = client.rcpt(rcpt)
                if code not in (250, 251):
                    refused[rcpt] = f"{code} {text.decode(errors='replace')}"
            if len(refused) == len(rcpts):
                return refused, None
            code, text = client.data(data)
            return refused, f"{code} {text.decode(errors='replace')}"
    except (OSError, smtplib.SMTPException) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or \
            type(exc).__name__
        raise DeliveryError(f"the mail server at {via[0]}:{via[1]} that releases go through "
                            f"did not take the message ({why})") from None


def learn_message(cfg, archive, doc, kind, by):
    """(what was done, in words): spamd taught the message as `kind` (its copy as a
    release sends it, without the quarantine's fields), and the document notes
    it; the same class again is a no-op that says so. MMSError if spamd did not
    learn it; then nothing is changed."""
    learned = doc.get("learned") if isinstance(doc.get("learned"), dict) else {}
    if learned.get("class") == kind:
        return (f"{doc['store_key']} was learned as {kind} already, by "
                f"{learned.get('by') or '?'}: nothing to do")
    if not cfg.spamd:
        raise UsageError("learning needs spamd: --spamd HOST:PORT")
    try:
        spamd_tell(cfg.spamd, release_copy(archive.read(doc)), kind, cfg.scan_timeout)
    except ScanError as exc:
        raise DeliveryError(f"{exc}; nothing was changed") from None
    archive.learned(doc, kind, by)
    return f"learned {doc['store_key']} as {kind}"


@command("learn", "teach spamd's Bayes that KEY is spam (--spam) or not (--ham), as "
         "spamc -L does", ("spam", "learn_ham", "spamd", "scan_timeout") + MONGO,
         key="store_key")
def archive_learn(cfg, archive):
    if cfg.spam == cfg.learn_ham:
        raise UsageError("learn KEY --spam, or learn KEY --ham")
    print(learn_message(cfg, archive, archive.resolve(cfg.key), "spam" if cfg.spam else "ham",
                        os_user()))
    return 0


@command("delete", "delete KEY, unless it is on legal hold", MONGO, key="store_key")
def archive_delete(cfg, archive):
    doc = archive.resolve(cfg.key)
    archive.delete(doc)
    print(f"deleted {doc['store_key']}")
    return 0


@command("hold", "put KEY on legal hold: delete, purge and --retention leave it alone",
         MONGO, key="store_key")
def archive_hold(cfg, archive, held=True):
    """A legal hold: purge and delete leave the message alone until unhold."""
    doc = archive.resolve(cfg.key)
    archive.hold(doc, held, by={"user": os_user(), "at": datetime.datetime.now(UTC),
                                "via": "command line"})
    print(f"legal hold {'placed on' if held else 'lifted from'} {doc['store_key']}")
    return 0


@command("unhold", "lift the legal hold from KEY", MONGO, key="store_key")
def archive_unhold(cfg, archive):
    return archive_hold(cfg, archive, held=False)


@command("purge", "delete what is older than --older-than and not on legal hold",
         FILTERS + ("older_than", "dry_run") + MONGO)
def archive_purge(cfg, archive):
    """Delete what is older than --older-than, never what is held. The
    metadata goes first, so that an interrupted purge leaves at worst an orphan
    file (which `verify --orphans --repair` sweeps), never a document that points at nothing."""
    if not cfg.older_than:
        raise UsageError("purge needs --older-than, e.g. --older-than 90d")
    count = archive.purge(dataclasses.replace(cfg.filters, held=False).query(),
                          dry_run=cfg.dry_run)
    print(f"{'would purge' if cfg.dry_run else 'purged'} {count} message(s) received before "
          f"{cfg.older_than:%Y-%m-%d %H:%M:%S} UTC")
    return 0


ORPHAN_AGE = datetime.timedelta(hours=1)  # younger, a write may still be under way


def uploaded(when, now):
    """A file's uploadDate; nx-27017 gives back fs.files dates as ISO strings."""
    if isinstance(when, str):
        with contextlib.suppress(ValueError):
            when = datetime.datetime.fromisoformat(when)
    if not isinstance(when, datetime.datetime):
        return now
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@command("verify", "an fsck of the archive", FILTERS + ("orphans", "repair") + MONGO)
def archive_verify(cfg, archive):
    """An fsck for the archive: each metadata document's file exists and decodes,
    with the recorded size and sha256; with --orphans, files and chunks that no
    document points at, which --repair removes once they are an hour old (every file
    of the archive is read for them, so only when asked). One line per
    problem; exit 1 if there is any. Memory stays the same whatever the archive's
    size: documents and files are read a batch at a time, messages a chunk at a time."""
    problems = 0

    def problem(text):
        nonlocal problems
        problems += 1
        print(text)

    for docs in batched(archive.search(cfg.filters.query()), archive.BATCH):
        files = archive.files_of(docs)
        for doc in docs:
            trouble = verify_message(archive, doc, files.get(doc.get("message")))
            if trouble:
                problem(f"{doc.get('store_key', doc['_id'])}: {trouble}")
    now = datetime.datetime.now(UTC)
    for orphans in (archive.orphan_files(), archive.orphan_chunks()) \
            if cfg.orphans or cfg.repair else ():
        for file_id, made, what in orphans:
            if cfg.repair and now - uploaded(made, now) > ORPHAN_AGE:
                archive.remove_files([file_id])
                print(f"removed orphan {what}")
            else:
                problem(f"orphan {what}, no message points at it")
    print(f"verify: {problems} problem(s)")
    return 1 if problems else 0


def verify_message(archive, doc, file):
    """What is wrong with one stored message, or None."""
    try:
        digest, size = digest_of(archive.pieces(doc, file))
    except Damaged as exc:
        return exc.args[0]
    if doc.get("size") not in (None, size):
        return f"{size} bytes stored, {doc['size']} recorded"
    if doc.get("sha256") and digest != doc["sha256"]:
        return "sha256 differs from the one recorded at receipt"
    return None


@command("stats", "counts and bytes, in all and by group",
         ("since", "until", "by", "top", "json") + MONGO)
def archive_stats(cfg, archive):
    """Counts and bytes, in all and per group, computed by MongoDB."""
    totals, groups = archive.stats(cfg.since, cfg.until, cfg.by, cfg.top)
    if cfg.json:
        sys.stdout.write(json_line({"totals": totals, "by": cfg.by, "groups": groups}))
        return 0
    print(", ".join(f"{name} {value}" for name, value in totals.items()))
    for group in groups:
        print(f"{group['messages']:>10} {group['bytes']:>14} {group['group']}")
    return 0


def group_name(value):
    return "<>" if value == "" else str(value if value is not None else "-")


class Spooling(Exception):
    """Proxy and filter modes with MongoDB down: mail flows, and waits in the spool."""


@command("check", "one line and exit 0 or 2, for Nagios, monit or a HEALTHCHECK",
         ("server", "host", "port", "hostname", "remote_host", "remote_port", "clamd", "spamd",
          "scan_timeout") + MONGO, bounded=True)
def archive_check(cfg, archive):
    """A probe for Nagios, monit or a container HEALTHCHECK: one line, exit 0 (OK), 1
    (WARNING) or 2 (CRITICAL). It talks to the running server as a client would: in
    quarantine mode a probe message goes in, is found in MongoDB and deleted; in
    proxy and filter modes nothing is relayed, but MongoDB, the downstream server
    and the scanners are each asked, and MongoDB down is a WARNING (mail is
    relayed and spooled)."""
    try:
        state = running_instance(cfg)
    except UsageError as exc:
        print(f"UNKNOWN: {exc}")
        return 3
    if state:  # the server as it runs, whatever flags it was given
        target = Target(cfg.server if cfg.source.get("server") == "--server" else
                        state["server"], state["host"], state["port"], state["probe"])
    else:
        target = Target(cfg.server, cfg.host, cfg.port)
    try:
        done = CHECKS[target.server](cfg, archive, target)
        missing = archive.missing_indexes() if target.server != "debug" else {}
    except Spooling as exc:
        print(f"WARNING: {exc}")
        return 1
    except Exception as exc:
        print(f"CRITICAL: {mongo_error(exc)}")
        return 2
    if missing:
        print(f"WARNING: {done}, but indexes are missing: " + "; ".join(
            f"{name} ({cost})" for name, cost in missing.items()))
        return 1
    print(f"OK: {done}")
    return 0


def running_instance(cfg):
    """The state of the instance check asks: the one on --port; else the only one
    running here; else the only one that stores into the MongoDB check is given.
    UsageError names them when that is not one."""
    states = read_states()
    if cfg.source.get("port") == "--port":
        return states.get(cfg.port)
    if len(states) > 1:
        mine = {port: s for port, s in states.items() if s.get("mongo") == mongo_name(cfg)}
        if len(mine) != 1:
            ports = ", ".join(f"{port} ({s['server']})" for port, s in sorted(states.items()))
            raise UsageError(f"{len(states)} mms instances run here, on ports {ports}, and "
                             f"{len(mine) or 'none'} of them store into {mongo_name(cfg)}: "
                             f"name one with --port")
        states = mine
    return next(iter(states.values()), None)


@dataclasses.dataclass(frozen=True)
class Target:
    """The server `check` asks: as its state file says it runs, else as the options say."""
    server: str
    host: str
    port: int
    probe: str = None


def check_smtp(cfg, target, message=None):
    """The server's greeting and EHLO, and a message if given: its reply."""
    host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(target.host, target.host)
    try:
        with smtplib.SMTP(host, target.port, local_hostname="mms-check",
                          timeout=cfg.mongo_timeout + 10) as client:
            client.ehlo()
            if message is None:
                return client.noop()
            client.mail("mms-check@" + cfg.hostname)
            client.rcpt("mms-check@" + cfg.hostname)
            return client.data(message)
    except (OSError, smtplib.SMTPException) as exc:
        raise RuntimeError(f"mms at {host}:{target.port}: {exc}") from None


def check_quarantine(cfg, archive, target):
    archive.ping()  # first: CRITICAL within --mongo-timeout
    mark = f"X-MMS-Probe: {target.probe}\r\n" if target.probe else ""
    probe = (f"{mark}Subject: mms check\r\nFrom: mms-check@{cfg.hostname}\r\n\r\n"
             f"probe\r\n").encode()
    code, text = check_smtp(cfg, target, probe)
    if code != 250:
        raise RuntimeError(f"mms answered the probe {code} {text.decode(errors='replace')}")
    key = text.decode().rsplit(" ", 1)[-1]
    doc = archive.find(key)
    if doc is None:
        raise RuntimeError(f"the probe {key} was answered 250 but is not in MongoDB")
    archive.delete(doc)
    return f"probe {key[:12]} stored in MongoDB and deleted"


def check_debug(cfg, archive, target):
    code, _ = check_smtp(cfg, target)
    return f"mms at port {target.port} answers ({code})"


def check_relay(cfg, archive, target):
    check_smtp(cfg, target)
    Downstream(cfg).close()
    asked = ["mms", "MongoDB", f"downstream {cfg.remote_host}:{cfg.remote_port}"]
    if target.server == "mongo-filter":
        for name, request, answer in SCANNER_PINGS:
            address = getattr(cfg, name)
            if address and answer not in ask(address, request, cfg.scan_timeout):
                raise RuntimeError(f"{name} at {address[0]}:{address[1]} did not answer PONG")
            if address:
                asked.append(name)
    try:
        archive.ping()
    except Exception as exc:
        spooled = Spool(cfg.spool_dir).waiting()
        raise Spooling(f"MongoDB: {mongo_error(exc)}; mail is relayed, and {spooled} "
                       f"message(s) wait in {cfg.spool_dir} for `mms.py replay`") from None
    return ", ".join(asked) + " answer"


CHECKS = {"mongo-quarantine": check_quarantine, "debug": check_debug,
          "mongo-proxy": check_relay, "mongo-filter": check_relay}


@command("reindex", "parse messages stored before mms 1.1 (or with another --index-text), "
         "and count them", FILTERS + ("batch", "index_text") + MONGO)
def archive_reindex(cfg, archive):
    """Messages stored by mms 1.0 lack the fields the searches and the dashboard's
    daily counts read (completed_fields, search_fields): this writes them, a batch
    at a time, newest first, in one pass of one cursor over the received index,
    and adds each message to the daily counts. A message that has them is left
    alone, so a reindex stopped (or killed) goes on where it was when run again,
    and memory stays the same whatever the archive's size. It reads and writes
    MongoDB only: the SMTP server never waits for it but as it waits for MongoDB."""
    query = all_of(cfg.filters.query(), reindex_wanted(cfg.index_text))
    total, done, started = archive.count(query), 0, time.monotonic()
    progress = Progress(sys.stderr, total)
    for docs in batched(archive.search(query), cfg.batch):   # one pass of one cursor
        done += archive.reindex(docs, cfg.index_text)
        progress.show(done)
    progress.end()
    for name in archive.STATES:
        archive.count_state(name)
    print(f"reindex: {done} message(s) given their search fields in "
          f"{time.monotonic() - started:.0f} s")
    return 0


def reindex_wanted(text_max):
    """Stored before mms 1.1 (no verdict; not parsed) or 1.2 (no headers), or with
    another --index-text."""
    return {"$or": [{"verdict": {"$exists": False}}, {"headers": {"$exists": False}},
                    {"index_text": {"$ne": text_max}}]}


class Progress:
    """done/total, rate and time left, on one line of a terminal (nothing elsewhere)."""

    def __init__(self, stream, total):
        self.total, self.started = total, time.monotonic()
        self.tty = stream.isatty()
        self.stream = getattr(stream, "stream", stream)   # its own \r, past Escaped

    def show(self, done):
        if not self.tty:
            return
        rate = done / max(time.monotonic() - self.started, 1e-3)
        left = (self.total - done) / rate if rate and self.total > done else 0
        self.stream.write(f"\r{done}/{self.total} messages, {rate:.0f}/s, "
                          f"{left // 60:.0f} min {left % 60:02.0f} s left ")
        self.stream.flush()

    def end(self):
        if self.tty:
            self.stream.write("\n")


@command("audit", "the web console's audit log, newest first",
         ("user", "action", "since", "limit", "json") + MONGO)
def archive_audit(cfg, archive):
    """Who logged in, read, downloaded, held, released or deleted what, and how it went."""
    for entry in archive.audit_trail(audit_query(cfg.user, cfg.action, cfg.since),
                                     cfg.limit or 10**9):
        if cfg.json:
            sys.stdout.write(json_line(entry))
        else:
            user, role, client, action, key, result = (audit_value(entry.get(name)) for name in (
                "user", "role", "client", "action", "key", "result"))
            print(f"{entry.get('at'):%Y-%m-%d %H:%M:%S} {user} ({role}) from {client} "
                  f"{action} {key}: {result}")
    return 0


LISTS_MAX = 100_000        # allow and block entries in all (filter mode holds them in memory)
LISTS_DOMAIN_MAX = 10_000  # and for one recipient domain
LISTS_REFRESH = 60         # seconds between filter mode's readings of the lists
LISTS_QUERY_MS = 10_000    # maxTimeMS of a reading of the lists


def list_address(value, what):
    """An address or @domain, lower-cased; UsageError for anything else (no pattern)."""
    text = (value or "").strip().lower()
    if text.startswith("@") and DOMAIN_RE.match(text[1:]) and "." in text:
        return text
    if "@" in text[1:] and valid_address(text):
        return text
    raise UsageError(f"{what}: not an address or @domain (no patterns): {value!r}")


def list_pair(sender, rcpt):
    """(sender, recipient or "" for everyone) of a list entry, each an address or
    @domain: as the commands, the console and the API take them."""
    return list_address(sender, "sender"), list_address(rcpt, "for") if rcpt else ""


def list_command(cfg, archive, kind):
    sender, rcpt = list_pair(cfg.key, cfg.for_rcpt)
    before = archive.list_entry(kind, sender, rcpt, os_user())
    was = f" (it was {before['kind']}ed)" if before and before["kind"] != kind else ""
    print(f"{kind}ed mail from {sender} to {rcpt or 'everyone'}{was}")
    return 0


@command("allow", "always accept mail from SENDER (address or @domain) in filter mode: no "
         "spam check", ("for_rcpt",) + MONGO, key="sender")
def archive_allow(cfg, archive):
    return list_command(cfg, archive, "allow")


@command("block", "refuse mail from SENDER (address or @domain) in filter mode (550 5.7.1)",
         ("for_rcpt",) + MONGO, key="sender")
def archive_block(cfg, archive):
    return list_command(cfg, archive, "block")


@command("unlist", "take SENDER off the allow or block list", ("for_rcpt",) + MONGO,
         key="sender")
def archive_unlist(cfg, archive):
    sender, rcpt = list_pair(cfg.key, cfg.for_rcpt)
    if not archive.unlist(sender, rcpt):
        raise NotFound(f"{sender} is on no list for {rcpt or 'everyone'}")
    print(f"unlisted mail from {sender} to {rcpt or 'everyone'}")
    return 0


@command("lists", "the allow and block lists (--for RCPT: that recipient's); --amavis DIR "
         "writes the global ones for amavisd-new", ("for_rcpt", "json", "amavis") + MONGO)
def archive_lists(cfg, archive):
    if cfg.amavis:
        return write_amavis_lists(archive, cfg.amavis)
    rcpt = None if not cfg.for_rcpt else list_address(cfg.for_rcpt, "--for")
    for entry in archive.list_entries(rcpt):
        if cfg.json:
            sys.stdout.write(json_line(entry))
        else:
            at = entry.get("at")
            when = f"{at:%Y-%m-%d %H:%M}" if isinstance(at, datetime.datetime) else "-"
            print(f"{entry['kind']:<5} {entry['sender']} -> {entry['rcpt'] or 'everyone'} "
                  f"(by {entry.get('by') or '?'}, {when})")
    return 0


AMAVIS_LISTS = {"allow": "mms-allow-senders", "block": "mms-block-senders"}


def write_amavis_lists(archive, folder):
    """The lists for everyone, as files amavisd-new reads with read_hash() into
    @whitelist_sender_maps and @blacklist_sender_maps: a key a line, an address or
    a domain (amavisd-new's hash lookups try user@domain, then the domain). Each
    written whole and renamed into place, so amavisd-new never reads half a list."""
    keys = {kind: [] for kind in AMAVIS_LISTS}
    for entry in archive.list_entries(""):
        keys[entry["kind"]].append(entry["sender"].lstrip("@"))
    for kind, name in AMAVIS_LISTS.items():
        path = os.path.join(folder, name)
        with tempfile.NamedTemporaryFile("w", dir=folder, prefix=f".{name}.", delete=False) as f:
            f.write(f"# mms.py lists --amavis: the {kind} list for every recipient\n")
            f.writelines(f"{key}\n" for key in sorted(keys[kind]))
        os.chmod(f.name, 0o644)
        os.replace(f.name, path)
        print(f"{len(keys[kind])} sender(s) in {path}")
    return 0


@command("replay", "store what proxy and filter modes spooled while MongoDB was down",
         ("spool_dir",) + MONGO)
def archive_replay(cfg, archive):
    stored, left = Spool(cfg.spool_dir).replay(archive)
    why = "".join(f", {count} {reason}" for reason, count in sorted(left.items()))
    print(f"replayed {stored} message(s) from {cfg.spool_dir}, {sum(left.values())} left{why}")
    return 1 if left else 0




def mbox_entry(doc, data):
    """One mboxrd message: a From_ line, LF line ends, '>' added before any line that
    is '>'s then 'From '."""
    sender = doc.get("sender") or "MAILER-DAEMON"
    received = doc.get("received")
    when = (received if isinstance(received, datetime.datetime)
            else datetime.datetime.now(UTC)).astimezone(UTC)
    body = re.sub(rb"(?m)^(>*From )", rb">\1", data.replace(b"\r\n", b"\n"))
    if not body.endswith(b"\n"):
        body += b"\n"
    return f"From {sender} {when:%a %b %d %H:%M:%S %Y}\n".encode() + body + b"\n"


@command("export", "the matching messages as an mbox on stdout, or .eml files",
         FILTERS + ("format", "output", "sort") + MONGO)
def archive_export(cfg, archive):
    """The matching messages as one mbox on stdout, or one .eml each into --output."""
    query, order = cfg.filters.query(), sort_order(cfg)
    count = 0
    if cfg.format == "eml":
        if not cfg.output or not os.path.isdir(cfg.output):
            raise UsageError("export --format eml needs --output DIR, an existing directory")
        for doc in archive.search(query, order=order):
            key = str(doc.get("store_key", ""))
            if STORE_KEY_RE.fullmatch(key):
                with private(os.path.join(cfg.output, key + ".eml")) as f:
                    for piece in archive.pieces(doc):
                        f.write(piece)
                count += 1
        print(f"exported {count} message(s) to {cfg.output}")
        return 0
    out = sys.stdout.buffer
    for entry in mbox_entries(archive, archive.search(query, order=order)):
        out.write(entry)
    out.flush()
    return 0


def mbox_entries(archive, docs):
    """The messages as mboxrd entries, one message in memory at a time."""
    for doc in docs:
        yield mbox_entry(doc, archive.read(doc))


###############################################################################
# The web console #############################################################
###############################################################################

WEB_HEADERS = {  # on every HTML answer: no script, no framing, nothing guessed
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; "
                               "form-action 'self'; frame-ancestors 'none'; frame-src 'self'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store"}
WEB_SESSION_SECONDS = 8 * 3600
WEB_SESSIONS_MAX = 10_000                           # the oldest goes first past it
WEB_FAILURES_MAX, WEB_FAILURES_WINDOW = 10, 600   # failed logins from one address
WEB_FAILING_MAX = 10_000                            # addresses whose failures are kept
WEB_HASHING_MAX, WEB_HASHING_WAIT = 2, 10           # scrypt at once (16 MiB each), wait
WEB_SWEEP_SECONDS = 60                              # expired sessions and failures go
WEB_PAGE = 50                                       # messages a page
WEB_DEPTH_MAX = 10_000                              # a word search's page reads this far
WEB_COUNT_MAX = 1000                                # a search counts this far ("more than")
WEB_OVER_KEEP, WEB_OVER_MAX = 60, 1000              # "more than" kept (s), for this many searches
WEB_BULK_MAX = 1000                                 # messages one bulk action changes
WEB_MBOX_MAX = 1000                                 # messages in a search's mbox download
WEB_QUERY_MS = 5000                                 # maxTimeMS of each console query
WEB_VIEW_MAX = 4 * 2**20                            # of a message shown as a page
WEB_CACHE_SECONDS = 60                              # the dashboard's aggregations
SCRYPT = {"n": 2**14, "r": 8, "p": 1}                # 128 * n * r = 16 MiB a hash
VERDICT_COLOURS = {"clean": "#4c9f70", "spam": "#e0a030", "banned": "#8e44ad",
                   "virus": "#c0392b", "unchecked": "#8e8e8e"}


def hash_password(password, salt=None):
    """scrypt, salted: 'scrypt$N$r$p$salt$hash', hex, no ':' (the users file's separator)."""
    salt = salt or os.urandom(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **SCRYPT)
    return f"scrypt${SCRYPT['n']}${SCRYPT['r']}${SCRYPT['p']}${salt.hex()}${digest.hex()}"


def password_matches(stored, password):
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        given = hashlib.scrypt(password.encode(), salt=bytes.fromhex(salt), dklen=32,
                               n=int(n), r=int(r), p=int(p))
    except (ValueError, TypeError):
        return False
    return kind == "scrypt" and hmac.compare_digest(given.hex(), digest)


NOBODY = hash_password("")  # compared for an unknown name, so that it takes as long


ROLES = {"viewer": 0, "reviewer": 1, "admin": 2}   # each may what the one before may


def read_web_users(path):
    """{name: (hash, {role, domains, zone})} from lines
    'name:hash[:role[:domains[:zone]]]', in a file only its owner may read: the
    hashes are worth guessing at offline. domains (example.com,example.net)
    limits the user to mail for them; zone is the time zone they read times in."""
    users = {}
    lines = read_private("--web-users", path).decode("utf-8", "replace").splitlines()
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        name, _, rest = line.partition(":")
        digest, _, rest = rest.partition(":")
        role, _, rest = rest.partition(":")
        domains, _, zone = rest.partition(":")
        domains = tuple(d.strip().lower() for d in domains.split(",") if d.strip())
        try:
            zone = _zone(zone) if zone else None
        except argparse.ArgumentTypeError:
            zone = False
        if not name or not digest.startswith("scrypt$") or (role or "admin") not in ROLES \
                or not all(SCOPE_DOMAIN_RE.fullmatch(d) for d in domains) or zone is False:
            raise ConfigError(f"--web-users {path}, line {number}: not "
                              f"name:hash[:role[:domains[:zone]]] (see mms.py web-user)")
        users[name] = (digest, {"role": role or "admin", "domains": domains, "zone": zone})
    return users


SCOPE_DOMAIN_RE = re.compile(r"[a-z0-9-]+(\.[a-z0-9-]+)+")


@command("web-user", "the users file's line for NAME, the password read from stdin",
         ("role", "domains", "timezone"), key="NAME", opens_archive=False)
def archive_web_user(cfg, archive=None):
    """The users file's line for NAME: the password from stdin, never shown."""
    import getpass
    password = (getpass.getpass(f"password for {cfg.key}: ") if sys.stdin.isatty()
                else sys.stdin.readline().rstrip("\r\n"))
    if not password or not re.fullmatch(r"[A-Za-z0-9_.@-]{1,64}", cfg.key or ""):
        raise ConfigError(
            "web-user NAME, with a name of letters, digits and _.@- and a password on stdin")
    domains = ",".join(d.strip().lower() for d in (cfg.domains or "").split(",") if d.strip())
    if not all(SCOPE_DOMAIN_RE.fullmatch(d) for d in domains.split(",") if d):
        raise ConfigError(f"--domains: not a list of domains: {cfg.domains}")
    fields = [cfg.role, domains, str(cfg.timezone or "")]
    while fields and fields[-1] in ("", "admin"):      # the defaults are left out
        fields.pop()
    print(":".join([cfg.key, hash_password(password), *fields]))
    return 0


class AuditLog:
    """Who did what in the console, written by a thread of its own, a batch at a
    time: a page never waits for it. While MongoDB is away the entries wait, up
    to PENDING_MAX, and past it are dropped and the log says how many."""

    PENDING_MAX, BATCH = 10_000, 500

    def __init__(self, archive):
        self.archive = archive
        self.pending = queue.Queue(self.PENDING_MAX)
        self.dropped, self.failing = 0, False
        threading.Thread(target=self.write_forever, name="mms-audit", daemon=True).start()

    def record(self, entry):
        try:
            self.pending.put_nowait(entry)
        except queue.Full:
            self.dropped += 1
            if self.dropped in (1, 100, 10_000):
                log.error("web: the audit log cannot be written: %d entries dropped",
                          self.dropped)

    def write_forever(self):
        while True:
            batch = [self.pending.get()]
            while len(batch) < self.BATCH and not self.pending.empty():
                batch.append(self.pending.get_nowait())
            self.write(batch)

    def write(self, batch):
        while True:
            try:
                self.archive.write_audits(batch)
                self.failing = False
                break
            except Exception as exc:
                if not self.failing:
                    log.warning("web: the audit log waits: %s", mongo_error(exc))
                self.failing = True
                time.sleep(1)
        for _ in batch:
            self.pending.task_done()

    def flush(self):
        """Until every entry so far is written (the tests, and a clean stop)."""
        self.pending.join()


class WebServer(BoundedHTTPServer):
    """The console: the archive for the people who review it, over HTTP(S)."""

    CONNECTIONS, PER_CLIENT, RESERVED = 32, 8, 8
    HEADS, HEADS_PER_CLIENT = 256, 8

    def __init__(self, cfg, archive):
        self.cfg, self.archive = cfg, archive
        self.users = read_web_users(cfg.web_users)
        self.secret = web_secret(cfg.web_secret) if cfg.web_secret else None
        self.sessions, self.failures, self.cache, self.overs = {}, {}, {}, {}
        self.zone = cfg.web_timezone
        self.learning = "spamd" in cfg.given and bool(cfg.spamd)   # learn buttons shown
        self.audit = AuditLog(archive)
        try:
            archive.audit_indexes(cfg.audit_retention)
        except Exception as exc:
            log.warning("web: the audit log's indexes cannot be made (%s): it is kept "
                        "forever, and its searches read all of it", mongo_error(exc))
        self.lock, self.hashing = threading.Lock(), threading.BoundedSemaphore(WEB_HASHING_MAX)
        self.closed, self.login_key = threading.Event(), os.urandom(32)
        super().__init__("--web", cfg.web, WebHandler, cfg.web_allow)
        self.tls = bool(cfg.web_cert)
        self.headers = list(WEB_HEADERS.items()) + (
            [("Strict-Transport-Security", "max-age=31536000")] if self.tls else [])
        if self.tls:
            import ssl
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            try:
                context.load_cert_chain(cfg.web_cert, cfg.web_key or None)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"--web-cert {cfg.web_cert}: {exc}")
            # The handshake is the head reader's, without blocking: never the
            # accepting thread's, which one slow client would hold up.
            self.socket = context.wrap_socket(self.socket, server_side=True,
                                              do_handshake_on_connect=False)
        elif not is_loopback(self.host):
            log.warning("the web console listens on %s without TLS: passwords and mail "
                        "cross the network in clear; use --web-cert, or a reverse proxy",
                        cfg.web)
        threading.Thread(target=self.sweep_forever, name="mms-web-sweep", daemon=True).start()

    def login(self, address, name, password):
        """The user's (name, role), or None; 429 past WEB_FAILURES_MAX failures. The
        attempt counts before the hash (so that attempts at once are all counted) and
        is forgiven when it succeeds; an unknown name costs the same hash as a known
        one (no list of names to be had from the time it takes); at most
        WEB_HASHING_MAX hashes run at once (503 after WEB_HASHING_WAIT)."""
        now = time.monotonic()
        with self.lock:
            recent = [t for t in self.failures.get(address, ()) if now - t < WEB_FAILURES_WINDOW]
            put_newest(self.failures, address, recent + [now], WEB_FAILING_MAX)
            if len(recent) >= WEB_FAILURES_MAX:
                self.failures[address].pop()
                raise HTTPError(429, "too many failed logins from your address: wait")
        digest, profile = self.users.get(name, (NOBODY, None))
        if not self.hashing.acquire(timeout=WEB_HASHING_WAIT):
            raise HTTPError(503, "too many logins at once: try again")
        try:
            matches = password_matches(digest, password)
        finally:
            self.hashing.release()
        if profile and matches:
            with self.lock, contextlib.suppress(KeyError, ValueError):
                self.failures[address].remove(now)
            return name, profile
        log.warning("web: failed login for %r from %s", name[:64], address)
        return None

    def open_session(self, user, profile):
        token = os.urandom(24).hex()
        with self.lock:
            put_newest(self.sessions, token, {
                "user": user, **profile, "csrf": os.urandom(16).hex(),
                "expires": time.monotonic() + WEB_SESSION_SECONDS}, WEB_SESSIONS_MAX)
        return token

    def session(self, token):
        """A copy of the session: only the server's methods change it, under the lock."""
        with self.lock:
            found = self.sessions.get(token or "")
            if found and found["expires"] < time.monotonic():
                del self.sessions[token]
                found = None
            return dict(found, token=token) if found else None

    def close_session(self, token):
        with self.lock:
            self.sessions.pop(token, None)

    def tell(self, token, text):
        """What the next page shows this session once (never carried in a URL)."""
        with self.lock:
            if token in self.sessions:
                self.sessions[token]["said"] = text

    def told(self, token):
        with self.lock:
            return self.sessions.get(token, {}).pop("said", None)

    def sweep(self):
        """Expired sessions and forgotten failures go, so that a scan leaves nothing."""
        now = time.monotonic()
        with self.lock:
            for token in [t for t, s in self.sessions.items() if s["expires"] < now]:
                del self.sessions[token]
            for address in [a for a, times in self.failures.items()
                            if not times or now - times[-1] >= WEB_FAILURES_WINDOW]:
                del self.failures[address]

    def sweep_forever(self):
        while not self.closed.wait(WEB_SWEEP_SECONDS):
            self.sweep()

    def server_close(self):
        self.closed.set()
        super().server_close()

    def login_token(self, cookie):
        """The login form's CSRF token: tied to the browser's pre-session cookie, so a
        form on another site cannot log a browser in (as the sender's account)."""
        return hmac.new(self.login_key, cookie.encode(), hashlib.sha256).hexdigest()

    def over(self, key):
        """Whether a count of this search said "more than WEB_COUNT_MAX" within
        WEB_OVER_KEEP seconds."""
        with self.lock:
            at = self.overs.get(key)
        return at is not None and time.monotonic() - at < WEB_OVER_KEEP

    def note_over(self, key):
        """A count of this search said "more than WEB_COUNT_MAX" now (the oldest of
        WEB_OVER_MAX searches goes first)."""
        with self.lock:
            put_newest(self.overs, key, time.monotonic(), WEB_OVER_MAX)

    def forget_overs(self):
        with self.lock:
            self.overs.clear()

    def cached(self, key, make):
        """make()'s value, made at most once a WEB_CACHE_SECONDS however many visitors
        miss it at once: the others wait for the one making it, and take its value."""
        with self.lock:
            entry = self.cache.setdefault(key, {"at": None, "value": None,
                                                "making": threading.Lock()})
        with entry["making"]:
            now = time.monotonic()
            if entry["at"] is None or now - entry["at"] >= WEB_CACHE_SECONDS:
                entry["value"], entry["at"] = make(), now
            return entry["value"]


def put_newest(table, key, value, most):
    """table[key] = value as its newest entry (a dict keeps the order of insertion);
    past `most` entries, the oldest go first."""
    table.pop(key, None)
    table[key] = value
    while len(table) > most:
        del table[next(iter(table))]


def h(value):
    """Anything shown: escaped, in text and in attributes alike, with bidi controls
    shown as what they are ('\u202egnp.exe' would read "exe.png")."""
    return html.escape(BIDI_CONTROL_RE.sub(named_char, str(value)), quote=True)


def named_char(match):
    return f"[U+{ord(match.group()):04X}]"


STYLE = """body{font:14px/1.4 system-ui,sans-serif;margin:0;color:#222;overflow-wrap:break-word}
header{background:#234;color:#fff;padding:.5em 1em;display:flex;gap:1em;align-items:center}
header a{color:#fff}header form{margin-left:auto}main{padding:1em}
table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;padding:.25em .5em;
text-align:left;vertical-align:top}pre{background:#f6f6f6;padding:.5em;white-space:pre-wrap;
word-break:break-all;max-height:30em;overflow:auto}.grid{display:flex;flex-wrap:wrap;gap:2em}
.error{color:#a00}form.inline{display:inline}input,button{font:inherit}
.figures{display:flex;flex-wrap:wrap;gap:.5em}.figure{display:flex;flex-direction:column;
border:1px solid #ccc;padding:.4em .8em;min-width:6.5em;text-decoration:none}
.figure strong{font-size:1.4em}svg{max-width:100%;height:auto}fieldset{display:inline;
border:1px solid #ccc}form.search label{display:inline-block;margin:.2em .5em .2em 0}
td,th{overflow-wrap:anywhere}.muted{color:#595959}td,th,pre,h1,bdi{unicode-bidi:isolate}
.warning{background:#fff0c0}iframe.preview{width:100%;height:28em;border:1px solid #ccc;
background:#fff}details{margin:.5em 0}summary{cursor:pointer;font-weight:600}
a:focus,button:focus,input:focus,select:focus,summary:focus{outline:2px solid #0a58ca}
@media (max-width:600px){table,tbody,tr,td,th{display:block}tr{border:1px solid #ccc;
margin:.5em 0;padding:.25em}td,th{border:0}header{flex-wrap:wrap}main{padding:.5em}
tr.head{display:none}td[data-label]::before{content:attr(data-label) ": ";font-weight:600}
form.search label,form.search input,form.search select{display:block;width:100%;
box-sizing:border-box}input,select{max-width:100%}}
@media (prefers-color-scheme:dark){body{background:#121212;color:#e6e6e6}
a{color:#8ab4f8}pre{background:#1e1e1e}td,th{border-color:#333}.muted{color:#a8a8a8}
.warning{background:#4a3b00}.error{color:#ff8a80}input,select,button{background:#1e1e1e;
color:#e6e6e6;border:1px solid #555}}"""


WEB_ROUTES = []   # (method, path as a regular expression, handler name, who may), by @route


def route(method, path, who="user"):
    """Register a console page beside its handler: who is anyone, user (any role),
    or the least of ROLES it takes."""
    def register(handler):
        WEB_ROUTES.append((method, re.compile(path), handler.__name__, who))
        return handler
    return register


class WebHandler(BoundedHandler):
    """One route per page: GET and POST dispatched by path, through each handler's
    @route."""

    timeout, HEAD_SECONDS = 10, 10
    BODY_MAX, BODY_SECONDS = 64 * 1024, 30      # a form or an API request
    policy = None                               # a Content-Security-Policy of its own

    def end_headers(self):
        """Every answer, the stdlib's own errors too, carries the security headers;
        the HTML preview its own policy (self.policy) instead of the console's."""
        for name, value in self.server.headers:
            self.send_header(name, self.policy if name == "Content-Security-Policy"
                             and self.policy else value)
        super().end_headers()
        self.answering = True

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def do_DELETE(self):
        self.dispatch("DELETE")

    def dispatch(self, method):
        path, _, query = self.path.partition("?")
        self.params = {k: v[-1] for k, v in urllib.parse.parse_qs(query).items()}
        self.answering, self.policy = False, None
        try:
            for verb, pattern, name, open_to in WEB_ROUTES:
                match = pattern.fullmatch(path)
                if verb == method and match:
                    self.user = None if open_to == "anyone" else self.authenticate(path)
                    if open_to in ROLES and ROLES[self.user["role"]] < ROLES[open_to]:
                        raise HTTPError(403, f"this takes a {open_to}")
                    return getattr(self, name)(*match.groups())
            raise HTTPError(404, "no such page")
        except (ConnectionError, TimeoutError):
            pass   # the client hung up, or stopped reading
        except Exception as exc:
            from pymongo.errors import ExecutionTimeout   # MongoDB's maxTimeMS ran out
            if not isinstance(exc, (MMSError, ExecutionTimeout)) or self.answering:
                log.error("web: %s %s failed: %s", method, path[:200], mongo_error(exc),
                          exc_info=bug(exc))
            if self.answering:        # a download broke off: no second status line in it
                self.close_connection = True
            elif isinstance(exc, MMSError):
                self.fail(exc.http_status, str(exc))
            elif isinstance(exc, ExecutionTimeout):
                self.too_slow()
            elif bug(exc):
                self.fail(500, "mms failed here: the log says why")
            else:
                self.fail(503, "the archive cannot be read now")

    # Sessions ###############################################################

    def cookie(self, wanted="mms_session"):
        for part in (self.headers.get("Cookie") or "").split(";"):
            name, _, value = part.strip().partition("=")
            if name == wanted:
                return value
        return None

    def authenticate(self, path):
        session = self.server.session(self.cookie())
        if session:
            return session
        if path.startswith("/api/"):
            basic = self.headers.get("Authorization") or ""
            if basic.startswith("Basic "):
                with contextlib.suppress(ValueError, UnicodeDecodeError):
                    name, _, password = base64.b64decode(basic[6:]).decode().partition(":")
                    found = self.server.login(self.client_address[0], name, password)
                    if found:
                        return {"user": found[0], **found[1], "csrf": None}
            raise HTTPError(401, "log in, or send HTTP Basic credentials")
        raise WebRedirect("/login")

    def form(self, csrf=None):
        """The posted fields, with the CSRF token checked: the session's, or the one
        given (the login form's)."""
        self.posted = urllib.parse.parse_qs(self.read_body().decode("utf-8", "replace"))
        fields = {k: v[-1] for k, v in self.posted.items()}
        expected = self.user.get("csrf") if self.user else csrf
        if (self.user or csrf is not None) and not (expected and hmac.compare_digest(
                fields.get("csrf", "").encode(), expected.encode())):
            raise HTTPError(403, "this form has expired: open the page again")
        return fields

    @route("GET", r"/login", "anyone")
    def get_login(self, error="", code=200):
        """The form, with a pre-session cookie and the token tied to it."""
        browser = self.cookie("mms_login")
        if not browser or not re.fullmatch(r"[0-9a-f]{32}", browser):
            browser = os.urandom(16).hex()
        form = LOGIN_FORM.format(error=error, csrf=self.server.login_token(browser))
        self.page("Log in", form, user=None, code=code, extra=[("Set-Cookie", (
            f"mms_login={browser}; Path=/login; HttpOnly; SameSite=Strict{self.secure()}"))])

    @route("POST", r"/login", "anyone")
    def post_login(self):
        browser = self.cookie("mms_login") or ""
        fields = self.form(csrf=self.server.login_token(browser) if browser else "")
        found = self.server.login(self.client_address[0], fields.get("user", ""),
                                  fields.get("password", ""))
        if not found:
            self.audit("login", result="failed", user=fields.get("user", ""))
            return self.get_login('<p class="error">Wrong name or password.</p>', code=401)
        token = self.server.open_session(*found)
        self.user = {"user": found[0], **found[1]}
        self.audit("login")
        self.redirect("/", cookie=f"mms_session={token}; Path=/; HttpOnly; SameSite=Strict"
                                  f"; Max-Age={WEB_SESSION_SECONDS}{self.secure()}")

    def secure(self):
        return "; Secure" if self.server.tls else ""

    @route("POST", r"/logout")
    def post_logout(self):
        self.form()
        self.server.close_session(self.cookie())
        self.redirect("/login", cookie="mms_session=; Path=/; Max-Age=0")

    # Pages ##################################################################

    @route("GET", r"/style\.css", "anyone")
    def get_style(self):
        self.send(200, STYLE.encode(), "text/css; charset=utf-8")

    @route("GET", r"/")
    def get_quarantine(self):
        """Where every role lands: the mail awaiting judgement, newest first, each row
        with what a reviewer decides by, and release and delete at hand."""
        if set(self.params) - {"before", "after", "skip", "start"}:
            raise HTTPError(400, "the quarantine takes no filters: search for them")
        archive, scope = self.server.archive, self.scope()
        awaiting, edge = archive.quarantine(scope), page_edge(self.params)
        docs, more = self.one_page(awaiting, "newest", edge and (
            lambda limit, order: archive.quarantine_page(scope, edge[0], limit, order)))
        count = self.count_of(("quarantine", scope),
                              lambda: archive.quarantine_count(scope, WEB_COUNT_MAX + 1))
        self.page("Quarantine", render_quarantine(docs, count, self.user, self.zone(),
                                                  self.page_links(docs, more, "/"),
                                                  self.actions))

    @route("GET", r"/dashboard")
    def get_dashboard(self):
        if self.user.get("domains"):       # the figures are of all the mail: not theirs
            raise HTTPError(403, "the dashboard's figures are of all the mail, not only of "
                                 "your domains: your quarantine is on the first page")
        data = self.server.cached("dashboard", lambda: dashboard_data(self.server.archive))
        self.page("Dashboard", render_dashboard(data))

    @route("GET", r"/messages")
    def get_messages(self):
        query, page = self.search()
        docs, more, count = self.counted_search(query) if page else (*self.one_page(query), None)
        csrf = self.user["csrf"] if ROLES[self.user["role"]] >= ROLES["reviewer"] else None
        self.page("Search", render_search(self.params, page, docs, csrf,
                                          self.page_links(docs, more), count))

    @route("GET", r"/messages\.mbox")
    def get_mbox(self):
        query, _ = self.search()
        docs = self.server.archive.search(query, limit=WEB_MBOX_MAX)
        self.audit("download", result="mbox of " + urllib.parse.urlencode(self.params)[:400])
        self.send_response(200)
        self.send_header("Content-Type", "application/mbox")
        self.send_header("Content-Disposition", 'attachment; filename="mms-export.mbox"')
        self.end_headers()
        for entry in mbox_entries(self.server.archive, docs):
            self.wfile.write(entry)

    @route("GET", r"/messages/([0-9a-f]{64})")
    def get_message(self, key):
        doc = self.doc(key)
        view = MimeView(self.server.archive, doc)
        self.audit("view", key)
        self.page(doc.get("subject") or key, render_message(
            key, doc, view, self.user["csrf"], self.zone(), self.actions(doc)))

    @route("GET", r"/messages/([0-9a-f]{64})/preview")
    def get_preview(self, key):
        """The HTML part, in a sandbox of its own: no script, form, remote load or
        navigation, whatever the HTML says (PREVIEW_CSP, Preview). Only for the
        message page's frame: a browser that opens it on its own (a link, a new tab)
        says so in Sec-Fetch-Dest, and is sent to the message's page instead."""
        doc = self.doc(key)
        if self.headers.get("Sec-Fetch-Dest") != "iframe":
            self.audit("preview", key, "refused: not in the message's page")
            return self.page("Open the message", f'<p class="error">The HTML preview opens '
                             f'only inside its message\'s page.</p><p><a href="/messages/'
                             f'{h(key)}">Open the message</a></p>', code=403)
        view = MimeView(self.server.archive, doc)
        if view.html is None:
            raise HTTPError(404, "this message has no HTML part")
        self.audit("preview", key)
        self.policy = PREVIEW_CSP
        self.send(200, Preview(view.html, view.images).html.encode("utf-8", "replace"),
                  "text/html; charset=utf-8")

    @route("GET", r"/messages/([0-9a-f]{64})/parts/([0-9]{1,5})")
    def get_part(self, key, number):
        """An attachment on its own, as bytes to save, never to open in the browser."""
        files = MimeView(self.server.archive, self.doc(key)).files
        if int(number) >= len(files):
            raise HTTPError(404, "no such attachment")
        self.audit("download", key, f"attachment {number}")
        name = BIDI_CONTROL_RE.sub("", files[int(number)]["name"] or "")
        name = re.split(r"[/\\]", name)[-1].strip()       # a path: its last part
        name = name if name.strip(".") else "attachment"
        plain = re.sub(r"[^A-Za-z0-9._-]", "_", name)[:100]
        self.send(200, files[int(number)]["payload"], "application/octet-stream", [
            ("Content-Disposition", f"attachment; filename=\"{plain}\"; filename*=UTF-8''"
                                    f"{urllib.parse.quote(name[:200], safe='')}")])   # RFC 5987

    @route("GET", r"/messages/([0-9a-f]{8,63})")
    def get_prefix(self, prefix):
        """A unique prefix of a store key, as `mms.py show` takes it: the message's page."""
        key = self.server.archive.resolve(prefix, self.scope())["store_key"]
        self.redirect(f"/messages/{self.doc(key)['store_key']}")

    @route("GET", r"/messages/([0-9a-f]{64})/raw")
    def get_raw(self, key):
        doc = self.doc(key)
        self.audit("download", key, "the message")
        self.send_response(200)
        self.send_header("Content-Type", "message/rfc822")
        self.send_header("Content-Disposition", f'attachment; filename="{key}.eml"')
        self.end_headers()
        for piece in self.server.archive.pieces(doc):
            self.wfile.write(piece)

    @route("POST", r"/messages/([0-9a-f]{64})/learn", "reviewer")
    def post_learn(self, key):
        """Not spam or Spam: spamd's Bayes taught (class=ham|spam), as `mms.py learn`."""
        fields = self.form()
        kind = (fields.get("class") or "").strip()
        if kind not in ("spam", "ham"):
            raise HTTPError(400, "class: spam or ham")
        self.post_action(key, "learn-" + kind, fields)

    @route("POST", r"/messages/([0-9a-f]{64})/(hold|unhold|release|delete|allow|block)",
           "reviewer")
    def post_action(self, key, action, fields=None):
        fields = self.form() if fields is None else fields
        doc = self.doc(key)
        if not may(self.user["role"], action, doc):
            self.audit(action, key, "refused: not for a " + self.user["role"])
            raise HTTPError(403, f"a {self.user['role']} cannot {action} this message: ask "
                                 f"an admin")
        danger = verdict(doc) if verdict(doc) in ("virus", "banned") else None
        if danger and action in ("release", "delete") and fields.get("confirm") != danger:
            return self.confirm(key, action, doc, fields)
        to = [a.strip() for a in fields.get("to", "").split(",") if a.strip()]
        if any(not valid_address(a) for a in to):
            raise HTTPError(400, "not an address: " + ", ".join(to))
        outside = self.outside_scope(to)
        if outside:
            self.audit(action, key, "refused: to " + ", ".join(outside) + ", outside the "
                       "user's domains")
            raise HTTPError(403, f"you release only to addresses in your domains, not to "
                                 f"{', '.join(outside)}: ask an administrator")
        try:
            result = self.act(action, doc, to, bool(fields.get("again")), danger == "virus")
        except AlreadyReleased as exc:
            raise HTTPError(409, exc.in_console) from None
        except DeliveryError as exc:
            if action.startswith("learn-"):
                raise HTTPError(502, f"Not learned: {exc}. Try again later, or ask your "
                                     f"administrator to look at spamd.") from None
            raise HTTPError(502, f"Not delivered: {exc}. The message is still here, unchanged. "
                                 f"Try again in a few minutes; if it fails again, ask your "
                                 f"administrator to look at that mail server.") from None
        if action == "delete":
            return self.page("Deleted", f"<p>{h(key)} is deleted.</p>")
        self.server.tell(self.user.get("token"), result)
        self.redirect(f"/messages/{key}")

    def act(self, action, doc, to=(), again=False, virus=False):
        """One action on one message, through the archive commands' own calls; what
        happened, logged and audited."""
        archive, user, key = self.server.archive, self.user["user"], doc["store_key"]
        by = {"user": user, "at": datetime.datetime.now(UTC), "via": "web"}
        if action in ("hold", "unhold"):
            archive.hold(doc, action == "hold", by=by)
            result = "legal hold placed" if action == "hold" else "legal hold lifted"
        elif action in ("allow", "block"):
            result = self.list_sender(doc, action)
        elif action.startswith("learn-"):
            if not self.server.learning:
                raise UsageError("learning needs the console's --spamd")
            result = learn_message(self.server.cfg, archive, doc, action[6:], user)
        elif action == "delete":
            archive.delete(doc)
            result = "deleted"
        else:
            to = list(to) or ([r for r in map(str, doc.get("rcpt") or []) if self.in_scope(r)]
                              if self.user.get("domains") else [])      # theirs only
            refused, record = release_message(self.server.cfg, archive, doc, to,
                                              again=again, virus=virus, by=user)
            result = f"released: {record['reply']}" if record else "not released"
            if refused:
                result += "; refused: " + "; ".join(f"{r} {a}" for r, a in refused.items())
        self.server.forget_overs()      # a release or a delete: a count may fall
        log.info("web: %s %s %s: %s", user, action, key, result)
        self.audit(action, key, result)
        return result

    def bulk(self, action, docs):
        """[(key, what happened)] for one action on many messages, a message at a
        time through act: a virus or banned message is released or deleted only on
        its own page, and each refusal is said, never silently skipped."""
        done = []
        for doc in docs:
            key, kind = doc["store_key"], verdict(doc)
            if not may(self.user["role"], action, doc):
                result = f"refused: not for a {self.user['role']}"
            elif action in ("release", "delete") and kind in ("virus", "banned"):
                result = f"skipped: a {kind} message is {action}d on its own page"
            else:
                try:
                    result = self.act(action, doc)
                except MMSError as exc:
                    result = f"failed: {exc}"
            done.append((key, result))
        self.audit("bulk", result=f"{action} of {len(docs)}: " + ", ".join(
            sorted({r.split(":")[0] for _, r in done}))[:400])
        return done

    @route("POST", r"/messages/bulk", "reviewer")
    def post_bulk(self):
        """One action on the rows ticked, or on all the messages a search finds (up
        to WEB_BULK_MAX, once their number is confirmed on a page that says it)."""
        fields = self.form()
        action = fields.get("action")
        if action not in ACTIONS:
            raise HTTPError(400, f"action: one of {', '.join(ACTIONS)}")
        if fields.get("all"):
            expect = fields.get("expect", "")
            docs, page, count = self.all_matching(fields, int(expect) if expect.isdigit()
                                                  else None)
            if count > WEB_BULK_MAX:
                raise HTTPError(400, f"{count} messages: at most {WEB_BULK_MAX} at once, "
                                     f"narrow the search")
            if docs is None:
                return self.confirm_bulk(action, page, count)
            missing = []
        else:
            docs, missing = self.found(self.posted.get("key", [])[:WEB_BULK_MAX])
        self.page(f"{action.capitalize()}: {len(docs)} message(s)",
                  render_bulk(missing + self.bulk(action, docs)))

    def all_matching(self, params, expect):
        """(the documents a bulk action's search finds, or None unless `expect` is
        their number and that is at most WEB_BULK_MAX; the filters as given; their
        number now): nothing is done to a set the user has not counted."""
        query, page = self.search(params)
        count = self.server.archive.count(query)
        if count > WEB_BULK_MAX or type(expect) is not int or expect != count:
            return None, page, count     # JSON's true and 1.0 are not a count (True == 1)
        return list(self.server.archive.search(query, limit=WEB_BULK_MAX)), page, count

    def found(self, keys):
        """(the documents of these keys, [(key, "not found")] for the others)."""
        docs, missing = [], []
        for key in map(str, keys):
            try:
                docs.append(self.doc(key))
            except HTTPError:
                missing.append((key[:64], "not found"))
        return docs, missing

    def confirm_bulk(self, action, page, count):
        kept = "".join(f'<input type="hidden" name="{h(name)}" value="{h(value)}">'
                       for name, value in {**page, "action": action, "all": "1",
                                           "expect": str(count)}.items())
        self.page(f"{action.capitalize()} {count} message(s)?", f"""<p>This will {h(action)}
the {count} message(s) this search finds now, one at a time; a virus or banned message is
released or deleted only on its own page.</p>
{render_form("/messages/bulk", self.user["csrf"], kept,
             f'<button type="submit">{h(action.capitalize())} {count} message(s)</button>')}""")

    def confirm(self, key, action, doc, fields):
        """A virus or banned message is released or deleted only from this page: it
        names what the message holds and what will happen, and asks."""
        kind = verdict(doc)
        kept = "".join(f'<input type="hidden" name="{name}" value="{h(fields[name])}">'
                       for name in ("to", "again") if fields.get(name))
        held = ", ".join(map(str, doc.get("virus") or [])) or doc.get("banned") or kind
        then = (f"Released, it goes to {fields.get('to') or 'its recipients'} as it is."
                if action == "release" else
                "Deleted, it is gone from the archive, its file too: nobody can release it.")
        self.page(f"{action.capitalize()} a {kind} message?", f"""<p class="error">This message
holds <bdi>{h(held)}</bdi>. {h(then)}</p>
{render_form(f"/messages/{key}/{action}", self.user["csrf"], kept,
             f'<button type="submit" name="confirm" value="{kind}">{action.capitalize()} it '
             f'all the same</button>')}
<p><a href="/messages/{h(key)}">Back to the message</a></p>""")

    @route("GET", r"/lists", "reviewer")
    def get_lists(self):
        """The allow and block entries this user may see and remove: a scoped user's,
        for recipients in their domains; everyone's for the others."""
        entries = list(self.server.archive.list_entries(domains=self.user.get("domains")))
        self.page("Allow and block lists", render_lists(entries, self.user["csrf"]))

    @route("POST", r"/lists/remove", "reviewer")
    def post_unlist(self):
        fields = self.form()
        try:
            sender, rcpt = list_pair(fields.get("sender"), fields.get("rcpt"))
        except UsageError as exc:
            raise HTTPError(400, str(exc)) from None
        if not self.in_scope(rcpt):
            self.audit("unlist", result=f"refused: {sender} -> {rcpt or 'everyone'}")
            raise HTTPError(403, "that entry is not for your domains: ask an administrator")
        done = self.server.archive.unlist(sender, rcpt)
        result = f"unlisted {sender} -> {rcpt or 'everyone'}" if done else "not on a list"
        self.audit("unlist", result=result)
        self.server.tell(self.user.get("token"), result)
        self.redirect("/lists")

    @route("GET", r"/audit", "admin")
    def get_audit(self):
        """Who did what: the newest first, by user, action and since."""
        trail = self.server.archive.audit_trail(audit_query(
            self.params.get("user"), self.params.get("action"),
            web_when(self.params.get("since"), "since")), WEB_PAGE * 4)
        self.page("Audit log", render_audit(self.params, trail, self.zone()))

    # A recipient's link from a quarantine report ###########################

    def linked(self, token):
        """(message, recipient) of a report's link: signed, not expired, no virus."""
        if self.server.secret is None:
            raise HTTPError(404, "no such page")
        key, rcpt = open_link(self.server.secret, token)
        doc = self.doc(key)
        if rcpt not in [str(r).lower() for r in doc.get("rcpt") or []]:
            raise HTTPError(403, "this link is not for this message")
        if doc.get("is_virus") or doc.get("quarantine") == "virus":
            raise HTTPError(403, "a virus is never released from a link: ask your administrator")
        return doc, rcpt

    @route("GET", r"/q/([A-Za-z0-9_.-]{1,2000})", "anyone")
    def get_link(self, token):
        """What the recipient needs to judge their own message, and nothing of the
        others (no header: amavisd-new's X-Envelope-To names every recipient, Bcc
        too). Only the POST from this page releases: link scanners GET every link."""
        doc, rcpt = self.linked(token)
        done = released_to(doc, rcpt)
        if is_held(doc):
            button = "<p>It is on legal hold: only an administrator can release it.</p>"
        elif done:
            button = f"<p>It was delivered to <bdi>{h(rcpt)}</bdi> already.</p>"
        else:
            button = (f'<form method="post" action="/q/{h(token)}"><button type="submit">'
                      f"Deliver this message to <bdi>{h(rcpt)}</bdi></button></form>")
            if self.params.get("allow") and doc.get("sender"):
                button += (f'<form method="post" action="/q/{h(token)}"><input type="hidden" '
                           f'name="allow" value="1"><button type="submit">Deliver it, and always '
                           f"allow mail from <bdi>{h(doc['sender'])}</bdi> to <bdi>{h(rcpt)}"
                           f"</bdi></button></form>")
        self.page("A message held for you", link_summary(self.server.archive, doc, rcpt) +
                  button)

    @route("POST", r"/q/([A-Za-z0-9_.-]{1,2000})", "anyone")
    def post_link(self, token):
        doc, rcpt = self.linked(token)
        fields = self.form()
        by = f"{rcpt}, from a quarantine report, at {self.client_address[0]}"
        if fields.get("allow") and doc.get("sender"):    # that recipient's own entry only
            sender = list_address(doc["sender"], "sender")
            self.server.archive.list_entry("allow", sender, rcpt, by, doc["store_key"])
            self.audit("report-allow", doc["store_key"], f"allowed {sender} for {rcpt}",
                       user=rcpt)
        refused, record = release_message(self.server.cfg, self.server.archive, doc, [rcpt],
                                          again=True, by=by, once_for=rcpt)
        self.server.forget_overs()
        log.info("web: %s released %s from a report: %s", rcpt, doc["store_key"],
                 record["reply"] if record else refused)
        self.audit("report-release", doc["store_key"], record["reply"] if record else refused,
                   user=rcpt)
        if not record or refused:
            raise HTTPError(502, "it could not be delivered now: try again later")
        self.page("Delivered", f"<p>The message is on its way to <bdi>{h(rcpt)}</bdi>.</p>")

    # The API ################################################################

    @route("GET", r"/api/openapi\.json")
    def get_openapi(self):
        """The API described, as OpenAPI 3.1: what the tests check each answer against."""
        self.json(openapi())

    @route("GET", r"/api/messages")
    def get_api_messages(self):
        query, page = self.search()
        docs, more = self.one_page(query)
        self.audit("list", result=f"{len(docs)} message(s) by the API: " +
                   urllib.parse.urlencode(page)[:400])
        self.json({"messages": [dict(doc, verdict=verdict(doc)) for doc in docs],
                   "next": edge_page(docs, "older", self.shown_above()) if more else None})

    @route("GET", r"/api/messages/([0-9a-f]{64})")
    def get_api_message(self, key):
        doc = self.doc(key)
        self.audit("view", key, "by the API")
        self.json(dict(doc, verdict=verdict(doc)))

    def json_body(self):
        """A change's JSON object: JSON only (a cross-site form cannot send it), from a
        session with its CSRF token in X-CSRF-Token, or with HTTP Basic."""
        if (self.headers.get("Content-Type") or "").split(";")[0].strip() != "application/json":
            raise HTTPError(415, "send Content-Type: application/json")
        token = self.user.get("csrf")
        if token and not hmac.compare_digest((self.headers.get("X-CSRF-Token") or "").encode(),
                                             token.encode()):
            raise HTTPError(403, "X-CSRF-Token: the session's token, from any page's forms")
        try:
            asked = json.loads(self.read_body())
        except ValueError:
            raise HTTPError(400, "the body is not JSON") from None
        if not isinstance(asked, dict):
            raise HTTPError(400, "a JSON object")
        return asked

    def listed(self, asked):
        """(sender, recipient or "") of an API list request, in this user's scope."""
        try:
            sender, rcpt = list_pair(str(asked.get("sender") or ""), str(asked.get("for") or ""))
        except UsageError as exc:
            raise HTTPError(400, str(exc)) from None
        if not self.in_scope(rcpt):
            raise HTTPError(403, "for: a recipient (or @domain) of your domains")
        return sender, rcpt

    @route("POST", r"/api/lists", "reviewer")
    def post_api_lists(self):
        """{"kind": "allow"|"block", "sender", "for"}: the entry, and what it replaced."""
        asked = self.json_body()
        if asked.get("kind") not in ("allow", "block"):
            raise HTTPError(400, "kind: allow or block")
        sender, rcpt = self.listed(asked)
        before = self.server.archive.list_entry(asked["kind"], sender, rcpt, self.user["user"])
        self.audit(asked["kind"], result=f"{sender} -> {rcpt or 'everyone'}")
        self.json({"kind": asked["kind"], "sender": sender, "for": rcpt,
                   "replaced": before["kind"] if before else None})

    @route("DELETE", r"/api/lists", "reviewer")
    def delete_api_lists(self):
        sender, rcpt = self.listed(self.json_body())
        if not self.server.archive.unlist(sender, rcpt):
            raise HTTPError(404, f"{sender} is on no list for {rcpt or 'everyone'}")
        self.audit("unlist", result=f"{sender} -> {rcpt or 'everyone'}")
        self.json({"sender": sender, "for": rcpt, "removed": True})

    @route("POST", r"/api/messages/([0-9a-f]{64})/learn", "reviewer")
    def post_api_learn(self, key):
        """{"class": "spam"|"ham"}: what was done."""
        kind = self.json_body().get("class")
        if kind not in ("spam", "ham"):
            raise HTTPError(400, "class: spam or ham")
        doc = self.doc(key)
        try:
            result = self.act("learn-" + kind, doc)
        except DeliveryError as exc:
            raise HTTPError(502, str(exc)) from None
        self.json({"key": key, "result": result})

    @route("POST", r"/api/bulk", "reviewer")
    def post_api_bulk(self):
        """{"action", "keys": [...]} or {"action", "filters": {...}, "expect": N}: each
        key's result (json_body)."""
        asked = self.json_body()
        try:
            action, keys = asked["action"], asked.get("keys") or []
            filters = {name: str(value) for name, value in (asked.get("filters") or {}).items()}
            unknown = sorted(set(filters) - set(FILTERS))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise HTTPError(400, 'a JSON object: {"action": ..., "keys": [...]} or '
                                 '{"action": ..., "filters": {...}, "expect": N}') from None
        if action not in ACTIONS:
            raise HTTPError(400, f"action: one of {', '.join(ACTIONS)}")
        if unknown:
            raise HTTPError(400, f"no such filter: {', '.join(unknown)[:200]} (filters: "
                                 f"{', '.join(FILTERS)})")
        if filters:
            docs, _, count = self.all_matching(filters, asked.get("expect"))
            if docs is None:
                return self.json({"error": f"the filters find {count} message(s): send "
                                           f"expect: {count} (at most {WEB_BULK_MAX})",
                                  "count": count}, 409)
            missing = []
        else:
            docs, missing = self.found(list(keys)[:WEB_BULK_MAX])
        self.json({"action": action, "results": [
            {"key": key, "result": result} for key, result in missing + self.bulk(action, docs)]})

    @route("GET", r"/api/stats")
    def get_api_stats(self):
        if self.user.get("domains"):
            raise HTTPError(403, "statistics are of all the mail: not for a user of some domains")
        since = web_when(self.params.get("since"), "since")
        by = self.params.get("by") or None
        if by is not None and by not in STATS_GROUPS:
            raise HTTPError(400, f"by: one of {', '.join(STATS_GROUPS)}")
        top = int(self.params["top"]) if self.params.get("top", "").isdigit() else 10
        totals, groups = self.server.archive.stats(since, None, by, min(top, 1000))
        self.json({"totals": totals, "by": by, "groups": groups})

    # Helpers ################################################################

    def count_of(self, key, count):
        """count() (up to WEB_COUNT_MAX + 1, or None out of time), unless a count of
        the same search said "more than WEB_COUNT_MAX" in the last WEB_OVER_KEEP
        seconds: that is a bound, not a number, and mail only adds to it (a purge
        aside). This console's own writes forget it. Otherwise every visit to a busy
        search's first page, or to a busy quarantine, reads 1,001 index keys: on
        nx-27017, 0.08 to 0.12 s of the time that SMTP's inserts share, two thirds
        of such a page's. SMTP kept 36 to 38% of its rate beside two reviewers who
        clicked such pages without pause, 61 to 69% with the bound kept."""
        key = hashlib.blake2b(repr(key).encode(), digest_size=16).digest()  # not a URL's size
        if self.server.over(key):
            return WEB_COUNT_MAX + 1
        found = available(count)
        if found is not None and found > WEB_COUNT_MAX:
            self.server.note_over(key)
        return found

    def counted_search(self, query):
        """(a page, whether there are more, how many match up to WEB_COUNT_MAX + 1 or
        None): the rows even when counting runs out of time. A page newest first (the
        first, or an older one) of a count that reads newest first comes from the
        count's own read (Archive.counted_page), passing over what one_page would. A
        first page that holds every match is its own count."""
        archive, limit = self.server.archive, WEB_COUNT_MAX + 1
        edge, newest = page_edge(self.params), self.order() == "newest"
        if self.params.get("after") or not newest or \
                edge and "$text" in query or not archive.counts_newest(query, limit):
            docs, more = self.one_page(query)
            if newest and not edge and not more:      # every match is on the page
                return docs, more, len(docs)
            return docs, more, self.count_of(("search", query),
                                             lambda: archive.count(query, limit))
        received, shown = edge or ({}, set())
        counted = available(lambda: archive.counted_page(
            query, WEB_PAGE + 1, limit,
            lambda row: within(row.get("received"), received) and str(row["_id"]) not in shown))
        if counted is None:                     # out of time: the rows alone
            return *self.one_page(query), None
        docs, count = counted
        if len(docs) > WEB_PAGE or count < limit:
            return docs[:WEB_PAGE], len(docs) > WEB_PAGE, count
        return *self.one_page(query), count     # the count's rows were all passed over

    def one_page(self, query, order=None, read=None):
        """(up to WEB_PAGE documents, whether there are more that way): one more is
        asked for; a newer page (after=) is read oldest first, from the index the
        same way, and turned round. By size or score, one page: the largest or the
        best matches. read(limit, order) reads the page, if not Archive.search.
        From an edge, the rows shown already (skip=) are read again and passed over,
        and so are rows outside the edge: nx-27017 compares dates to the second, so
        its range holds the rest of the edge's second too (120 messages of one second
        came back as the older page). Where that leaves the page short, it is read
        again, twice as far; MongoDB's range is exact, and one read does.
        A word search ($text) from an edge reads from its newest match, start= rows
        more, and its newer page is the rows just above the edge (edges)."""
        order = order or self.order()
        newer = order == "newest" and bool(self.params.get("after"))
        read = read or (lambda limit, order: self.server.archive.search(query, limit, order=order))
        received, shown = page_edge(self.params) or ({}, set())
        words = bool(received) and "$text" in query and order == "newest"
        limit = WEB_PAGE + 1 + len(shown) + (self.shown_above() if words else 0)
        while True:
            found = list(read(limit, "oldest" if newer and not words else order))
            inside = [doc for doc in found if within(doc.get("received"), received)]
            docs = [doc for doc in inside if str(doc["_id"]) not in shown]
            passed = len(inside) < len(found)           # read past a newer page's edge
            if (passed if words and newer else len(docs) > WEB_PAGE) or len(found) < limit \
                    or limit >= WEB_DEPTH_MAX:
                break
            limit = min(limit * 2, WEB_DEPTH_MAX)
        if words and newer:
            return docs[-WEB_PAGE:], len(docs) > WEB_PAGE
        docs = docs[:WEB_PAGE + 1]
        more = len(docs) > WEB_PAGE and order == "newest"
        return (docs[:WEB_PAGE][::-1] if newer else docs[:WEB_PAGE]), more

    def page_links(self, docs, more, where="/messages"):
        """{older, newer, where, start}: which pages there are beside this one (by date only:
        by size or score there is one page). One came from a newer or older page if
        it was asked with after= or before=."""
        if not docs or (where == "/messages" and self.order() != "newest"):
            return {}
        newer = bool(self.params.get("after"))
        return {"older": more or newer, "newer": more if newer else
                bool(self.params.get("before")), "where": where,
                "start": self.shown_above()}

    def shown_above(self):
        """How many rows the newer pages showed (start=): as far as a word search's
        page reads its matches (one_page)."""
        start = self.params.get("start") or ""
        return min(int(start), WEB_DEPTH_MAX) if start.isascii() and start.isdigit() else 0

    def order(self):
        sort = self.params.get("sort") or "date"
        if sort not in ("date", "size", "score"):
            raise HTTPError(400, "sort: one of date, size, score")
        if sort == "score" and not (self.params.get("text") or "").strip():
            raise HTTPError(400, "sort=score ranks the matches of text: give words")
        return "newest" if sort == "date" else sort

    def doc(self, key):
        """The message, if this user may see it: one outside a scoped user's domains
        is not there for them (404, as a key that does not exist)."""
        if not STORE_KEY_RE.fullmatch(key):
            raise HTTPError(404, "no such message")
        doc = self.server.archive.find(key)
        domains = (self.user or {}).get("domains")
        if doc is None or (domains and not set(doc.get("rcpt_domain") or ()) & set(domains)):
            raise HTTPError(404, f"no message with store_key {key}")
        return doc

    def list_sender(self, doc, kind):
        """Allow (and release) or block the message's sender for its recipients in
        this user's scope: what was done, in words."""
        sender = str(doc.get("sender") or "")
        if not sender:
            raise HTTPError(400, "a message from <> (a bounce) has no sender to list")
        rcpts = sorted({str(r).lower() for r in doc.get("rcpt") or [] if self.in_scope(str(r))})
        for rcpt in rcpts:
            self.server.archive.list_entry(kind, list_address(sender, "sender"),
                                           list_address(rcpt, "recipient"), self.user["user"],
                                           doc["store_key"])
        said = f"{kind}ed {sender.lower()} for {', '.join(rcpts)}"
        if kind == "allow" and not doc.get("released"):
            said += "; " + self.act("release", doc)
        return said

    def actions(self, doc):
        """The actions this user may take on this message, as its buttons offer them:
        learning only with the console's --spamd, listing only a sender there is."""
        return [action for action in ACTIONS if may(self.user["role"], action, doc)
                and (self.server.learning or not action.startswith("learn-"))
                and (doc.get("sender") or action not in ("allow", "block"))]

    def in_scope(self, address):
        """Whether an address (or @domain; "" is everyone) is this user's to act for:
        any for a user of all domains, one of their domains' for a scoped user."""
        domains = self.user.get("domains")
        return not domains or address.rpartition("@")[2].lower() in domains

    def outside_scope(self, to):
        """The addresses of a release's `to` that a user scoped to domains may not
        send mail to (a release elsewhere is an administrator's of all domains)."""
        return [a for a in to if not self.in_scope(a)]

    def audit(self, action, key=None, result="ok", user=None):
        """An entry of the audit log: who (a report's recipient, a failed login's
        name), as what, from where, when, on what, and how it went."""
        who = self.user or {}
        self.server.audit.record({
            "at": datetime.datetime.now(UTC), "user": str(user or who.get("user") or "")[:64],
            "role": who.get("role"), "client": self.client_address[0], "action": action,
            "key": key, "result": str(result)[:500]})

    def zone(self):
        """The user's time zone (web-user --timezone), else the console's."""
        return self.user.get("zone") or self.server.zone

    def scope(self):
        """A scoped user's searches: only mail for their domains, in the query; one
        domain as equality (Filters.query says why), several a $in, which a page of
        a date range reads one domain at a time (each_domain)."""
        domains = self.user.get("domains")
        if not domains:
            return {}
        return {"rcpt_domain": domains[0] if len(domains) == 1 else {"$in": list(domains)}}

    def search(self, params=None):
        """(the query, the filters as given) from the URL (or a form's fields), from
        the page's start on."""
        params = self.params if params is None else params
        unknown = sorted(set(params) - set(FILTERS) - PAGE_FIELDS)
        if unknown:
            raise HTTPError(400, f"no such filter: {', '.join(unknown)[:200]} (filters: "
                                 f"{', '.join(FILTERS)})")
        page = {name: params[name].strip() for name in FILTERS
                if (params.get(name) or "").strip()}
        return self.edges(all_of(Filters.parse(page).query(), self.scope()), params), page

    @staticmethod
    def edges(query, params):
        """The query from a page's edge on (before= or after=): a range on the index,
        never a skip. The rows of that same time shown already are passed over as
        they are read (one_page), not asked of MongoDB with $nin: nx-27017 reads
        every message for an _id condition beside a date (21 s at 200,000). A word
        search's edge is not asked at all: one_page reads its matches from the
        newest, as MongoDB does for any $text, and passes over those above the edge;
        nx-27017 read every message for a date beside a $text (30 s at 200,000)."""
        edge = page_edge(params)
        return all_of(query, {"received": edge[0]}) if edge and "$text" not in query else query

    def page(self, title, body, user=False, code=200, extra=()):
        user = self.user if user is False else user
        nav = ""
        if user:
            nav = ('<a href="/">Quarantine</a>' +
                   ("" if user.get("domains") else '<a href="/dashboard">Dashboard</a>') +
                   '<a href="/messages">Search</a>' +
                   ('<a href="/lists">Lists</a>' if ROLES[user.get("role", "viewer")] >=
                    ROLES["reviewer"] else "") +
                   ('<a href="/audit">Audit</a>' if user.get("role") == "admin" else "") +
                   render_form(
                "/logout", user["csrf"], f'{h(user["user"])} ({h(user["role"])}) ',
                '<button type="submit">Log out</button>'))
        said = self.server.told(user.get("token")) if user else None
        self.send(code, render_page(title, body, nav, said).encode(),
                  "text/html; charset=utf-8", extra)

    def json(self, value, code=200):
        self.send(code, json_line(value).encode(), "application/json")

    def redirect(self, where, cookie=None):
        self.send(303, b"", "text/plain", [("Location", where)] +
                  ([("Set-Cookie", cookie)] if cookie else []))

    def too_slow(self):
        """A query MongoDB stopped at the console's maxTimeMS: said, not retried."""
        text = (f"MongoDB stopped this search after {WEB_QUERY_MS / 1000:g} s, as it stops "
                f"every search of the console: not available now. Narrow it (since, a sender, "
                f"a recipient), or run `mms.py list` with the same filters.")
        if self.path.startswith("/api/"):
            return self.send(503, json_line({"error": text}).encode(), "application/json",
                             [("Retry-After", "60")])
        self.page("Not available now", f'<p class="error">{h(text)}</p>')

    def fail(self, code, text):
        if code == 303:
            return self.redirect(text)
        if self.path.startswith("/api/"):
            extra = [("WWW-Authenticate", 'Basic realm="mms"')] if code == 401 else []
            return self.send(code, json_line({"error": text}).encode(), "application/json",
                             extra)
        back, where = way_back(self.path)
        self.page(ERROR_TITLES.get(code, "Something went wrong"),
                  f'<p class="error">{h(text)}</p><p><a href="{h(back)}">Back to {h(where)}</a>'
                  f'</p>', user=getattr(self, "user", None), code=code)

    def log_message(self, format, *args):
        pass  # actions are logged as they are taken


ERROR_TITLES = {400: "That cannot be asked", 401: "Log in first", 403: "Not for you",
                404: "Not found", 409: "Not now", 413: "Too large", 429: "Too many tries",
                502: "Not delivered", 503: "Not available now"}


def way_back(path):
    """(where a person who met an error came from, its name): the message, the
    search, or the quarantine."""
    found = re.match(r"/messages/([0-9a-f]{64})", path)
    if found:
        return f"/messages/{found.group(1)}", "the message"
    if path.startswith("/q/"):                  # a recipient's link: theirs, no login
        return path.split("?")[0], "the message"
    if path.startswith(("/messages", "/api")):
        return "/messages", "the search"
    return "/", "the quarantine"


class WebRedirect(HTTPError):
    def __init__(self, where):
        super().__init__(303, where)


LOGIN_FORM = """{error}<form method="post" action="/login">
<input type="hidden" name="csrf" value="{csrf}">
<p><label>Name <input name="user" autocomplete="username" required></label></p>
<p><label>Password <input name="password" type="password" autocomplete="current-password"
required></label></p><p><button type="submit">Log in</button></p></form>"""

DASHBOARD_TOTALS = ("messages", "bytes", "virus", "spam", "banned", "held", "released",
                    "allowed", "blocked")
FIGURE_WORDS = {"bytes": "size", "held": "on legal hold", "allowed": "allowed by a list",
                "blocked": "recipients blocked by a list"}
DASHBOARD_SEARCHES = {   # each figure of the dashboard, the search that lists it
    "messages": "since=30d", "bytes": "since=30d", "virus": "verdict=virus&since=30d",
    "spam": "verdict=spam&since=30d", "banned": "verdict=banned&since=30d",
    "held": "held=1", "released": "released=1"}
TOP_SEARCHES = {"sender-domain": ("sender", "@"), "rcpt-domain": ("rcpt", "@"),
                "client": ("client", ""), "attachment-type": ("attachment_type", "")}
DASHBOARD_TOPS = (("sender-domain", "sender domains"), ("rcpt-domain", "recipient domains"),
                  ("client", "clients"), ("attachment-type", "attachment types"))  # TALLIES


def render_page(title, body, nav="", said=None):
    """A whole page: the header with its navigation, a notice shown once, the body."""
    notice = f'<p class="muted">{h(said)}</p>' if said else ""
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><title>'
            f'{h(title)} - mms</title><link rel="stylesheet" href="/style.css"></head><body><header><strong>mms</strong>{nav}</header><main><h1>{h(title)}</h1>'
            f'{notice}{body}</main></body></html>')


ACTIONS = ("hold", "unhold", "release", "delete", "allow", "block", "learn-spam", "learn-ham")
ACTION_WORDS = {"hold": "Place a legal hold", "unhold": "Lift the legal hold",
                "release": "Release", "delete": "Delete",
                "allow": "Release and always allow this sender", "block": "Block this sender",
                "learn-spam": "Spam (teach SpamAssassin)",
                "learn-ham": "Not spam (teach SpamAssassin)"}
LIST_ACTIONS = ("allow", "block", "learn-spam", "learn-ham")   # a reviewer's, for their scope
# What a search's URL or a bulk form holds beside its filters: a page's edge and
# order, and the bulk form's own fields.
PAGE_FIELDS = {"before", "after", "skip", "start", "sort", "csrf", "action", "all", "expect",
               "key"}


def may(role, action, doc):
    """A reviewer holds, releases, allows a sender (but not of a virus or banned
    mail), blocks one and teaches SpamAssassin; an admin does everything; a viewer
    reads."""
    if role == "admin":
        return action != "allow" or verdict(doc) not in ("virus", "banned")
    return role == "reviewer" and action in ("hold", "release", *LIST_ACTIONS) and \
        (action not in ("release", "allow") or verdict(doc) not in ("virus", "banned"))


def action_form(key, action, csrf, label, inside=""):
    """The button of one action on one message: POST /messages/KEY/ACTION, or
    /messages/KEY/learn with its class."""
    path, inside = (f"/messages/{key}/learn", f'<input type="hidden" name="class" '
                    f'value="{action[6:]}">' + inside) if action.startswith("learn-") else \
        (f"/messages/{key}/{action}", inside)
    return render_form(path, csrf, inside, f'<button type="submit" name="do" value="{action}">'
                                           f"{h(label)}</button>", "inline")


def render_form(action, csrf, inside, button, css="", name=""):
    """A POST form with its CSRF token: every form that changes something."""
    css = (f' class="{css}"' if css else "") + (f' id="{name}"' if name else "")
    return (f'<form{css} method="post" action="{h(action)}"><input type="hidden" name="csrf" '
            f'value="{h(csrf)}">{inside}{button}</form>')


def render_dashboard(data):
    totals = data["totals"]
    figures = "".join(
        (f'<a class="figure" href="/messages?{h(DASHBOARD_SEARCHES[k])}">' if k in
         DASHBOARD_SEARCHES else '<div class="figure">') + f'<span>{h(FIGURE_WORDS.get(k, k))}'
        f'</span> <strong>'
        f'{shown(human_size(totals[k]) if k == "bytes" and totals[k] is not None else totals[k])}'
        f"</strong>" + ("</a>" if k in DASHBOARD_SEARCHES else "</div>") for k in DASHBOARD_TOTALS)
    tops = "".join(f'<div><h3>Top {h(title)}, 7 days</h3>'
                   f'{NOT_NOW if data["top"][by] is None else top_table(data["top"][by], by)}'
                   f"</div>" for by, title in DASHBOARD_TOPS)
    chart = NOT_NOW if data["days"] is None else day_chart(data["days"])
    return f"""<h2>Last 30 days</h2>
<div class="figures">{figures}</div>
<p class="muted">{shown(data['archived'])} messages in the archive in all. Counts are of mail
received, by the day (UTC) it came.</p>
<h3>Messages per day</h3>{chart}<div class="grid">{tops}</div>"""


NOT_NOW = '<span class="muted">not available now</span>'


def shown(value):
    return NOT_NOW if value is None else h(value)


def render_search(params, page, docs, csrf=None, pages=None, count=None):
    """The search form, how many it found, a page of rows (each with a tick for a
    bulk action, given the CSRF token), the bulk form, and the links to the newer
    and older pages."""
    rows = "".join(message_row(doc, bool(csrf)) for doc in docs)
    found = "" if count is None else f"<p><strong>{h(matched(count))}</strong></p>"
    return f"""{search_form(params)}{found}
<p><a href="/messages.mbox?{h(urllib.parse.urlencode(page))}">Download these as mbox</a></p>
<table><tr class="head">{"<th></th>" if csrf else ""}<th>received</th><th>from</th><th>to</th>
<th>subject</th><th>size</th><th>verdict</th><th>score</th><th>state</th>
<th>attachments</th></tr>
{rows}</table>{bulk_form(page, csrf, count) if csrf and rows else ""}{page_nav(docs, pages or {}, page)}"""


def matched(count):
    if count > WEB_COUNT_MAX:
        return f"More than {WEB_COUNT_MAX:,} messages"
    return f"{count:,} message{'' if count == 1 else 's'}" if count else "No messages"


def bulk_form(page, csrf, count=None):
    """The rows ticked (their boxes name this form), or all this search finds."""
    kept = "".join(f'<input type="hidden" name="{h(name)}" value="{h(value)}">'
                   for name, value in page.items())
    options = "".join(f'<option value="{name}">{ACTION_WORDS[name]}</option>'
                      for name in ACTIONS)
    every = matched(count).lower() if count is not None else "the messages"
    return render_form("/messages/bulk", csrf, kept + (
        '<fieldset><legend>Apply to</legend><label><input type="radio" name="all" value="" '
        'checked> the ticked rows</label> <label><input type="radio" name="all" value="1"> '
        f'all {h(every)} this search finds</label></fieldset> <label>Action <select '
        f'name="action">{options}</select></label> '),
        '<button type="submit">Apply</button>', name="bulk")


def openapi():
    """The JSON API as OpenAPI 3.1 (JSON Schema 2020-12 for its bodies)."""
    message = {"type": "object", "required": ["store_key", "verdict"], "properties": {
        "store_key": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "sender": {"type": "string"}, "rcpt": {"type": "array", "items": {"type": "string"}},
        "received": {"type": "string"}, "subject": {"type": "string"},
        "size": {"type": "integer"}, "verdict": {"enum": list(VERDICTS)},
        "files": {"type": "array", "items": {"type": "object"}}}}
    error = {"type": "object", "required": ["error"], "properties": {
        "error": {"type": "string"}, "count": {"type": "integer"}}}

    def answer(schema, *codes):
        return {"200": {"description": "done", "content": {"application/json": {
            "schema": schema}}}, **{str(code): {"description": "refused", "content": {
                "application/json": {"schema": error}}} for code in codes}}
    filters = [{"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
               for name in FILTERS]
    return {"openapi": "3.1.0", "info": {"title": "mms", "version": __version__},
            "components": {"securitySchemes": {"basic": {"type": "http", "scheme": "basic"},
                                               "session": {"type": "apiKey", "in": "cookie",
                                                           "name": "mms_session"}}},
            "security": [{"basic": []}, {"session": []}],
            "paths": {
        "/api/messages": {"get": {"parameters": filters + [
            {"name": "before", "in": "query", "schema": {"type": "string"}},
            {"name": "skip", "in": "query", "schema": {"type": "string"}},
            {"name": "start", "in": "query", "schema": {"type": "integer"}}],
            "responses": answer({"type": "object", "required": ["messages", "next"],
                                 "properties": {"messages": {"type": "array", "items": message},
                                                "next": {"type": ["object", "null"]}}},
                                400, 401, 503)}},
        "/api/messages/{key}": {"get": {"parameters": [
            {"name": "key", "in": "path", "required": True, "schema": {"type": "string"}}],
            "responses": answer(message, 401, 404)}},
        "/api/stats": {"get": {"parameters": [
            {"name": name, "in": "query", "schema": {"type": "string"}}
            for name in ("since", "by", "top")],
            "responses": answer({"type": "object", "required": ["totals", "groups"]},
                                400, 401, 403, 503)}},
        "/api/bulk": {"post": {"requestBody": {"required": True, "content": {
            "application/json": {"schema": {"type": "object", "required": ["action"],
                                            "properties": {
                "action": {"enum": list(ACTIONS)},
                "keys": {"type": "array", "items": {"type": "string"}},
                "filters": {"type": "object"}, "expect": {"type": "integer"}}}}}},
            "responses": answer({"type": "object", "required": ["action", "results"],
                                 "properties": {"results": {"type": "array", "items": {
                                     "type": "object", "required": ["key", "result"]}}}},
                                400, 401, 403, 409, 415)}},
        "/api/lists": {
            "post": {"requestBody": {"required": True, "content": {"application/json": {
                "schema": {"type": "object", "required": ["kind", "sender"], "properties": {
                    "kind": {"enum": ["allow", "block"]}, "sender": {"type": "string"},
                    "for": {"type": "string"}}}}}},
                "responses": answer({"type": "object", "required": ["kind", "sender", "for"]},
                                    400, 401, 403, 409, 415)},
            "delete": {"requestBody": {"required": True, "content": {"application/json": {
                "schema": {"type": "object", "required": ["sender"], "properties": {
                    "sender": {"type": "string"}, "for": {"type": "string"}}}}}},
                "responses": answer({"type": "object", "required": ["removed"]},
                                    400, 401, 403, 404, 415)}},
        "/api/messages/{key}/learn": {"post": {
            "parameters": [{"name": "key", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["class"], "properties": {
                    "class": {"enum": ["spam", "ham"]}}}}}},
            "responses": answer({"type": "object", "required": ["key", "result"]},
                                400, 401, 403, 404, 415, 502)}}}}


def render_bulk(done):
    rows = "".join("<tr>" + cells((("Message", f'<a href="/messages/{h(key)}">{h(key[:16])}</a>'),
                                   ("What happened", h(result)))) + "</tr>" for key, result in done)
    return (f'<table><tr class="head"><th>message</th><th>what happened</th></tr>{rows}</table>'
            f'<p><a href="/messages">Back to the search</a> <a href="/">Back to the quarantine</a>'
            f"</p>")


def render_lists(entries, csrf):
    """Each entry, with who added it, when and from which message, and a remove."""
    rows = "".join("<tr>" + cells((
        ("List", h(e.get("kind"))), ("Sender", h(e.get("sender"))),
        ("For", h(e.get("rcpt") or "everyone")), ("By", h(e.get("by") or "-")),
        ("Message", f'<a href="/messages/{h(e["message"])}">{h(e["message"][:12])}</a>'
         if STORE_KEY_RE.fullmatch(str(e.get("message") or "")) else "-"),
        ("Remove", render_form("/lists/remove", csrf, f'<input type="hidden" name="sender" '
                               f'value="{h(e.get("sender"))}"><input type="hidden" name="rcpt" '
                               f'value="{h(e.get("rcpt") or "")}">',
                               '<button type="submit">Remove</button>', "inline")))) + "</tr>"
        for e in entries)
    return ("<p>Filter mode refuses mail from a blocked sender (550 5.7.1) and does not "
            "ask SpamAssassin about an allowed one (ClamAV still scans it). "
            "<code>mms.py lists</code> shows the same.</p>" + (
                '<table><tr class="head"><th>list</th><th>sender</th><th>for</th><th>by</th>'
                f"<th>message</th><th></th></tr>{rows}</table>" if rows else
                "<p>No entries.</p>"))


def render_audit(params, trail, zone):
    form = "".join(f'<label>{name} <input name="{name}" value="{h(params.get(name, ""))}" '
                   f'size="14"></label> ' for name in ("user", "action", "since"))
    rows = "".join(
        "<tr>" + cells((("When", h(entry['at'].astimezone(zone).strftime('%d %b %Y %H:%M:%S'))),
                        *((name.capitalize(), h(audit_value(entry.get(name)))) for name in (
                            "user", "role", "client", "action", "key", "result")))) + "</tr>"
        for entry in trail if isinstance(entry.get("at"), datetime.datetime))
    return (f'<form method="get" action="/audit">{form}<button type="submit">Search</button>'
            f'</form><table><tr class="head"><th>when ({h(zone)})</th><th>user</th><th>role</th>'
            f"<th>from</th><th>action</th><th>message</th><th>result</th></tr>{rows}</table>")


def audit_query(user, action, since):
    """The audit log's filter: each clause on its index (user, at; action, at; at)."""
    return all_of({"user": user} if user else {}, {"action": action} if action else {},
                  {"at": {"$gte": since}} if since else {})


def web_when(value, name):
    if not value:
        return None
    try:
        return _when(value)
    except argparse.ArgumentTypeError as exc:
        raise HTTPError(400, f"{name}: {exc}") from None


def edge_page(docs, way, start=0):
    """The older page starts at the last row's received time (the newer at the
    first's), without the rows of that same time shown already: a range on the
    index, never a skip. start= is how many rows the newer pages showed: how far
    a word search's page reads its matches from the newest (one_page)."""
    row = docs[-1] if way == "older" else docs[0]
    edge = row.get("received")
    if not isinstance(edge, datetime.datetime):
        return {}
    same = [str(d["_id"]) for d in docs if d.get("received") == edge]
    return {"before" if way == "older" else "after": edge.astimezone(UTC).isoformat(),
            "skip": ",".join(same),
            "start": start + len(docs) if way == "older" else max(start - WEB_PAGE, 0)}


def within(when, received):
    """Whether a date is in a page edge's range ({"$lte": ..., "$gte": ...})."""
    if not received:
        return True
    if not isinstance(when, datetime.datetime):
        return False
    return (when <= received.get("$lte", when)) and (when >= received.get("$gte", when))


def page_edge(params):
    """(the range of received from a page's before= ($lte) and after= ($gte), the
    _ids shown already at that time); None for a first page."""
    received = {op: web_when(params[edge], edge) for edge, op in (("before", "$lte"),
                                                                  ("after", "$gte"))
                if params.get(edge)}
    if not received:
        return None
    return received, {i for i in (params.get("skip") or "").split(",")
                      if re.fullmatch(r"[0-9a-f]{24}", i)}


def dashboard_data(archive):
    """The dashboard's figures, from the daily counts (Tally), the held and released
    counters (Archive.states) and the collection's own count. Each figure on
    its own: one MongoDB cannot give within the console's maxTimeMS is None, shown
    as "not available now", and the others are shown."""
    today = datetime.datetime.now(UTC)
    verdicts = available(lambda: archive.daily("verdict", today - 29 * DAY))
    totals = dict.fromkeys(DASHBOARD_TOTALS)
    if verdicts is not None:
        counted = [(kind, n, size) for groups in verdicts.values()
                   for kind, (n, size) in groups.items()]
        totals.update(messages=sum(n for _, n, _ in counted),
                      bytes=sum(size for _, _, size in counted),
                      **{kind: sum(n for k, n, _ in counted if k == kind)
                         for kind in ("virus", "spam", "banned")})
    states = available(archive.states)
    totals.update(held=states and states["held"], released=states and states["released"])
    listed = available(lambda: archive.daily("list", today - 29 * DAY))
    totals.update({kind: None if listed is None else sum(
        groups.get(kind, [0])[0] for groups in listed.values()) for kind in ("allowed",
                                                                            "blocked")})
    return {"totals": totals, "archived": available(lambda: archive.count({})),
            "days": None if verdicts is None else {
                day: {kind: n for kind, (n, _) in groups.items()}
                for day, groups in verdicts.items()},
            "top": {by: available(lambda by=by: archive.top(by, today - 6 * DAY))
                    for by, _ in DASHBOARD_TOPS}}


def available(make):
    """What make() gives, or None if MongoDB stopped it at the console's maxTimeMS."""
    from pymongo.errors import ExecutionTimeout
    try:
        return make()
    except ExecutionTimeout:
        return None


def day_chart(days, width=720, height=180):
    """Messages per day, stacked by verdict, as inline SVG: no script, no request."""
    start = datetime.datetime.now(UTC).date() - datetime.timedelta(days=29)
    dates = [(start + datetime.timedelta(days=n)).isoformat() for n in range(30)]
    highest = max([sum(days.get(d, {}).values()) for d in dates] + [1])
    bar, bars = width / 30, []
    for n, date in enumerate(dates):
        y = height
        for verdict, colour in VERDICT_COLOURS.items():
            count = days.get(date, {}).get(verdict, 0)
            if count:
                tall = count / highest * (height - 20)
                y -= tall
                bars.append(f'<rect x="{n * bar + 1:.1f}" y="{y:.1f}" width="{bar - 2:.1f}" '
                            f'height="{tall:.1f}" fill="{colour}"><title>{h(date)}: {count} '
                            f'{h(verdict)}</title></rect>')
    legend = "".join(f'<text x="{10 + i * 110}" y="12" fill="{colour}">{h(v)}</text>'
                     for i, (v, colour) in enumerate(VERDICT_COLOURS.items()))
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 20}" '
            f'viewBox="0 0 {width} {height + 20}" role="img" aria-label="messages per day">{legend}{"".join(bars)}'
            f'<text x="0" y="{height + 15}">{h(dates[0])}</text><text x="{width - 80}" '
            f'y="{height + 15}">{h(dates[-1])}</text></svg>')


def top_table(groups, by):
    """A top table, each group a link to its week's search."""
    field, prefix = TOP_SEARCHES[by]
    names = [str(g["group"] or "") or ("<>" if by == "sender-domain" else "-") for g in groups]
    label = dict(DASHBOARD_TOPS)[by].rstrip("s").capitalize()
    searches = [urllib.parse.urlencode({field: name if name == "<>" else prefix + name,
                                        "since": "7d"}) for name in names]
    rows = "".join("<tr>" + cells(((label, f'<a href="/messages?{h(search)}">{h(name)}</a>'),
                                   ("Messages", h(g["messages"])))) + "</tr>"
                   for g, name, search in zip(groups, names, searches))
    return (f'<table><tr class="head"><th>{h(label)}</th><th>messages</th></tr>{rows}'
            f"</table>")


SEARCH_CHOICES = {   # the filters a select box offers: (value, shown), "" being any
    "verdict": [(v, v) for v in VERDICTS],
    "quarantine": [(q, q) for q in QUARANTINES],
    "held": [("1", "on legal hold"), ("0", "not on legal hold")],
    "sort": [("date", "newest first"), ("size", "largest first"), ("score", "best match first")],
}
# Each filter as a helpdesk reads it; the first ones are shown, the rest folded.
SEARCH_LABELS = {
    "sender": "From (sender, or @domain)", "rcpt": "To (recipient, or @domain)",
    "text": "Words", "verdict": "Verdict",
    "since": "Received since (24h, 7d, 2026-12-01)", "until": "Received before",
    "subject": "Subject contains", "message_id": "Message-ID",
    "quarantine_id": "Quarantine ID", "client": "Client IP or network",
    "quarantine": "Quarantine type", "attachment": "Attachment name (*.zip)",
    "attachment_type": "Attachment type (application/zip)",
    "attachment_sha256": "Attachment SHA-256", "country": "Client's country (CN)",
    "bounce": "Bounces only",
    "held": "Legal hold", "released": "Released only", "sort": "Order"}
SEARCH_FIRST = ("sender", "rcpt", "text", "verdict")


def search_form(params):
    """Sender, recipient, words and verdict, with every other filter of `list`
    under "More filters" (open when one of them is set)."""
    def field(name):
        label = SEARCH_LABELS[name]
        if name in SEARCH_CHOICES:
            return select_box(name, SEARCH_CHOICES[name], params, label,
                              blank=None if name == "sort" else "any")
        if name in ("released", "bounce"):
            return (f'<label><input type="checkbox" name="{name}" value="1"'
                    f'{" checked" if params.get(name) else ""}> {h(label)}</label> ')
        return (f'<label>{h(label)} <input name="{name}" value="{h(params.get(name, ""))}">'
                f"</label> ")
    more = [name for name in (*FILTERS, "sort") if name not in SEARCH_FIRST + ("virus", "spam")]
    folded = " open" if any(params.get(name) for name in more if name != "sort") else ""
    return (f'<form method="get" action="/messages" class="search">'
            f'{"".join(field(name) for name in SEARCH_FIRST)}<details{folded}><summary>More '
            f'filters</summary>{"".join(field(name) for name in more)}</details>'
            f'<button type="submit">Search</button></form>')


def select_box(name, choices, params, label, blank="any"):
    options = "".join(f'<option value="{h(value)}"'
                      f'{" selected" if params.get(name) == value else ""}>{h(shown)}</option>'
                      for value, shown in choices)
    blank = f'<option value="">{blank}</option>' if blank else ""
    return f'<label>{h(label)} <select name="{name}">{blank}{options}</select></label> '


def message_row(doc, tick=False):
    key = str(doc.get("store_key", ""))
    received = doc.get("received")
    when = f"{received:%Y-%m-%d %H:%M:%S}" if isinstance(received, datetime.datetime) else "-"
    state = ", ".join(MARK_WORDS.get(mark, mark) for mark in marks(doc)
                      if mark in ("held", "released"))
    score = doc.get("spam_score")
    box = (f'<td><input type="checkbox" name="key" value="{h(key)}" form="bulk" '
           f'aria-label="select {h(key[:12])}"></td>') if tick else ""
    return f"<tr>{box}" + cells((
        ("Received", h(when)), ("From", h(doc.get("sender") or "<>")),
        ("To", h(rcpt_list(doc))), ("Subject", subject_link(doc)),
        ("Size", h(human_size(doc.get("size")))), ("Verdict", h(verdict(doc))),
        ("Score", h(score if score is not None else "-")), ("State", h(state or "-")),
        ("Attachments", h(doc.get("files_count") or 0)))) + "</tr>"


def cells(pairs):
    """Table cells, each with its label, which a phone shows beside the value."""
    return "".join(f'<td data-label="{label}">{value}</td>' for label, value in pairs)


def rcpt_list(doc):
    rcpt = doc.get("rcpt")
    return ", ".join(map(str, rcpt[:3])) + (" ..." if len(rcpt) > 3 else "") \
        if isinstance(rcpt, list) else str(rcpt or "")


def subject_link(doc):
    key = str(doc.get("store_key", ""))
    subject = h(doc.get("subject") or "(no subject)")
    return f'<a href="/messages/{h(key)}">{subject}</a>' if STORE_KEY_RE.fullmatch(key) \
        else subject


ROW_WORDS = {"allow": "Release + allow sender", "block": "Block sender", "learn-spam": "Spam",
             "learn-ham": "Not spam"}     # a row's buttons, shorter


def quarantine_row(doc, user, now, actions):
    """A message awaiting judgement: who, what, why it is held, how old, and the
    actions this user may take on it at hand."""
    key, kind = doc["store_key"], verdict(doc)
    names = doc.get("virus") if isinstance(doc.get("virus"), list) else []
    why = report_verdict(doc).replace("held as ", "") + (
        f": {', '.join(map(str, names))}" if names else "")
    received = doc.get("received")
    age = age_text(now - received) if isinstance(received, datetime.datetime) else "-"
    shown = [a for a in ("release", "delete", "allow", "block", "learn-spam", "learn-ham")
             if a in actions and not (a == "delete" and is_held(doc))] if user.get("csrf") else []
    buttons = " ".join(action_form(key, action, user["csrf"], ROW_WORDS.get(action, ACTION_WORDS[
        action])) for action in shown)
    hold = ' <span class="muted">(legal hold)</span>' if is_held(doc) else ""
    return f'<tr class="{h(kind)}">' + cells((
        ("From", h(doc.get("sender") or "<>")), ("To", h(rcpt_list(doc))),
        ("Subject", subject_link(doc) + hold), ("Verdict", h(why)),
        ("Attachments", h(doc.get("files_count") or 0)), ("Age", h(age)),
        ("Actions", buttons or '<span class="muted">-</span>'))) + "</tr>"


def age_text(delta):
    minutes = max(0, int(delta.total_seconds() // 60))
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h" if minutes < 2880 else f"{minutes // 1440} days"


def render_quarantine(docs, count, user, zone, pages, actions):
    """The landing page: how many messages wait, and a page of them."""
    said = ("Mail awaiting judgement." if count is None else
            "Nothing awaits judgement." if not count else
            f"More than {WEB_COUNT_MAX:,} messages await judgement." if count > WEB_COUNT_MAX
            else f"{count:,} message{'s' if count != 1 else ''} await{'s' if count == 1 else ''}"
                 f" judgement.")
    now = datetime.datetime.now(UTC)
    rows = "".join(quarantine_row(doc, user, now, actions(doc)) for doc in docs)
    table = ('<table><tr class="head"><th>from</th><th>to</th><th>subject</th><th>verdict'
             '</th><th>attachments</th><th>age</th><th></th></tr>' + rows + "</table>"
             ) if rows else ""
    return (f'<p>{h(said)} Spam, viruses and banned attachments that were not released, '
            f'newest first. <a href="/messages">Search all mail</a></p>{table}'
            f"{page_nav(docs, pages, {})}")


def page_nav(docs, pages, page):
    """The links to the newer and the older page, from this page's edges."""
    where, start = pages.get("where", "/messages"), pages.get("start", 0)
    link = "".join(
        f'<a href="{where}?{h(urllib.parse.urlencode({**page, **edge_page(docs, way, start)}))}">'
        f"{way.capitalize()} messages</a> " for way in ("newer", "older") if pages.get(way))
    return f"<p>{link}</p>" if link else ""


def field_table(doc):
    """Every stored field, as text: envelope, client, verdicts, quarantine, history."""
    rows = "".join(f"<tr><th>{h(name)}</th><td>{h(json.dumps(value, default=str, ensure_ascii=False))}"
                   f"</td></tr>" for name, value in doc.items() if name != "_id")
    return f"<table>{rows}</table>"


class MimeView:
    """A stored message as the console shows it, read once (at most WEB_VIEW_MAX):
    its header as text, its text parts, its first HTML part and the images it
    names by cid:, and its attachments with what their first bytes say they are.
    Hostile MIME never stops the page (a sender would hide a message from
    review): a part that cannot be decoded is shown as its bytes with the reason,
    and a message nested too deep for the parser as its text."""

    def __init__(self, archive, doc):
        import email
        import email.policy
        data, cut = bytearray(), False
        for piece in archive.pieces(doc):
            data += piece
            if len(data) > WEB_VIEW_MAX:
                data, cut = data[:WEB_VIEW_MAX], True
                break
        data = bytes(data)
        head = header_block(data)
        self.fields = header_values(head, (b"from", b"to"))
        self.head = "\n".join(f"{name}: {decode_header_value(value)}" for name, value in
                              header_pairs(head))
        self.notes = [f"Shown: the first {WEB_VIEW_MAX} bytes; download the message for the "
                      f"rest."] if cut else []
        self.texts, self.files, self.html, self.images = [], [], None, {}
        try:
            message = email.message_from_bytes(data, policy=email.policy.compat32)
        except RecursionError:
            body = data[len(head):].decode("utf-8", "replace")
            self.texts.append(("Body, as text", f"<pre>{h(body)}</pre>"))
            self.notes.append("Its MIME parts are nested too deep to be shown one by one.")
            return
        for part in mime_leaves(message, self.notes):
            self.add(part)

    def add(self, part):
        kind, payload = part.get_content_type(), part.get_payload(decode=True) or b""
        name = part_filename(part)
        cid = str(part.get("Content-ID") or "").strip().strip("<>").lower()
        if cid and kind.startswith("image/") and len(self.images) < 100:
            self.images[cid] = (kind, payload)
        if name or kind not in ("text/plain", "text/html"):
            sniff = sniffed(payload[:16])
            self.files.append({"name": name, "kind": kind, "size": len(payload),
                               "sha256": hashlib.sha256(payload).hexdigest(), "sniff": sniff,
                               "warning": file_warning(name, kind, sniff), "payload": payload})
        elif kind == "text/plain":
            self.texts.append(("Text", part_text(part, payload)))
        else:
            if self.html is None:
                self.html = decoded(payload, part.get_content_charset() or "utf-8")
            self.texts.append(("HTML source", part_text(part, payload)))


def render_message(key, doc, view, csrf=None, zone=UTC, actions=ACTIONS):
    """One message as a mail client shows it (who, when, what the scanners said, what
    was done with it), the HTML part in a sandboxed preview with its links and
    remote images told, the attachments; the stored fields, the header and each
    part's source one click away. An admin's actions come with the CSRF token."""
    release = ('<input name="to" placeholder="to (optional)" aria-label="release to">'
               '<label><input type="checkbox" name="again" value="1"> again</label>')
    shown = [name for name in ("unhold" if is_held(doc) else "hold", "delete", "release",
                               "allow", "block", "learn-spam", "learn-ham") if name in actions]
    actions = "".join(action_form(key, name, csrf, ACTION_WORDS[name],
                                  release if name == "release" else "") + " "
                      for name in shown) if csrf else ""
    texts = "".join(f"<details{' open' if label == 'Text' else ''}><summary>{h(label)}"
                    f"</summary>{body}</details>" for label, body in view.texts)
    notes = "".join(f'<p class="muted">{h(note)}</p>' for note in view.notes)
    return f"""{legal_hold(doc, zone)}<p>{actions}
<a href="/messages/{h(key)}/raw">Download the message</a></p>
{summary_table(doc, view, zone)}{preview_section(key, view)}{files_table(key, view.files)}
{texts}<details><summary>Header</summary><pre>{h(view.head)}</pre></details>
<details><summary>All stored fields</summary>{field_table(doc)}</details>{notes}"""


def legal_hold(doc, zone):
    """A held message's state, said first: what a legal hold refuses, and what not."""
    if not is_held(doc):
        return ""
    record = doc.get("held_by") if isinstance(doc.get("held_by"), dict) else {}
    at = record.get("at")
    since = f" since {at.astimezone(zone):%d %b %Y %H:%M} {zone}" \
        if isinstance(at, datetime.datetime) else ""
    by = f" by {record['user']}" if record.get("user") else ""
    return (f'<p class="warning">On legal hold{h(since)}{h(by)}: delete, purge and '
            f"--retention leave it alone, and a recipient's report link cannot release it. "
            f"A release sends a copy; the message stays here, on hold.</p>")


def summary_table(doc, view, zone):
    """What a reviewer reads first, as sentences and names, not JSON."""
    def when(value):
        return f"{value.astimezone(zone):%d %b %Y %H:%M} {zone}" \
            if isinstance(value, datetime.datetime) else "-"
    header = {name.decode(): decode_header_value(value) for name, value in view.fields.items()}
    rcpts = ", ".join(map(str, doc.get("rcpt") or [])) or "-"
    rows = [("From", f"{header.get('from', '-')} (envelope: {doc.get('sender') or '<>'})"),
            ("To", f"{header.get('to', '-')} (envelope: {rcpts})"),
            ("Subject", doc.get("subject") or "-"), ("Date", when(doc.get("sent"))),
            ("Received", f"{when(doc.get('received'))} from {doc.get('client_address', '-')}"
                         + (f" ({doc['country']})" if doc.get("country") else "")),
            ("Size", human_size(doc.get("size"))), ("Verdict", verdict_sentence(doc))]
    if doc.get("quarantine") or doc.get("quarantine_id"):
        rows.append(("Quarantine", f"{doc.get('quarantine', '-')}, ID "
                                   f"{doc.get('quarantine_id') or '-'}"))
    rows += [("History", line) for line in history(doc, when)]
    cells = "".join(f"<tr><th>{h(name)}</th><td>{h(value)}</td></tr>" for name, value in rows)
    return f'<table class="summary">{cells}</table>'


def verdict_sentence(doc):
    said = [verdict(doc)]
    if doc.get("virus"):
        said.append("virus " + ", ".join(map(str, doc["virus"] if isinstance(doc["virus"], list)
                                             else [doc["virus"]])))
    if doc.get("spam_score") is not None:
        required = doc.get("spam_required")
        said.append(f"spam score {doc['spam_score']}" +
                    (f" (required {required})" if required is not None else ""))
    if isinstance(doc.get("spam_symbols"), list) and doc["spam_symbols"]:
        said.append("rules " + ", ".join(map(str, doc["spam_symbols"][:50])))
    return "; ".join(said)


def history(doc, when):
    """Holds and releases as sentences: 'released to bob@example.com by alice, ...'."""
    lines = []
    for field, done in (("held_by", "legal hold placed"), ("unheld_by", "legal hold lifted")):
        record = doc.get(field)
        if isinstance(record, dict):
            lines.append(f"{done} by {record.get('user', '?')}, {when(record.get('at'))}")
    for record in doc.get("released") or []:
        if isinstance(record, dict):
            to = ", ".join(map(str, record.get("to") or [])) or "its recipients"
            lines.append(f"released to {to} by {record.get('by', '?')}, "
                         f"{when(record.get('at'))} ({str(record.get('reply', ''))[:60]})")
    return lines


def preview_section(key, view):
    if view.html is None:
        return ""
    preview = Preview(view.html, view.images)
    remote = (f'<p class="warning">{preview.remote} remote image(s) not loaded</p>'
              if preview.remote else "")
    rows = "".join(f'<tr{" class=warning" if wrong else ""}>' + cells((
        ("Text", h(text)), ("Goes to", h(target)), ("Warning", h(wrong or "-")))) + "</tr>"
        for text, target, wrong in preview.links)
    links = (f'<h3>Links</h3><table><tr class="head"><th>text</th><th>goes to</th><th></th>'
             f"</tr>{rows}</table>") if rows else ""
    return (f'<h3>HTML preview</h3><iframe class="preview" sandbox title="HTML preview" '
            f'referrerpolicy="no-referrer" src="/messages/{h(key)}/preview"></iframe>'
            f"{remote}{links}")


def files_table(key, files):
    if not files:
        return ""
    rows = "".join(
        f'<tr{" class=warning" if f["warning"] else ""}>' + cells((
            ("Name", h(f["name"] or "(no name)")), ("Declared", h(f["kind"])),
            ("Its bytes say", h(f["sniff"] or "-")), ("Size", h(human_size(f["size"]))),
            ("SHA-256", f'<code>{h(f["sha256"][:16])}</code>'),
            ("Warning", h(f["warning"] or "-")),
            ("File", f'<a href="/messages/{h(key)}/parts/{n}">download</a>'))) + "</tr>"
        for n, f in enumerate(files))
    return ('<h3>Attachments</h3><table><tr class="head"><th>name</th><th>declared</th><th>'
            "its bytes say</th><th>size</th><th>sha256</th><th></th><th></th></tr>" + rows +
            "</table>")


PREVIEW_CSP = ("sandbox; default-src 'none'; img-src data: cid:; style-src 'unsafe-inline'; "
               "frame-ancestors 'self'")   # no script, form, remote load or navigation
PREVIEW_INLINE_MAX = 2 * 2**20    # bytes of cid: images put into one preview
LINKS_MAX = 500                   # links a message's page lists
# What the preview keeps of a sender's HTML: these tags, with these attributes, and
# nothing else (a tag not named here goes, its text stays).
PREVIEW_TAGS = frozenset(
    "a abbr acronym address article aside b bdi bdo big blockquote br caption center cite "
    "code col colgroup dd del dfn div dl dt em figcaption figure font footer h1 h2 h3 h4 h5 "
    "h6 header hr i img ins kbd li main mark nav ol p pre q s samp section small span strike "
    "strong sub summary sup table tbody td tfoot th thead tr tt u ul var wbr".split())
PREVIEW_ATTRIBUTES = frozenset(
    "align alt bgcolor border cellpadding cellspacing class color colspan dir face height "
    "hspace id lang nowrap rowspan scope size span start style title type valign vspace "
    "width".split())
PREVIEW_IMAGE_TYPES = frozenset(("image/png", "image/jpeg", "image/gif", "image/webp"))
# Elements whose content is raw text to a browser (it ends only at their end tag);
# the first ones' content is not shown at all.
RAW_DROPPED = frozenset(("script", "style", "title", "iframe", "noembed", "noframes"))
RAW_TEXT = RAW_DROPPED | {"textarea", "xmp"}
RAW_END_RE = {name: re.compile(rf"(?i)</{name}[\s/>]") for name in RAW_TEXT}
TAG_OPEN_RE = re.compile(r"<(?:(!--)|([!?])|(/?)([A-Za-z][^\s/>]*))")
ATTRIBUTE_RE = re.compile(r"""[\s/]*(?:(>)|([^\s/>][^\s/>=]*)(?:\s*=\s*(?:"([^"]*)(")?|"""
                          r"""'([^']*)(')?|([^\s>]*)))?)""")
CSS_URL_RE = re.compile(r"""(?i)(?:url|image-set|image|cross-fade|element)\(\s*['"]?\s*"""
                        r"""([^'")\s]*)\s*['"]?\s*\)?|@import""")
REMOTE_RE = re.compile(r"(?i)^\s*(?:(?:https?|ftp):)?//")
DATA_IMAGE_RE = re.compile(r"(?i)data:image/(?:png|jpeg|gif|webp);base64,[A-Za-z0-9+/=\s]*")
HOST_IN_TEXT_RE = re.compile(r"(?i)^\s*(?:https?://)?((?:[a-z0-9-]+\.)+[a-z]{2,})(?:[/:?#]|\s*$)")
RISKY_EXTENSIONS = {"exe", "scr", "com", "pif", "bat", "cmd", "js", "jse", "vbs", "vbe", "wsf",
                    "hta", "msi", "jar", "ps1", "lnk", "iso", "img", "cpl", "reg", "dll"}
MAGIC = [(b"%PDF-", "application/pdf"), (b"PK\x03\x04", "application/zip"),
         (b"MZ", "application/x-msdownload"), (b"\x7fELF", "application/x-executable"),
         (b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
         (b"GIF8", "image/gif"), (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "application/x-ole-storage"),
         (b"Rar!\x1a\x07", "application/vnd.rar"),
         (b"7z\xbc\xaf\x27\x1c", "application/x-7z-compressed"),
         (b"\x1f\x8b", "application/gzip"), (b"{\\rtf", "application/rtf")]


def html_tokens(text):
    """("text", data), ("tag", name, closing, {attribute: value}) and ("raw", name,
    text) as a browser's tokenizer reads them (a quoted value may hold '>'; comments
    and <! and <? declarations are skipped; a raw text element runs to its end tag),
    in one forward pass of anchored matches: hostile HTML costs its length (the
    stdlib's html.parser takes minutes over 250 KB of '<a<a<a'). A tag cut off by
    the end of the text is dropped, as a browser drops it."""
    at, size = 0, len(text)
    while at < size:
        found = TAG_OPEN_RE.search(text, at)
        if not found:
            yield "text", text[at:]
            return
        if found.start() > at:
            yield "text", text[at:found.start()]
        at = found.end()
        if found.group(1) or found.group(2):            # <!-- ... -->, <!...>, <?...>
            empty = re.match(r"-?>", text[at:at + 2]) if found.group(1) else None
            end = at + empty.end() - 3 if empty else \
                text.find("-->" if found.group(1) else ">", at)
            at = size if end < 0 else end + (3 if found.group(1) else 1)
            continue
        name, closing, attrs = found.group(4).lower(), bool(found.group(3)), {}
        while (attribute := ATTRIBUTE_RE.match(text, at)) and not attribute.group(1):
            at = attribute.end()
            double, closed, single, ended = attribute.group(3, 4, 5, 6)
            if (double is not None and closed is None) or (single is not None and ended is None):
                return                                  # a quoted value cut off
            value = next((v for v in attribute.group(3, 5, 7) if v is not None), "")
            attrs.setdefault(attribute.group(2).lower(), html.unescape(value))
        if attribute is None:
            return                                      # cut off: no tag
        at = attribute.end()
        yield "tag", name, closing, attrs
        if name in RAW_TEXT and not closing:
            end = RAW_END_RE[name].search(text, at)
            stop = size if end is None else end.start()
            if name not in RAW_DROPPED or name == "style":
                yield "raw", name, text[at:stop]
            at = stop


class Preview:
    """An HTML part rebuilt to be looked at: a sender's text, every character of it
    escaped, between tags of PREVIEW_TAGS rebuilt with PREVIEW_ATTRIBUTES' values
    escaped; nothing of a sender's markup passes as it came. Links are kept as text
    (their targets listed beside, those whose text names another host flagged);
    cid: images of PREVIEW_IMAGE_TYPES are put in as data: URIs; remote images,
    CSS url()s among them, are counted and taken out."""

    def __init__(self, text, images):
        self.images, self.inlined, self.links, self.remote = images, 0, [], 0
        out, anchor = [], None
        for token in html_tokens(text):
            if token[0] == "text":
                out.append(html.escape(html.unescape(token[1]), quote=False))
                if anchor is not None and len(anchor[1]) < 200:
                    anchor[1] += " " + html.unescape(token[1])[:200]
            elif token[0] == "raw":
                out.append(self.raw(*token[1:]))
            else:
                _, name, closing, attrs = token
                if name in ("a", "area") and (closing or len(self.links) < LINKS_MAX):
                    anchor = self.close(anchor)
                    if not closing:
                        anchor = [attrs.get("href"), ""]
                out.append(self.tag(name, closing, attrs))
        self.close(anchor)
        self.html = "".join(out)

    def close(self, anchor):
        if anchor is not None and anchor[0] is not None:
            shown = " ".join(anchor[1].split())[:200]
            self.links.append(link_row(shown, anchor[0][:2000]))
        return None

    def tag(self, name, closing, attrs):
        if name not in PREVIEW_TAGS:
            if name == "style" and not closing:
                return "<style>"
            return "</style>" if name == "style" else ""
        if closing:
            return f"</{name}>"
        kept = {key: value for key, value in attrs.items() if key in PREVIEW_ATTRIBUTES}
        for key in ("background", "srcset", "poster", "lowsrc", "dynsrc"):
            self.remote += bool(REMOTE_RE.match(attrs.get(key, "")))
        if "style" in kept:
            kept["style"] = self.css(kept["style"])
        if name == "img":
            src = self.image(attrs.get("src", ""))
            if src:
                kept["src"] = src
        if name == "a" and attrs.get("href"):
            kept["title"] = "goes to " + attrs["href"][:2000]
        return f"<{name}" + "".join(f' {key}="{html.escape(value, quote=True)}"'
                                    for key, value in kept.items()) + ">"

    def raw(self, name, text):
        """A textarea's or xmp's text, escaped; a style element's CSS without a '<'
        (it cannot end the element) and without a url()."""
        if name == "style":
            return self.css(text).replace("<", "")
        return html.escape(html.unescape(text), quote=False)

    def css(self, text):
        """CSS with each url() and its kin made a data: URI or none; no backslash
        (u\\72l( is url( to a browser)."""
        return CSS_URL_RE.sub(self.css_url, text[:65536].replace("\\", ""))

    def css_url(self, match):
        image = self.image(match.group(1) or "")
        return f'url("{image}")' if image else "none"

    def image(self, src):
        """A data: URI for a cid: image of the message or an image's own data: URI;
        '' for anything else (a remote one is counted)."""
        src = src.strip()
        if src[:4].lower() == "cid:":
            found = self.images.get(urllib.parse.unquote(src[4:]).strip("<>").lower())
            if found is None or found[0] not in PREVIEW_IMAGE_TYPES or \
                    self.inlined + len(found[1]) > PREVIEW_INLINE_MAX:
                return ""
            self.inlined += len(found[1])
            return f"data:{found[0]};base64,{base64.b64encode(found[1]).decode()}"
        if DATA_IMAGE_RE.fullmatch(src):
            return "".join(src.split())
        self.remote += bool(REMOTE_RE.match(src))
        return ""


def link_row(shown, target):
    """(text, target, what is wrong): a text that names a host the target is not
    on, or a target that is not a web address."""
    try:
        parts = urllib.parse.urlsplit(target.strip())
        host = (parts.hostname or "").lower()
    except ValueError:
        return shown, target, "not a web address"
    if parts.scheme.lower() not in ("http", "https", "mailto"):
        return shown, target, f"not a web address ({parts.scheme or 'relative'})"
    named = HOST_IN_TEXT_RE.match(shown)
    named = named.group(1).lower() if named else ""
    if named and host and host != named and not host.endswith("." + named):
        return shown, target, f"text says {named}, goes to {host}"
    return shown, target, ""


def sniffed(head):
    return next((kind for magic, kind in MAGIC if head.startswith(magic)), "")


def file_warning(name, declared, sniff):
    """Why an attachment deserves a second look, or ''."""
    base = BIDI_CONTROL_RE.sub("", name).lower().rstrip(". ")
    pieces = base.rsplit(".", 2)
    if BIDI_CONTROL_RE.search(name):
        return "its name hides its end (a bidi control)"
    if len(pieces) > 1 and pieces[-1] in RISKY_EXTENSIONS:
        double = f" behind .{pieces[-2]}" if len(pieces) > 2 and len(pieces[-2]) <= 4 else ""
        return f"a program (.{pieces[-1]}){double}"
    if sniff in ("application/x-msdownload", "application/x-executable") and \
            sniff != declared:
        return f"a program, declared {declared}"
    return ""


def human_size(size):
    if not isinstance(size, int):
        return "-"
    for unit, scale in (("MB", 2**20), ("KB", 1024)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} bytes"


def mime_leaves(message, notes):
    """The parts that are not multipart, depth first, without recursion: no deeper
    than MIME_DEPTH_MAX, no more than MIME_PARTS_MAX (each left out is noted)."""
    stack, seen = [(message, 0)], 0
    while stack:
        part, depth = stack.pop()
        seen += 1
        if seen > MIME_PARTS_MAX:
            notes.append(f"Only the first {MIME_PARTS_MAX} MIME parts are shown.")
            return
        if not part.is_multipart():
            yield part
        elif depth >= MIME_DEPTH_MAX:
            notes.append(f"Parts nested deeper than {MIME_DEPTH_MAX} levels are not shown.")
        else:
            stack += [(p, depth + 1) for p in reversed(part.get_payload()) if hasattr(p, "walk")]


def part_filename(part):
    """The decoded filename, or its raw form and why it could not be decoded."""
    try:
        return decode_header_value(str(part.get_filename() or "").encode())
    except (LookupError, UnicodeError, ValueError) as exc:
        raw = part.get("Content-Disposition") or part.get("Content-Type") or ""
        return f"{str(raw)[:HEADER_VALUE_MAX]} (the name cannot be decoded: {exc})"


def part_text(part, payload):
    try:
        return f"<pre>{h(payload.decode(part.get_content_charset() or 'utf-8', 'replace'))}</pre>"
    except (LookupError, UnicodeError) as exc:   # a charset unknown, or one like idna
        return (f'<p class="error">Charset {h(part.get_content_charset())} cannot be decoded '
                f'({h(exc)}): its bytes as they are.</p>'
                f"<pre>{h(payload.decode('ascii', 'backslashreplace'))}</pre>")


def link_summary(archive, doc, rcpt):
    """A report link's table: that recipient, the header's From, Subject and Date,
    and the verdict."""
    found = header_lists(archive.head(doc), (b"from", b"date"))
    score = doc.get("spam_score")
    rows = (("to", rcpt), ("from", decode_header_value(found.get(b"from", [b""])[0])),
            ("envelope sender", doc.get("sender") or "<>"), ("subject", doc.get("subject", "")),
            ("date", decode_header_value(found.get(b"date", [b""])[0])),
            ("held as", verdict(doc)),
            *((("spam score", score),) if isinstance(score, (int, float)) else ()))
    return "<table>" + "".join(f"<tr><th>{h(k)}</th><td>{h(v)}</td></tr>" for k, v in rows) + \
        "</table>"


def header_pairs(head):
    """(name, raw value) of each field, unfolded, for display."""
    pairs = []
    for line in head.split(b"\n"):
        line = line.rstrip(b"\r")
        if line[:1] in (b" ", b"\t") and pairs:
            pairs[-1][1] += b" " + line.strip()
        elif b":" in line:
            name, _, value = line.partition(b":")
            pairs.append([name.decode("ascii", "replace"), value.strip()])
    return pairs


@command("web", "the web console", ("web", "web_users", "web_cert", "web_key", "web_allow", "via",
                                   "hostname", "server", "remote_host", "remote_port", "spamd",
                                   "scan_timeout") + MONGO,
         bounded=True)
def archive_web(cfg, archive):
    """`mms.py web`: the console until SIGTERM or SIGINT."""
    if not cfg.web_users:
        raise UsageError("web needs --web-users FILE (lines from `mms.py web-user NAME`)")
    server = WebServer(cfg, archive)
    log.info("web console on %s://%s, %d user(s), releases via %s", "https" if server.tls
             else "http", cfg.web, len(server.users),
             "%s:%d" % cfg.via if cfg.via else "127.0.0.1:25")
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: threading.Thread(target=server.shutdown).start())
    server.serve_forever(poll_interval=0.5)
    server.server_close()
    return 0


###############################################################################
# Quarantine reports ##########################################################
###############################################################################

DIGEST_KINDS = ("spam", "banned")   # and "virus" with --include virus
DIGEST_FIELDS = ("store_key", "rcpt", "received", "sender", "subject", "spam_score",
                 *(f"is_{name}" for name in VERDICT_FIELDS))   # what a report prints


def web_secret(path):
    """The key that signs the digests' links."""
    secret = read_private("--web-secret", path, 4096).strip()
    if len(secret) < 16:
        raise ConfigError(
            f"--web-secret {path}: too short (head -c 32 /dev/urandom | base64 > {path})")
    return secret


def sign_link(secret, store_key, rcpt, expires):
    """A token that names the message, the recipient and an expiry, signed with
    HMAC-SHA256: base64url(key NL rcpt NL expires) '.' base64url(mac)."""
    payload = f"{store_key}\n{rcpt}\n{int(expires)}".encode()
    mac = hmac.new(secret, payload, hashlib.sha256).digest()
    return (base64.urlsafe_b64encode(payload).rstrip(b"=") + b"." +
            base64.urlsafe_b64encode(mac).rstrip(b"=")).decode()


def open_link(secret, token, now=None):
    """(store_key, rcpt) of a token; HTTPError 403 if it was not signed with this
    secret, 410 once it has expired."""
    try:
        payload, mac = (base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
                        for part in token.split("."))
        store_key, rcpt, expires = payload.decode().split("\n")
        expires = int(expires)
    except (ValueError, UnicodeDecodeError, binascii.Error):
        raise HTTPError(403, "this link is not one mms made") from None
    if not hmac.compare_digest(mac, hmac.new(secret, payload, hashlib.sha256).digest()):
        raise HTTPError(403, "this link is not one mms made")
    if expires < (now or time.time()):
        raise HTTPError(410, "this link has expired: ask your administrator")
    return store_key, rcpt


@command("digest", "a report to each local recipient of what was quarantined for them",
         ("since", "url", "web_secret", "mail_from", "expire_days", "include", "rcpt_domain",
          "dry_run", "via", "hostname") + MONGO)
def archive_digest(cfg, archive):
    """One report per local recipient of what was quarantined for them since --since:
    sender, subject, date and score, each with a link that shows the message and
    offers to release it to that recipient."""
    if not (cfg.url and cfg.rcpt_domain and cfg.web_secret):
        raise UsageError("digest needs --url, --web-secret and --rcpt-domain (the local "
                          "domains whose recipients get reports; no report goes elsewhere)")
    secret = web_secret(cfg.web_secret)
    since = cfg.since or datetime.datetime.now(UTC) - datetime.timedelta(hours=24)
    kinds = DIGEST_KINDS + (("virus",) if cfg.include == "virus" else ())
    domains = {d.strip().lower().lstrip("@") for d in cfg.rcpt_domain.split(",") if d.strip()}
    held = collections.defaultdict(list)
    for doc in archive.search(all_of({"quarantine": {"$in": list(kinds)}},
                                     {"received": {"$gte": since}}), projection=DIGEST_FIELDS):
        for rcpt in doc.get("rcpt") or []:
            if isinstance(rcpt, str) and reported(rcpt.lower(), domains):
                held[rcpt.lower()].append(doc)
    expires = time.time() + cfg.expire_days * 86400
    sender = cfg.mail_from or f"quarantine@{cfg.hostname}"
    sent = failed = 0
    for rcpt, docs in sorted(held.items()):
        if cfg.dry_run:
            print(f"{rcpt}: {len(docs)} message(s): " + ", ".join(d["store_key"][:12]
                                                                for d in docs))
            continue
        links = [(doc, f"{cfg.url.rstrip('/')}/q/{sign_link(secret, doc['store_key'], rcpt, expires)}")
                 for doc in docs]
        why = send_report(cfg, sender, rcpt, digest_message(sender, rcpt, links, cfg))
        if why is None:
            sent += 1
        else:
            failed += 1
            log.warning("digest: the report to %s was not sent: %s", rcpt, why)
            print(f"{rcpt}: not sent: {why}")
    if not cfg.dry_run:
        print(f"digest: {sent} report(s) sent, {failed} failed, {len(held)} recipient(s)")
    return 1 if failed else 0


def reported(rcpt, domains):
    """Whether a recipient gets a report: in a local domain, and without the
    routing a relay may still honour (x%attacker.example@local, a!b@local)."""
    local, _, domain = rcpt.rpartition("@")
    if domain not in domains:
        return False
    if "%" in local or "!" in local:
        log.warning("digest: no report for %r: a %% or ! in the local part may route "
                    "it elsewhere", rcpt)
        return False
    return True


def send_report(cfg, sender, rcpt, report):
    """None once the relay took the report, else why not: each report on its own,
    so one recipient (a name the relay refuses, an SMTPUTF8 address it cannot take)
    never costs the others theirs."""
    try:
        refused, reply = send_message(cfg.via or ("127.0.0.1", 25), sender, [rcpt], report,
                                      cfg.hostname)
    except MMSError as exc:
        return str(exc)
    if reply and reply.startswith("2") and not refused:
        return None
    return refused.get(rcpt) or reply


REPORT_VALUE_MAX = 120   # characters of a sender or a subject in a report


def digest_message(sender, rcpt, links, cfg):
    """The report: a text part and a simple HTML part. Each value from a message is
    one line, cut to REPORT_VALUE_MAX (a subject that decodes to line breaks would
    write fake entries), and escaped in the HTML."""
    import email.policy
    from email.message import EmailMessage
    rows, lines = [], []
    for doc, link in links:
        when = doc.get("received")
        when = f"{when:%Y-%m-%d %H:%M}" if isinstance(when, datetime.datetime) else ""
        verdict = report_verdict(doc)
        who, subject = one_line(doc.get("sender") or "<>"), one_line(doc.get("subject", ""))
        allow = f"{link}?allow=1" if doc.get("sender") else ""
        lines.append(f"{when}  {who}  {subject}\n  {verdict}\n  {link}" + (
            f"\n  release, and always allow this sender: {allow}" if allow else ""))
        rows.append(f"<tr><td>{h(when)}</td><td><bdi>{h(who)}</bdi></td><td><bdi>{h(subject)}"
                    f"</bdi></td><td>{h(verdict)}</td><td><a href=\"{h(link)}\">review</a>" + (
                        f' <a href="{h(allow)}">release and always allow this sender</a>'
                        if allow else "") + "</td></tr>")
    text = (f"These {len(links)} message(s) for {rcpt} were held. Open a link to see "
            f"one, and to have it delivered if it is yours:\n\n" + "\n\n".join(lines) +
            f"\n\nThe links expire in {cfg.expire_days:g} day(s).\n")
    page = (f"<p>These {len(links)} message(s) for {h(rcpt)} were held.</p>"
            f"<table><tr><th>received</th><th>from</th><th>subject</th><th>held as</th><th>"
            f"</th></tr>{''.join(rows)}</table><p>The links expire in "
            f"{h(f'{cfg.expire_days:g}')} day(s).</p>")
    message = EmailMessage()
    message["From"], message["To"] = sender, rcpt
    message["Subject"] = f"Quarantine report: {len(links)} message(s) held for you"
    message["Date"] = email.utils.formatdate(localtime=False)
    message["Message-ID"] = email.utils.make_msgid(domain=cfg.hostname)
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(text)
    message.add_alternative(f"<!doctype html><html><body>{page}</body></html>", subtype="html")
    return message.as_bytes(policy=email.policy.SMTPUTF8 if not rcpt.isascii() else None)


def report_verdict(doc):
    """What a report says a message was held as, with a score only where there is one."""
    kind = verdict(doc)
    score = doc.get("spam_score")
    return f"held as {kind}" + (f", score {score:g}" if isinstance(score, (int, float)) else "")


def one_line(value, limit=REPORT_VALUE_MAX):
    """A value as one line of text: control characters, line breaks and bidi
    controls become spaces, and a long value is cut, with an ellipsis."""
    text = re.sub(r"\s+", " ", CONTROL_RE.sub(" ", BIDI_CONTROL_RE.sub(" ", str(value)))).strip()
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


###############################################################################
# The command line ############################################################
###############################################################################

# Trying it: `mms.py try` ####################################################

TRY_DATA = os.path.join(os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share"),
                        "mms-try")
TRY_WAIT = 30                    # seconds each part may take to listen


@command("try", "try mms here: an embedded store, SMTP, the console and a catch-all for "
         "releases, on loopback", ("port", "web", "data", "sample"), opens_archive=False)
def archive_try(cfg, _):
    """What mailpit's one command gives, for mms: nx-27017 as the store (kept in
    --data between runs), quarantine mode with --real-rcpt on 127.0.0.1:--port, the
    console on --web with a new admin password, and a debug-mode mms that releases
    go to (its output in DATA/released.log); with --sample, mail of every kind sent
    through SMTP as amavisd-new sends it. One process group; SIGINT or SIGTERM
    stops every part. Loopback only: it is for trying, not for production."""
    web_host = cfg.web.rpartition(":")[0].strip("[]")
    if not is_loopback(web_host):
        raise ConfigError(f"try serves on loopback only, not {cfg.web}: --web 127.0.0.1:PORT")
    import shutil
    store = (shutil.which("nx-27017", path=os.path.dirname(sys.executable))
             or shutil.which("nx-27017"))
    if store is None:
        raise ConfigError("try keeps its mail in nx-27017, an embedded MongoDB-wire store, "
                          "which is not installed: pip install nx-27017")
    data = os.path.abspath(cfg.data or TRY_DATA)
    os.makedirs(data, mode=0o700, exist_ok=True)
    parts = TryParts(data)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        uri, password = parts.start(cfg, store)
        print(f"mms {__version__} try: for trying mms on this machine, not for production "
              f"(everything listens on loopback)\n"
              f"  SMTP      127.0.0.1:{cfg.port} (mongo-quarantine, --real-rcpt: as "
              f"amavisd-new's target)\n"
              f"  console   http://{cfg.web}/  user admin  password {password}\n"
              f"  releases  go to a catch-all on 127.0.0.1:{parts.catch_all}: "
              f"{os.path.join(data, 'released.log')}\n"
              f"  store     {uri} (nx-27017, files in {os.path.join(data, 'store')})\n"
              f"Ctrl-C stops everything.", flush=True)
        if cfg.sample:
            print(f"sent {send_samples(cfg.port)} sample messages", flush=True)
        while not stop.wait(0.5) and parts.running():
            pass
    finally:
        parts.stop()
    print("stopped", flush=True)
    return 0


class TryParts:
    """The processes of `mms.py try`, started in order and stopped together."""

    def __init__(self, data):
        self.data, self.processes, self.catch_all = data, [], None

    def start(self, cfg, store):
        mongo_port, self.catch_all = free_loopback_port(), free_loopback_port()
        self.spawn("nx-27017", mongo_port, [
            store, "--host", "127.0.0.1", "-p", str(mongo_port),
            "--data-dir", os.path.join(self.data, "store"),
            "--pid-file", os.path.join(self.data, "nx-27017.pid"),
            "--log-file", os.path.join(self.data, "nx-27017.log")],
            stdout=open(os.path.join(self.data, "nx-27017.out"), "ab"), stderr=True)
        uri = f"mongodb://127.0.0.1:{mongo_port}/"
        me, mongo = [sys.executable, os.path.abspath(__file__)], [
            "--mongo-host", uri, "--mongo-database", "mms_try", "--hostname", "localhost"]
        self.spawn("the catch-all", self.catch_all, [
            *me, "--server", "debug", "--host", "127.0.0.1", "--port", str(self.catch_all),
            "--hostname", "localhost"],
            stdout=open(os.path.join(self.data, "released.log"), "ab"))
        self.spawn("mms", cfg.port, [
            *me, "--server", "mongo-quarantine", "--real-rcpt", "--host", "127.0.0.1",
            "--port", str(cfg.port), *mongo])
        password = os.urandom(12).hex()
        users = os.path.join(self.data, "web-users")
        with private(users) as f:
            f.write(f"admin:{hash_password(password)}\n".encode())
        self.spawn("the console", int(cfg.web.rpartition(":")[2]), [
            *me, "web", "--web", cfg.web, "--web-users", users, "--via",
            f"127.0.0.1:{self.catch_all}", *mongo])
        return uri, password

    def spawn(self, name, port, argv, stdout=None, stderr=False):
        """A part, once it listens on its port (its output to stdout if given, its
        errors too with stderr); ConfigError if it ends first."""
        import subprocess
        process = subprocess.Popen(argv, stdout=stdout, stdin=subprocess.DEVNULL,
                                   stderr=subprocess.STDOUT if stderr else None)
        if stdout is not None:
            stdout.close()                      # the part has its own
        self.processes.append(process)
        deadline = time.monotonic() + TRY_WAIT
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ConfigError(f"{name} stopped as it started (exit {process.returncode}): "
                                  f"is port {port} in use? The lines above say why")
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            time.sleep(0.1)
        raise ConfigError(f"{name} did not listen on port {port} within {TRY_WAIT} s")

    def running(self):
        return all(process.poll() is None for process in self.processes)

    def stop(self):
        """Each part asked to stop (SIGTERM), the last started first; killed after 10 s."""
        import subprocess
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
        for process in reversed(self.processes):
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def free_loopback_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# What --sample sends: mail of each kind, as amavisd-new passes it on (its fields on
# quarantine copies, above its own Received:). The EICAR test file is kept encoded,
# so that no scanner takes this file for a virus.
EICAR = "WDVPIVAlQEFQWzRcUFpYNTQoUF4pN0NDKTd9JEVJQ0FSLVNUQU5EQVJELUFOVElWSVJVUy1URVNULUZJTEUhJEgrSCo="
SAMPLES = [   # (sender, recipients, amavisd-new's fields or None, the message)
    ("alice@example.org", ["bob@example.com"], None,
     "From: Alice <alice@example.org>\r\nTo: bob@example.com\r\nSubject: Minutes of Monday's "
     "meeting\r\n\r\nHi Bob,\r\n\r\nthe minutes are below.\r\n"),
    ("offers@cheap-watches.example", ["bob@example.com", "carol@example.com"],
     "X-Spam-Flag: YES\r\nX-Spam-Score: 14.2",
     "From: Watches <offers@cheap-watches.example>\r\nTo: bob@example.com\r\nSubject: "
     "Replica watches, 90% off\r\n\r\nBuy now.\r\n"),
    ("billing@example.net", ["carol@example.com"],
     "X-Amavis-Alert: INFECTED, message contains virus: Eicar-Signature",
     "From: billing@example.net\r\nTo: carol@example.com\r\nSubject: Your invoice\r\n"
     "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
     "Content-Type: text/plain\r\n\r\nSee the attached invoice.\r\n--b\r\nContent-Type: "
     "application/octet-stream; name=eicar.com\r\nContent-Disposition: attachment; "
     f"filename=eicar.com\r\nContent-Transfer-Encoding: base64\r\n\r\n{EICAR}\r\n--b--\r\n"),
    ("scanner@example.net", ["bob@example.com"],
     "X-Amavis-Alert: BANNED, message contains invoice.pdf.exe",
     "From: scanner@example.net\r\nTo: bob@example.com\r\nSubject: Scanned document\r\n"
     "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
     "Content-Type: text/plain\r\n\r\nYour document.\r\n--b\r\nContent-Type: application/pdf; "
     "name=invoice.pdf.exe\r\nContent-Disposition: attachment; filename=invoice.pdf.exe\r\n"
     "Content-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA\r\n--b--\r\n"),
    ("service@paypa1.example", ["carol@example.com"], "X-Spam-Flag: YES\r\nX-Spam-Score: 8.1",
     "From: \"PayPal\" <service@paypa1.example>\r\nTo: carol@example.com\r\nSubject: Your "
     "account is locked\r\nMIME-Version: 1.0\r\nContent-Type: text/html; charset=utf-8\r\n\r\n"
     "<p>Dear customer, sign in at <a href=\"http://paypa1.example/login\">www.paypal.com</a> "
     "to unlock your account.</p>\r\n"),
    ("dave@example.org", ["bob@example.com"], None,
     "From: Dave <dave@example.org>\r\nTo: bob@example.com\r\nSubject: Photos and the "
     "report\r\nMIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n"
     "Content-Type: text/plain\r\n\r\nAs promised.\r\n--b\r\nContent-Type: application/pdf\r\n"
     "Content-Disposition: attachment; filename=report.pdf\r\nContent-Transfer-Encoding: "
     "base64\r\n\r\nJVBERi0xLjQK\r\n--b\r\nContent-Type: image/png\r\nContent-Disposition: "
     "attachment; filename=photo.png\r\nContent-Transfer-Encoding: base64\r\n\r\n"
     "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5E"
     "rkJggg==\r\n--b--\r\n"),
    ("", ["alice@example.org"], None,
     "From: Mail Delivery System <MAILER-DAEMON@example.com>\r\nTo: alice@example.org\r\n"
     "Subject: Undelivered Mail Returned to Sender\r\nMIME-Version: 1.0\r\nContent-Type: "
     "multipart/report; report-type=delivery-status; boundary=b\r\n\r\n--b\r\n"
     "Content-Type: text/plain\r\n\r\nThe mail to nobody@example.com could not be delivered."
     "\r\n--b\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; "
     "mx.example.com\r\n\r\nFinal-Recipient: rfc822; nobody@example.com\r\nAction: failed\r\n"
     "Status: 5.1.1\r\n--b--\r\n"),
]


def send_samples(port):
    """SAMPLES, through mms's SMTP as amavisd-new sends them: a quarantine copy to a
    quarantine address, its real recipients in X-Envelope-To (--real-rcpt)."""
    with smtplib.SMTP("127.0.0.1", port, local_hostname="amavis.localhost", timeout=30) as smtp:
        for n, (sender, rcpts, fields, message) in enumerate(SAMPLES):
            if fields:
                kind = "virus" if "INFECTED" in fields else "banned" if "BANNED" in fields \
                    else "spam"
                head = (f"X-Envelope-From: <{sender}>\r\nX-Envelope-To: "
                        f"{', '.join(f'<{r}>' for r in rcpts)}\r\nX-Quarantine-ID: "
                        f"<{kind}-{os.urandom(6).hex()}>\r\n{fields}\r\n")
                to = [f"{kind}-quarantine@localhost"]
            else:
                head, to = "", rcpts
            received = (f"Received: from localhost by amavis.localhost (amavisd-new) id "
                        f"sample{n}; {email.utils.formatdate()}\r\n")
            smtp.sendmail(sender, to, (head + received + message).encode())
    return len(SAMPLES)


def open_server(cfg, mode=None, start=True):
    """Everything that can fail at start-up fails here, before the first client."""
    plugins = load_plugins(cfg.plugin)
    metrics = Metrics(cfg, rows=cfg.workers, plugins=[p.__name__ for p in plugins])
    mode = mode or make_mode(cfg, metrics)
    try:
        server = SMTPServer(cfg, mode, metrics, plugins)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {cfg.host}:{cfg.port}: {exc}")
    if start:
        server.start()
    return server


def serve(cfg):
    """Run until SIGTERM or SIGINT, then drain: this is what supervisord expects.

    The port listens (and a monitor may see it) before the session threads run:
    a signal in between must not kill mms with the default action. SIGHUP
    reopens the log from the start, and a stop before serving ends cleanly."""
    signal.signal(signal.SIGHUP, reopen_log)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop_starting)
    server = open_server(cfg, start=False)
    host, port = server.server_address[:2]
    log.info("starting mms %s in %s mode on %s:%d (pid %d, %d worker(s)), clients allowed: "
             "%s, plugins: %s", __version__, cfg.server, host, port, os.getpid(), cfg.workers,
             ", ".join(map(str, server.allow)) or "all", ", ".join(cfg.plugin) or "none")
    if not cfg.allow and not is_loopback(cfg.host):
        who = ("only --xforward-hosts may connect" if cfg.server in RELAY_MODES
               else "any client that reaches it may send mail")
        log.warning("listening on %s with no --allow: %s", cfg.host, who)
    if cfg.metrics:
        MetricsServer(cfg, server.metrics, server)
    server.probe_token = os.urandom(16).hex()
    write_state(cfg, host, port, server.probe_token)
    if cfg.workers > 1:
        return run_workers(server, cfg.workers)
    return run_process(server)


# Where each running server says where it listens, for `mms.py check` to find it
# however it was started (flags after a container's image name, say), with the
# token that marks check's probe as no mail and the MongoDB it stores into: one
# file per instance (by port), so that check asks the instance whose MongoDB it is
# asked about when a host runs several (a quarantine and a proxy, say).
def state_path(port):
    return os.path.join(tempfile.gettempdir(), f"mms-{os.geteuid()}-{port}.state")


def mongo_name(cfg):
    """The MongoDB collection an instance stores into, as check compares it."""
    return f"{redact(cfg.mongo_host)} {cfg.mongo_database}.{cfg.mongo_collection}"


def write_state(cfg, host, port, token):
    """Written whole (a new file renamed into place), readable by this user only."""
    state = {"pid": os.getpid(), "server": cfg.server, "host": host, "port": port,
             "probe": token, "mongo": mongo_name(cfg)}
    path = f"{state_path(port)}.{os.getpid()}"
    try:
        with private(path) as f:
            f.write(json.dumps(state).encode())
        os.replace(path, state_path(port))
    except OSError as exc:
        log.warning("cannot write %s (%s): `mms.py check` needs --port", state_path(port), exc)


def read_states():
    """{port: state} of this user's servers that still run."""
    import glob
    states = {}
    for path in glob.glob(state_path("*")):
        try:
            with open_regular(path) as f:
                if os.fstat(f.fileno()).st_uid != os.geteuid():
                    continue
                state = json.loads(f.read(4096))
            os.kill(state["pid"], 0)
            states[int(state["port"])] = state
        except (OSError, ValueError, KeyError, TypeError, Refused):
            continue
    return states


def systemd_notify(state):
    """sd_notify(3) for Type=notify: one datagram to $NOTIFY_SOCKET, if systemd set it
    (an abstract socket when it begins with '@'). Nothing to do elsewhere."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("cannot tell systemd %s at %s: %s", state, address, exc)


def keep_watchdog():
    """WATCHDOG=1 at half of $WATCHDOG_USEC, from a thread, while the process lives."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or (pid and pid != str(os.getpid())):
        return

    def beat():
        while True:
            systemd_notify("WATCHDOG=1")
            time.sleep(int(usec) / 2e6)
    threading.Thread(target=beat, name="mms-watchdog", daemon=True).start()


def stop_starting(signum, frame):
    log.info("received %s while starting, stopped", signal.Signals(signum).name)
    raise SystemExit(0)


def is_loopback(host):
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run_process(server, row=0):
    """Signals first: a SIGTERM a second after start is a clean stop too."""

    def stop(signum, frame):
        log.info("received %s, stopping", signal.Signals(signum).name)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, reopen_log)
    server.start(row)
    if server.cfg.workers == 1:
        systemd_notify("READY=1")
        keep_watchdog()
    server.serve_forever(poll_interval=0.5)
    if server.cfg.workers == 1:
        systemd_notify("STOPPING=1")
    server.drain(server.cfg.grace)
    server.mode.close()
    log.info("stopped")
    return 0


WORKER_SETTLED = 10      # seconds: a worker that dies younger comes back after a delay,
WORKER_DELAY_MAX = 60    # doubled each time from 1 s up to this


def run_workers(server, count):
    """Fork workers that share the listening socket; the GIL then caps one worker, not
    the host. A worker that dies is replaced, and writes its metrics where the dead
    one did; one that dies young comes back after a delay that doubles each time
    (never a restart loop that fills the log); SIGTERM is passed on to all of them."""
    workers, stopping, delays = {}, False, [0] * count

    def spawn(row):
        pid = os.fork()
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            code = 1
            try:
                code = run_process(server, row)
            finally:
                os._exit(code)
        workers[pid] = row, time.monotonic()

    def stop(signum, frame):
        nonlocal stopping
        stopping = True
        systemd_notify("STOPPING=1")
        server.draining = True  # /healthz: 503 from now on, as one process answers
        server.stop_listening()
        for pid in workers:
            os.kill(pid, signal.SIGTERM)

    def hangup(signum, frame):
        reopen_log(signum, frame)
        for pid in workers:
            os.kill(pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, hangup)
    for row in range(count):
        spawn(row)
    systemd_notify("READY=1")
    keep_watchdog()   # after the first forks: no thread of the parent's in a worker
    due = {}          # row: when the worker that died young may start again
    while workers or (due and not stopping):
        pid, status = os.waitpid(-1, os.WNOHANG) if workers else (0, 0)
        if pid and not stopping:
            row, started = workers.pop(pid)
            lived = time.monotonic() - started
            delays[row] = 0 if lived > WORKER_SETTLED else min(max(2 * delays[row], 1),
                                                                 WORKER_DELAY_MAX)
            log.error("worker %d ended after %.1f s (status %d), starting another%s", pid,
                      lived, status, f" in {delays[row]} s" if delays[row] else "")
            due[row] = time.monotonic() + delays[row]
        elif pid:
            workers.pop(pid)
        for row, when in list(due.items()):
            if when <= time.monotonic() and not stopping:
                del due[row]
                spawn(row)
        if not pid:
            time.sleep(0.1)
    server.server_close()
    log.info("all workers stopped")
    return 0


class EscapeControls(logging.Filter):
    """What a client sends may reach the log (addresses, HELO names, commands in
    --debug): C0, C1 and DEL are written as \\xNN, so that no client can forge a
    log line or send escape sequences to a terminal."""

    def filter(self, record):
        text = record.getMessage()
        if CONTROL_RE.search(text):
            text = CONTROL_RE.sub(hexed, text)
        record.msg, record.args = text, None  # formatted once, not again by the handler
        return True


class LogLines(logging.StreamHandler):
    """One write(2) per record, and no lock held across it. The stdlib handler holds
    its lock while the write has let go of the GIL, and at 20 sessions every other
    session that logged queued behind it in a futex. The kernel keeps a write to a
    file whole; into supervisord's pipe, a record up to PIPE_BUF (4 KiB) bytes, so
    that only a longer one, a traceback, can be split by another line, as lines of
    two --workers always could be."""

    def handle(self, record):
        """The stdlib's takes the handler's lock around emit()."""
        passed = self.filter(record)
        if passed:
            self.emit(record)
        return passed

    def emit(self, record):
        try:
            fd = self.stream.fileno()
        except (AttributeError, OSError, ValueError):
            with self.lock:
                return super().emit(record)
        try:
            write_all(fd, (self.format(record) + "\n").encode("utf-8", "backslashreplace"))
        except Exception:
            self.handleError(record)


class LogFormat(logging.Formatter):
    """The stdlib's format, with the local time of a second written once for all the
    lines of that second, not by localtime and strftime for each (3 of a message's
    8 us of logging), and the process id known, not asked of the kernel each line."""

    pid = os.getpid()   # set again in a forked worker (below the class)

    def __init__(self, fmt):
        super().__init__(fmt)
        self.second, self.stamp = None, ""

    def formatMessage(self, record):
        record.process = self.pid
        return super().formatMessage(record)

    def formatTime(self, record, datefmt=None):
        second = int(record.created)
        if second != self.second:  # two threads at a new second write the same text
            self.stamp, self.second = time.strftime("%Y-%m-%d %H:%M:%S",
                                                    self.converter(second)), second
        return f"{self.stamp},{int(record.msecs):03d}"


os.register_at_fork(after_in_child=lambda: setattr(LogFormat, "pid", os.getpid()))


@dataclasses.dataclass
class LogFile:
    """Where the log goes, for SIGHUP to reopen: the handler, --log-file, and the
    stream the last reopen retired (closed at the next)."""
    handler: logging.Handler = None
    path: str = ""
    retired: typing.IO = None


LOG_FILE = LogFile()


def setup_logging(cfg):
    """stderr, or --log-file; --debug adds mms's SMTP dialogue, not the driver's events."""
    try:
        stream = open(cfg.log_file, "a", encoding="utf-8") if cfg.log_file else sys.stderr
    except OSError as exc:
        raise ConfigError(f"--log-file {cfg.log_file}: {exc}")
    # No caller, thread, process name or id looked up for each record (the logging
    # HOWTO's "Optimization"): the format uses only the id, which LogFormat knows.
    logging._srcfile = None
    logging.logThreads = logging.logMultiprocessing = logging.logProcesses = False
    handler = LogLines(stream)
    handler.setFormatter(LogFormat("%(asctime)s mms[%(process)d]: %(levelname)s %(message)s"))
    handler.addFilter(EscapeControls())
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    log.setLevel(logging.DEBUG if cfg.debug else logging.INFO)
    LOG_FILE.handler, LOG_FILE.path = handler, cfg.log_file


def reopen_log(signum=None, frame=None):
    """SIGHUP: logrotate moved the file away; write to a new one at the same path.
    Without --log-file there is nothing to reopen, and SIGHUP is only logged."""
    path = LOG_FILE.path
    if not path:
        log.info("received SIGHUP: no --log-file to reopen, ignored")
        return
    try:
        old = LOG_FILE.handler.setStream(open(path, "a", encoding="utf-8"))
    except OSError as exc:
        log.error("received SIGHUP: cannot reopen %s: %s", path, exc)
        return
    # A session may be writing to the old file at this instant: it is closed at the
    # next SIGHUP, so that its descriptor cannot be reused under that write.
    retired, LOG_FILE.retired = LOG_FILE.retired, old
    if retired is not None:
        retired.close()
    log.info("received SIGHUP: reopened %s", path)


def main(argv=None):
    try:
        cfg = parse_config(argv)
        setup_logging(cfg)
        for warning in cfg.warnings:
            log.warning(warning)
        if cfg.command == "start":
            return serve(cfg)
        if not COMMANDS[cfg.command].opens_archive:
            return COMMANDS[cfg.command].run(cfg, None)
        return run_archive_command(cfg)
    except MMSError as exc:
        print(f"mms.py: error: {exc}", file=sys.stderr)
        return exc.exit_status


if __name__ == "__main__":
    sys.exit(main())
