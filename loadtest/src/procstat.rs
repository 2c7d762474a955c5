//! The server's own cost, read from `/proc` (`--server-pid`): CPU time (user and kernel, every
//! thread) and resident memory, sampled at the ramp's start, the run phase's start and its end.
//! Parsing is pure and tested on fixed text; reading is one `read_to_string` per file.

use serde::{Deserialize, Serialize};

/// One reading of a process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sample {
    /// User and kernel CPU time of every thread, in clock ticks.
    pub utime: u64,
    pub stime: u64,
    /// Resident set, in bytes.
    pub rss: u64,
}

impl Sample {
    /// The sum of several processes (the nodes of a cluster).
    pub fn sum(samples: &[Sample]) -> Sample {
        samples.iter().fold(Sample::default(), |a, s| Sample {
            utime: a.utime + s.utime,
            stime: a.stime + s.stime,
            rss: a.rss + s.rss,
        })
    }
}

/// `utime` and `stime` (fields 14 and 15) of a `/proc/PID/stat` line. The command name (field
/// 2) is in parentheses and may hold spaces and parentheses: fields are counted after the last
/// `)`.
pub fn parse_stat(text: &str) -> Result<(u64, u64), String> {
    let rest = text
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or("no `)` in /proc/PID/stat")?;
    // After `)`: field 3 (state) is the first.
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Result<u64, String> {
        fields
            .get(n - 3)
            .ok_or(format!("/proc/PID/stat has no field {n}"))?
            .parse()
            .map_err(|e| format!("/proc/PID/stat field {n}: {e}"))
    };
    Ok((field(14)?, field(15)?))
}

/// `VmRSS` of a `/proc/PID/status`, in bytes.
pub fn parse_rss(text: &str) -> Result<u64, String> {
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .ok_or("no VmRSS in /proc/PID/status")?;
    let kib: u64 = line
        .split_whitespace()
        .next()
        .ok_or("an empty VmRSS")?
        .parse()
        .map_err(|e| format!("VmRSS: {e}"))?;
    Ok(kib * 1024)
}

/// Reads process `pid` now.
pub fn sample(pid: u32) -> Result<Sample, String> {
    let read = |f: &str| {
        std::fs::read_to_string(format!("/proc/{pid}/{f}"))
            .map_err(|e| format!("--server-pid {pid}: /proc/{pid}/{f}: {e}"))
    };
    let (utime, stime) = parse_stat(&read("stat")?)?;
    let rss = parse_rss(&read("status")?)?;
    Ok(Sample { utime, stime, rss })
}

