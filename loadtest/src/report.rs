//! Measurements and the report: hdrhistograms per thread, merged at the end; the JSON keys that
//! tools and CI consume; merging the JSON reports of several worker processes.

use std::collections::BTreeMap;

use hdrhistogram::serialization::{Deserializer, Serializer, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latencies up to 60 s, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant bounds are valid")
}

/// What one thread measured.
#[derive(Debug)]
pub struct Stats {
    pub connect_us: Histogram<u64>,
    pub handshake_us: Histogram<u64>,
    pub fanout_us: Histogram<u64>,
    pub connections: u64,
    /// `connections` by the index of the `--url` each went to.
    pub connections_by_url: BTreeMap<usize, u64>,
    pub deliveries: u64,
    pub flaps_sent: u64,
    pub reconnects: u64,
    pub errors: BTreeMap<String, u64>,
    pub missing: u64,
    pub out_of_order: u64,
    pub checked: u64,
    /// Live events on a direct feed whose seq skipped one or more (see [`Verify::seq_gaps`]).
    pub seq_gaps: u64,
    /// The `subchurn` scenario's counts.
    pub subchurn: Subchurn,
    /// Events that took a watched user from visible to offline. Every harness user stays
    /// connected (reconnecting when closed), so each is a flap a watcher saw (an upgrade or a
    /// grace that did not hold).
    pub went_offline: u64,
    /// Reconnects per 100 ms window (unix ms / 100 → count): the reconnect burst's shape.
    pub reconnect_windows: BTreeMap<u64, u64>,
}

/// The shape of the reconnects of a run (`--json` `reconnect_shape`): when the first and the
/// last came, and the busiest 100 ms.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ReconnectShape {
    pub count: u64,
    /// From the first reconnect to the last.
    pub spread_ms: u64,
    /// The most reconnects in one 100 ms window.
    pub peak_per_100ms: u64,
    /// Half, and 99 %, of the reconnects had come this long after the first.
    pub p50_ms: u64,
    pub p99_ms: u64,
    /// The windows themselves (unix ms / 100 → count), so worker reports merge exactly.
    pub windows: BTreeMap<u64, u64>,
}

impl ReconnectShape {
    pub fn of(windows: &BTreeMap<u64, u64>) -> Option<ReconnectShape> {
        let (first, last) = (*windows.keys().next()?, *windows.keys().next_back()?);
        let count: u64 = windows.values().sum();
        let at = |q: f64| {
            let want = (count as f64 * q).ceil() as u64;
            let mut seen = 0;
            for (w, n) in windows {
                seen += n;
                if seen >= want {
                    return (w - first) * 100;
                }
            }
            (last - first) * 100
        };
        Some(ReconnectShape {
            count,
            spread_ms: (last - first) * 100,
            peak_per_100ms: windows.values().copied().max().unwrap_or(0),
            p50_ms: at(0.5),
            p99_ms: at(0.99),
            windows: windows.clone(),
        })
    }
}

/// What the `subchurn` scenario counted (README "Subscription churn").
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Subchurn {
    /// The storm: ops sent and acknowledged.
    pub subscribe_ops: u64,
    pub subscribe_acked: u64,
    pub unsubscribe_ops: u64,
    pub unsubscribe_acked: u64,
    /// Ids named in acknowledged subscribes.
    pub ids_subscribed: u64,
    /// Ops the server refused, by error code (`rate_limited`, `overloaded`, …).
    pub refused: BTreeMap<String, u64>,
    /// Presence events received during the storm. The watched users do not change then, so
    /// every one is a snapshot.
    pub snapshots: u64,
    /// After the storm (`--verify`): watchers, and those that unsubscribed and re-subscribed
    /// every id (acknowledged; refusals are retried until `--drain`).
    pub watchers: u64,
    pub resubscribed: u64,
    /// Ops refused while re-subscribing, by code (each was retried).
    pub resubscribe_refused: BTreeMap<String, u64>,
    /// (watcher, id) snapshots expected after re-subscribing, missing, and wrong (status or
    /// text not what the harness set).
    pub snapshots_expected: u64,
    pub snapshots_missing: u64,
    pub snapshots_wrong: u64,
    /// (watcher, target) live events expected after the targets changed once more, and missing.
    pub live_expected: u64,
    pub live_missing: u64,
}

