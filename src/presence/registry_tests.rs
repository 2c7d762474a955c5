//! Unit tests and a proptest reference model for the registry.

use super::*;
use proptest::prelude::*;
use std::net::Ipv4Addr;

fn info(groups: &[&str]) -> SessionInfo {
    SessionInfo {
        device: None,
        device_type: DeviceType::Web,
        region: None,
        groups: groups.iter().map(|g| GroupId::from(*g)).collect(),
        roles: Arc::from([]),
        ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        connected_at_ms: 0,
    }
}

fn uid(s: &str) -> UserId {
    UserId::from(s)
}

fn sid(n: u64) -> crate::presence::SessionId {
    crate::presence::SessionId::from_raw(n)
}

#[test]
fn two_devices_then_offline_with_last_seen() {
    let mut r = Registry::new();
    let alice = uid("alice");
    let c1 = r
        .connect(&alice, sid(1), Status::Online, info(&[]), 10)
        .unwrap();
    assert_eq!((c1.state.devices, c1.state.seq), (1, 1));
    let c2 = r
        .connect(&alice, sid(2), Status::Online, info(&[]), 20)
        .unwrap();
    assert_eq!((c2.state.devices, c2.state.seq), (2, 2));
    let c3 = r.disconnect("alice", sid(1), Hold::None, 30).unwrap();
    assert_eq!(c3.state.status, Aggregate::Online);
    assert_eq!(c3.state.last_seen, None);
    let c4 = r.disconnect("alice", sid(2), Hold::None, 40).unwrap();
    assert_eq!(c4.state.status, Aggregate::Offline);
    assert_eq!(c4.state.last_seen, Some(40));
    assert_eq!(c4.state.seq, 4);
    // Remembered while offline: a later subscriber sees last_seen and the same seq.
    let snap = r.snapshot(&alice, 50);
    assert_eq!((snap.seq, snap.last_seen, snap.ts), (4, Some(40), 40));
}

#[test]
fn a_users_first_session_takes_room_for_one() {
    // Memory per connection (docs/BENCHMARKS.md, "Issue 14"): a first `push` would make room
    // for four sessions, and most users have one device.
    let mut r = Registry::new();
    let alice = uid("alice");
    r.connect(&alice, sid(1), Status::Online, info(&[]), 10);
    assert_eq!(r.users.get("alice").unwrap().sessions.capacity(), 1);
    // A second device still fits (the vector grows as usual).
    r.connect(&alice, sid(2), Status::Online, info(&[]), 20);
    assert_eq!(r.users.get("alice").unwrap().sessions.len(), 2);
}

#[test]
fn invisible_hides_and_ranking_is_online_busy_away() {
    let mut r = Registry::new();
    let bob = uid("bob");
    assert!(r
        .connect(&bob, sid(1), Status::Invisible, info(&[]), 1)
        .is_none());
    assert_eq!(r.snapshot(&bob, 1).status, Aggregate::Offline);
    let c = r
        .set_status("bob", sid(1), Status::Away, None, 2)
        .unwrap()
        .unwrap();
    assert_eq!(c.state.status, Aggregate::Away);
    let c = r.connect(&bob, sid(2), Status::Busy, info(&[]), 3).unwrap();
    assert_eq!(c.state.status, Aggregate::Busy);
    let c = r
        .connect(&bob, sid(3), Status::Online, info(&[]), 4)
        .unwrap();
    assert_eq!(c.state.status, Aggregate::Online);
    let c = r
        .set_status("bob", sid(3), Status::Invisible, None, 5)
        .unwrap()
        .unwrap();
    assert_eq!((c.state.status, c.state.devices), (Aggregate::Busy, 2));
}

#[test]
fn text_follows_the_deciding_session_and_same_state_is_no_change() {
    let mut r = Registry::new();
    let u = uid("u");
    r.connect(&u, sid(1), Status::Online, info(&[]), 1);
    let c = r
        .set_status("u", sid(1), Status::Online, Some("lunch".into()), 2)
        .unwrap()
        .unwrap();
    assert_eq!(c.state.text.as_deref(), Some("lunch"));
    let again = r.set_status("u", sid(1), Status::Online, Some("lunch".into()), 3);
    assert_eq!(again, Ok(None), "no seq for a no-op");
    assert_eq!(
        r.set_status("u", sid(9), Status::Away, None, 4),
        Err(RegistryError::UnknownSession)
    );
}

#[test]
fn watchers_are_reported_and_counted() {
    let mut r = Registry::new();
    let u = uid("u");
    let snap = r.watch(&u, 3, 7);
    assert_eq!((snap.seq, snap.status, snap.ts), (0, Aggregate::Offline, 7));
    r.watch(&u, 3, 7);
    r.watch(&u, 1, 7);
    let c = r.connect(&u, sid(1), Status::Online, info(&[]), 8).unwrap();
    assert_eq!(c.watchers, vec![3, 1]);
    assert!(r.unwatch("u", 3));
    assert!(r.unwatch("u", 3));
    assert!(!r.unwatch("u", 3));
    assert_eq!(r.watchers("u"), vec![1]);
}

#[test]
fn never_seen_watched_user_is_forgotten_on_unwatch() {
    let mut r = Registry::new();
    r.watch(&uid("ghost"), 0, 1);
    assert_eq!(r.user_count(), 1);
    r.unwatch("ghost", 0);
    assert_eq!(r.user_count(), 0);
}

