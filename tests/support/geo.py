#!/usr/bin/env python3
"""Geo data for tests/geo.rs (docs/CONFIG.md, "[geo]").

  geo.py real                      prints the path of the real GeoLite2-City database that PyPI's
                                   maxminddb-geolite2 ships
  geo.py expect DB IP...           prints "IP<TAB>REGION" per address, REGION as presenced forms
                                   it (ISO code, "/City" when the record has an English city name;
                                   "-" for none), read with MaxMind's own Python reader (maxminddb),
                                   independently of the server's Rust reader
  geo.py write OUT CIDR=CC[/City]...
                                   writes a small IPv6 database (IPv4 mapped in) with those networks,
                                   with PyPI's mmdb-writer

The packages are installed with pip when missing (pinned: the database's contents are what the
tests compare against, through the reader above, never hard-coded).
"""
import importlib
import subprocess
import sys

PACKAGES = {
    "_maxminddb_geolite2": "maxminddb-geolite2==2018.703",
    "maxminddb": "maxminddb>=2",
    "mmdb_writer": "mmdb-writer==0.2.7",
    "netaddr": "netaddr",
}


def need(module):
    try:
        return importlib.import_module(module)
    except ImportError:
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
             PACKAGES[module]],
            check=True, stdout=sys.stderr)
        importlib.invalidate_caches()
        return importlib.import_module(module)


def region(record):
    if not record:
        return "-"
    country = (record.get("country") or {}).get("iso_code")
    if not country:
        return "-"
    city = ((record.get("city") or {}).get("names") or {}).get("en")
    return f"{country}/{city}" if city else country


def main(argv):
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[0], argv[1:]
    if cmd == "real":
        print(need("_maxminddb_geolite2").geolite2_database())
    elif cmd == "expect":
        reader = need("maxminddb").open_database(args[0])
        for ip in args[1:]:
            print(f"{ip}\t{region(reader.get(ip))}")
    elif cmd == "write":
        mmdb_writer = need("mmdb_writer")
        netaddr = need("netaddr")
        writer = mmdb_writer.MMDBWriter(ip_version=6, ipv4_compatible=True,
                                        database_type="presenced-test", languages=["en"])
        for spec in args[1:]:
            cidr, value = spec.split("=", 1)
            country, _, city = value.partition("/")
            record = {"country": {"iso_code": country}}
            if city:
                record["city"] = {"names": {"en": city}}
            writer.insert_network(netaddr.IPSet([cidr]), record)
        writer.to_db_file(args[0])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