impl Subchurn {
    pub fn add(&mut self, o: &Subchurn) {
        self.subscribe_ops += o.subscribe_ops;
        self.subscribe_acked += o.subscribe_acked;
        self.unsubscribe_ops += o.unsubscribe_ops;
        self.unsubscribe_acked += o.unsubscribe_acked;
        self.ids_subscribed += o.ids_subscribed;
        for (k, v) in &o.refused {
            *self.refused.entry(k.clone()).or_default() += v;
        }
        self.snapshots += o.snapshots;
        self.watchers += o.watchers;
        self.resubscribed += o.resubscribed;
        for (k, v) in &o.resubscribe_refused {
            *self.resubscribe_refused.entry(k.clone()).or_default() += v;
        }
        self.snapshots_expected += o.snapshots_expected;
        self.snapshots_missing += o.snapshots_missing;
        self.snapshots_wrong += o.snapshots_wrong;
        self.live_expected += o.live_expected;
        self.live_missing += o.live_missing;
    }

    fn codes(m: &BTreeMap<String, u64>) -> String {
        if m.is_empty() {
            return "none".into();
        }
        m.iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// The human table's lines.
    pub fn table(&self, run_s: f64) -> String {
        let per_s = |n: u64| n as f64 / run_s.max(1e-9);
        let mut t = format!(
            "  subscribe ops           {} sent, {} acked ({:.0}/s; {} ids)\n  \
             unsubscribe ops         {} sent, {} acked\n  \
             refused                 {}\n  \
             snapshots               {} ({:.0}/s)\n",
            self.subscribe_ops,
            self.subscribe_acked,
            per_s(self.subscribe_ops),
            self.ids_subscribed,
            self.unsubscribe_ops,
            self.unsubscribe_acked,
            Self::codes(&self.refused),
            self.snapshots,
            per_s(self.snapshots),
        );
        if self.watchers > 0 {
            t += &format!(
                "  after the storm         {}/{} watchers re-subscribed (refused meanwhile: {})\n  \
                 re-snapshots            {} expected, {} missing, {} wrong\n  \
                 live events             {} expected, {} missing\n",
                self.resubscribed,
                self.watchers,
                Self::codes(&self.resubscribe_refused),
                self.snapshots_expected,
                self.snapshots_missing,
                self.snapshots_wrong,
                self.live_expected,
                self.live_missing,
            );
        }
        t
    }
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            connect_us: histogram(),
            handshake_us: histogram(),
            fanout_us: histogram(),
            connections: 0,
            connections_by_url: BTreeMap::new(),
            deliveries: 0,
            flaps_sent: 0,
            reconnects: 0,
            errors: BTreeMap::new(),
            missing: 0,
            out_of_order: 0,
            checked: 0,
            seq_gaps: 0,
            subchurn: Subchurn::default(),
            went_offline: 0,
            reconnect_windows: BTreeMap::new(),
        }
    }
}

impl Stats {
    pub fn error(&mut self, kind: impl Into<String>) {
        *self.errors.entry(kind.into()).or_default() += 1;
    }

    /// A connection was established (the first time) to `--url` number `url`.
    pub fn established(&mut self, url: usize) {
        self.connections += 1;
        *self.connections_by_url.entry(url).or_default() += 1;
    }

