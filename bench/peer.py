"""The peer mms is measured against: an SMTP-to-MongoDB recorder written the way
most people would write one, with aiosmtpd and pymongo's GridFS.put. It stores
the same format as mms (base64(zlib(message)) in GridFS, one metadata document).
It is part of the benchmark, not of mms.

    python bench/peer.py --port 14003 --mongo mongodb://127.0.0.1:27017/ --database bench
"""

import argparse
import base64
import datetime
import secrets
import signal
import threading
import zlib

import gridfs
from aiosmtpd.controller import Controller
from pymongo import MongoClient


class Recorder:
    def __init__(self, db):
        self.db = db
        self.fs = gridfs.GridFS(db)

    async def handle_DATA(self, server, session, envelope):
        data = envelope.original_content
        key = secrets.token_hex(32)
        file_id = self.fs.put(base64.b64encode(zlib.compress(data)), filename=key,
                              contentType="text/plain")
        self.db.message.insert_one({
            "store_key": key, "sender": envelope.mail_from.lower(),
            "rcpt": [r.lower() for r in envelope.rcpt_tos], "rcpt_count": len(envelope.rcpt_tos),
            "rcpt_refused": {}, "client_address": session.peer[0], "xforward": {},
            "server": session.peer[0], "received": datetime.datetime.now(datetime.timezone.utc),
            "message": file_id, "size": len(data)})
        return f"250 Ok: queued as {key}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mongo", required=True)
    parser.add_argument("--database", default="bench_peer")
    args = parser.parse_args()
    db = MongoClient(args.mongo)[args.database]
    db.message.create_index("store_key", unique=True)
    controller = Controller(Recorder(db), hostname="127.0.0.1", port=args.port,
                            data_size_limit=None)
    controller.start()
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    stopped.wait()
    controller.stop()


if __name__ == "__main__":
    main()