#[test]
fn group_membership_follows_visible_sessions() {
    let mut r = Registry::new();
    let u = uid("u");
    let c = r
        .connect(&u, sid(1), Status::Online, info(&["a", "b"]), 1)
        .unwrap();
    assert_eq!(c.groups, vec![("a".into(), true), ("b".into(), true)]);
    let c = r
        .connect(&u, sid(2), Status::Online, info(&["c"]), 2)
        .unwrap();
    assert_eq!(c.groups.len(), 3);
    let c = r
        .set_status("u", sid(1), Status::Invisible, None, 3)
        .unwrap()
        .unwrap();
    let mut g = c.groups.clone();
    g.sort();
    assert_eq!(
        g,
        vec![("a".into(), false), ("b".into(), false), ("c".into(), true)]
    );
    let left = c.state.left_group();
    assert_eq!(
        (left.status, left.devices, left.seq),
        (Aggregate::Offline, 0, c.state.seq)
    );
}

// ---- Reference model -------------------------------------------------------------------------

#[derive(Clone, Debug)]
enum Op {
    Connect {
        user: u8,
        status: Status,
        groups: u8,
    },
    Disconnect {
        user: u8,
        nth: u8,
    },
    SetStatus {
        user: u8,
        nth: u8,
        status: Status,
        text: Option<u8>,
    },
    Watch {
        user: u8,
        shard: u8,
    },
    Unwatch {
        user: u8,
        shard: u8,
    },
}

fn status() -> impl Strategy<Value = Status> {
    prop_oneof![
        Just(Status::Online),
        Just(Status::Away),
        Just(Status::Busy),
        Just(Status::Invisible)
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..4u8, status(), 0..4u8).prop_map(|(user, status, groups)| Op::Connect {
            user,
            status,
            groups
        }),
        (0..4u8, 0..4u8).prop_map(|(user, nth)| Op::Disconnect { user, nth }),
        (0..4u8, 0..4u8, status(), proptest::option::of(0..3u8)).prop_map(
            |(user, nth, status, text)| Op::SetStatus {
                user,
                nth,
                status,
                text
            }
        ),
        (0..4u8, 0..3u8).prop_map(|(user, shard)| Op::Watch { user, shard }),
        (0..4u8, 0..3u8).prop_map(|(user, shard)| Op::Unwatch { user, shard }),
    ]
}

/// The simplest possible model: a flat list of sessions, aggregate recomputed from scratch.
#[derive(Default)]
struct Model {
    /// (user, session id, status, text, order of last status change, groups bitmask)
    sessions: Vec<(u8, u64, Status, Option<u8>, u64, u8)>,
    seq: [u64; 4],
    last_seen: [Option<u64>; 4],
    watches: Vec<(u8, u8)>,
    last: [(Aggregate, Option<u8>, u32, u8); 4],
}

impl Model {
    fn view(&self, user: u8) -> (Aggregate, Option<u8>, u32, u8) {
        let vis: Vec<_> = self
            .sessions
            .iter()
            .filter(|s| s.0 == user && s.2 != Status::Invisible)
            .collect();
        let Some(top) = vis.iter().max_by_key(|s| (s.2.visible().unwrap(), s.4)) else {
            return (Aggregate::Offline, None, 0, 0);
        };
        let groups = vis.iter().fold(0, |m, s| m | s.5);
        (top.2.visible().unwrap(), top.3, vis.len() as u32, groups)
    }
}

fn group_set(mask: u8) -> Vec<&'static str> {
    ["g0", "g1"]
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, g)| *g)
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]
    #[test]
    fn registry_matches_reference_model(ops in proptest::collection::vec(op(), 1..80)) {
        let mut reg = Registry::new();
        let mut model = Model::default();
        let users: Vec<UserId> = (0..4).map(|i| uid(&format!("u{i}"))).collect();
        let mut next_id = 0u64;
        for (step, op) in ops.into_iter().enumerate() {
            let now = 100 + step as u64;
            let (user, change) = match op {
                Op::Connect { user, status, groups } => {
                    next_id += 1;
                    model.sessions.push((user, next_id, status, None, step as u64, groups));
                    let c = reg.connect(&users[user as usize], sid(next_id), status, info(&group_set(groups)), now);
                    (user, c)
                }
                Op::Disconnect { user, nth } => {
                    let ids: Vec<u64> = model.sessions.iter().filter(|s| s.0 == user).map(|s| s.1).collect();
                    if ids.is_empty() { continue; }
                    let id = ids[nth as usize % ids.len()];
                    model.sessions.retain(|s| s.1 != id);
                    (user, reg.disconnect(&users[user as usize], sid(id), Hold::None, now))
                }
                Op::SetStatus { user, nth, status, text } => {
                    let ids: Vec<u64> = model.sessions.iter().filter(|s| s.0 == user).map(|s| s.1).collect();
                    if ids.is_empty() { continue; }
                    let id = ids[nth as usize % ids.len()];
                    let s = model.sessions.iter_mut().find(|s| s.1 == id).unwrap();
                    s.2 = status;
                    s.3 = text;
                    s.4 = step as u64;
                    let text = text.map(|t| Arc::<str>::from(format!("t{t}")));
                    (user, reg.set_status(&users[user as usize], sid(id), status, text, now).unwrap())
                }
                Op::Watch { user, shard } => {
                    model.watches.push((user, shard));
                    let snap = reg.watch(&users[user as usize], shard as u16, now);
                    prop_assert_eq!(snap.seq, model.seq[user as usize]);
                    prop_assert_eq!(snap.last_seen, model.last_seen[user as usize]);
                    continue;
                }
                Op::Unwatch { user, shard } => {
                    let known = model.watches.iter().position(|w| *w == (user, shard));
                    if let Some(p) = known { model.watches.remove(p); }
                    prop_assert_eq!(reg.unwatch(&users[user as usize], shard as u16), known.is_some());
                    continue;
                }
            };
            let online = (0..4u8).filter(|u| model.view(*u).2 > 0).count();
            prop_assert_eq!(reg.online_users(), online, "online count at step {}", step);
            // The ordered index holds exactly the visible users, in id order.
            let listed: Vec<String> = reg.online_after(None, now).map(|v| v.user.to_string()).collect();
            let expect: Vec<String> = (0..4u8).filter(|u| model.view(*u).2 > 0).map(|u| format!("u{u}")).collect();
            prop_assert_eq!(listed, expect);
            let u = user as usize;
            let before = model.last[u];
            let after = model.view(user);
            if before == after {
                prop_assert!(change.is_none(), "no change expected at step {}", step);
                continue;
            }
            let change = change.expect("a change of the view must be reported");
            model.seq[u] += 1;
            if before.0 != Aggregate::Offline && after.0 == Aggregate::Offline {
                model.last_seen[u] = Some(now);
            }
            model.last[u] = after;
            prop_assert_eq!(change.state.seq, model.seq[u]);
            prop_assert_eq!(change.state.status, after.0);
            prop_assert_eq!(change.state.text.as_deref().map(str::to_owned), after.1.map(|t| format!("t{t}")));
            prop_assert_eq!(change.state.devices, after.2);
            prop_assert_eq!(change.state.last_seen, model.last_seen[u]);
            let mut shards: Vec<u16> = model.watches.iter().filter(|w| w.0 == user).map(|w| w.1 as u16).collect();
            shards.sort();
            shards.dedup();
            let mut got = change.watchers.clone();
            got.sort();
            prop_assert_eq!(got, shards);
            // Every group in before ∪ after is reported, with membership per `after`.
            let mut expect_groups: Vec<(GroupId, bool)> = group_set(before.3 | after.3)
                .into_iter()
                .map(|g| (GroupId::from(g), group_set(after.3).contains(&g)))
                .collect();
            expect_groups.sort();
            let mut got_groups = change.groups.clone();
            got_groups.sort();
            prop_assert_eq!(got_groups, expect_groups);
        }
        // Totals agree at the end.
        prop_assert_eq!(reg.session_count(), model.sessions.len());
        let online = (0..4u8).filter(|u| model.view(*u).2 > 0).count();
        prop_assert_eq!(reg.online_users(), online);
    }
}

