//! Client → server ops: `{"op": "...", "id"?: ..., ...}`.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::presence::{GroupId, Status, UserId};

/// The client's request id, echoed byte-for-byte in the reply. Must be a JSON string or number.
pub type RequestId = Box<RawValue>;

/// Input limits that parsing enforces. Named and configurable (`[limits]` in the config).
#[derive(Clone, Debug)]
pub struct OpLimits {
    /// Users named in one `subscribe`/`unsubscribe`.
    pub max_users_per_op: usize,
    /// Bytes in a user or group id.
    pub max_id_bytes: usize,
    /// Characters in a `set_status` text.
    pub max_text_chars: usize,
    /// Characters in an `activity` kind.
    pub max_kind_chars: usize,
}

impl Default for OpLimits {
    fn default() -> Self {
        OpLimits {
            max_users_per_op: 1000,
            max_id_bytes: 256,
            max_text_chars: 128,
            max_kind_chars: 32,
        }
    }
}

/// A parsed client op.
#[derive(Debug, PartialEq, Eq)]
pub enum Op {
    Subscribe(Vec<UserId>),
    Unsubscribe(Vec<UserId>),
    SubscribeGroup(GroupId),
    UnsubscribeGroup(GroupId),
    SetStatus {
        status: Status,
        text: Option<Arc<str>>,
    },
    Activity {
        kind: Arc<str>,
        to: Option<UserId>,
    },
    Refresh(String),
    Ping,
}

impl Op {
    /// Short name, for metrics and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Subscribe(_) => "subscribe",
            Op::Unsubscribe(_) => "unsubscribe",
            Op::SubscribeGroup(_) => "subscribe_group",
            Op::UnsubscribeGroup(_) => "unsubscribe_group",
            Op::SetStatus { .. } => "set_status",
            Op::Activity { .. } => "activity",
            Op::Refresh(_) => "refresh",
            Op::Ping => "ping",
        }
    }
}

/// One client message: the op and its optional id.
#[derive(Debug)]
pub struct Request {
    pub id: Option<RequestId>,
    pub op: Op,
}

/// Error codes of `{"type":"error"}` replies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorCode {
    BadRequest,
    UnknownOp,
    TooLarge,
    RateLimited,
    TooManySubscriptions,
    Forbidden,
    /// The server is shedding new work (its inter-shard queues are congested): nothing was
    /// applied; retry later.
    Overloaded,
}

impl ErrorCode {
    /// Every code, for the documentation check.
    pub const ALL: [ErrorCode; 7] = [
        ErrorCode::BadRequest,
        ErrorCode::UnknownOp,
        ErrorCode::TooLarge,
        ErrorCode::RateLimited,
        ErrorCode::TooManySubscriptions,
        ErrorCode::Forbidden,
        ErrorCode::Overloaded,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::UnknownOp => "unknown_op",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::Overloaded => "overloaded",
        }
    }
}

/// A refused op: becomes one `error` reply; the session goes on.
#[derive(Debug)]
pub struct OpError {
    pub id: Option<RequestId>,
    pub code: ErrorCode,
    pub message: String,
}

impl OpError {
    pub fn new(id: Option<RequestId>, code: ErrorCode, message: impl Into<String>) -> OpError {
        OpError {
            id,
            code,
            message: message.into(),
        }
    }
}

/// Every field any op may carry; each op then takes what it needs. Borrowed where possible so
/// parsing allocates only for what is kept.
#[derive(Deserialize)]
struct RawOp<'a> {
    #[serde(borrow)]
    op: Option<&'a RawValue>,
    id: Option<RequestId>,
    #[serde(borrow)]
    users: Option<Vec<Id<'a>>>,
    group: Option<String>,
    status: Option<String>,
    text: Option<String>,
    kind: Option<String>,
    to: Option<String>,
    token: Option<String>,
}

/// A string that borrows from the input unless it holds a JSON escape, which is decoded (the only
/// case that allocates): a user id inside an array, the op name. The newtype is what lets serde
/// borrow it: a bare `Cow` only borrows when it is the field itself, so `Vec<Cow<str>>` would
/// allocate every id twice, and `from_str::<Cow<str>>` always allocates.
#[derive(Deserialize)]
struct Id<'a>(#[serde(borrow)] std::borrow::Cow<'a, str>);

/// Used only when the full parse fails, to still echo the client's id in the error.
#[derive(Deserialize)]
struct IdOnly {
    id: Option<RequestId>,
}

