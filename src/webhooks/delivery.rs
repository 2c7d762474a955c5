//! What a webhook sends, and in what order (pure): the filter, the bounded queue with its
//! in-flight batch, the request body (`json` or `slack`) and its signature.
//!
//! Order: one queue per webhook, first in first out, and a batch stays in flight (resent after
//! a failure, with the same ids) until a 2xx takes it off. So no event overtakes an earlier
//! one that is not acknowledged, a user's above all. Past `max_queue` events waiting, the
//! oldest not in flight is dropped and counted.

use std::collections::{HashSet, VecDeque};

use ring::hmac;

use super::event::{Event, Kind};

/// Which events a webhook wants.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    /// Empty: every kind.
    pub kinds: HashSet<Kind>,
    pub users: HashSet<String>,
    pub groups: HashSet<String>,
    pub roles: HashSet<String>,
}

impl Filter {
    /// The event's kind is wanted, and, when any of `users`, `groups`, `roles` is set, the
    /// event matches at least one of them (a listed user, or a user in a listed group or with a
    /// listed role): "alice, or anyone in `ops`".
    pub fn wants(&self, e: &Event) -> bool {
        if !self.kinds.is_empty() && !self.kinds.contains(&e.event) {
            return false;
        }
        if self.users.is_empty() && self.groups.is_empty() && self.roles.is_empty() {
            return true;
        }
        self.users.contains(&*e.user)
            || e.groups.iter().any(|g| self.groups.contains(&**g))
            || e.roles.iter().any(|r| self.roles.contains(&**r))
    }
}

/// A webhook's events: waiting, and the batch in flight.
#[derive(Debug)]
pub struct Queue {
    waiting: VecDeque<Event>,
    in_flight: Vec<Event>,
    max_queue: usize,
    dropped: u64,
}

impl Queue {
    /// `max_queue`: events held in all (waiting and in flight); at least 2.
    pub fn new(max_queue: usize) -> Queue {
        Queue {
            waiting: VecDeque::new(),
            in_flight: Vec::new(),
            max_queue: max_queue.max(2),
            dropped: 0,
        }
    }

    /// Adds `e`; past `max_queue`, drops the oldest waiting event (never one in flight: it may
    /// have been received already) and returns true.
    pub fn push(&mut self, e: Event) -> bool {
        let mut dropped = false;
        if self.waiting.len() + self.in_flight.len() >= self.max_queue && !self.waiting.is_empty() {
            self.waiting.pop_front();
            self.dropped += 1;
            dropped = true;
        }
        if self.waiting.len() + self.in_flight.len() >= self.max_queue {
            // Everything held is in flight (a batch as large as the queue): the new one goes.
            self.dropped += 1;
            return true;
        }
        self.waiting.push_back(e);
        dropped
    }

    /// The batch to send: the one in flight (again, after a failure), or the next `max` waiting.
    pub fn batch(&mut self, max: usize) -> &[Event] {
        if self.in_flight.is_empty() {
            let n = self.waiting.len().min(max.max(1));
            self.in_flight.extend(self.waiting.drain(..n));
        }
        &self.in_flight
    }

    /// The receiver acknowledged the batch in flight.
    pub fn acked(&mut self) -> usize {
        let n = self.in_flight.len();
        self.in_flight.clear();
        n
    }

    pub fn len(&self) -> usize {
        self.waiting.len() + self.in_flight.len()
    }

