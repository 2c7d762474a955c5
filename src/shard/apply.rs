//! What a client op means: [`Shard::submit`] (budget, panic containment) and [`Shard::apply`]
//! (the op itself), with the subscription bookkeeping they share. No socket here: the unit
//! tests call `apply` directly.

use std::panic::AssertUnwindSafe;

use super::budget::OpVerdict;
use super::mesh::MeshMsg;
use super::outbox::Key;
use super::session::{CloseRequest, Session, SubState};
use super::{now_ms, remove_sub, Shard};
use crate::metrics::ShardMetrics;
use crate::presence::{GroupId, Status, UserId};
use crate::protocol::ops::{ErrorCode, Op, OpError, Request};
use crate::protocol::{events, RequestId};

impl Shard {
    /// One decoded client message: counted, budgeted, then applied. A panic while applying it
    /// closes this session (1011) and repairs what the op may have left half-done
    /// ([`Shard::repair_after_panic`]); the shard and every other session go on.
    pub fn submit(&self, session: &Session, parsed: Result<Request, OpError>) {
        ShardMetrics::inc(&self.metrics.ops);
        if session.closing() {
            return; // on its way out: nothing more is applied
        }
        let verdict = session
            .budget
            .borrow_mut()
            .op(self.cfg.limits.ops_per_second, now_ms());
        match (verdict, parsed) {
            (OpVerdict::Allow, Ok(req)) => {
                let applied =
                    std::panic::catch_unwind(AssertUnwindSafe(|| self.apply(session, req)));
                if applied.is_err() {
                    self.repair_after_panic(session);
                }
            }
            (OpVerdict::Allow, Err(e)) => {
                ShardMetrics::inc(&self.metrics.ops_invalid);
                session.reply_error(e.id.as_ref(), e.code, &e.message);
            }
            (OpVerdict::Limited, parsed) => {
                ShardMetrics::inc(&self.metrics.ops_rate_limited);
                let id = match &parsed {
                    Ok(req) => req.id.as_ref(),
                    Err(e) => e.id.as_ref(),
                };
                session.reply_error(id, ErrorCode::RateLimited, "too many ops: slow down");
            }
            (OpVerdict::Abuse, _) => {
                ShardMetrics::inc(&self.metrics.rate_abuse_closes);
                // The replies already queued (acks, `rate_limited` errors) go out first.
                session.request_close(CloseRequest {
                    code: 4008,
                    reason: "rate limit abuse",
                    flush_ms: self.cfg.limits.close_flush_ms,
                });
            }
        }
    }