/// Parses one text frame into a [`Request`], applying `limits`.
pub fn parse(text: &str, limits: &OpLimits) -> Result<Request, OpError> {
    let raw: RawOp = match serde_json::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            let id = serde_json::from_str::<IdOnly>(text)
                .ok()
                .and_then(|i| i.id)
                .filter(valid_id);
            let what = if e.is_data() {
                "bad field"
            } else {
                "invalid JSON"
            };
            return Err(OpError::new(
                id,
                ErrorCode::BadRequest,
                format!("{what}: {e}"),
            ));
        }
    };
    let id = raw.id.as_ref().filter(|i| valid_id(i)).cloned();
    if raw.id.is_some() && id.is_none() {
        return Err(OpError::new(
            None,
            ErrorCode::BadRequest,
            "`id` must be a string or a number",
        ));
    }
    let bad = |msg: String| OpError::new(id.clone(), ErrorCode::BadRequest, msg);
    let Some(op) = raw.op else {
        return Err(bad("missing field `op`".into()));
    };
    // Borrowed unless the name has a JSON escape (`"\u0070ing"` is `ping`); then it is decoded.
    let Ok(Id(name)) = serde_json::from_str::<Id>(op.get()) else {
        return Err(bad("`op` must be a string".into()));
    };
    let name = &*name;
    let op = match name {
        "subscribe" | "unsubscribe" => {
            let users = raw
                .users
                .ok_or_else(|| bad("missing field `users`".into()))?;
            if users.len() > limits.max_users_per_op {
                return Err(bad(format!(
                    "at most {} users per op, got {}",
                    limits.max_users_per_op,
                    users.len()
                )));
            }
            let users = users
                .into_iter()
                .map(|u| check_id("users[]", &u.0, limits).map(UserId::from))
                .collect::<Result<Vec<_>, _>>()
                .map_err(bad)?;
            if name == "subscribe" {
                Op::Subscribe(users)
            } else {
                Op::Unsubscribe(users)
            }
        }
        "subscribe_group" | "unsubscribe_group" => {
            let group = raw
                .group
                .ok_or_else(|| bad("missing field `group`".into()))?;
            let group = GroupId::from(check_id("group", &group, limits).map_err(bad)?);
            if name == "subscribe_group" {
                Op::SubscribeGroup(group)
            } else {
                Op::UnsubscribeGroup(group)
            }
        }
        "set_status" => {
            let status = raw
                .status
                .ok_or_else(|| bad("missing field `status`".into()))?;
            let status = Status::parse(&status).ok_or_else(|| {
                bad(format!(
                    "unknown status `{status}` (online, away, busy, invisible)"
                ))
            })?;
            let text = match raw.text {
                Some(t) if t.chars().count() > limits.max_text_chars => {
                    return Err(bad(format!(
                        "`text` longer than {} characters",
                        limits.max_text_chars
                    )))
                }
                Some(t) if t.is_empty() => None,
                t => t.map(Arc::from),
            };
            Op::SetStatus { status, text }
        }
        "activity" => {
            let kind = raw.kind.ok_or_else(|| bad("missing field `kind`".into()))?;
            if kind.is_empty() || kind.chars().count() > limits.max_kind_chars {
                return Err(bad(format!(
                    "`kind` must be 1 to {} characters",
                    limits.max_kind_chars
                )));
            }
            let to = match raw.to {
                Some(to) => Some(UserId::from(check_id("to", &to, limits).map_err(bad)?)),
                None => None,
            };
            Op::Activity {
                kind: kind.into(),
                to,
            }
        }
        "refresh" => Op::Refresh(
            raw.token
                .ok_or_else(|| bad("missing field `token`".into()))?,
        ),
        "ping" => Op::Ping,
        other => {
            return Err(OpError::new(
                id,
                ErrorCode::UnknownOp,
                format!("unknown op `{}`", truncate(other, 64)),
            ))
        }
    };
    Ok(Request { id, op })
}

fn valid_id(id: &RequestId) -> bool {
    let s = id.get();
    s.len() <= 128 && (s.starts_with('"') || s.starts_with('-') || s.as_bytes()[0].is_ascii_digit())
}

fn check_id<'a>(field: &str, id: &'a str, limits: &OpLimits) -> Result<&'a str, String> {
    if id.is_empty() || id.len() > limits.max_id_bytes {
        return Err(format!(
            "`{field}` ids must be 1 to {} bytes",
            limits.max_id_bytes
        ));
    }
    Ok(id)
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
#[path = "ops_tests.rs"]
mod tests;
