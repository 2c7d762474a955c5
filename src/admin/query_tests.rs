use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use proptest::prelude::*;

use super::*;
use crate::presence::{Hold, Registry, SessionInfo, Status};

fn info(groups: &[&str], roles: &[&str], region: Option<&str>, t: DeviceType) -> SessionInfo {
    SessionInfo {
        device: None,
        device_type: t,
        region: region.map(Into::into),
        groups: groups.iter().map(|g| GroupId::from(*g)).collect(),
        roles: roles.iter().map(|g| Arc::from(*g)).collect(),
        ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        connected_at_ms: 1,
    }
}

fn user_id(i: usize) -> String {
    format!("user-{i:03}")
}

fn sid(n: u64) -> crate::presence::SessionId {
    crate::presence::SessionId::from_raw(n)
}

#[test]
fn filters_combine() {
    let mut r = Registry::new();
    let web = info(&["team"], &["admin"], Some("eu"), DeviceType::Web);
    r.connect(&"Alice".into(), sid(1), Status::Busy, web, 1);
    r.connect(
        &"bob".into(),
        sid(2),
        Status::Online,
        info(&[], &[], None, DeviceType::Ios),
        1,
    );
    r.connect(
        &"carl".into(),
        sid(3),
        Status::Invisible,
        info(&["team"], &[], None, DeviceType::Ios),
        1,
    );
    let page = |f: OnlineFilter| {
        let q = OnlineQuery {
            filter: f,
            after: None,
            limit: 10,
        };
        let p = online_page(&r, &q, 0, 5);
        p.rows
            .iter()
            .map(|r| r.user.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        page(OnlineFilter::default()),
        ["Alice", "bob"],
        "invisible users are not online"
    );
    let team = OnlineFilter {
        group: Some("team".into()),
        ..Default::default()
    };
    assert_eq!(page(team.clone()), ["Alice"]);
    let busy_team = OnlineFilter {
        status: Some(Aggregate::Busy),
        ..team.clone()
    };
    assert_eq!(page(busy_team), ["Alice"]);
    let online_team = OnlineFilter {
        status: Some(Aggregate::Online),
        ..team
    };
    assert!(page(online_team).is_empty());
    let f = |role: Option<&str>, region: Option<&str>, t: Option<DeviceType>, q: Option<&str>| {
        page(OnlineFilter {
            role: role.map(Into::into),
            region: region.map(Into::into),
            device_type: t,
            q: q.map(Into::into),
            ..Default::default()
        })
    };
    assert_eq!(f(Some("admin"), None, None, None), ["Alice"]);
    assert_eq!(f(None, Some("eu"), None, None), ["Alice"]);
    assert_eq!(f(None, None, Some(DeviceType::Ios), None), ["bob"]);
    assert_eq!(
        f(None, None, None, Some("ALI")),
        ["Alice"],
        "q ignores ASCII case"
    );
    assert!(f(Some("admin"), None, Some(DeviceType::Ios), None).is_empty());
    let rows = online_page(
        &r,
        &OnlineQuery {
            filter: OnlineFilter::default(),
            after: None,
            limit: 1,
        },
        3,
        5,
    );
    assert_eq!((rows.rows.len(), rows.total, rows.more), (1, 2, true));
    let row = &rows.rows[0];
    assert_eq!((row.status, row.devices, row.shard), ("busy", 1, 3));
    assert_eq!(row.device_types, ["web"]);
    assert_eq!(row.groups, [GroupId::from("team")]);
}

#[test]
fn merge_takes_the_smallest_ids_and_sets_the_cursor() {
    let row = |u: &str| OnlineRow {
        user: u.into(),
        status: "online",
        text: None,
        devices: 1,
        ts: 0,
        device_types: vec![],
        regions: vec![],
        groups: vec![],
        shard: 0,
    };
    let a = OnlinePage {
        rows: vec![row("a"), row("d")],
        total: 5,
        more: true,
        last_kept: Some("d".into()),
    };
    let b = OnlinePage {
        rows: vec![row("b"), row("c")],
        total: 2,
        more: false,
        last_kept: Some("c".into()),
    };
    let (rows, total, next) = merge_online(vec![a.clone(), b.clone()], 2);
    assert_eq!(
        rows.iter().map(|r| &*r.user).collect::<Vec<_>>(),
        ["a", "b"]
    );
    assert_eq!((total, next.as_deref()), (7, Some("b")));
    let (rows, _, next) = merge_online(vec![a, b], 4);
    assert_eq!(rows.len(), 4);
    assert_eq!(next.as_deref(), Some("d"), "a shard had more");
    let last = OnlinePage {
        rows: vec![row("z")],
        total: 1,
        more: false,
        last_kept: Some("z".into()),
    };
    assert_eq!(merge_online(vec![last, OnlinePage::default()], 5).2, None);
    // Every row of a page with more left meanwhile: the cursor still moves on.
    let emptied = OnlinePage {
        rows: vec![],
        total: 3,
        more: true,
        last_kept: Some("m".into()),
    };
    assert_eq!(merge_online(vec![emptied], 2).2.as_deref(), Some("m"));
}

/// What happens between two pages of a walk.
#[derive(Debug, Clone)]
enum Step {
    /// User `i` connects (group "g" when `grouped`).
    Connect(usize, bool),
    Disconnect(usize),
    Page,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..40usize, any::<bool>()).prop_map(|(i, g)| Step::Connect(i, g)),
        (0..40usize).prop_map(Step::Disconnect),
        Just(Step::Page),
        Just(Step::Page),
    ]
}

