//! How history records become CQL rows and back: the columns of `schema/presenced.cql`, the
//! partition each row goes to, and the per-row `n` that keeps same-millisecond events apart.

use std::collections::BTreeMap;
use std::sync::Arc;

use ::scylla::value::{CqlTimestamp, MaybeUnset};
use ::scylla::{DeserializeRow, SerializeRow};

use super::super::event::{day_of, hour_of, EventKind, HistoryEvent, Sample};
use super::super::schema::SESSION_BUCKETS;
use super::super::store::StoreError;
use crate::presence::{Aggregate, DeviceType, GroupId, SessionId};

/// CQL `timestamp` of a time in ms (clamped: CQL timestamps are signed).
pub fn ts(ms: u64) -> CqlTimestamp {
    CqlTimestamp(i64::try_from(ms).unwrap_or(i64::MAX))
}

fn ms(t: CqlTimestamp) -> u64 {
    u64::try_from(t.0).unwrap_or(0)
}

fn opt<T>(v: Option<T>) -> MaybeUnset<T> {
    // Unset, not null: a null in an INSERT writes a tombstone.
    v.map_or(MaybeUnset::Unset, MaybeUnset::Set)
}

fn nonzero(v: u64) -> MaybeUnset<i64> {
    opt((v != 0).then_some(v as i64))
}

/// Which `sessions_by_hour` bucket a user's session events go to (fixed: part of the layout).
pub fn bucket(user: &str) -> i32 {
    (xxhash_rust::xxh3::xxh3_64(user.as_bytes()) % u64::from(SESSION_BUCKETS)) as i32
}

/// The values of one `events_by_user` (and, for session events, `sessions_by_hour`) insert.
/// Field names are column names: the driver binds by name.
#[derive(SerializeRow)]
pub struct EventRow<'a> {
    pub user_id: &'a str,
    pub day: i32,
    pub ts: CqlTimestamp,
    pub n: i64,
    pub kind: &'a str,
    pub session: i64,
    pub started_at: MaybeUnset<CqlTimestamp>,
    pub device: MaybeUnset<&'a str>,
    pub device_type: MaybeUnset<&'a str>,
    pub region: MaybeUnset<&'a str>,
    pub groups: MaybeUnset<Vec<&'a str>>,
    pub status: MaybeUnset<&'a str>,
    pub status_text: MaybeUnset<&'a str>,
    pub devices: MaybeUnset<i32>,
    pub seq: MaybeUnset<i64>,
}

impl<'a> EventRow<'a> {
    pub fn new(e: &'a HistoryEvent, n: u64) -> EventRow<'a> {
        EventRow {
            user_id: &e.user,
            day: day_of(e.ts) as i32,
            ts: ts(e.ts),
            n: n as i64,
            kind: e.kind.as_str(),
            session: e.session.get() as i64,
            started_at: opt((e.started_at != 0).then(|| ts(e.started_at))),
            device: opt(e.device.as_deref()),
            device_type: opt(e.device_type.map(DeviceType::as_str)),
            region: opt(e.region.as_deref()),
            groups: opt((!e.groups.is_empty()).then(|| e.groups.iter().map(|g| &**g).collect())),
            status: opt(e.status.map(Aggregate::as_str)),
            status_text: opt(e.text.as_deref()),
            devices: opt(e.devices.map(|d| d as i32)),
            seq: nonzero(e.seq),
        }
    }
}

/// The values of one `sessions_by_hour` insert: session starts and ends, and status events with
/// just their status (what "who was online" needs).
#[derive(SerializeRow)]
pub struct SessionRow<'a> {
    pub hour: i64,
    pub bucket: i32,
    pub ts: CqlTimestamp,
    pub n: i64,
    pub user_id: &'a str,
    pub kind: &'a str,
    pub session: i64,
    pub started_at: MaybeUnset<CqlTimestamp>,
    pub device: MaybeUnset<&'a str>,
    pub device_type: MaybeUnset<&'a str>,
    pub region: MaybeUnset<&'a str>,
    pub groups: MaybeUnset<Vec<&'a str>>,
    pub status: MaybeUnset<&'a str>,
}

impl<'a> SessionRow<'a> {
    pub fn new(e: &'a HistoryEvent, n: u64) -> SessionRow<'a> {
        let r = EventRow::new(e, n);
        SessionRow {
            hour: hour_of(e.ts) as i64,
            bucket: bucket(&e.user),
            ts: r.ts,
            n: r.n,
            user_id: r.user_id,
            kind: r.kind,
            session: r.session,
            started_at: r.started_at,
            device: r.device,
            device_type: r.device_type,
            region: r.region,
            groups: r.groups,
            status: r.status,
        }
    }
}

/// The values of one `samples_by_day` insert.
#[derive(SerializeRow)]
pub struct SampleRow<'a> {
    pub day: i32,
    pub ts: CqlTimestamp,
    pub online: i64,
    pub groups: MaybeUnset<BTreeMap<&'a str, i64>>,
}