    pub fn add(&mut self, other: Stats) {
        self.connect_us.add(&other.connect_us).expect("same bounds");
        self.handshake_us
            .add(&other.handshake_us)
            .expect("same bounds");
        self.fanout_us.add(&other.fanout_us).expect("same bounds");
        self.connections += other.connections;
        self.deliveries += other.deliveries;
        self.flaps_sent += other.flaps_sent;
        self.reconnects += other.reconnects;
        self.missing += other.missing;
        self.out_of_order += other.out_of_order;
        self.checked += other.checked;
        self.seq_gaps += other.seq_gaps;
        self.subchurn.add(&other.subchurn);
        self.went_offline += other.went_offline;
        for (k, v) in other.reconnect_windows {
            *self.reconnect_windows.entry(k).or_default() += v;
        }
        for (k, v) in other.connections_by_url {
            *self.connections_by_url.entry(k).or_default() += v;
        }
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
    pub count: u64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        Percentiles {
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
            count: h.len(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Verify {
    pub passed: bool,
    /// (subscriber, flapped user) pairs whose final state never arrived.
    pub missing: u64,
    /// Events with a `seq` not above the last one seen for that user on that feed.
    pub out_of_order: u64,
    /// (subscriber, flapped user) pairs checked.
    pub checked: u64,
    /// Live events on a direct feed whose `seq` was more than one above the last one seen for
    /// that (subscriber, user): the server merged queued events, or lost one.
    #[serde(default)]
    pub seq_gaps: u64,
    /// How far the server's coalescing counter (`presenced_coalesced_events_total`) moved over
    /// the run, read from `--admin-url` (summed over every server when it names several);
    /// `null` without it. When it did not move, every seq gap
    /// is a lost event and fails verification; when it did, gaps are allowed (counted).
    #[serde(default)]
    pub coalesced: Option<u64>,
    /// A server behind `--admin-url` is a cluster node (docs/CLUSTER.md): there `seq` is a
    /// hybrid logical clock that rises by at least one per change, so gaps are the norm, are
    /// counted, and never fail verification; the finals and the order of `seq` still do.
    #[serde(default)]
    pub cluster: bool,
}

impl Verify {
    /// The verdict: everything checked arrived, in order, and every seq gap is explained.
    pub fn judge(&mut self) {
        let gaps_unexplained = self.seq_gaps > 0 && self.coalesced == Some(0) && !self.cluster;
        self.passed =
            self.missing == 0 && self.out_of_order == 0 && self.checked > 0 && !gaps_unexplained;
    }

    /// One line on the seq gaps, saying whether they could be attributed.
    pub fn gaps_line(&self) -> String {
        let why = match self.coalesced {
            _ if self.seq_gaps == 0 => "none".to_string(),
            _ if self.cluster => "not losses: in a cluster seq is a hybrid logical clock, which \
                                  rises by at least one per change"
                .to_string(),
            None => "not attributed: without --admin-url it is unknown whether the server \
                     coalesced"
                .to_string(),
            Some(0) => "the server coalesced nothing: lost events (verify fails)".to_string(),
            Some(c) => format!("allowed: the server coalesced {c} events for slow consumers"),
        };
        format!("  seq gaps                {} ({why})\n", self.seq_gaps)
    }
}

/// Connections established to one `--url`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct UrlConnections {
    pub url: String,
    pub connections: u64,
}

impl UrlConnections {
    /// One entry per URL of `urls`, in order, with the counts of `stats`.
    pub fn of(urls: &[String], stats: &Stats) -> Vec<UrlConnections> {
        urls.iter()
            .enumerate()
            .map(|(i, url)| UrlConnections {
                url: url.clone(),
                connections: stats.connections_by_url.get(&i).copied().unwrap_or(0),
            })
            .collect()
    }

    /// Adds `more` (another worker's) to `into`: position by position while the URLs agree
    /// (workers of one fleet get the same `--url`), any other entry appended.
    fn merge(into: &mut Vec<UrlConnections>, more: Vec<UrlConnections>) {
        for (i, u) in more.into_iter().enumerate() {
            match into.get_mut(i) {
                Some(mine) if mine.url == u.url => mine.connections += u.connections,
                _ => into.push(u),
            }
        }
    }
}

/// The machine-readable report (`--json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    pub scenario: String,
    pub workers: usize,
    pub connections_established: u64,
    /// `connections_established` by `--url`, in the order given (a repeated URL is listed
    /// each time).
    #[serde(default)]
    pub urls: Vec<UrlConnections>,
    /// Time to open and subscribe every connection, and the resulting rate (handshakes/s).
    pub ramp_s: f64,
    pub handshakes_per_sec: f64,
    pub deliveries: u64,
    pub deliveries_per_sec: f64,
    pub duration_s: f64,
    pub client_cpu_s: f64,
    pub flaps_sent: u64,
    /// The flap rate asked for (`--flaps-per-sec`, whole fleet).
    #[serde(default)]
    pub flaps_per_sec_target: u64,
    /// Length of the run phase (flapping), and the flap rate sent over it.
    #[serde(default)]
    pub run_phase_s: f64,
    #[serde(default)]
    pub flaps_per_sec: f64,
    pub reconnects: u64,
    /// Watched users seen going from visible to offline (see [`Stats::went_offline`]).
    #[serde(default)]
    pub went_offline: u64,
    /// When the reconnects came (absent when there were none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reconnect_shape: Option<ReconnectShape>,
    pub connect_latency_us: Percentiles,
    pub handshake_latency_us: Percentiles,
    pub fanout_latency_us: Percentiles,
    pub errors: BTreeMap<String, u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<Verify>,
    /// The `subchurn` scenario's counts (absent for the others).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subchurn: Option<Subchurn>,
    /// The server's own cost (`--server-pid`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<crate::procstat::ServerCost>,
    /// The raw histograms (hdrhistogram V2, base64), so worker reports can be merged exactly.
    pub histograms: BTreeMap<String, String>,
}

fn encode(h: &Histogram<u64>) -> String {
    use base64::Engine;
    let mut buf = Vec::new();
    V2Serializer::new()
        .serialize(h, &mut buf)
        .expect("serialising to a Vec cannot fail");
    base64::engine::general_purpose::STANDARD.encode(buf)
}

fn decode(s: &str) -> Result<Histogram<u64>, String> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| e.to_string())?;
    Deserializer::new()
        .deserialize(&mut &bytes[..])
        .map_err(|e| format!("{e:?}"))
}

