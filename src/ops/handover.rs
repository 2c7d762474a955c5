//! The hand-over's byte format: how the old process of an upgrade streams its presence to the
//! new one (docs/OPERATIONS.md, "The hand-over format").
//!
//! ```text
//! header  = magic "PRSNCHO\0" (8 bytes) | version u16 LE | reserved u16 (0)
//! frame   = kind u8 | length u32 LE | payload (length bytes, postcard)
//! stream  = header, Hello?, Records*, End,
//!           then Delta*, at most one (BusUsers* Bus), at most one Released, then Drained or EOF
//! ```
//!
//! - `Hello` (6), in a cluster: the node's bus identity ([`Hello`]): id, incarnation, clock,
//!   followed buckets, known nodes.
//! - `Records` (1): a batch of [`UserRecord`]s, the state at the hand-over.
//! - `End` (2): how many users the batches held, and the CRC-32 of the `Hello` and `Records`
//!   payloads. The new process refuses the state unless both match.
//! - `Delta` (3): one user's record, changed after the hand-over.
//! - `BusUsers` (8) and `Bus` (7), in a cluster, after `READY`: the old process stopped
//!   publishing; per user the groups it was last published in and whether its last share is
//!   still unpublished, in batches, then the clock and stream numbers ([`Handoff`]); or nothing
//!   (`Bus` with no value: the old process's bus link did not answer, and the new process
//!   joins as a new incarnation).
//! - `Released` (4): the old process let go of the control socket's path.
//! - `Drained` (5): the old process closed its last session.
//!
//! Every length is checked before anything is allocated: a frame may not exceed
//! [`MAX_FRAME`], nor the state its whole limit (`upgrade.max_state_bytes`).

use std::io::{self, Read, Write};

use crate::cluster::handoff::{Handoff, HandoffUser, Hello};
use crate::presence::handover::{RecordError, UserRecord};

pub const MAGIC: [u8; 8] = *b"PRSNCHO\0";
/// Bumped whenever a record's fields change: a new process refuses a version it does not
/// know, and the old one goes on serving. Written: this one; read: this one and
/// [`OLDEST_READ`] on (an upgrade from the release before).
pub const VERSION: u16 = 2;
/// Format 1: records without the node's share (the release before upgrades kept a cluster
/// node's bus identity).
pub const OLDEST_READ: u16 = 1;
/// Largest single frame.
pub const MAX_FRAME: u32 = 16 << 20;
/// Users per `Records` frame the writer aims for.
pub const BATCH: usize = 1024;

const RECORDS: u8 = 1;
const END: u8 = 2;
const DELTA: u8 = 3;
const RELEASED: u8 = 4;
const DRAINED: u8 = 5;
const HELLO: u8 = 6;
const BUS: u8 = 7;
const BUS_USERS: u8 = 8;
/// Users per `BusUsers` frame.
const USERS_BATCH: usize = 4096;

/// Why a hand-over stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("not a presenced hand-over (bad magic)")]
    Magic,
    #[error("hand-over format version {0}, this build reads {OLDEST_READ} to {VERSION}: upgrade through a release that reads both")]
    Version(u16),
    #[error("the state exceeds upgrade.max_state_bytes ({limit} bytes)")]
    TooLarge { limit: u64 },
    #[error("a frame of {0} bytes exceeds the limit of {MAX_FRAME}")]
    FrameTooLarge(u32),
    #[error("truncated: {0}")]
    Truncated(io::Error),
    #[error("corrupt frame: {0}")]
    Corrupt(String),
    #[error("unexpected frame kind {0}")]
    Unexpected(u8),
    #[error("checksum mismatch: the state is corrupt")]
    Checksum,
    #[error("the state announced {want} users and held {got}")]
    Count { want: u64, got: u64 },
    #[error(transparent)]
    Record(#[from] RecordError),
}

/// One frame after the state.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame {
    Delta(UserRecord),
    /// Users the bus hand-over names (part of the coming `Bus`).
    BusUsers(Vec<HandoffUser>),
    /// The old process's bus identity after it stopped publishing (`users` empty: they came
    /// in `BusUsers`); `None`: it could not hand it over.
    Bus(Option<Handoff>),
    Released,
    Drained,
}