#[test]
fn rebuild_recounts_and_republishes() {
    let mut reg = Registry::new();
    let a = uid("a");
    reg.connect(&a, sid(1), Status::Online, info(&[]), 1);
    reg.connect(&a, sid(2), Status::Away, info(&[]), 1);
    reg.watch(&a, 3, 1);
    let seq = reg.snapshot(&a, 2).seq;
    // Session 2 is gone (its close was cut short): the rebuild drops it, counts again and
    // publishes a new seq to the watchers.
    let c = reg
        .rebuild("a", sid(2), 5)
        .expect("always a change for a known user");
    assert_eq!(c.state.seq, seq + 1);
    assert_eq!(c.state.devices, 1);
    assert_eq!(c.watchers, vec![3]);
    assert_eq!(reg.session_count(), 1);
    assert_eq!(reg.online_users(), 1);
    let c = reg.rebuild("a", sid(1), 6).unwrap();
    assert_eq!(c.state.status, Aggregate::Offline);
    assert_eq!(c.state.last_seen, Some(6));
    assert_eq!((reg.session_count(), reg.online_users()), (0, 0));
    assert!(reg.rebuild("nobody", sid(9), 7).is_none());
}

#[test]
fn online_scan_resumes_after_any_id() {
    let mut reg = Registry::new();
    for (i, u) in ["d", "b", "a", "c"].iter().enumerate() {
        reg.connect(&uid(u), sid(i as u64 + 1), Status::Online, info(&[]), 1);
    }
    let after = |a: Option<&str>| -> Vec<String> {
        reg.online_after(a, 1).map(|v| v.user.to_string()).collect()
    };
    assert_eq!(after(None), ["a", "b", "c", "d"]);
    assert_eq!(after(Some("b")), ["c", "d"]);
    assert_eq!(
        after(Some("bb")),
        ["c", "d"],
        "a cursor need not be a current user"
    );
    assert!(after(Some("d")).is_empty());
}

// --- The cluster: shares heard from other nodes (SPEC §12). ---

fn replicated() -> Registry {
    Registry::replicated(Arc::new(crate::presence::contrib::Hlc::new()), 64)
}

fn share(status: Aggregate, devices: u32, clock: u64) -> Contribution {
    Contribution {
        status,
        text: None,
        devices,
        groups: Vec::new(),
        last_seen: None,
        clock,
    }
}

#[test]
fn a_single_node_registry_hands_nothing_to_a_bridge() {
    let mut r = Registry::new();
    r.connect(&uid("a"), sid(1), Status::Online, info(&[]), 10);
    r.watch(&uid("b"), 0, 10);
    assert!(r.take_outgoing().is_empty());
    assert_eq!(
        r.apply_remote(&uid("a"), 1, share(Aggregate::Busy, 1, 5), 10),
        None,
        "remote shares mean nothing on a single node"
    );
}