/// Reads every process of `pids`, summed.
pub fn sample_all(pids: &[u32]) -> Result<Sample, String> {
    let samples = pids
        .iter()
        .map(|p| sample(*p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Sample::sum(&samples))
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`).
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf reads a constant of the system and touches no memory of ours.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// What the server cost over a run (`--json` `server`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerCost {
    /// The processes read.
    pub pids: Vec<u32>,
    /// Over the run phase: deliveries counted by the harness, and the server's CPU time.
    pub run_deliveries: u64,
    pub run_s: f64,
    /// `run_deliveries / run_s`: the delivery rate the CPU figures are at.
    pub run_deliveries_per_sec: f64,
    pub user_s: f64,
    pub kernel_s: f64,
    /// CPU per delivery over the run phase (user, kernel, both), in µs; 0 without deliveries.
    pub user_us_per_delivery: f64,
    pub kernel_us_per_delivery: f64,
    pub cpu_us_per_delivery: f64,
    /// The server's CPU over the run phase as a share of one core (100 = one core busy).
    pub cpu_percent_of_core: f64,
    /// Resident memory before the ramp and at the run phase's start, and the growth per
    /// connection established (what the connections and their subscriptions cost).
    pub rss_before_bytes: u64,
    pub rss_run_bytes: u64,
    pub rss_per_connection_bytes: f64,
    /// The same at the run phase's end: with a heartbeat shorter than the run, what an idle
    /// connection holds in steady state, after the sweep gave back its set-up buffers.
    pub rss_end_bytes: u64,
    pub rss_per_connection_end_bytes: f64,
    /// Over the ramp (connect, handshake with its JWT, welcome, subscribe): the server's CPU
    /// per connection established, in µs, and its inverse, connections per CPU-second (the
    /// handshake rate one core would sustain).
    pub ramp_cpu_us_per_connection: f64,
    pub connections_per_cpu_second: f64,
}

impl ServerCost {
    /// From the samples before the ramp, at the run's start and at its end.
    #[allow(clippy::too_many_arguments)]
    pub fn of(
        pids: &[u32],
        before: Sample,
        start: Sample,
        end: Sample,
        run_deliveries: u64,
        run_s: f64,
        connections: u64,
        ticks_per_s: f64,
    ) -> ServerCost {
        let secs = |ticks: u64| ticks as f64 / ticks_per_s;
        let user_s = secs(end.utime.saturating_sub(start.utime));
        let kernel_s = secs(end.stime.saturating_sub(start.stime));
        let ramp_s = secs((start.utime + start.stime).saturating_sub(before.utime + before.stime));
        let per = |s: f64| {
            if run_deliveries == 0 {
                0.0
            } else {
                s * 1e6 / run_deliveries as f64
            }
        };
        ServerCost {
            pids: pids.to_vec(),
            run_deliveries,
            run_s,
            run_deliveries_per_sec: if run_s > 0.0 {
                run_deliveries as f64 / run_s
            } else {
                0.0
            },
            user_s,
            kernel_s,
            user_us_per_delivery: per(user_s),
            kernel_us_per_delivery: per(kernel_s),
            cpu_us_per_delivery: per(user_s + kernel_s),
            cpu_percent_of_core: if run_s > 0.0 {
                (user_s + kernel_s) / run_s * 100.0
            } else {
                0.0
            },
            rss_before_bytes: before.rss,
            rss_run_bytes: start.rss,
            rss_per_connection_bytes: if connections == 0 {
                0.0
            } else {
                start.rss.saturating_sub(before.rss) as f64 / connections as f64
            },
            rss_end_bytes: end.rss,
            rss_per_connection_end_bytes: if connections == 0 {
                0.0
            } else {
                end.rss.saturating_sub(before.rss) as f64 / connections as f64
            },
            ramp_cpu_us_per_connection: if connections == 0 {
                0.0
            } else {
                ramp_s * 1e6 / connections as f64
            },
            connections_per_cpu_second: if ramp_s > 0.0 {
                connections as f64 / ramp_s
            } else {
                0.0
            },
        }
    }

    /// The human lines.
    pub fn table(&self) -> String {
        format!(
            "\n  server (pid {})\n    CPU over the run        {:.2} s user + {:.2} s kernel ({:.1} % of a core)\n    \
             CPU per delivery        {:.2} µs ({:.2} user + {:.2} kernel) over {} deliveries ({:.0}/s)\n    \
             RSS                     {} KiB before, {} KiB at the run ({:.0} B per connection), {} KiB at its end ({:.0} B)\n    \
             ramp CPU                {:.1} µs per connection ({:.0} connections per CPU-second)\n",
            self.pids
                .iter()
                .map(u32::to_string)
                .collect::<Vec<_>>()
                .join(","),
            self.user_s,
            self.kernel_s,
            self.cpu_percent_of_core,
            self.cpu_us_per_delivery,
            self.user_us_per_delivery,
            self.kernel_us_per_delivery,
            self.run_deliveries,
            self.run_deliveries_per_sec,
            self.rss_before_bytes / 1024,
            self.rss_run_bytes / 1024,
            self.rss_per_connection_bytes,
            self.rss_end_bytes / 1024,
            self.rss_per_connection_end_bytes,
            self.ramp_cpu_us_per_connection,
            self.connections_per_cpu_second,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_last_parenthesis() {
        // A command name with a space and a parenthesis, as a thread may name itself.
        let line = "4242 (pres (x) d) S 1 4242 4242 0 -1 4194560 1234 0 0 0 731 95 0 0 20 0 5 0 \
                    100 200000000 3000 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_stat(line), Ok((731, 95)));
        assert!(parse_stat("4242 no parenthesis").is_err());
        assert!(parse_stat("4242 (x) S 1 2").is_err(), "too few fields");
        assert!(
            parse_stat("4242 (x) S 1 2 3 4 5 6 7 8 9 10 x 5").is_err(),
            "not a number"
        );
    }

    #[test]
    fn rss_is_read_in_kib_and_given_in_bytes() {
        let status = "Name:\tpresenced\nVmPeak:\t  900 kB\nVmRSS:\t   20480 kB\nThreads:\t5\n";
        assert_eq!(parse_rss(status), Ok(20480 * 1024));
        assert!(parse_rss("Name:\tx\n").is_err());
    }

    #[test]
    fn the_cost_is_per_delivery_over_the_run_and_per_connection_over_the_ramp() {
        let before = Sample {
            utime: 10,
            stime: 5,
            rss: 10 << 20,
        };
        let start = Sample {
            utime: 100,
            stime: 50,
            rss: 14 << 20,
        };
        let end = Sample {
            utime: 300,
            stime: 150,
            rss: 15 << 20,
        };
        let c = ServerCost::of(&[7], before, start, end, 100_000, 10.0, 1024, 100.0);
        assert_eq!((c.user_s, c.kernel_s), (2.0, 1.0));
        assert_eq!(c.run_deliveries_per_sec, 10_000.0);
        assert!((c.cpu_us_per_delivery - 30.0).abs() < 1e-9);
        assert!((c.user_us_per_delivery - 20.0).abs() < 1e-9);
        assert!((c.kernel_us_per_delivery - 10.0).abs() < 1e-9);
        assert!((c.cpu_percent_of_core - 30.0).abs() < 1e-9);
        assert!((c.rss_per_connection_bytes - 4096.0).abs() < 1e-9);
        assert!((c.rss_per_connection_end_bytes - 5120.0).abs() < 1e-9);
        // (100 + 50) - (10 + 5) ticks = 1.35 s over 1024 connections.
        assert!((c.ramp_cpu_us_per_connection - 1.35e6 / 1024.0).abs() < 1e-6);
        assert!((c.connections_per_cpu_second - 1024.0 / 1.35).abs() < 1e-6);
        let idle = ServerCost::of(&[7], before, start, end, 0, 10.0, 0, 100.0);
        assert_eq!(
            (idle.cpu_us_per_delivery, idle.rss_per_connection_bytes),
            (0.0, 0.0)
        );
        assert!(c.table().contains("30.00 µs"));
    }

    #[test]
    fn this_process_can_be_read() {
        let me = sample(std::process::id()).unwrap();
        assert!(me.rss > 0);
        assert!(sample(u32::MAX).is_err(), "no such process");
    }
}
