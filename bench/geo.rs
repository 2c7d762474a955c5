//! The `[geo]` lookup on the handshake path: `geo::Geo::region` for a mix of addresses (found
//! with a city, found with a country only, not in the database) in the real GeoLite2-City that
//! PyPI's `maxminddb-geolite2` ships (`tests/support/geo.py real` finds or installs it).
//!
//! Baseline: the crate's own full record, `Reader::lookup` then `decode::<geoip2::City>()`
//! (location, postal code, subdivisions, every name language), formatted the same way. The gap
//! is what decoding only the country code and the English city name buys.

use std::hint::black_box;
use std::net::IpAddr;
use std::path::PathBuf;

use criterion::{criterion_group, criterion_main, Criterion};
use maxminddb::geoip2;

/// Addresses with a city record, with a country only, and with none.
const ADDRESSES: [&str; 6] = [
    "81.2.69.142",
    "193.0.6.139",
    "8.8.8.8",
    "2a02:d400::1",
    "127.0.0.1",
    "192.0.2.1",
];

fn database() -> PathBuf {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/support/geo.py");
    let out = std::process::Command::new("python3")
        .arg(script)
        .arg("real")
        .output()
        .expect("python3 runs (tests/support/geo.py)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim())
}

fn full_record(reader: &maxminddb::Reader<Vec<u8>>, ip: IpAddr) -> Option<String> {
    let rec = reader.lookup(ip).ok()?.decode::<geoip2::City>().ok()??;
    let country = rec.country.iso_code?;
    Some(match rec.city.names.english {
        Some(city) => format!("{country}/{city}"),
        None => country.to_owned(),
    })
}

fn lookups(c: &mut Criterion) {
    let path = database();
    let ours = presenced::geo::Geo::open(&path).expect("the database loads");
    let reader = maxminddb::Reader::open_readfile(&path).unwrap();
    let ips: Vec<IpAddr> = ADDRESSES.iter().map(|a| a.parse().unwrap()).collect();
    for ip in &ips {
        assert_eq!(
            ours.region(*ip),
            full_record(&reader, *ip),
            "{ip}: the same answer"
        );
    }
    let mut g = c.benchmark_group("geo_lookup_6_addresses");
    g.bench_function("ours_region", |b| {
        b.iter(|| {
            for ip in &ips {
                black_box(ours.region(black_box(*ip)));
            }
        })
    });
    g.bench_function("crate_full_city_record", |b| {
        b.iter(|| {
            for ip in &ips {
                black_box(full_record(&reader, black_box(*ip)));
            }
        })
    });
    g.finish();
}

criterion_group!(benches, lookups);
criterion_main!(benches);