#[test]
fn local_changes_become_shares_and_watch_interest_is_counted_per_user() {
    let mut r = replicated();
    let alice = uid("alice");
    r.connect(&alice, sid(1), Status::Online, info(&["g"]), 1_000);
    let out = r.take_outgoing();
    assert_eq!(out.shares.len(), 1);
    let (user, s) = &out.shares[0];
    assert_eq!((user, s.status, s.devices), (&alice, Aggregate::Online, 1));
    assert_eq!(s.groups, vec![GroupId::from("g")]);
    assert_eq!(crate::presence::contrib::Hlc::millis(s.clock), 1_000);
    // A second invisible session changes nothing visible: no share.
    r.connect(&alice, sid(2), Status::Invisible, info(&[]), 1_001);
    assert!(r.take_outgoing().shares.is_empty());
    // Interest: the first watcher of a user adds its bucket, the last removes it.
    let b = crate::presence::contrib::bucket_of("bob", 64);
    r.watch(&uid("bob"), 0, 1);
    r.watch(&uid("bob"), 1, 1);
    assert_eq!(r.take_outgoing().interest, vec![(b, 1)]);
    r.unwatch("bob", 0);
    assert!(r.take_outgoing().interest.is_empty());
    r.unwatch("bob", 1);
    assert_eq!(r.take_outgoing().interest, vec![(b, -1)]);
    // Going offline here is a share too, with last_seen.
    r.disconnect("alice", sid(1), Hold::None, 2_000);
    let out = r.take_outgoing();
    assert_eq!(out.shares[0].1.status, Aggregate::Offline);
    assert_eq!(out.shares[0].1.last_seen, Some(2_000));
}

#[test]
fn remote_shares_merge_with_local_sessions_and_seq_follows_the_clock() {
    let mut r = replicated();
    let alice = uid("alice");
    r.watch(&alice, 0, 0);
    r.connect(&alice, sid(1), Status::Away, info(&[]), 1_000);
    let local_seq = r.snapshot(&alice, 0).seq;
    let clock = 5_000 << crate::presence::contrib::HLC_LOGICAL_BITS;
    let c = r
        .apply_remote(&alice, 7, share(Aggregate::Busy, 2, clock), 1_001)
        .expect("a visible change");
    assert!(
        !c.local,
        "heard, not made here: history records it where it happened"
    );
    assert_eq!((c.state.status, c.state.devices), (Aggregate::Busy, 3));
    assert!(
        c.state.seq >= clock && c.state.seq > local_seq,
        "seq = the newest clock"
    );
    assert_eq!(c.watchers, vec![0]);
    // The same share again, or an older one: nothing.
    assert_eq!(
        r.apply_remote(&alice, 7, share(Aggregate::Busy, 2, clock), 1_002),
        None
    );
    assert_eq!(
        r.apply_remote(&alice, 7, share(Aggregate::Online, 9, clock - 1), 1_002),
        None
    );
    // A later local change still rises above it.
    let c = r
        .set_status("alice", sid(1), Status::Online, None, 1_003)
        .unwrap()
        .unwrap();
    assert!(
        c.state.seq > clock,
        "local clocks observe nothing yet, but seq never falls"
    );
}

#[test]
fn a_dead_node_takes_its_devices_and_sets_last_seen_to_its_last_heartbeat() {
    let mut r = replicated();
    let bob = uid("bob");
    r.watch(&bob, 0, 0);
    r.apply_remote(&bob, 1, share(Aggregate::Online, 1, 10), 100);
    r.apply_remote(&bob, 2, share(Aggregate::Away, 1, 11), 100);
    assert_eq!(r.online_users(), 1);
    let changes = r.drop_node(1, 4_242, 5_000);
    assert_eq!(changes.len(), 1);
    assert_eq!(
        (changes[0].state.status, changes[0].state.devices),
        (Aggregate::Away, 1)
    );
    let changes = r.drop_node(2, 4_343, 5_000);
    assert_eq!(changes[0].state.status, Aggregate::Offline);
    assert_eq!(changes[0].state.last_seen, Some(4_343));
    assert_eq!(
        r.online_users(),
        0,
        "the online index follows remote changes"
    );
    assert!(
        r.drop_node(2, 1, 1).is_empty(),
        "dropping twice changes nothing"
    );
}

#[test]
fn a_snapshot_puts_out_what_it_leaves_out_unless_newer() {
    let mut r = replicated();
    let (a, b, c) = (uid("a"), uid("b"), uid("c"));
    for u in [&a, &b, &c] {
        r.watch(u, 0, 0);
    }
    r.apply_remote(&a, 1, share(Aggregate::Online, 1, 10), 0);
    r.apply_remote(&b, 1, share(Aggregate::Online, 1, 10), 0);
    r.apply_remote(&c, 1, share(Aggregate::Online, 1, 30), 0);
    // The node's snapshot at clock 20 lists only `a` (with a newer share): `b` is gone there;
    // `c`'s share is newer than the snapshot, so it stays; users out of scope are untouched.
    let scope = SnapScope {
        users: &|u: &str| u != "zzz",
        groups: &|_: &GroupId| false,
        followed: &|_: &str| true,
        followed_groups: &|_: &GroupId| false,
    };
    let changes = r.apply_snapshot(
        1,
        vec![(a.clone(), share(Aggregate::Busy, 1, 15))],
        &scope,
        20,
        100,
    );
    let got: Vec<(String, Aggregate)> = changes
        .iter()
        .map(|c| (c.state.user.to_string(), c.state.status))
        .collect();
    assert!(got.contains(&("a".into(), Aggregate::Busy)), "{got:?}");
    assert!(got.contains(&("b".into(), Aggregate::Offline)), "{got:?}");
    assert_eq!(got.len(), 2, "{got:?}");
    assert_eq!(r.snapshot(&c, 0).status, Aggregate::Online);
    // Forgetting a bucket drops what was heard there.
    let changes = r.retain_remote(&|u, _| u != "c", 200);
    assert_eq!(changes.len(), 1);
    assert_eq!(r.snapshot(&c, 0).status, Aggregate::Offline);
    assert_eq!(
        r.remote_share_count(),
        2,
        "a's share and b's tombstone remain"
    );
    assert_eq!(
        r.local_shares(&|_, _| true),
        vec![],
        "nothing of this node's own"
    );
}