/// The state at the hand-over: the users, and in a cluster the node's bus identity.
#[derive(Debug, Default)]
pub struct State {
    pub records: Vec<UserRecord>,
    pub hello: Option<Hello>,
    /// The stream's format version (the frames after the state are read by it).
    pub version: u16,
}

/// A record of format 1: no `share`.
#[derive(serde::Deserialize)]
struct UserRecordV1 {
    user: String,
    seq: u64,
    last_seen: Option<u64>,
    changed_at_ms: u64,
    sessions: Vec<crate::presence::handover::SessionRecord>,
}

impl From<UserRecordV1> for UserRecord {
    fn from(r: UserRecordV1) -> UserRecord {
        UserRecord {
            user: r.user,
            seq: r.seq,
            last_seen: r.last_seen,
            changed_at_ms: r.changed_at_ms,
            sessions: r.sessions,
            share: None,
        }
    }
}

fn decode_records(payload: &[u8], version: u16) -> Result<Vec<UserRecord>, FormatError> {
    match version {
        1 => Ok(decode::<Vec<UserRecordV1>>(payload)?
            .into_iter()
            .map(UserRecord::from)
            .collect()),
        _ => decode(payload),
    }
}

fn decode_record(payload: &[u8], version: u16) -> Result<UserRecord, FormatError> {
    match version {
        1 => Ok(decode::<UserRecordV1>(payload)?.into()),
        _ => decode(payload),
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct EndFrame {
    users: u64,
    crc: u32,
}

fn encode<T: serde::Serialize>(v: &T) -> io::Result<Vec<u8>> {
    postcard::to_stdvec(v).map_err(|e| io::Error::other(e.to_string()))
}

fn write_frame(w: &mut impl Write, kind: u8, payload: &[u8]) -> io::Result<()> {
    let len = u32::try_from(payload.len())
        .ok()
        .filter(|n| *n <= MAX_FRAME)
        .ok_or_else(|| io::Error::other("a hand-over frame over its limit"))?;
    let mut head = [0u8; 5];
    head[0] = kind;
    head[1..].copy_from_slice(&len.to_le_bytes());
    w.write_all(&head)?;
    w.write_all(payload)
}

/// Writes the header, the bus identity (in a cluster) and the whole state (in batches of
/// [`BATCH`] users), then `End`.
pub fn write_state(
    w: &mut impl Write,
    records: &[UserRecord],
    hello: Option<&Hello>,
) -> io::Result<()> {
    let mut head = [0u8; 12];
    head[..8].copy_from_slice(&MAGIC);
    head[8..10].copy_from_slice(&VERSION.to_le_bytes());
    w.write_all(&head)?;
    let mut crc = crc32fast::Hasher::new();
    if let Some(hello) = hello {
        let payload = encode(hello)?;
        crc.update(&payload);
        write_frame(w, HELLO, &payload)?;
    }
    for batch in records.chunks(BATCH) {
        let payload = encode(&batch)?;
        crc.update(&payload);
        write_frame(w, RECORDS, &payload)?;
    }
    let end = EndFrame {
        users: records.len() as u64,
        crc: crc.finalize(),
    };
    write_frame(w, END, &encode(&end)?)
}

pub fn write_delta(w: &mut impl Write, rec: &UserRecord) -> io::Result<()> {
    write_frame(w, DELTA, &encode(rec)?)
}

/// Writes the bus identity handed over after `READY` (`None`: none could be).
pub fn write_handoff(w: &mut impl Write, handoff: Option<&Handoff>) -> io::Result<()> {
    let Some(h) = handoff else {
        return write_frame(w, BUS, &encode(&None::<Handoff>)?);
    };
    for batch in h.users.chunks(USERS_BATCH) {
        write_users(w, batch)?;
    }
    let head = Handoff {
        users: Vec::new(),
        ..h.clone()
    };
    write_frame(w, BUS, &encode(&Some(head))?)
}

/// One `BusUsers` frame, or halves of it until each fits [`MAX_FRAME`] (a user's groups come
/// from its token: a batch has no fixed size). Nothing is written for a batch that cannot fit.
fn write_users(w: &mut impl Write, batch: &[HandoffUser]) -> io::Result<()> {
    let payload = encode(&batch)?;
    if payload.len() <= MAX_FRAME as usize || batch.len() < 2 {
        return write_frame(w, BUS_USERS, &payload);
    }
    let (a, b) = batch.split_at(batch.len() / 2);
    write_users(w, a)?;
    write_users(w, b)
}

pub fn write_released(w: &mut impl Write) -> io::Result<()> {
    write_frame(w, RELEASED, &[])
}

pub fn write_drained(w: &mut impl Write) -> io::Result<()> {
    write_frame(w, DRAINED, &[])
}

fn read_frame_raw(
    r: &mut impl Read,
    budget: &mut u64,
    limit: u64,
) -> Result<(u8, Vec<u8>), FormatError> {
    let mut head = [0u8; 5];
    r.read_exact(&mut head).map_err(FormatError::Truncated)?;
    let len = u32::from_le_bytes(head[1..].try_into().expect("4 bytes"));
    if len > MAX_FRAME {
        return Err(FormatError::FrameTooLarge(len));
    }
    let need = 5 + u64::from(len);
    if need > *budget {
        return Err(FormatError::TooLarge { limit });
    }
    *budget -= need;
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).map_err(FormatError::Truncated)?;
    Ok((head[0], payload))
}

fn decode<'a, T: serde::Deserialize<'a>>(payload: &'a [u8]) -> Result<T, FormatError> {
    match postcard::take_from_bytes::<T>(payload) {
        Ok((v, [])) => Ok(v),
        Ok((_, rest)) => Err(FormatError::Corrupt(format!(
            "{} bytes after the value",
            rest.len()
        ))),
        Err(e) => Err(FormatError::Corrupt(e.to_string())),
    }
}

/// Reads the header and the state up to its `End`, refusing anything malformed, over `limit`
/// bytes in all, or not matching its checksum and count. Every record is checked.
pub fn read_state(r: &mut impl Read, limit: u64) -> Result<State, FormatError> {
    let mut head = [0u8; 12];
    r.read_exact(&mut head).map_err(FormatError::Truncated)?;
    if head[..8] != MAGIC {
        return Err(FormatError::Magic);
    }
    let version = u16::from_le_bytes([head[8], head[9]]);
    if !(OLDEST_READ..=VERSION).contains(&version) || head[10..] != [0, 0] {
        return Err(FormatError::Version(version));
    }
    let mut budget = limit.saturating_sub(12);
    let mut crc = crc32fast::Hasher::new();
    let mut out: Vec<UserRecord> = Vec::new();
    let mut hello = None;
    loop {
        let (kind, payload) = read_frame_raw(r, &mut budget, limit)?;
        match kind {
            HELLO if version >= 2 && hello.is_none() && out.is_empty() => {
                crc.update(&payload);
                hello = Some(decode::<Hello>(&payload)?);
            }
            RECORDS => {
                crc.update(&payload);
                out.extend(decode_records(&payload, version)?);
            }
            END => {
                let end: EndFrame = decode(&payload)?;
                if end.crc != crc.finalize() {
                    return Err(FormatError::Checksum);
                }
                if end.users != out.len() as u64 {
                    return Err(FormatError::Count {
                        want: end.users,
                        got: out.len() as u64,
                    });
                }
                for rec in &out {
                    rec.check()?;
                }
                return Ok(State {
                    records: out,
                    hello,
                    version,
                });
            }
            other => return Err(FormatError::Unexpected(other)),
        }
    }
}

/// Reads one frame after the state (of format `version`, [`State::version`]); `Ok(None)` at a
/// clean end of the stream.
pub fn read_frame(r: &mut impl Read, version: u16) -> Result<Option<Frame>, FormatError> {
    let mut first = [0u8; 1];
    match r.read(&mut first) {
        Ok(0) => return Ok(None),
        Ok(_) => {}
        Err(e) => return Err(FormatError::Truncated(e)),
    }
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(FormatError::Truncated)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_FRAME {
        return Err(FormatError::FrameTooLarge(len));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).map_err(FormatError::Truncated)?;
    match first[0] {
        DELTA => {
            let rec = decode_record(&payload, version)?;
            rec.check()?;
            Ok(Some(Frame::Delta(rec)))
        }
        BUS_USERS if version >= 2 => Ok(Some(Frame::BusUsers(decode(&payload)?))),
        BUS if version >= 2 => Ok(Some(Frame::Bus(decode(&payload)?))),
        RELEASED => Ok(Some(Frame::Released)),
        DRAINED => Ok(Some(Frame::Drained)),
        other => Err(FormatError::Unexpected(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::handover::{SessionRecord, ShareRecord, MAX_COUNTER};
    use proptest::prelude::*;

    fn session() -> impl Strategy<Value = SessionRecord> {
        (
            any::<u64>(),
            prop::sample::select(vec!["online", "away", "busy", "invisible"]),
            prop::option::of("[a-z ]{0,12}"),
            prop::option::of("[a-z0-9]{1,8}"),
            prop::sample::select(vec!["web", "ios", "android", "desktop", "other"]),
            prop::collection::vec("[a-z]{1,6}", 0..3),
            any::<u64>(),
            0..=MAX_COUNTER,
            prop::option::of(any::<u64>()),
        )
            .prop_map(
                |(origin, status, text, device, dt, groups, at, stamp, until)| SessionRecord {
                    origin,
                    status: status.into(),
                    text,
                    device,
                    device_type: dt.into(),
                    groups,
                    connected_at_ms: at,
                    ended_at_ms: at / 2,
                    stamp,
                    until,
                },
            )
    }

    fn record() -> impl Strategy<Value = UserRecord> {
        (
            "[a-z0-9]{1,12}",
            0..=MAX_COUNTER,
            prop::option::of(any::<u64>()),
            any::<u64>(),
            prop::collection::vec(session(), 0..4),
            prop::option::of((0..=MAX_COUNTER, prop::option::of(any::<u64>()))),
        )
            .prop_map(|(user, seq, last_seen, changed_at_ms, sessions, share)| {
                UserRecord {
                    user,
                    seq,
                    last_seen,
                    changed_at_ms,
                    sessions,
                    share: share.map(|(clock, last_seen)| ShareRecord { clock, last_seen }),
                }
            })
    }

    fn hello() -> impl Strategy<Value = Hello> {
        (
            "[a-z0-9-]{1,20}",
            any::<u64>(),
            any::<u64>(),
            prop::collection::vec(0u32..4096, 0..8),
            prop::collection::vec(0u32..4096, 0..8),
            prop::collection::vec(("[a-z0-9-]{1,12}", any::<u64>()), 0..4),
            any::<u64>(),
        )
            .prop_map(
                |(node_id, incarnation, clock, follows, follows_groups, members, hold_ms)| Hello {
                    node_id,
                    incarnation,
                    clock,
                    follows,
                    follows_groups,
                    members,
                    hold_ms,
                },
            )
    }

    fn handoff() -> impl Strategy<Value = Handoff> {
        (
            any::<u64>(),
            prop::collection::vec((0u32..4096, any::<u64>()), 0..8),
            prop::collection::vec((0u32..4096, any::<u64>()), 0..8),
            prop::collection::vec(
                (
                    "[a-z0-9]{1,8}",
                    prop::collection::vec("[a-z]{1,6}", 0..3),
                    any::<bool>(),
                ),
                0..(USERS_BATCH * 2 + 3),
            ),
        )
            .prop_map(|(clock, numbers, group_numbers, users)| Handoff {
                clock,
                numbers,
                group_numbers,
                numbers_base: clock / 3,
                users: users
                    .into_iter()
                    .map(|(user, groups, unpublished)| HandoffUser {
                        user,
                        groups,
                        unpublished,
                    })
                    .collect(),
            })
    }

    fn bytes_of(records: &[UserRecord]) -> Vec<u8> {
        bytes_with(records, None)
    }

    fn bytes_with(records: &[UserRecord], hello: Option<&Hello>) -> Vec<u8> {
        let mut buf = Vec::new();
        write_state(&mut buf, records, hello).unwrap();
        buf
    }

    proptest! {
        #[test]
        fn the_state_round_trips(records in prop::collection::vec(record(), 0..40), hello in prop::option::of(hello())) {
            let buf = bytes_with(&records, hello.as_ref());
            let back = read_state(&mut buf.as_slice(), u64::MAX).unwrap();
            prop_assert_eq!(back.records, records);
            prop_assert_eq!(back.hello, hello);
        }

        #[test]
        fn every_truncation_is_refused(records in prop::collection::vec(record(), 1..10), hello in prop::option::of(hello()), cut in any::<prop::sample::Index>()) {
            let buf = bytes_with(&records, hello.as_ref());
            let cut = cut.index(buf.len());
            prop_assert!(read_state(&mut &buf[..cut], u64::MAX).is_err());
        }

        #[test]
        fn every_flipped_byte_is_refused(records in prop::collection::vec(record(), 1..10), hello in prop::option::of(hello()), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut buf = bytes_with(&records, hello.as_ref());
            let at = at.index(buf.len());
            buf[at] ^= 1 << bit;
            prop_assert!(read_state(&mut buf.as_slice(), u64::MAX).is_err(), "flip at {at} bit {bit} accepted");
        }

        #[test]
        fn deltas_round_trip(rec in record()) {
            let mut buf = Vec::new();
            write_delta(&mut buf, &rec).unwrap();
            write_released(&mut buf).unwrap();
            write_drained(&mut buf).unwrap();
            let mut r = buf.as_slice();
            prop_assert_eq!(read_frame(&mut r, VERSION).unwrap(), Some(Frame::Delta(rec)));
            prop_assert_eq!(read_frame(&mut r, VERSION).unwrap(), Some(Frame::Released));
            prop_assert_eq!(read_frame(&mut r, VERSION).unwrap(), Some(Frame::Drained));
            prop_assert_eq!(read_frame(&mut r, VERSION).unwrap(), None);
        }

        #[test]
        fn the_bus_identity_round_trips_in_batches(h in prop::option::of(handoff())) {
            let mut buf = Vec::new();
            write_handoff(&mut buf, h.as_ref()).unwrap();
            let mut r = buf.as_slice();
            let mut groups = Vec::new();
            let mut batches = 0;
            let got = loop {
                match read_frame(&mut r, VERSION).unwrap() {
                    Some(Frame::BusUsers(g)) => {
                        prop_assert!(g.len() <= USERS_BATCH);
                        batches += 1;
                        groups.extend(g);
                    }
                    Some(Frame::Bus(h)) => break h,
                    other => prop_assert!(false, "unexpected {other:?}"),
                }
            };
            prop_assert_eq!(read_frame(&mut r, VERSION).unwrap(), None);
            let want_batches = h.as_ref().map_or(0, |h| h.users.len().div_ceil(USERS_BATCH));
            prop_assert_eq!(batches, want_batches);
            let back = got.map(|g| Handoff { users: std::mem::take(&mut groups), ..g });
            prop_assert_eq!(back, h);
        }
    }

    /// The size docs/ARCHITECTURE.md and docs/CONFIG.md quote for `upgrade.max_state_bytes`.
    #[test]
    fn a_user_with_one_plain_session_takes_about_fifty_bytes() {
        let users: Vec<UserRecord> = (0..1000u64)
            .map(|i| UserRecord {
                user: format!("user-{i:06}"),
                seq: 3,
                last_seen: None,
                changed_at_ms: 1_796_000_000_000 + i,
                sessions: vec![SessionRecord {
                    origin: (1 << 48) + i,
                    status: "online".into(),
                    text: None,
                    device: None,
                    device_type: "web".into(),
                    groups: Vec::new(),
                    connected_at_ms: 1_796_000_000_000 + i,
                    ended_at_ms: 0,
                    stamp: 1,
                    until: None,
                }],
                share: None,
            })
            .collect();
        let per_user = bytes_of(&users).len() / users.len();
        assert!((40..=70).contains(&per_user), "{per_user} bytes per user");
    }

    /// A batch of users whose groups make it larger than a frame goes in halves.
    #[test]
    fn a_bus_batch_over_the_frame_limit_is_split() {
        let groups: Vec<String> = (0..3_000).map(|i| format!("{i:01000}")).collect();
        let users: Vec<HandoffUser> = (0..8)
            .map(|i| HandoffUser {
                user: format!("u{i}"),
                groups: groups.clone(),
                unpublished: false,
            })
            .collect();
        let h = Handoff {
            users,
            ..Handoff::default()
        };
        let mut buf = Vec::new();
        write_handoff(&mut buf, Some(&h)).unwrap();
        let mut r = buf.as_slice();
        let (mut frames, mut got) = (0, Vec::new());
        let back = loop {
            match read_frame(&mut r, VERSION).unwrap() {
                Some(Frame::BusUsers(u)) => {
                    frames += 1;
                    got.extend(u);
                }
                Some(Frame::Bus(b)) => break b.unwrap(),
                other => panic!("{other:?}"),
            }
        };
        assert_eq!(frames, 2, "24 MB in two frames under 16 MiB");
        assert_eq!(Handoff { users: got, ..back }, h);
    }

    /// The release before wrote format 1 (records without `share`): this one reads it, so an
    /// upgrade from it hands over as before.
    #[test]
    fn format_one_is_still_read() {
        #[derive(serde::Serialize)]
        struct V1<'a> {
            user: &'a str,
            seq: u64,
            last_seen: Option<u64>,
            changed_at_ms: u64,
            sessions: Vec<SessionRecord>,
        }
        let rec = V1 {
            user: "alice",
            seq: 7,
            last_seen: Some(3),
            changed_at_ms: 5,
            sessions: Vec::new(),
        };
        let mut buf = MAGIC.to_vec();
        buf.extend_from_slice(&1u16.to_le_bytes());
        buf.extend_from_slice(&[0, 0]);
        let payload = encode(&vec![&rec]).unwrap();
        let mut crc = crc32fast::Hasher::new();
        crc.update(&payload);
        write_frame(&mut buf, RECORDS, &payload).unwrap();
        let end = EndFrame {
            users: 1,
            crc: crc.finalize(),
        };
        write_frame(&mut buf, END, &encode(&end).unwrap()).unwrap();
        write_frame(&mut buf, DELTA, &encode(&rec).unwrap()).unwrap();
        let mut r = buf.as_slice();
        let state = read_state(&mut r, u64::MAX).unwrap();
        assert_eq!(state.version, 1);
        let want = UserRecord {
            user: "alice".into(),
            seq: 7,
            last_seen: Some(3),
            changed_at_ms: 5,
            sessions: Vec::new(),
            share: None,
        };
        assert_eq!(state.records, vec![want.clone()]);
        assert_eq!(read_frame(&mut r, 1).unwrap(), Some(Frame::Delta(want)));
        // Format 1 has no bus frames.
        let mut bus = Vec::new();
        write_handoff(&mut bus, None).unwrap();
        assert!(read_frame(&mut bus.as_slice(), 1).is_err());
    }

    #[test]
    fn oversized_state_is_refused_before_it_is_read() {
        let records: Vec<UserRecord> = (0..3000)
            .map(|i| UserRecord {
                user: format!("user-{i}"),
                seq: i,
                last_seen: None,
                changed_at_ms: 1,
                sessions: Vec::new(),
                share: None,
            })
            .collect();
        let buf = bytes_of(&records);
        let limit = (buf.len() / 2) as u64;
        let err = read_state(&mut buf.as_slice(), limit).unwrap_err();
        assert!(matches!(err, FormatError::TooLarge { .. }), "{err}");
        assert!(read_state(&mut buf.as_slice(), buf.len() as u64).is_ok());
        // A frame that claims more than MAX_FRAME is refused from its header alone.
        let mut bogus = buf[..12].to_vec();
        bogus.push(RECORDS);
        bogus.extend_from_slice(&u32::MAX.to_le_bytes());
        let err = read_state(&mut bogus.as_slice(), u64::MAX).unwrap_err();
        assert!(matches!(err, FormatError::FrameTooLarge(_)), "{err}");
    }

    #[test]
    fn wrong_magic_version_and_unknown_names_are_refused() {
        let good = vec![UserRecord {
            user: "alice".into(),
            seq: 3,
            last_seen: Some(5),
            changed_at_ms: 4,
            sessions: Vec::new(),
            share: None,
        }];
        let mut buf = bytes_of(&good);
        buf[0] = b'X';
        assert!(matches!(
            read_state(&mut buf.as_slice(), u64::MAX),
            Err(FormatError::Magic)
        ));
        let mut buf = bytes_of(&good);
        buf[8] = 9;
        assert!(matches!(
            read_state(&mut buf.as_slice(), u64::MAX),
            Err(FormatError::Version(9))
        ));
        let mut bad = good.clone();
        bad[0].sessions.push(SessionRecord {
            origin: 1,
            status: "sleeping".into(),
            text: None,
            device: None,
            device_type: "web".into(),
            groups: Vec::new(),
            connected_at_ms: 0,
            ended_at_ms: 0,
            stamp: 0,
            until: None,
        });
        let buf = bytes_of(&bad);
        let err = read_state(&mut buf.as_slice(), u64::MAX).unwrap_err();
        assert!(
            err.to_string().contains("unknown status `sleeping`"),
            "{err}"
        );
    }
}