    /// The meaning of one op, applied to this session and the shard (no budget check: see
    /// [`Shard::submit`]). Replies go to the session's outbox.
    pub fn apply(&self, session: &Session, req: Request) {
        if session.closing() || session.closed.get() {
            return;
        }
        #[cfg(feature = "fault-injection")]
        match &req.op {
            Op::Activity { kind, .. } => assert!(
                &**kind != super::faults::PANIC_IN_OP,
                "fault injection: panic while handling an op"
            ),
            Op::SetStatus { text: Some(t), .. } if &**t == super::faults::PANIC_IN_PUBLISH => {
                self.panic_in_publish.set(true);
            }
            _ => {}
        }
        let id = req.id.as_ref();
        let m = &self.metrics;
        ShardMetrics::inc(match &req.op {
            Op::Subscribe(_) => &m.ops_subscribe,
            Op::Unsubscribe(_) => &m.ops_unsubscribe,
            Op::SubscribeGroup(_) => &m.ops_subscribe_group,
            Op::UnsubscribeGroup(_) => &m.ops_unsubscribe_group,
            Op::SetStatus { .. } => &m.ops_set_status,
            Op::Activity { .. } => &m.ops_activity,
            Op::Refresh(_) => &m.ops_refresh,
            Op::Ping => &m.ops_ping,
        });
        if session.observer.is_some()
            && matches!(
                req.op,
                Op::SetStatus { .. } | Op::Activity { .. } | Op::Refresh(_)
            )
        {
            let msg = "read-only impersonation: this session cannot change anything";
            return session.reply_error(id, ErrorCode::Forbidden, msg);
        }
        match req.op {
            Op::Subscribe(users) => self.op_subscribe(session, id, &users),
            Op::Unsubscribe(users) => {
                self.unwatch_users(session, &users);
                session.push_reply(events::ack(id));
            }
            Op::SubscribeGroup(group) => self.op_subscribe_group(session, id, &group),
            Op::UnsubscribeGroup(group) => {
                self.unwatch_group(session, &group);
                session.push_reply(events::ack(id));
            }
            Op::SetStatus { status, text } => {
                let change = self.registry.borrow_mut().set_status(
                    &session.user,
                    session.id,
                    status,
                    text,
                    now_ms(),
                );
                self.hand_to_bridge();
                self.forward_to_new(&session.user);
                match change {
                    Ok(change) => {
                        session.status.set(status);
                        session.push_reply(events::ack(id));
                        if let Some(change) = change {
                            self.publish(change);
                        }
                    }
                    // Only a session open in the registry reaches here (observers are refused
                    // above, closed sessions at the top); if that invariant breaks, say so to
                    // the client rather than take the shard down.
                    Err(e) => {
                        tracing::error!(session = %session.id, error = %e,
                            "set_status for a session the registry does not know");
                        session.reply_error(id, ErrorCode::BadRequest, "session not registered");
                    }
                }
            }
            Op::Activity { kind, to } => {
                if session.status.get() == Status::Invisible {
                    let msg = "invisible sessions cannot send activity";
                    return session.reply_error(id, ErrorCode::Forbidden, msg);
                }
                session.push_reply(events::ack(id));
                self.send_activity(&session.user, kind, to);
            }
            Op::Refresh(token) => match self.verifier.verify_refresh(&token, &session.user) {
                Ok(claims) => {
                    let mut expiries = self.expiries.borrow_mut();
                    expiries.remove(&(session.expires_at.get(), session.id));
                    expiries.insert((claims.exp, session.id));
                    session.expires_at.set(claims.exp);
                    session.push_reply(events::ack(id));
                }
                Err(e) => session.reply_error(id, ErrorCode::Forbidden, e.reason()),
            },
            Op::Ping => session.push_reply(events::pong(id, now_ms())),
        }
    }

    fn op_subscribe(&self, session: &Session, id: Option<&RequestId>, users: &[UserId]) {
        let mut fresh: Vec<&UserId> = {
            let watching = session.watching.borrow();
            users.iter().filter(|u| !watching.contains_key(u)).collect()
        };
        fresh.sort_unstable();
        fresh.dedup();
        if self.admit_subscriptions(session, id, fresh.len()) {
            session.push_reply(events::ack(id));
            self.watch_users(session, &fresh);
        }
    }

    fn op_subscribe_group(&self, session: &Session, id: Option<&RequestId>, group: &GroupId) {
        let fresh = usize::from(!session.watching_groups.borrow().contains_key(group));
        if self.admit_subscriptions(session, id, fresh) {
            session.push_reply(events::ack(id));
            if fresh == 1 {
                self.watch_group(session, group);
            }
        }
    }

    /// Whether `n` new subscriptions may be taken, all or none: within `max_subscriptions`,
    /// the mesh not congested (load shedding), and within the id budget. Otherwise the error is
    /// replied and false returned; nothing has been applied either way.
    fn admit_subscriptions(&self, session: &Session, id: Option<&RequestId>, n: usize) -> bool {
        if n == 0 {
            return true; // all already held: an ack, nothing new
        }
        let limits = &self.cfg.limits;
        let max_subs = limits.max_subscriptions;
        if self.held(session) + n > max_subs {
            let msg = format!("at most {max_subs} subscriptions per connection");
            session.reply_error(id, ErrorCode::TooManySubscriptions, &msg);
            return false;
        }
        if self.mesh.congested() {
            ShardMetrics::inc(&self.metrics.ops_overloaded);
            let msg = "the server is shedding load: nothing was subscribed, retry later";
            session.reply_error(id, ErrorCode::Overloaded, msg);
            return false;
        }
        let granted = self.subscriptions.borrow_mut().take(
            &session.user,
            u32::try_from(n).unwrap_or(u32::MAX),
            now_ms(),
        );
        if !granted {
            ShardMetrics::inc(&self.metrics.ops_rate_limited);
            let msg = format!(
                "too many new subscriptions: at most {} ids per second (nothing was subscribed)",
                limits.subscriptions_per_second
            );
            session.reply_error(id, ErrorCode::RateLimited, &msg);
            return false;
        }
        true
    }