#[test]
fn local_shares_are_what_a_snapshot_of_this_node_sends() {
    let mut r = replicated();
    r.connect(&uid("x"), sid(1), Status::Busy, info(&[]), 10);
    r.connect(&uid("y"), sid(2), Status::Invisible, info(&[]), 10);
    r.apply_remote(&uid("z"), 3, share(Aggregate::Online, 1, 5), 10);
    let shares = r.local_shares(&|_, _| true);
    assert_eq!(shares.len(), 1, "visible local users only: {shares:?}");
    assert_eq!(shares[0].0, uid("x"));
    assert_eq!(shares[0].1.status, Aggregate::Busy);
    assert!(r.local_shares(&|u, _| u != "x").is_empty());
}

#[test]
fn a_group_bucket_snapshot_trims_groups_and_drops_what_only_a_group_kept() {
    let mut r = replicated();
    let grouped = |groups: &[&str], clock| Contribution {
        groups: groups.iter().map(|g| GroupId::from(*g)).collect(),
        ..share(Aggregate::Online, 1, clock)
    };
    let (a, b) = (uid("a"), uid("b"));
    r.apply_remote(&a, 1, grouped(&["g1", "g2"], 10), 0);
    r.apply_remote(&b, 1, grouped(&["g1"], 10), 0);
    // The node's snapshot of g1's bucket lists neither: both left g1 there. `a` is still in g2,
    // a followed group (its share stays, trimmed); `b` was held only for g1 and its own bucket
    // is not followed here, so its share goes.
    let scope = SnapScope {
        users: &|_: &str| false,
        groups: &|g: &GroupId| &**g == "g1",
        followed: &|_: &str| false,
        followed_groups: &|g: &GroupId| &**g == "g2",
    };
    let changes = r.apply_snapshot(1, Vec::new(), &scope, 20, 100);
    assert_eq!(changes.len(), 2);
    let a_now = r.view("a", 0).unwrap();
    assert_eq!(
        (a_now.status, a_now.groups),
        (Aggregate::Online, &[GroupId::from("g2")][..])
    );
    let c = changes.iter().find(|c| &*c.state.user == "a").unwrap();
    assert_eq!(
        c.groups,
        vec![(GroupId::from("g2"), true), (GroupId::from("g1"), false)]
    );
    assert_eq!(r.snapshot(&b, 0).status, Aggregate::Offline);
    // Retaining by interest: a share with no followed group and an unfollowed user goes.
    let changes = r.retain_remote(&|_, s| s.groups.iter().any(|g| &**g == "g9"), 200);
    assert_eq!(
        changes.len(),
        1,
        "a's share goes; b's tombstone goes silently"
    );
    assert_eq!(r.remote_share_count(), 0);
}

#[test]
fn a_share_left_only_with_unfollowed_groups_goes() {
    let mut r = replicated();
    let share = Contribution {
        groups: vec![GroupId::from("g1"), GroupId::from("g2")],
        ..share(Aggregate::Online, 1, 10)
    };
    r.apply_remote(&uid("a"), 1, share, 0);
    // g1's bucket snapshot leaves `a` out; g2 is not followed here, nor is `a`'s own bucket:
    // nothing would keep the share accurate, so it goes (it would otherwise stay online).
    let scope = SnapScope {
        users: &|_: &str| false,
        groups: &|g: &GroupId| &**g == "g1",
        followed: &|_: &str| false,
        followed_groups: &|_: &GroupId| false,
    };
    let changes = r.apply_snapshot(1, Vec::new(), &scope, 20, 100);
    assert_eq!(changes.len(), 1);
    assert_eq!(r.snapshot(&uid("a"), 0).status, Aggregate::Offline);
    assert_eq!(r.online_users(), 0);
}

/// The reconnect grace and the upgrade hand-over (issue 13): holds, re-attaching, expiry.
mod holds {
    use super::*;

    fn alice() -> UserId {
        UserId::from("alice")
    }

    #[test]
    fn a_held_last_session_is_reattached_without_a_change() {
        let mut r = Registry::new();
        r.watch(&alice(), 0, 1);
        r.connect(&alice(), sid(1), Status::Online, info(&[]), 10)
            .unwrap();
        r.set_status("alice", sid(1), Status::Away, Some("lunch".into()), 20)
            .unwrap()
            .unwrap();
        assert_eq!(r.disconnect("alice", sid(1), Hold::IfLast(1_000), 30), None);
        assert_eq!(r.held_count(), 1);
        assert_eq!(
            r.connect(&alice(), sid(2), Status::Online, info(&[]), 40),
            None
        );
        assert_eq!(r.held_count(), 0);
        let s = r.snapshot(&alice(), 50);
        assert_eq!(
            (s.status, s.text.as_deref(), s.devices),
            (Aggregate::Away, Some("lunch"), 1)
        );
        assert!(r.expire_holds(2_000).is_empty(), "nothing left to expire");
    }