    /// A batch is out, not yet acknowledged.
    pub fn has_in_flight(&self) -> bool {
        !self.in_flight.is_empty()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

/// How a webhook's body is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// `{"events": [...]}`.
    #[default]
    Json,
    /// A Slack-compatible incoming-webhook message: `{"text": "alice (admin) is online"}`, one
    /// line per event.
    Slack,
}

/// The request body for `events`.
pub fn body(format: Format, events: &[Event]) -> Vec<u8> {
    match format {
        Format::Json => {
            serde_json::to_vec(&serde_json::json!({ "events": events })).expect("events serialise")
        }
        Format::Slack => {
            let text = events.iter().map(line).collect::<Vec<_>>().join("\n");
            serde_json::to_vec(&serde_json::json!({ "text": text })).expect("text serialises")
        }
    }
}

/// One event as a sentence: "alice (admin) is online", "bob is busy: in a call".
pub fn line(e: &Event) -> String {
    let who = if e.roles.is_empty() {
        e.user.to_string()
    } else {
        let roles: Vec<&str> = e.roles.iter().map(|r| &**r).collect();
        format!("{} ({})", e.user, roles.join(", "))
    };
    let status = e.status.unwrap_or("online");
    let text = e
        .text
        .as_deref()
        .map_or(String::new(), |t| format!(": {t}"));
    match e.event {
        Kind::UserOnline | Kind::StatusChange => format!("{who} is {status}{text}"),
        Kind::UserOffline => format!("{who} is offline"),
        Kind::SessionStart => format!(
            "{who} opened a session{}",
            e.device_type.map_or(String::new(), |t| format!(" on {t}"))
        ),
        Kind::SessionEnd => format!("{who} closed a session"),
    }
}

/// `X-Presenced-Signature`: `sha256=` and the hex HMAC-SHA256, under `secret`, of
/// `"{timestamp}.{body}"` (the timestamp is `X-Presenced-Timestamp`, seconds since the epoch).
pub fn signature(secret: &[u8], timestamp: u64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;

    fn ev(n: u64, user: &str, kind: Kind) -> Event {
        Event {
            id: format!("x-0-{n}"),
            node: None,
            event: kind,
            user: user.into(),
            seq: n,
            ts: 1_700_000_000_000 + n,
            status: Some("online"),
            text: None,
            devices: Some(1),
            session: None,
            device: None,
            device_type: None,
            region: None,
            groups: Arc::from([]),
            roles: Arc::from([]),
        }
    }

    #[test]
    fn the_signature_is_hmac_sha256_of_timestamp_dot_body() {
        // RFC 4231 test case 2's key and a body, checked against Python's hmac module:
        // hmac.new(b"Jefe", b"1700000000.{}", "sha256").hexdigest()
        let sig = signature(b"Jefe", 1_700_000_000, b"{}");
        assert_eq!(
            sig,
            "sha256=d3793e2b4103edfbd98cc19591832f5fad701d413db9fcae0ae7dab8184ed207"
        );
        assert_ne!(
            sig,
            signature(b"Jefe", 1_700_000_001, b"{}"),
            "the timestamp counts"
        );
        assert_ne!(
            sig,
            signature(b"Jeff", 1_700_000_000, b"{}"),
            "the key counts"
        );
    }

    #[test]
    fn filters_take_kinds_then_any_of_users_groups_roles() {
        let mut e = ev(1, "alice", Kind::UserOnline);
        assert!(Filter::default().wants(&e), "no filter: everything");
        let kinds = Filter {
            kinds: [Kind::UserOffline].into(),
            ..Filter::default()
        };
        assert!(!kinds.wants(&e));
        let ops = Filter {
            groups: ["ops".to_string()].into(),
            users: ["bob".to_string()].into(),
            ..Filter::default()
        };
        assert!(!ops.wants(&e));
        e.groups = Arc::from([crate::presence::GroupId::from("ops")]);
        assert!(ops.wants(&e));
        assert!(ops.wants(&ev(2, "bob", Kind::SessionEnd)));
        let admins = Filter {
            roles: ["admin".to_string()].into(),
            ..Filter::default()
        };
        e.roles = Arc::from([Arc::<str>::from("admin")]);
        assert!(admins.wants(&e));
    }

    #[test]
    fn slack_lines_read_as_sentences() {
        let mut e = ev(1, "alice", Kind::UserOnline);
        e.roles = Arc::from([Arc::<str>::from("admin")]);
        assert_eq!(line(&e), "alice (admin) is online");
        let mut busy = ev(2, "bob", Kind::StatusChange);
        busy.status = Some("busy");
        busy.text = Some("in a call".into());
        assert_eq!(line(&busy), "bob is busy: in a call");
        assert_eq!(line(&ev(3, "bob", Kind::UserOffline)), "bob is offline");
        let body = body(Format::Slack, &[e, busy]);
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["text"], "alice (admin) is online\nbob is busy: in a call");
    }

    proptest! {
        /// Against a model: events leave in the order they came, a batch is resent until
        /// acknowledged, at most `max_queue` are held, and every drop is of the oldest waiting
        /// event and is counted.
        #[test]
        fn the_queue_keeps_order_bounds_and_counts(
            max_queue in 2..20usize,
            batch_max in 1..8usize,
            ops in proptest::collection::vec(0..4u8, 0..300),
        ) {
            let mut q = Queue::new(max_queue);
            let mut model_waiting: VecDeque<u64> = VecDeque::new();
            let mut model_flight: Vec<u64> = Vec::new();
            let mut dropped = 0u64;
            let mut delivered: Vec<u64> = Vec::new();
            let mut n = 0u64;
            for op in ops {
                match op {
                    0 | 1 => {
                        n += 1;
                        if model_waiting.len() + model_flight.len() >= max_queue {
                            if model_waiting.pop_front().is_some() {
                                dropped += 1;
                                model_waiting.push_back(n);
                            } else {
                                dropped += 1;
                            }
                        } else {
                            model_waiting.push_back(n);
                        }
                        q.push(ev(n, "u", Kind::StatusChange));
                    }
                    2 => {
                        if model_flight.is_empty() {
                            let k = model_waiting.len().min(batch_max);
                            model_flight.extend(model_waiting.drain(..k));
                        }
                        let got: Vec<u64> = q.batch(batch_max).iter().map(|e| e.seq).collect();
                        prop_assert_eq!(&got, &model_flight);
                    }
                    _ => {
                        delivered.append(&mut model_flight);
                        q.acked();
                    }
                }
                prop_assert!(q.len() <= max_queue);
                prop_assert_eq!(q.len(), model_waiting.len() + model_flight.len());
                prop_assert_eq!(q.dropped(), dropped);
            }
            prop_assert!(delivered.windows(2).all(|w| w[0] < w[1]), "in order: {:?}", delivered);
        }
    }
}