    /// Subscriptions a session holds (users and groups).
    fn held(&self, session: &Session) -> usize {
        session.watching.borrow().len() + session.watching_groups.borrow().len()
    }

    /// Subscribes to users not yet watched: mark pending, ask each owner for a snapshot.
    fn watch_users(&self, session: &Session, users: &[&UserId]) {
        let mut watching = session.watching.borrow_mut();
        for &user in users {
            let gen = session.next_gen();
            // Share the shard's copy of the id when it has one: one allocation per watched
            // user per shard, not one per subscription.
            let key = self
                .user_subs
                .borrow()
                .get_key_value(&**user)
                .map_or_else(|| user.clone(), |(k, _)| k.clone());
            watching.insert(key, SubState::Pending(gen));
            self.send(
                self.owner(user),
                MeshMsg::Watch {
                    user: user.clone(),
                    from: self.ix,
                    session: session.id,
                    gen,
                },
            );
        }
        watching.shrink();
    }

    fn unwatch_users(&self, session: &Session, users: &[UserId]) {
        for user in users {
            let Some(state) = session.watching.borrow_mut().remove(user) else {
                continue;
            };
            self.drop_user_sub(session, user, state);
        }
        session.watching.borrow_mut().shrink();
    }

    /// Undoes one subscription to `user`, already taken out of `session.watching`: the local
    /// subscriber list, its queued events, and the owner's watcher count.
    pub(super) fn drop_user_sub(&self, session: &Session, user: &UserId, state: SubState) {
        if state == SubState::Live {
            remove_sub(&mut self.user_subs.borrow_mut(), user, session.id);
        }
        session.cancel(&Key::Presence(user.clone(), None));
        session.cancel(&Key::Activity(user.clone()));
        self.send(
            self.owner(user),
            MeshMsg::Unwatch {
                user: user.clone(),
                from: self.ix,
            },
        );
    }

    fn watch_group(&self, session: &Session, group: &GroupId) {
        let gen = session.next_gen();
        session
            .watching_groups
            .borrow_mut()
            .insert(group.clone(), SubState::Pending(gen));
        self.send(
            self.owner(group),
            MeshMsg::WatchGroup {
                group: group.clone(),
                from: self.ix,
                session: session.id,
                gen,
            },
        );
    }

    fn unwatch_group(&self, session: &Session, group: &GroupId) {
        let Some(state) = session.watching_groups.borrow_mut().remove(group) else {
            return;
        };
        self.drop_group_sub(session, group, state);
    }

    /// Undoes one subscription to `group`, already taken out of `session.watching_groups`.
    pub(super) fn drop_group_sub(&self, session: &Session, group: &GroupId, state: SubState) {
        if state == SubState::Live {
            remove_sub(&mut self.group_subs.borrow_mut(), group, session.id);
        }
        // Every queued event of this feed goes: one left behind could overtake the snapshot of
        // a later re-subscription.
        session.cancel_where(|k| match k {
            Key::GroupSnapshot(g) => g == group,
            Key::Presence(_, Some(g)) => g == group,
            _ => false,
        });
        self.send(
            self.owner(group),
            MeshMsg::UnwatchGroup {
                group: group.clone(),
                from: self.ix,
            },
        );
    }
}

#[cfg(test)]
#[path = "apply_tests.rs"]
mod tests;