    #[test]
    fn an_unclaimed_hold_expires_with_the_real_end_as_last_seen() {
        let mut r = Registry::new();
        r.watch(&alice(), 0, 1);
        r.connect(&alice(), sid(1), Status::Online, info(&[]), 10)
            .unwrap();
        assert_eq!(r.disconnect("alice", sid(1), Hold::IfLast(1_000), 30), None);
        assert!(r.expire_holds(999).is_empty());
        let c = r.expire_holds(1_000);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].state.status, Aggregate::Offline);
        assert_eq!(c[0].state.last_seen, Some(30));
        assert!(c[0].local, "history records it");
    }

    #[test]
    fn handed_over_users_keep_seq_and_follow_the_old_process() {
        let mut old = Registry::new();
        old.connect(&alice(), sid(1), Status::Online, info(&[]), 10)
            .unwrap();
        old.set_status("alice", sid(1), Status::Busy, None, 20)
            .unwrap();
        let rec = old.handover_record("alice").unwrap();
        let mut new = Registry::new();
        new.adopt(&rec, 30).unwrap();
        assert_eq!(new.snapshot(&alice(), 40), old.snapshot(&alice(), 40));
        // A change on the old process after the hand-over: followed, seq never behind.
        old.set_status("alice", sid(1), Status::Away, None, 50)
            .unwrap();
        let rec = old.handover_record("alice").unwrap();
        let c = new.update_from_old(&rec, 60).unwrap().unwrap();
        assert_eq!(c.state.status, Aggregate::Away);
        assert!(c.state.seq >= old.snapshot(&alice(), 60).seq);
        // While the old process serves it, a session here without that device id is another
        // device, not it coming back.
        new.connect(&alice(), sid(7), Status::Online, info(&[]), 65);
        assert_eq!(new.snapshot(&alice(), 66).devices, 2);
        new.disconnect("alice", sid(7), Hold::None, 67);
        // The old process drains it (held there, and so here); the client re-attaches here;
        // a late record naming it does not bring it back.
        old.disconnect("alice", sid(1), Hold::Always(5_000), 80);
        let rec = old.handover_record("alice").unwrap();
        assert_eq!(new.update_from_old(&rec, 85).unwrap(), None);
        new.connect(&alice(), sid(1), Status::Online, info(&[]), 90);
        let s = new.snapshot(&alice(), 91);
        assert_eq!((s.status, s.devices), (Aggregate::Away, 1));
        assert_eq!(new.update_from_old(&rec, 92).unwrap(), None);
        assert_eq!(new.snapshot(&alice(), 93).devices, 1);
        new.end_old(100, 200);
        assert!(
            new.expire_holds(10_000).is_empty(),
            "the live session here stays"
        );
    }

    /// In a cluster the new process takes the old one's share of a user with its clock: the
    /// other nodes hear nothing of a user the upgrade did not change, and whatever this node
    /// stamps later sorts after it.
    #[test]
    fn a_handed_over_share_keeps_its_clock_and_is_not_published_again() {
        let hlc = Arc::new(crate::presence::contrib::Hlc::new());
        let mut old = Registry::replicated(hlc.clone(), 64);
        old.connect(&alice(), sid(1), Status::Busy, info(&["g"]), 1_000)
            .unwrap();
        let published = old.take_outgoing().shares;
        assert_eq!(published.len(), 1);
        let clock = published[0].1.clock;
        let rec = old.handover_record("alice").unwrap();
        assert_eq!(rec.share.map(|s| s.clock), Some(clock));

        let fresh = Arc::new(crate::presence::contrib::Hlc::new());
        let mut new = Registry::replicated(fresh.clone(), 64);
        new.adopt(&rec, 1_001).unwrap();
        assert!(
            new.take_outgoing().shares.is_empty(),
            "the old process published it"
        );
        let mine = new.local_shares(&|_, _| true);
        assert_eq!(mine.len(), 1);
        assert_eq!(mine[0].1.clock, clock, "the old process's clock");
        assert!(mine[0].1.same_share(&published[0].1));
        assert!(fresh.tick(0) > clock, "this process stamps after it");

        // A change on the old process after the hand-over: its share, its clock, published
        // from here too (the old process may have handed the bus over before it could).
        old.set_status("alice", sid(1), Status::Away, None, 1_002)
            .unwrap();
        let changed = old.take_outgoing().shares[0].1.clone();
        let rec = old.handover_record("alice").unwrap();
        new.update_from_old(&rec, 1_003).unwrap();
        let out = new.take_outgoing().shares;
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].1, changed, "the very share the old process stamped");
        // The same record again: nothing new.
        new.update_from_old(&rec, 1_004).unwrap();
        assert!(new.take_outgoing().shares.is_empty());

        // Re-attached here: the share is this process's own, stamped after the old one's.
        new.connect(&alice(), sid(7), Status::Online, info(&["g"]), 1_005);
        old.set_status("alice", sid(1), Status::Busy, Some("x".into()), 1_006)
            .unwrap();
        let rec = old.handover_record("alice").unwrap();
        let old_clock = rec.share.unwrap().clock;
        new.take_outgoing();
        new.update_from_old(&rec, 1_007).unwrap();
        for (_, share) in new.take_outgoing().shares {
            assert!(
                share.clock > old_clock,
                "stamped after the old process's share"
            );
        }
        assert!(fresh.tick(0) > old_clock);
    }

    #[test]
    fn republish_and_restamp_queue_the_shares_held() {
        let hlc = Arc::new(crate::presence::contrib::Hlc::new());
        let mut r = Registry::replicated(hlc, 64);
        r.connect(&alice(), sid(1), Status::Online, info(&[]), 1_000)
            .unwrap();
        let first = r.take_outgoing().shares[0].1.clone();
        r.republish(&[alice(), UserId::from("nobody")]);
        assert_eq!(r.take_outgoing().shares, vec![(alice(), first.clone())]);
        assert_eq!(r.restamp_shares(Some(&[UserId::from("nobody")]), 2_000), 0);
        assert_eq!(r.restamp_shares(None, 2_000), 1);
        let again = r.take_outgoing().shares;
        assert!(again[0].1.clock > first.clock);
        assert!(again[0].1.same_share(&first));
        // A single node has no shares.
        let mut single = Registry::new();
        single.connect(&alice(), sid(1), Status::Online, info(&[]), 1);
        single.republish(&[alice()]);
        assert_eq!(single.restamp_shares(None, 2), 0);
        assert!(single.take_outgoing().is_empty());
    }

    fn on(device: &str, device_type: DeviceType) -> SessionInfo {
        SessionInfo {
            device: Some(device.into()),
            device_type,
            ..info(&[])
        }
    }

    #[test]
    fn a_held_session_is_claimed_by_its_own_device_never_another_id() {
        let mut r = Registry::new();
        r.connect(
            &alice(),
            sid(1),
            Status::Online,
            on("phone", DeviceType::Ios),
            10,
        );
        r.set_status("alice", sid(1), Status::Busy, Some("driving".into()), 11)
            .unwrap();
        r.disconnect("alice", sid(1), Hold::IfLast(1_000), 20);
        // The laptop is not the phone coming back: a device of its own, online.
        r.connect(
            &alice(),
            sid(2),
            Status::Online,
            on("laptop", DeviceType::Desktop),
            30,
        );
        assert_eq!(r.held_count(), 1);
        let s = r.snapshot(&alice(), 31);
        assert_eq!((s.status, s.devices), (Aggregate::Online, 2));
        // The phone re-attaches, busy again.
        r.connect(
            &alice(),
            sid(3),
            Status::Online,
            on("phone", DeviceType::Ios),
            40,
        );
        assert_eq!(r.held_count(), 0);
        let phone = r
            .sessions("alice")
            .iter()
            .find(|s| s.id == sid(3))
            .unwrap()
            .clone();
        assert_eq!(
            (phone.status, phone.text.as_deref()),
            (Status::Busy, Some("driving"))
        );
    }

    #[test]
    fn an_invisible_session_is_held_and_comes_back_invisible() {
        let mut r = Registry::new();
        r.watch(&alice(), 0, 1);
        r.connect(&alice(), sid(1), Status::Online, info(&[]), 10);
        r.set_status("alice", sid(1), Status::Invisible, None, 11)
            .unwrap();
        assert_eq!(r.disconnect("alice", sid(1), Hold::Always(1_000), 20), None);
        assert_eq!(r.held_count(), 1);
        // Re-attached: still invisible, so watchers see nothing at all.
        assert_eq!(
            r.connect(&alice(), sid(2), Status::Online, info(&[]), 30),
            None
        );
        assert_eq!(r.sessions("alice")[0].status, Status::Invisible);
    }

    #[test]
    fn a_late_record_does_not_bring_back_a_hold_that_expired_here() {
        let mut old = Registry::new();
        old.connect(&alice(), sid(1), Status::Online, info(&[]), 10);
        old.disconnect("alice", sid(1), Hold::Always(1_000), 20);
        let rec = old.handover_record("alice").unwrap();
        let mut new = Registry::new();
        new.watch(&alice(), 0, 1);
        new.adopt(&rec, 30).unwrap();
        let gone = new.expire_holds(1_000);
        assert_eq!(gone[0].state.status, Aggregate::Offline);
        // The old process still sends the user's record with the hold in it.
        assert_eq!(new.update_from_old(&rec, 1_001).unwrap(), None);
        assert_eq!(new.snapshot(&alice(), 1_002).status, Aggregate::Offline);
    }

    #[test]
    fn a_kick_lets_go_of_held_sessions_for_good() {
        let mut old = Registry::new();
        old.connect(&alice(), sid(1), Status::Online, info(&[]), 10);
        let mut new = Registry::new();
        new.adopt(&old.handover_record("alice").unwrap(), 20)
            .unwrap();
        let (gone, change) = new.drop_holds("alice", 30);
        assert_eq!(gone, 1);
        assert_eq!(change.unwrap().state.status, Aggregate::Offline);
        // The old process drains the kicked session later: it stays gone here.
        old.disconnect("alice", sid(1), Hold::Always(5_000), 40);
        let rec = old.handover_record("alice").unwrap();
        assert_eq!(new.update_from_old(&rec, 50).unwrap(), None);
        assert_eq!(new.held_count(), 0);
    }

    #[test]
    fn records_with_counters_near_overflow_are_refused() {
        let mut old = Registry::new();
        old.connect(&alice(), sid(1), Status::Online, info(&[]), 10);
        let mut rec = old.handover_record("alice").unwrap();
        rec.seq = u64::MAX;
        assert!(Registry::new().adopt(&rec, 20).is_err());
        rec.seq = 1;
        rec.sessions[0].stamp = u64::MAX;
        assert!(Registry::new().adopt(&rec, 20).is_err());
    }
}

