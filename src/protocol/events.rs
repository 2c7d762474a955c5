//! Server → client events, serialised directly into complete WebSocket text frames.
//!
//! Server frames are never masked, so a frame's bytes are the same for every recipient: a shard
//! serialises a presence event once and every local subscriber gets a clone of the same
//! [`Bytes`] (a reference-count increment, no copy, no allocation per delivery).

use bytes::Bytes;
use serde::Serialize;
use serde_json::value::RawValue;
use tungstenite::protocol::frame::coding::{Data, OpCode};
use tungstenite::protocol::frame::FrameHeader;

use super::ops::{ErrorCode, RequestId};
use crate::presence::PresenceState;

/// Longest unmasked frame header: 2 bytes plus an 8-byte length.
const HEADER_MAX: usize = 10;

/// Serialises `event` as JSON into a buffer with room for the header in front, then writes the
/// header just before the payload. One allocation per event, none per recipient.
fn frame<T: Serialize>(event: &T) -> Bytes {
    let mut buf = Vec::with_capacity(HEADER_MAX + 128);
    buf.resize(HEADER_MAX, 0);
    serde_json::to_writer(&mut buf, event).expect("events serialise: plain structs of strings");
    let payload_len = (buf.len() - HEADER_MAX) as u64;
    let header = text_header();
    let header_len = header.len(payload_len);
    let start = HEADER_MAX - header_len;
    header
        .format(payload_len, &mut &mut buf[start..HEADER_MAX])
        .expect("header fits: HEADER_MAX is the longest unmasked header");
    Bytes::from(buf).slice(start..)
}

/// Any serialisable value as one complete, unmasked text frame (the admin feed's messages).
pub fn json_frame<T: Serialize>(value: &T) -> Bytes {
    frame(value)
}

fn text_header() -> FrameHeader {
    FrameHeader {
        is_final: true,
        opcode: OpCode::Data(Data::Text),
        ..FrameHeader::default()
    }
}

/// The JSON payload of a frame built here.
#[cfg(test)]
fn payload(frame: &[u8]) -> &[u8] {
    let header_len = match frame.get(1).map(|b| b & 0x7f) {
        Some(126) => 4,
        Some(127) => 10,
        _ => 2,
    };
    &frame[header_len.min(frame.len())..]
}

#[derive(Serialize)]
struct Presence<'a> {
    r#type: &'static str,
    user: &'a str,
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    text: Option<&'a str>,
    devices: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_seen: Option<u64>,
    ts: u64,
    seq: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    group: Option<&'a str>,
}

impl<'a> Presence<'a> {
    fn new(state: &'a PresenceState, group: Option<&'a str>) -> Self {
        Presence {
            r#type: "presence",
            user: &state.user,
            status: state.status.as_str(),
            text: state.text.as_deref(),
            devices: state.devices,
            last_seen: state.last_seen,
            ts: state.ts,
            seq: state.seq,
            group,
        }
    }
}

/// `{"type":"presence",...}`, tagged with `group` for group feeds.
pub fn presence(state: &PresenceState, group: Option<&str>) -> Bytes {
    frame(&Presence::new(state, group))
}

/// `{"type":"group_snapshot","group","members":[presence...]}`: the visible members.
pub fn group_snapshot(group: &str, members: &[PresenceState]) -> Bytes {
    #[derive(Serialize)]
    struct Snapshot<'a> {
        r#type: &'static str,
        group: &'a str,
        members: Vec<Presence<'a>>,
    }
    frame(&Snapshot {
        r#type: "group_snapshot",
        group,
        members: members
            .iter()
            .map(|m| Presence::new(m, Some(group)))
            .collect(),
    })
}

/// `{"type":"welcome",...}` right after the upgrade. `cpu`: the CPU the serving shard is
/// pinned to (`null` when unpinned), so operators can see placement from any client. `admin`:
/// set for an admin's read-only impersonation of `user` (then `read_only` and `admin` are sent).
pub fn welcome(
    session: &str,
    user: &str,
    shard: usize,
    cpu: Option<usize>,
    heartbeat_ms: u64,
    admin: Option<&str>,
    resumed: Option<(&str, Option<&str>)>,
) -> Bytes {
    #[derive(Serialize)]
    struct Resumed<'a> {
        status: &'a str,
        text: Option<&'a str>,
    }
    #[derive(Serialize)]
    struct Welcome<'a> {
        r#type: &'static str,
        session: &'a str,
        user: &'a str,
        shard: usize,
        cpu: Option<usize>,
        heartbeat_ms: u64,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        read_only: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        admin: Option<&'a str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        resumed: Option<Resumed<'a>>,
    }
    frame(&Welcome {
        r#type: "welcome",
        session,
        user,
        shard,
        cpu,
        heartbeat_ms,
        read_only: admin.is_some(),
        admin,
        resumed: resumed.map(|(status, text)| Resumed { status, text }),
    })
}