impl Report {
    /// `coalesced`: how far the server's coalescing counter moved over the run, when known.
    pub fn new(
        scenario: &str,
        stats: &Stats,
        run_s: f64,
        cpu_s: f64,
        verify: bool,
        coalesced: Option<u64>,
    ) -> Report {
        let mut histograms = BTreeMap::new();
        histograms.insert("connect".into(), encode(&stats.connect_us));
        histograms.insert("handshake".into(), encode(&stats.handshake_us));
        histograms.insert("fanout".into(), encode(&stats.fanout_us));
        Report {
            scenario: scenario.into(),
            workers: 1,
            connections_established: stats.connections,
            urls: Vec::new(),
            ramp_s: 0.0,
            handshakes_per_sec: 0.0,
            deliveries: stats.deliveries,
            deliveries_per_sec: stats.deliveries as f64 / run_s.max(1e-9),
            duration_s: run_s,
            client_cpu_s: cpu_s,
            flaps_sent: stats.flaps_sent,
            flaps_per_sec_target: 0,
            run_phase_s: 0.0,
            flaps_per_sec: 0.0,
            reconnects: stats.reconnects,
            went_offline: stats.went_offline,
            reconnect_shape: ReconnectShape::of(&stats.reconnect_windows),
            connect_latency_us: Percentiles::of(&stats.connect_us),
            handshake_latency_us: Percentiles::of(&stats.handshake_us),
            fanout_latency_us: Percentiles::of(&stats.fanout_us),
            errors: stats.errors.clone(),
            subchurn: None,
            verify: verify.then(|| {
                let mut v = Verify {
                    passed: false,
                    missing: stats.missing,
                    out_of_order: stats.out_of_order,
                    checked: stats.checked,
                    seq_gaps: stats.seq_gaps,
                    coalesced,
                    cluster: false,
                };
                v.judge();
                v
            }),
            server: None,
            histograms,
        }
    }

    /// The servers behind `--admin-url` are cluster nodes (see [`Verify::cluster`]): judged
    /// again.
    pub fn set_cluster(&mut self, cluster: bool) {
        if let Some(v) = &mut self.verify {
            v.cluster = cluster;
            v.judge();
        }
    }

