"""Set is_bounce (0/1), the field mongo-mail-web filters on, so that bounces and
auto-replies can be found with {"is_bounce": 1}.

    python mms.py --plugin plugins.mark_bounces
"""
import re

BOUNCE_SENDERS = re.compile(r"^(mailer-daemon|postmaster)@", re.IGNORECASE)
HEADER_END = b"\r\n\r\n"


def apply(metadata=None, data=None):
    sender = metadata.get("sender", "")
    headers = data[:data.find(HEADER_END)] if HEADER_END in data[:65536] else data[:65536]
    bounce = (not sender or BOUNCE_SENDERS.match(sender)
              or re.search(rb"^Auto-Submitted:[ \t]*auto-(replied|generated)",
                           headers, re.IGNORECASE | re.MULTILINE))
    metadata["is_bounce"] = 1 if bounce else 0