proptest! {
    /// A cursor walk over several shards while users come and go visits every user online (and
    /// matching) throughout exactly once, never anyone twice, never anyone who did not match.
    #[test]
    fn pagination_visits_each_stable_user_once(
        shards in 1usize..4,
        initial in proptest::collection::vec(any::<bool>(), 40),
        steps in proptest::collection::vec(step(), 0..80),
        limit in 1usize..6,
        only_group in any::<bool>(),
    ) {
        let mut regs: Vec<Registry> = (0..shards).map(|_| Registry::new()).collect();
        let owner = |i: usize| i % shards;
        // user index -> session id, while connected
        let mut online: HashMap<usize, u64> = HashMap::new();
        let mut grouped: HashMap<usize, bool> = HashMap::new();
        let mut next_id = 1u64;
        let mut connect = |regs: &mut Vec<Registry>, online: &mut HashMap<usize, u64>, grouped: &mut HashMap<usize, bool>, i: usize, g: bool| {
            if online.contains_key(&i) { return; }
            let groups: &[&str] = if g { &["g"] } else { &[] };
            regs[owner(i)].connect(&user_id(i).into(), sid(next_id), Status::Online, info(groups, &[], None, DeviceType::Web), 1);
            online.insert(i, next_id);
            grouped.insert(i, g);
            next_id += 1;
        };
        for (i, on) in initial.iter().enumerate() {
            if *on { connect(&mut regs, &mut online, &mut grouped, i, i % 3 == 0); }
        }
        let filter = OnlineFilter { group: only_group.then(|| "g".to_owned()), ..Default::default() };
        let matches = |i: usize, grouped: &HashMap<usize, bool>| !only_group || grouped.get(&i) == Some(&true);
        // Users online and matching for the whole walk (candidates shrink as they leave).
        let mut stable: BTreeSet<usize> = online.keys().copied().filter(|i| matches(*i, &grouped)).collect();
        let mut seen: Vec<String> = Vec::new();
        let mut cursor: Option<UserId> = None;
        let mut done = false;
        let mut steps = steps.into_iter();
        while !done {
            let s = steps.next().unwrap_or(Step::Page);
            match s {
                Step::Connect(i, g) => connect(&mut regs, &mut online, &mut grouped, i, g),
                Step::Disconnect(i) => {
                    if let Some(id) = online.remove(&i) {
                        regs[owner(i)].disconnect(&user_id(i), sid(id), Hold::None, 2);
                        stable.remove(&i);
                    }
                }
                Step::Page => {
                    let q = OnlineQuery { filter: filter.clone(), after: cursor.clone(), limit };
                    let pages = regs.iter().enumerate().map(|(ix, r)| online_page(r, &q, ix as u16, 3)).collect();
                    let (rows, _total, next) = merge_online(pages, limit);
                    prop_assert!(rows.len() <= limit);
                    for r in &rows {
                        let i: usize = r.user[5..].parse().unwrap();
                        prop_assert!(online.contains_key(&i) && matches(i, &grouped), "{} listed but not online/matching", r.user);
                        seen.push(r.user.to_string());
                    }
                    match next {
                        Some(c) => {
                            prop_assert_eq!(Some(&c), rows.last().map(|r| &r.user));
                            cursor = Some(c);
                        }
                        None => done = true,
                    }
                }
            }
        }
        let unique: BTreeSet<&String> = seen.iter().collect();
        prop_assert_eq!(unique.len(), seen.len(), "someone was listed twice: {:?}", seen);
        for i in stable {
            prop_assert!(unique.contains(&user_id(i)), "{} was online throughout but never listed", user_id(i));
        }
    }
}

#[test]
fn a_region_filter_matches_the_region_and_its_cities() {
    assert!(region_matches("DE", "DE"));
    assert!(region_matches("DE/Berlin", "DE"));
    assert!(region_matches("DE/Berlin", "DE/Berlin"));
    assert!(!region_matches("DEN", "DE"));
    assert!(!region_matches("DE", "DE/Berlin"));
    assert!(!region_matches("eu-west", "eu"));
}