#[derive(Serialize)]
struct Reply<'a> {
    r#type: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ts: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    code: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<&'a str>,
}

impl<'a> Reply<'a> {
    fn new(r#type: &'static str, id: Option<&'a RequestId>) -> Self {
        Reply {
            r#type,
            id: id.map(|i| &**i),
            ts: None,
            code: None,
            message: None,
        }
    }
}

/// `{"type":"ack","id"?}`.
pub fn ack(id: Option<&RequestId>) -> Bytes {
    frame(&Reply::new("ack", id))
}

/// `{"type":"pong","id"?,"ts"}`.
pub fn pong(id: Option<&RequestId>, ts: u64) -> Bytes {
    frame(&Reply {
        ts: Some(ts),
        ..Reply::new("pong", id)
    })
}

/// `{"type":"error","id"?,"code","message"}`.
pub fn error(id: Option<&RequestId>, code: ErrorCode, message: &str) -> Bytes {
    frame(&Reply {
        code: Some(code.as_str()),
        message: Some(message),
        ..Reply::new("error", id)
    })
}

/// `{"type":"activity","user","kind","ts"}`.
pub fn activity(user: &str, kind: &str, ts: u64) -> Bytes {
    #[derive(Serialize)]
    struct Activity<'a> {
        r#type: &'static str,
        user: &'a str,
        kind: &'a str,
        ts: u64,
    }
    frame(&Activity {
        r#type: "activity",
        user,
        kind,
        ts,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::Aggregate;
    use std::io::Cursor;

    fn parse_frame(bytes: &[u8]) -> (FrameHeader, serde_json::Value) {
        let mut cur = Cursor::new(bytes);
        let (header, len) = FrameHeader::parse(&mut cur).unwrap().unwrap();
        let body = &bytes[cur.position() as usize..];
        assert_eq!(
            body.len() as u64,
            len,
            "frame length covers exactly the payload"
        );
        (header, serde_json::from_slice(body).unwrap())
    }

    #[test]
    fn presence_frames_are_complete_unmasked_text_frames() {
        let state = PresenceState {
            user: "alice".into(),
            status: Aggregate::Busy,
            text: Some("call".into()),
            devices: 2,
            last_seen: None,
            ts: 5,
            seq: 9,
        };
        let (header, v) = parse_frame(&presence(&state, Some("team")));
        assert!(header.is_final && header.mask.is_none());
        assert_eq!(header.opcode, OpCode::Data(Data::Text));
        assert_eq!(
            v,
            serde_json::json!({"type":"presence","user":"alice","status":"busy","text":"call",
                "devices":2,"ts":5,"seq":9,"group":"team"})
        );
    }

    #[test]
    fn long_payloads_get_extended_lengths() {
        let members: Vec<PresenceState> = (0..2000)
            .map(|i| PresenceState {
                user: format!("user-{i}").into(),
                status: Aggregate::Online,
                text: None,
                devices: 1,
                last_seen: None,
                ts: 1,
                seq: 1,
            })
            .collect();
        let bytes = group_snapshot("g", &members);
        assert!(bytes.len() > 65_536, "exercises the 8-byte length form");
        let (_, v) = parse_frame(&bytes);
        assert_eq!(v["members"].as_array().unwrap().len(), 2000);
        let (_, v) = parse_frame(&group_snapshot("g", &members[..300]));
        assert_eq!(v["members"].as_array().unwrap().len(), 300);
    }

    #[test]
    fn replies_echo_ids() {
        let id: RequestId = RawValue::from_string("\"x1\"".into()).unwrap();
        let (_, v) = parse_frame(&ack(Some(&id)));
        assert_eq!(v, serde_json::json!({"type":"ack","id":"x1"}));
        let (_, v) = parse_frame(&error(None, ErrorCode::TooLarge, "too big"));
        assert_eq!(
            v,
            serde_json::json!({"type":"error","code":"too_large","message":"too big"})
        );
        let (_, v) = parse_frame(&pong(Some(&id), 3));
        assert_eq!(v, serde_json::json!({"type":"pong","id":"x1","ts":3}));
        assert_eq!(payload(&ack(None)), br#"{"type":"ack"}"#);
    }
}