impl<'a> SampleRow<'a> {
    pub fn new(s: &'a Sample) -> SampleRow<'a> {
        SampleRow {
            day: day_of(s.ts) as i32,
            ts: ts(s.ts),
            online: s.online as i64,
            groups: opt((!s.groups.is_empty())
                .then(|| s.groups.iter().map(|(g, n)| (&**g, *n as i64)).collect())),
        }
    }
}

/// An `events_by_user` row as read back.
#[derive(DeserializeRow)]
pub struct EventOut {
    pub user_id: String,
    pub ts: CqlTimestamp,
    pub n: i64,
    pub kind: String,
    pub session: Option<i64>,
    pub started_at: Option<CqlTimestamp>,
    pub device: Option<String>,
    pub device_type: Option<String>,
    pub region: Option<String>,
    pub groups: Option<Vec<String>>,
    pub status: Option<String>,
    pub status_text: Option<String>,
    pub devices: Option<i32>,
    pub seq: Option<i64>,
}

/// A `sessions_by_hour` row as read back.
#[derive(DeserializeRow)]
pub struct SessionOut {
    pub user_id: String,
    pub ts: CqlTimestamp,
    pub n: i64,
    pub kind: String,
    pub session: Option<i64>,
    pub started_at: Option<CqlTimestamp>,
    pub device: Option<String>,
    pub device_type: Option<String>,
    pub region: Option<String>,
    pub groups: Option<Vec<String>>,
    pub status: Option<String>,
}

impl From<SessionOut> for EventOut {
    fn from(s: SessionOut) -> EventOut {
        EventOut {
            user_id: s.user_id,
            ts: s.ts,
            n: s.n,
            kind: s.kind,
            session: s.session,
            started_at: s.started_at,
            device: s.device,
            device_type: s.device_type,
            region: s.region,
            groups: s.groups,
            status: s.status,
            status_text: None,
            devices: None,
            seq: None,
        }
    }
}

fn corrupt(what: &str, value: &str) -> StoreError {
    StoreError::fatal(format!("scylla: unreadable row: {what} `{value}`"))
}

fn aggregate(s: &str) -> Option<Aggregate> {
    [
        Aggregate::Offline,
        Aggregate::Away,
        Aggregate::Busy,
        Aggregate::Online,
    ]
    .into_iter()
    .find(|a| a.as_str() == s)
}

impl EventOut {
    pub fn into_event(self) -> Result<HistoryEvent, StoreError> {
        let kind = EventKind::parse(&self.kind).ok_or_else(|| corrupt("kind", &self.kind))?;
        let device_type = match self.device_type.as_deref() {
            None => None,
            Some(d) => Some(DeviceType::parse(d).ok_or_else(|| corrupt("device_type", d))?),
        };
        let status = match self.status.as_deref() {
            None => None,
            Some(s) => Some(aggregate(s).ok_or_else(|| corrupt("status", s))?),
        };
        let arc = |s: String| -> Arc<str> { s.into() };
        let mut e = HistoryEvent::new(ms(self.ts), self.user_id.into(), kind);
        e.session = SessionId::from_raw(self.session.unwrap_or(0) as u64);
        e.started_at = self.started_at.map_or(0, ms);
        e.device = self.device.map(arc);
        e.device_type = device_type;
        e.region = self.region.map(arc);
        e.groups = self
            .groups
            .unwrap_or_default()
            .into_iter()
            .map(GroupId::from)
            .collect();
        e.status = status;
        e.text = self.status_text.map(arc);
        e.devices = self.devices.map(|d| d as u32);
        e.seq = self.seq.unwrap_or(0) as u64;
        Ok(e)
    }
}

/// A `samples_by_day` row as read back.
#[derive(DeserializeRow)]
pub struct SampleOut {
    pub ts: CqlTimestamp,
    pub online: i64,
    pub groups: Option<BTreeMap<String, i64>>,
}

impl SampleOut {
    pub fn into_sample(self) -> Sample {
        let mut groups: Vec<(GroupId, u64)> = self
            .groups
            .unwrap_or_default()
            .into_iter()
            .map(|(g, n)| (g.into(), n as u64))
            .collect();
        // The order shards record them in: largest first, ties by name.
        groups.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        Sample {
            ts: ms(self.ts),
            online: self.online as u64,
            groups,
        }
    }
}