/// A model of holds (issue 13): random connects (with or without a device id), status changes,
/// closes with and without a hold, and clock ticks, for a few users. After every step:
/// - what watchers see is the aggregate of live and held sessions, as a plain recomputation
///   from the model says;
/// - a change is published exactly when that aggregate moved, with the next `seq`;
/// - the held counter, the session counter and the online index agree with the entries;
/// - a re-attached session carries the status its held session had.
mod hold_model {
    use super::*;

    #[derive(Clone, Debug)]
    enum Op {
        Connect { user: u8, device: Option<u8> },
        SetStatus { pick: usize, status: u8 },
        Close { pick: usize, hold: u8 },
        Tick { ms: u64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..3, prop::option::of(0u8..3))
                .prop_map(|(user, device)| Op::Connect { user, device }),
            (any::<usize>(), 0u8..4).prop_map(|(pick, status)| Op::SetStatus { pick, status }),
            (any::<usize>(), 0u8..3).prop_map(|(pick, hold)| Op::Close { pick, hold }),
            (1u64..400).prop_map(|ms| Op::Tick { ms }),
        ]
    }

    #[derive(Clone, Debug)]
    struct M {
        status: Status,
        device: Option<u8>,
        until: Option<u64>,
    }

    fn status_of(n: u8) -> Status {
        [
            Status::Online,
            Status::Away,
            Status::Busy,
            Status::Invisible,
        ][usize::from(n) % 4]
    }

    fn expected(sessions: &[M]) -> (Aggregate, u32) {
        let visible = sessions.iter().filter_map(|m| m.status.visible());
        let devices = visible.clone().count() as u32;
        (visible.max().unwrap_or(Aggregate::Offline), devices)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]
        #[test]
        fn holds_keep_the_aggregate_and_the_counters_right(ops in prop::collection::vec(op(), 1..80)) {
            let mut r = Registry::new();
            let users: Vec<UserId> = (0..3).map(|u| uid(&format!("u{u}"))).collect();
            for u in &users {
                r.watch(u, 0, 0);
            }
            // Per user: the model's sessions (live: until None; held: until Some) with ids.
            let mut model: Vec<Vec<(Option<u64>, M)>> = vec![Vec::new(); 3];
            let mut seq = [0u64; 3];
            let mut seen = [(Aggregate::Offline, 0u32); 3];
            let (mut now, mut next_id) = (1_000u64, 1u64);
            for op in ops {
                let mut changes: Vec<Change> = Vec::new();
                match op {
                    Op::Connect { user, device } => {
                        let u = usize::from(user);
                        let info = SessionInfo {
                            device: device.map(|d| Arc::from(format!("d{d}").as_str())),
                            ..info(&[])
                        };
                        let id = next_id;
                        next_id += 1;
                        let before_held = r.held_count();
                        changes.extend(r.connect(&users[u], sid(id), Status::Online, info, now));
                        let status = r.sessions(&users[u]).iter().find(|s| s.id == sid(id)).unwrap().status;
                        if r.held_count() < before_held {
                            // Re-attached: to its own device's held session if there is one,
                            // else to the first of a compatible device (one device type here).
                            let may = |m: &M| m.device.is_none() || device.is_none() || m.device == device;
                            let held = |i: &Option<u64>| i.is_none();
                            let pos = model[u]
                                .iter()
                                .position(|(i, m)| held(i) && device.is_some() && m.device == device)
                                .or_else(|| model[u].iter().position(|(i, m)| held(i) && may(m)));
                            prop_assert_eq!(pos.map(|p| model[u][p].1.status), Some(status), "the held status goes on");
                            prop_assert!(pos.is_some(), "re-attached to a held session it may claim");
                            model[u].remove(pos.unwrap());
                        } else {
                            prop_assert_eq!(status, Status::Online);
                        }
                        model[u].push((Some(id), M { status, device, until: None }));
                    }
                    Op::SetStatus { pick, status } => {
                        let live: Vec<(usize, u64)> = (0..3).flat_map(|u| model[u].iter().filter_map(move |(i, _)| i.map(|i| (u, i)))).collect();
                        if live.is_empty() { continue; }
                        let (u, id) = live[pick % live.len()];
                        let s = status_of(status);
                        changes.extend(r.set_status(&users[u], sid(id), s, None, now).unwrap());
                        model[u].iter_mut().find(|(i, _)| *i == Some(id)).unwrap().1.status = s;
                    }
                    Op::Close { pick, hold } => {
                        let live: Vec<(usize, u64)> = (0..3).flat_map(|u| model[u].iter().filter_map(move |(i, _)| i.map(|i| (u, i)))).collect();
                        if live.is_empty() { continue; }
                        let (u, id) = live[pick % live.len()];
                        let until = now + 500;
                        let h = [Hold::None, Hold::IfLast(until), Hold::Always(until)][usize::from(hold)];
                        changes.extend(r.disconnect(&users[u], sid(id), h, now));
                        let pos = model[u].iter().position(|(i, _)| *i == Some(id)).unwrap();
                        let (_, mut m) = model[u].remove(pos);
                        let others = model[u].iter().any(|(i, m)| i.is_some() && m.status.visible().is_some());
                        let held = match h {
                            Hold::None => false,
                            Hold::Always(_) => true,
                            Hold::IfLast(_) => !others,
                        };
                        if held {
                            m.until = Some(until);
                            model[u].push((None, m));
                        }
                    }
                    Op::Tick { ms } => {
                        now += ms;
                        changes.extend(r.expire_holds(now));
                        for m in model.iter_mut() {
                            m.retain(|(i, m)| i.is_some() || m.until.is_some_and(|t| t > now));
                        }
                    }
                }
                for c in &changes {
                    let u = users.iter().position(|u| *u == c.state.user).unwrap();
                    seq[u] += 1;
                    prop_assert_eq!(c.state.seq, seq[u], "one seq per change");
                }
                for u in 0..3 {
                    let ms: Vec<M> = model[u].iter().map(|(_, m)| m.clone()).collect();
                    let want = expected(&ms);
                    let s = r.snapshot(&users[u], now);
                    prop_assert_eq!((s.status, s.devices), want, "user {}", u);
                    let moved = want != seen[u];
                    let published = changes.iter().any(|c| c.state.user == users[u]);
                    prop_assert_eq!(moved, published, "a change exactly when the aggregate moved (user {})", u);
                    seen[u] = want;
                }
                let held: usize = model.iter().map(|m| m.iter().filter(|(i, _)| i.is_none()).count()).sum();
                let live: usize = model.iter().map(|m| m.iter().filter(|(i, _)| i.is_some()).count()).sum();
                prop_assert_eq!(r.held_count(), held);
                prop_assert_eq!(r.session_count(), live);
                let online = seen.iter().filter(|(a, _)| *a != Aggregate::Offline).count();
                prop_assert_eq!(r.online_users(), online);
            }
        }
    }
}