    /// One fleet report from the workers' reports: counts add up, histograms merge exactly,
    /// the duration is the longest, verification passes only if every worker's did.
    pub fn merge(reports: Vec<Report>) -> Result<Report, String> {
        let mut it = reports.into_iter();
        let mut out = it.next().ok_or("nothing to merge")?;
        let mut hists: BTreeMap<String, Histogram<u64>> = BTreeMap::new();
        for (k, v) in &out.histograms {
            hists.insert(k.clone(), decode(v)?);
        }
        for r in it {
            out.workers += r.workers;
            out.connections_established += r.connections_established;
            UrlConnections::merge(&mut out.urls, r.urls);
            out.ramp_s = out.ramp_s.max(r.ramp_s);
            out.deliveries += r.deliveries;
            out.duration_s = out.duration_s.max(r.duration_s);
            out.client_cpu_s += r.client_cpu_s;
            out.flaps_sent += r.flaps_sent;
            out.run_phase_s = out.run_phase_s.max(r.run_phase_s);
            out.reconnects += r.reconnects;
            out.went_offline += r.went_offline;
            let mut windows = out
                .reconnect_shape
                .take()
                .map(|s| s.windows)
                .unwrap_or_default();
            for (k, v) in r.reconnect_shape.map(|s| s.windows).unwrap_or_default() {
                *windows.entry(k).or_default() += v;
            }
            out.reconnect_shape = ReconnectShape::of(&windows);
            for (k, v) in r.errors {
                *out.errors.entry(k).or_default() += v;
            }
            // Workers of one fleet read the same server: its cost is over the fleet's
            // deliveries, which only the merged report knows.
            out.server = None;
            out.subchurn = match (out.subchurn.take(), r.subchurn) {
                (Some(mut a), Some(b)) => {
                    a.add(&b);
                    Some(a)
                }
                (a, b) => a.or(b),
            };
            out.verify = match (out.verify.take(), r.verify) {
                // Every worker read the same server's counter over about the same run: the
                // largest move stands for the fleet.
                (Some(a), Some(b)) => Some(Verify {
                    passed: a.passed && b.passed,
                    missing: a.missing + b.missing,
                    out_of_order: a.out_of_order + b.out_of_order,
                    checked: a.checked + b.checked,
                    seq_gaps: a.seq_gaps + b.seq_gaps,
                    coalesced: a.coalesced.max(b.coalesced),
                    cluster: a.cluster || b.cluster,
                }),
                (a, b) => a.or(b),
            };
            for (k, v) in &r.histograms {
                let h = decode(v)?;
                match hists.get_mut(k) {
                    Some(acc) => acc.add(&h).map_err(|e| format!("{e:?}"))?,
                    None => {
                        hists.insert(k.clone(), h);
                    }
                }
            }
        }
        out.deliveries_per_sec = out.deliveries as f64 / out.duration_s.max(1e-9);
        out.flaps_per_sec = out.flaps_sent as f64 / out.run_phase_s.max(1e-9);
        out.handshakes_per_sec = out.connections_established as f64 / out.ramp_s.max(1e-9);
        let get = |k: &str| hists.get(k).map(Percentiles::of).unwrap_or_default();
        out.connect_latency_us = get("connect");
        out.handshake_latency_us = get("handshake");
        out.fanout_latency_us = get("fanout");
        out.histograms = hists.iter().map(|(k, h)| (k.clone(), encode(h))).collect();
        Ok(out)
    }

