//! The hand-over's byte format: how the old process of an upgrade streams its presence to the
//! new one (docs/OPERATIONS.md, "The hand-over format").
//!
//! ```text
//! header  = magic "PRSNCHO\0" (8 bytes) | version u16 LE | reserved u16 (0)
//! frame   = kind u8 | length u32 LE | payload (length bytes, postcard)
//! stream  = header, Records*, End, then Delta* and at most one Released, then Drained or EOF
//! ```
//!
//! - `Records` (1): a batch of [`UserRecord`]s, the state at the hand-over.
//! - `End` (2): how many users the batches held, and the CRC-32 of their payloads. The new
//!   process refuses the state unless both match.
//! - `Delta` (3): one user's record, changed after the hand-over.
//! - `Released` (4): the old process let go of the control socket's path.
//! - `Drained` (5): the old process closed its last session.
//!
//! Every length is checked before anything is allocated: a frame may not exceed
//! [`MAX_FRAME`], nor the state its whole limit (`upgrade.max_state_bytes`).

use std::io::{self, Read, Write};

use crate::presence::handover::{RecordError, UserRecord};

pub const MAGIC: [u8; 8] = *b"PRSNCHO\0";
/// Bumped whenever a record's fields change: a new process refuses a version it does not
/// know, and the old one goes on serving.
pub const VERSION: u16 = 1;
/// Largest single frame.
pub const MAX_FRAME: u32 = 16 << 20;
/// Users per `Records` frame the writer aims for.
pub const BATCH: usize = 1024;

const RECORDS: u8 = 1;
const END: u8 = 2;
const DELTA: u8 = 3;
const RELEASED: u8 = 4;
const DRAINED: u8 = 5;

/// Why a hand-over stream was refused.
#[derive(Debug, thiserror::Error)]
pub enum FormatError {
    #[error("not a presenced hand-over (bad magic)")]
    Magic,
    #[error("hand-over format version {0}, this build reads {VERSION}: upgrade through a release that reads both")]
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
    Released,
    Drained,
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

/// Writes the header and the whole state (in batches of [`BATCH`] users), then `End`.
pub fn write_state(w: &mut impl Write, records: &[UserRecord]) -> io::Result<()> {
    let mut head = [0u8; 12];
    head[..8].copy_from_slice(&MAGIC);
    head[8..10].copy_from_slice(&VERSION.to_le_bytes());
    w.write_all(&head)?;
    let mut crc = crc32fast::Hasher::new();
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
pub fn read_state(r: &mut impl Read, limit: u64) -> Result<Vec<UserRecord>, FormatError> {
    let mut head = [0u8; 12];
    r.read_exact(&mut head).map_err(FormatError::Truncated)?;
    if head[..8] != MAGIC {
        return Err(FormatError::Magic);
    }
    let version = u16::from_le_bytes([head[8], head[9]]);
    if version != VERSION || head[10..] != [0, 0] {
        return Err(FormatError::Version(version));
    }
    let mut budget = limit.saturating_sub(12);
    let mut crc = crc32fast::Hasher::new();
    let mut out: Vec<UserRecord> = Vec::new();
    loop {
        let (kind, payload) = read_frame_raw(r, &mut budget, limit)?;
        match kind {
            RECORDS => {
                crc.update(&payload);
                let batch: Vec<UserRecord> = decode(&payload)?;
                out.extend(batch);
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
                return Ok(out);
            }
            other => return Err(FormatError::Unexpected(other)),
        }
    }
}

/// Reads one frame after the state; `Ok(None)` at a clean end of the stream.
pub fn read_frame(r: &mut impl Read) -> Result<Option<Frame>, FormatError> {
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
            let rec: UserRecord = decode(&payload)?;
            rec.check()?;
            Ok(Some(Frame::Delta(rec)))
        }
        RELEASED => Ok(Some(Frame::Released)),
        DRAINED => Ok(Some(Frame::Drained)),
        other => Err(FormatError::Unexpected(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::handover::{SessionRecord, MAX_COUNTER};
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
        )
            .prop_map(
                |(user, seq, last_seen, changed_at_ms, sessions)| UserRecord {
                    user,
                    seq,
                    last_seen,
                    changed_at_ms,
                    sessions,
                },
            )
    }

    fn bytes_of(records: &[UserRecord]) -> Vec<u8> {
        let mut buf = Vec::new();
        write_state(&mut buf, records).unwrap();
        buf
    }

    proptest! {
        #[test]
        fn the_state_round_trips(records in prop::collection::vec(record(), 0..40)) {
            let buf = bytes_of(&records);
            let back = read_state(&mut buf.as_slice(), u64::MAX).unwrap();
            prop_assert_eq!(back, records);
        }

        #[test]
        fn every_truncation_is_refused(records in prop::collection::vec(record(), 1..10), cut in any::<prop::sample::Index>()) {
            let buf = bytes_of(&records);
            let cut = cut.index(buf.len());
            prop_assert!(read_state(&mut &buf[..cut], u64::MAX).is_err());
        }

        #[test]
        fn every_flipped_byte_is_refused(records in prop::collection::vec(record(), 1..10), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut buf = bytes_of(&records);
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
            prop_assert_eq!(read_frame(&mut r).unwrap(), Some(Frame::Delta(rec)));
            prop_assert_eq!(read_frame(&mut r).unwrap(), Some(Frame::Released));
            prop_assert_eq!(read_frame(&mut r).unwrap(), Some(Frame::Drained));
            prop_assert_eq!(read_frame(&mut r).unwrap(), None);
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
            })
            .collect();
        let per_user = bytes_of(&users).len() / users.len();
        assert!((40..=70).contains(&per_user), "{per_user} bytes per user");
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
