//! The client's region from its address: a MaxMind DB (`[geo] database`, GeoLite2 or GeoIP2
//! Country/City, or any database in that format with the same fields), read with the
//! `maxminddb` crate, loaded whole once and shared read-only by every shard, and swapped whole
//! on SIGHUP (docs/CONFIG.md, "`[geo]`").
//!
//! A region is the country's ISO code (`DE`), and `DE/Berlin` when the database has the city
//! (its English name). An address the database does not cover, or a record without a country,
//! has no region; that is not an error.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use arc_swap::ArcSwap;
use serde::Deserialize;

/// The fields of a GeoIP2 City or Country record the region is made of; the rest is skipped.
#[derive(Deserialize)]
struct Record<'a> {
    #[serde(borrow, default)]
    country: Option<Country<'a>>,
    #[serde(borrow, default)]
    city: Option<City<'a>>,
}

#[derive(Deserialize)]
struct Country<'a> {
    #[serde(borrow, default)]
    iso_code: Option<&'a str>,
}

#[derive(Deserialize)]
struct City<'a> {
    #[serde(borrow, default)]
    names: Option<Names<'a>>,
}

#[derive(Deserialize)]
struct Names<'a> {
    #[serde(borrow, default)]
    en: Option<&'a str>,
}

/// One loaded database.
pub struct GeoDb {
    reader: maxminddb::Reader<Vec<u8>>,
}

impl std::fmt::Debug for GeoDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeoDb")
            .field("kind", &self.kind())
            .field("build_epoch", &self.build_epoch())
            .finish()
    }
}

impl GeoDb {
    /// Reads and checks the whole file. The error says which file and what is wrong with it.
    pub fn open(path: &Path) -> Result<GeoDb, String> {
        let reader = maxminddb::Reader::open_readfile(path)
            .map_err(|e| format!("geo.database {}: {e}", path.display()))?;
        // The whole file is checked (search tree, data section, metadata), so one that opens but
        // is damaged fails here, at start or on reload, not as "no region" for every client.
        // It reads every record (timed in docs/BENCHMARKS.md, "Issue 15"), off the shards.
        reader
            .verify()
            .map_err(|e| format!("geo.database {}: damaged: {e}", path.display()))?;
        Ok(GeoDb { reader })
    }

    fn lookup(&self, ip: IpAddr) -> Result<Option<String>, maxminddb::MaxMindDbError> {
        let found = self.reader.lookup(ip.to_canonical())?;
        let Some(rec) = found.decode::<Record>()? else {
            return Ok(None);
        };
        let Some(country) = rec.country.and_then(|c| c.iso_code) else {
            return Ok(None);
        };
        let city = rec.city.and_then(|c| c.names).and_then(|n| n.en);
        Ok(Some(match city {
            Some(city) => format!("{country}/{city}"),
            None => country.to_owned(),
        }))
    }

    /// The region of `ip`, if the database has one for it.
    pub fn region(&self, ip: IpAddr) -> Option<String> {
        // A record that does not decode is no region for this client, not a failed handshake.
        self.lookup(ip).ok().flatten()
    }

    /// When the database was built (seconds since the epoch, from its metadata).
    pub fn build_epoch(&self) -> u64 {
        self.reader.metadata().build_epoch
    }

    /// The database's type, from its metadata (e.g. `GeoLite2-City`).
    pub fn kind(&self) -> &str {
        &self.reader.metadata().database_type
    }
}

/// The database every shard reads, and its reloads.
#[derive(Debug)]
pub struct Geo {
    path: PathBuf,
    db: ArcSwap<GeoDb>,
    reloads_ok: AtomicU64,
    reloads_failed: AtomicU64,
}

impl Geo {
    pub fn open(path: &Path) -> Result<Geo, String> {
        let db = GeoDb::open(path)?;
        tracing::info!(path = %path.display(), kind = db.kind(), build_epoch = db.build_epoch(),
            "geo: database loaded");
        Ok(Geo {
            path: path.to_owned(),
            db: ArcSwap::from_pointee(db),
            reloads_ok: AtomicU64::new(0),
            reloads_failed: AtomicU64::new(0),
        })
    }

    /// The region of `ip` in the current database.
    pub fn region(&self, ip: IpAddr) -> Option<String> {
        self.db.load().region(ip)
    }

    /// Reads the file again and, if it is valid, serves it from the next lookup on; otherwise
    /// keeps serving the one loaded before and says why.
    pub fn reload(&self) -> Result<(), String> {
        match GeoDb::open(&self.path) {
            Ok(db) => {
                tracing::info!(path = %self.path.display(), kind = db.kind(),
                    build_epoch = db.build_epoch(), "geo: database reloaded");
                self.db.store(Arc::new(db));
                self.reloads_ok.fetch_add(1, Relaxed);
                Ok(())
            }
            Err(why) => {
                tracing::error!(
                    why,
                    "geo: reload failed; still serving the database loaded before"
                );
                self.reloads_failed.fetch_add(1, Relaxed);
                Err(why)
            }
        }
    }

    pub fn build_epoch(&self) -> u64 {
        self.db.load().build_epoch()
    }

    /// Successful and failed reloads since start.
    pub fn reloads(&self) -> (u64, u64) {
        (
            self.reloads_ok.load(Relaxed),
            self.reloads_failed.load(Relaxed),
        )
    }
}
