"""The seed's example: change the server field and print the metadata.

    python mms.py --server debug --plugin plugins.dummy_plugin
"""
import pprint


def apply(metadata=None, data=None):
    metadata["server"] = "1.1.1.1"
    pprint.pprint(metadata)