    /// The human table.
    pub fn table(&self) -> String {
        let row = |name: &str, p: &Percentiles| {
            format!(
                "  {name:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}\n",
                p.p50, p.p90, p.p99, p.p999, p.max, p.count
            )
        };
        let mut t = format!(
            "scenario {} ({} worker(s))\n  connections established {} in {:.2} s ({:.0}/s)\n  run                     {:.1} s\n  \
             flaps sent              {} ({:.0}/s over {:.1} s; asked {}/s)\n  deliveries              {} ({:.0}/s)\n  client CPU              {:.2} s\n  \
             reconnects              {}{}\n  went offline            {}\n\n  latency (µs)           {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}\n",
            self.scenario,
            self.workers,
            self.connections_established,
            self.ramp_s,
            self.handshakes_per_sec,
            self.duration_s,
            self.flaps_sent,
            self.flaps_per_sec,
            self.run_phase_s,
            self.flaps_per_sec_target,
            self.deliveries,
            self.deliveries_per_sec,
            self.client_cpu_s,
            self.reconnects,
            self.reconnect_shape.as_ref().map_or(String::new(), |s| format!(
                " (over {} ms; p50 {} ms, p99 {} ms after the first; peak {} per 100 ms)",
                s.spread_ms, s.p50_ms, s.p99_ms, s.peak_per_100ms
            )),
            self.went_offline,
            "p50",
            "p90",
            "p99",
            "p99.9",
            "max",
            "count"
        );
        t += &row("connect", &self.connect_latency_us);
        t += &row("handshake", &self.handshake_latency_us);
        t += &row("fan-out", &self.fanout_latency_us);
        if self.urls.len() > 1 {
            t += "\n  connections by --url\n";
            for u in &self.urls {
                t += &format!("    {:<40} {}\n", u.url, u.connections);
            }
        }
        if let Some(sc) = &self.subchurn {
            t += "\n";
            t += &sc.table(self.run_phase_s);
        }
        if let Some(s) = &self.server {
            t += &s.table();
        }
        if self.errors.is_empty() {
            t += "\n  errors                  none\n";
        } else {
            t += "\n  errors\n";
            for (k, v) in &self.errors {
                t += &format!("    {k:<24} {v}\n");
            }
        }
        if let Some(v) = &self.verify {
            t += &v.gaps_line();
            t += &format!(
                "  verify                  {} (checked {}, missing {}, out of order {}, seq gaps {})\n",
                if v.passed { "PASSED" } else { "FAILED" },
                v.checked,
                v.missing,
                v.out_of_order,
                v.seq_gaps
            );
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_adds_counts_and_merges_histograms_exactly() {
        let mut a = Stats::default();
        let mut b = Stats::default();
        for v in 1..=100 {
            a.fanout_us.record(v).unwrap();
            b.fanout_us.record(v + 1000).unwrap();
        }
        a.deliveries = 100;
        b.deliveries = 100;
        b.error("read");
        let ra = Report::new("t", &a, 2.0, 1.0, true, None);
        let rb = Report::new("t", &b, 4.0, 1.0, true, None);
        let json = serde_json::to_string(&ra).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        let m = Report::merge(vec![back, rb]).unwrap();
        assert_eq!((m.workers, m.deliveries, m.duration_s), (2, 200, 4.0));
        assert_eq!(m.deliveries_per_sec, 50.0);
        assert_eq!(m.fanout_latency_us.count, 200);
        assert!(m.fanout_latency_us.p99 >= 1000);
        assert_eq!(m.errors["read"], 1);
        assert!(!m.verify.unwrap().passed, "nothing was checked");
    }

    /// Connections by `--url`: counted per URL index across threads, reported in `--url`'s
    /// order (a repeated URL twice), and added up position by position across workers.
    #[test]
    fn connections_by_url_add_up() {
        let urls = vec!["ws://a:1/ws".to_string(), "ws://a:1/ws".to_string()];
        let mut a = Stats::default();
        let mut b = Stats::default();
        for n in 0..5 {
            a.established(n % 2);
        }
        b.established(1);
        a.add(b);
        assert_eq!(a.connections, 6);
        let by = UrlConnections::of(&urls, &a);
        assert_eq!(
            by.iter().map(|u| u.connections).collect::<Vec<_>>(),
            vec![3, 3]
        );
        let mut r1 = Report::new("t", &a, 1.0, 1.0, false, None);
        r1.urls = by.clone();
        let mut r2 = r1.clone();
        r2.urls[1].connections = 10;
        let m = Report::merge(vec![r1, r2]).unwrap();
        assert_eq!(
            m.urls.iter().map(|u| u.connections).collect::<Vec<_>>(),
            vec![6, 13]
        );
        assert!(m.table().contains("connections by --url"), "{}", m.table());
        // A worker with other URLs: its entries are listed after.
        let mut other = Vec::new();
        UrlConnections::merge(&mut other, by.clone());
        UrlConnections::merge(
            &mut other,
            vec![UrlConnections {
                url: "ws://b:2/ws".into(),
                connections: 4,
            }],
        );
        assert_eq!(other.len(), 3);
        assert_eq!(other[2].url, "ws://b:2/ws");
    }

    /// Issue 11 item 19: a seq gap fails verification when the server says it coalesced
    /// nothing, is allowed when it coalesced, and is only counted when nobody asked it.
    #[test]
    fn seq_gaps_fail_only_when_the_server_coalesced_nothing() {
        let mut s = Stats {
            checked: 10,
            ..Stats::default()
        };
        let verdict = |s: &Stats, c: Option<u64>| {
            let r = Report::new("t", s, 1.0, 1.0, true, c);
            let v = r.verify.clone().unwrap();
            (v.passed, r.table())
        };
        assert!(verdict(&s, Some(0)).0, "no gaps, nothing coalesced");
        s.seq_gaps = 2;
        let (passed, table) = verdict(&s, Some(0));
        assert!(!passed, "gaps the server cannot explain are lost events");
        assert!(table.contains("seq gaps                2 (the server coalesced nothing"));
        let (passed, table) = verdict(&s, Some(5));
        assert!(passed, "gaps are allowed when the server coalesced");
        assert!(table.contains("allowed: the server coalesced 5 events"));
        let (passed, table) = verdict(&s, None);
        assert!(passed);
        assert!(table.contains("not attributed"), "{table}");
        // Merging keeps the count and the largest move of the counter; a failed worker fails
        // the fleet.
        let a = Report::new("t", &s, 1.0, 1.0, true, Some(0));
        let b = Report::new(
            "t",
            &Stats {
                checked: 1,
                ..Stats::default()
            },
            1.0,
            1.0,
            true,
            Some(0),
        );
        let m = Report::merge(vec![a, b]).unwrap().verify.unwrap();
        assert_eq!((m.passed, m.seq_gaps, m.coalesced), (false, 2, Some(0)));
    }

    /// Against cluster nodes `seq` is a hybrid logical clock: gaps with nothing coalesced are
    /// no loss, but a missing final or a `seq` going back still fail.
    #[test]
    fn in_a_cluster_seq_gaps_are_not_losses() {
        let mut s = Stats {
            checked: 10,
            seq_gaps: 7,
            ..Stats::default()
        };
        let judged = |s: &Stats| {
            let mut r = Report::new("t", s, 1.0, 1.0, true, Some(0));
            r.set_cluster(true);
            (r.verify.clone().unwrap(), r.table())
        };
        let (v, table) = judged(&s);
        assert!(v.passed && v.cluster, "{table}");
        assert!(table.contains("hybrid logical clock"), "{table}");
        s.missing = 1;
        assert!(!judged(&s).0.passed, "a missing final still fails");
        s.missing = 0;
        s.out_of_order = 1;
        assert!(!judged(&s).0.passed, "seq going back still fails");
        // A fleet is a cluster's if any worker's servers were; the flag survives JSON.
        s.out_of_order = 0;
        let a = serde_json::to_string(&judged(&s).0).unwrap();
        let a: Verify = serde_json::from_str(&a).unwrap();
        assert!(a.cluster);
        let worker = || {
            let one_check = Stats {
                checked: 1,
                ..Stats::default()
            };
            Report::new("t", &one_check, 1.0, 1.0, true, Some(0))
        };
        let (two, mut one) = (worker(), worker());
        one.set_cluster(true);
        let m = Report::merge(vec![two, one]).unwrap().verify.unwrap();
        assert!(m.cluster);
        // A report written before the field existed reads as not a cluster's.
        let old: Verify =
            serde_json::from_str(r#"{"passed":true,"missing":0,"out_of_order":0,"checked":1}"#)
                .unwrap();
        assert!(!old.cluster);
    }
}
