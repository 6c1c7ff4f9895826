"""country: the ISO country of the client that sent the message, as mongo-mail-web
computed it for the seed's completed document.

    python mms.py --plugin plugins.geoip_country

The address is XFORWARD's ADDR when the front Postfix gives it (the real client),
else the connecting client's. Private, loopback, link-local and unknown addresses
get no country. The database is the administrator's:

* MMS_GEOIP_DB=/var/lib/GeoIP/GeoLite2-Country.mmdb (MaxMind's GeoLite2 Country, or
  any .mmdb with a country.iso_code), read through the `maxminddb` package
  (pip install maxminddb); or, without MMS_GEOIP_DB,
* the data bundled with `geoip2fast` (pip install geoip2fast).

mms.py itself never imports either: a missing one stops mms at start-up, saying
what to install. A lookup costs microseconds (README, "Plugins").
"""
import ipaddress
import os

DATABASE = os.environ.get("MMS_GEOIP_DB", "")


def open_lookup():
    """country(ip) -> "CN" or None, from the database configured."""
    if DATABASE:
        try:
            import maxminddb
        except ImportError:
            raise ImportError("MMS_GEOIP_DB names a .mmdb database: pip install maxminddb "
                              "(or unset MMS_GEOIP_DB and pip install geoip2fast)") from None
        reader = maxminddb.open_database(DATABASE)   # OSError names a missing file

        def country(ip):
            found = reader.get(ip) or {}
            return ((found.get("country") or found.get("registered_country") or {})
                    .get("iso_code"))
        return country
    try:
        from geoip2fast import GeoIP2Fast
    except ImportError:
        raise ImportError("pip install geoip2fast (its data is bundled), or pip install "
                          "maxminddb and MMS_GEOIP_DB=/path/to/GeoLite2-Country.mmdb") from None
    geoip = GeoIP2Fast()

    def country(ip):
        code = geoip.lookup(ip).country_code
        return code if len(code) == 2 and code.isalpha() else None
    return country


LOOKUP = open_lookup()     # at start-up, when mms imports the plugin


def client_ip(metadata):
    xforward = metadata.get("xforward") or {}
    address = xforward.get("ADDR") or metadata.get("client_address") or ""
    if address.upper().startswith("IPV6:"):           # Postfix's XFORWARD form
        address = address[5:]
    try:
        ip = ipaddress.ip_address(address.split("%")[0])
    except ValueError:
        return None
    ip = getattr(ip, "ipv4_mapped", None) or ip
    return None if not ip.is_global else str(ip)


def apply(metadata=None, data=None):
    ip = client_ip(metadata)
    code = LOOKUP(ip) if ip else None
    if code:
        metadata["country"] = code.upper()
