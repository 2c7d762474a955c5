//! `presenced topology`: the machine's CPUs as glommio sees them (CPU, core, package, NUMA
//! node), SMT siblings, and the shard → CPU plan the given flags would produce, judged: an error
//! for a plan `serve` would refuse, a warning for one it would run poorly.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::config::{Config, HistoryBackend, Placement};
use crate::shard::runtime::plan_cpus;

/// What `presenced topology` prints.
#[derive(Debug, Default)]
pub struct Report {
    /// The machine and the plan, for stdout.
    pub text: String,
    /// The plan runs, but poorly (shards sharing a CPU or a core, the history writer on a
    /// shard's CPU or on a CPU that is not online).
    pub warnings: Vec<String>,
    /// `serve` would refuse the plan (a shard pinned to a CPU that is not online, a placement
    /// glommio cannot make).
    pub errors: Vec<String>,
}

/// A CPU as the machine describes it.
struct Cpu {
    cpu: usize,
    core: usize,
    package: usize,
    numa: usize,
}

/// The report for `cfg` (already validated). Fails only when the online CPUs cannot be read.
pub fn report(cfg: &Config) -> Result<Report, String> {
    let online = glommio::CpuSet::online().map_err(|e| e.to_string())?;
    let mut cpus: Vec<Cpu> = online
        .iter()
        .map(|c| Cpu {
            cpu: c.cpu,
            core: c.core,
            package: c.package,
            numa: c.numa_node,
        })
        .collect();
    cpus.sort_by_key(|c| c.cpu);
    Ok(judge(cfg, &cpus, plan_cpus(cfg, cfg.shard_count())))
}

fn judge(
    cfg: &Config,
    cpus: &[Cpu],
    plan: Result<Vec<Option<usize>>, impl std::fmt::Display>,
) -> Report {
    let mut r = Report::default();
    machine(&mut r.text, cpus);
    let flags = flag_spelling(cfg, cfg.shard_count());
    let _ = writeln!(r.text, "\nplan: {flags}");
    let plan = match plan {
        Ok(plan) => plan,
        Err(e) => {
            r.errors.push(format!("{flags}: {e}"));
            return r;
        }
    };
    let online = |c: usize| cpus.iter().find(|l| l.cpu == c);
    for (ix, cpu) in plan.iter().enumerate() {
        let place = match cpu.map(|c| (c, online(c))) {
            Some((c, Some(l))) => format!("cpu {c} (core {}, numa {})", l.core, l.numa),
            Some((c, None)) => format!("cpu {c} (not online)"),
            None => "unpinned".to_owned(),
        };
        let _ = writeln!(r.text, "  shard {ix} -> {place}");
    }
    let pinned: Vec<usize> = plan.iter().flatten().copied().collect();
    let mut offline: Vec<usize> = pinned
        .iter()
        .copied()
        .filter(|&c| online(c).is_none())
        .collect();
    offline.sort_unstable();
    offline.dedup();
    if !offline.is_empty() {
        r.errors.push(format!(
            "{flags}: CPU(s) {} not online (online: {}); a shard cannot run there",
            cpu_list(&offline),
            online_list(cpus)
        ));
    }
    let mut distinct = pinned.clone();
    distinct.sort_unstable();
    distinct.dedup();
    if distinct.len() < pinned.len() {
        r.warnings.push(format!(
            "{flags}: {} shards on {} CPU(s): shards sharing a CPU take turns on it; give each \
             shard a CPU of its own (fewer --shards, or more --cpus)",
            pinned.len(),
            distinct.len()
        ));
    }
    let smt = cores(cpus)
        .values()
        .filter(|sib| sib.iter().filter(|c| distinct.contains(c)).count() > 1)
        .count();
    if smt > 0 {
        r.warnings.push(format!(
            "{flags}: {smt} physical core(s) carry two shards on SMT siblings; prefer one shard \
             per core"
        ));
    }
    history_cpu(cfg, &plan, cpus, &mut r);
    r
}

/// Where the history writer runs, and whether that is a good place.
fn history_cpu(cfg: &Config, plan: &[Option<usize>], cpus: &[Cpu], r: &mut Report) {
    if cfg.history.backend == HistoryBackend::Off {
        return;
    }
    let Some(cpu) = cfg.history.cpu else {
        let _ = writeln!(r.text, "  history writer -> unpinned");
        return;
    };
    let _ = writeln!(r.text, "  history writer -> cpu {cpu}");
    if !cpus.iter().any(|c| c.cpu == cpu) {
        // `serve` starts, logs that it cannot pin the writer, and leaves it unpinned.
        r.warnings.push(format!(
            "history.cpu = {cpu}: not online (online: {}); the writer would run unpinned",
            online_list(cpus)
        ));
    }
    if let Some(shard) = plan.iter().position(|c| *c == Some(cpu)) {
        r.warnings.push(format!(
            "history.cpu = {cpu}: shard {shard} is pinned there too; keep the writer off the \
             shard CPUs"
        ));
    }
}

/// The machine: each CPU, physical cores with their SMT siblings, NUMA nodes.
fn machine(w: &mut String, cpus: &[Cpu]) {
    let _ = writeln!(w, "online CPUs: {}", cpus.len());
    let _ = writeln!(
        w,
        "{:>5} {:>5} {:>8} {:>5}",
        "cpu", "core", "package", "numa"
    );
    for c in cpus {
        let _ = writeln!(
            w,
            "{:>5} {:>5} {:>8} {:>5}",
            c.cpu, c.core, c.package, c.numa
        );
    }
    let cores = cores(cpus);
    let mut numa: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for c in cpus {
        numa.entry(c.numa).or_default().push(c.cpu);
    }
    let _ = writeln!(w, "\nphysical cores: {}", cores.len());
    for ((package, core), siblings) in &cores {
        let smt = if siblings.len() > 1 {
            "  (SMT siblings)"
        } else {
            ""
        };
        let _ = writeln!(w, "  package {package} core {core}: cpus {siblings:?}{smt}");
    }
    let _ = writeln!(w, "NUMA nodes: {}", numa.len());
    for (node, list) in &numa {
        let _ = writeln!(w, "  node {node}: cpus {list:?}");
    }
}

/// Physical cores, (package, core) → their CPUs (SMT siblings share one).
fn cores(cpus: &[Cpu]) -> BTreeMap<(usize, usize), Vec<usize>> {
    let mut cores: BTreeMap<(usize, usize), Vec<usize>> = BTreeMap::new();
    for c in cpus {
        cores.entry((c.package, c.core)).or_default().push(c.cpu);
    }
    cores
}

/// The online CPUs as `--cpus` spells them.
fn online_list(cpus: &[Cpu]) -> String {
    cpu_list(&cpus.iter().map(|c| c.cpu).collect::<Vec<_>>())
}

/// The plan as the flags that ask for it: `--shards 4 --placement fixed --cpus 0-3`.
fn flag_spelling(cfg: &Config, shards: usize) -> String {
    let mut s = format!(
        "--shards {shards} --placement {}",
        placement_name(cfg.placement)
    );
    if !cfg.cpus.is_empty() && cfg.placement != Placement::Unbound {
        let _ = write!(s, " --cpus {}", cfg.cpus);
    }
    s
}

/// The name the flag and the config file use (`max-spread`).
fn placement_name(p: Placement) -> &'static str {
    match p {
        Placement::MaxSpread => "max-spread",
        Placement::MaxPack => "max-pack",
        Placement::Fixed => "fixed",
        Placement::Unbound => "unbound",
    }
}

/// Sorted, distinct CPUs as a list the `--cpus` flag takes: `[0, 1, 2, 3, 6]` → `0-3,6`.
fn cpu_list(cpus: &[usize]) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < cpus.len() {
        let mut j = i;
        while j + 1 < cpus.len() && cpus[j + 1] == cpus[j] + 1 {
            j += 1;
        }
        if !out.is_empty() {
            out.push(',');
        }
        let _ = if j > i {
            write!(out, "{}-{}", cpus[i], cpus[j])
        } else {
            write!(out, "{}", cpus[i])
        };
        i = j + 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Four CPUs: two cores with two SMT siblings each (cpu 0 and 2 share core 0).
    fn machine4() -> Vec<Cpu> {
        (0..4)
            .map(|cpu| Cpu {
                cpu,
                core: cpu % 2,
                package: 0,
                numa: 0,
            })
            .collect()
    }

    fn cfg(edit: impl FnOnce(&mut Config)) -> Config {
        let mut c = Config::default();
        edit(&mut c);
        c
    }

    fn judged(c: &Config) -> Report {
        judge(c, &machine4(), plan_cpus(c, c.shard_count()))
    }

    #[test]
    fn names_and_lists_read_as_flags() {
        assert_eq!(cpu_list(&[0, 1, 2, 3, 6]), "0-3,6");
        assert_eq!(cpu_list(&[5]), "5");
        assert_eq!(cpu_list(&[1, 3, 4]), "1,3-4");
        for p in [
            Placement::MaxSpread,
            Placement::MaxPack,
            Placement::Fixed,
            Placement::Unbound,
        ] {
            let via_serde = toml::Value::try_from(p).unwrap();
            assert_eq!(via_serde.as_str(), Some(placement_name(p)));
        }
    }

    #[test]
    fn a_good_plan_has_no_findings() {
        let c = cfg(|c| {
            c.shards = 2;
            c.cpus = "0-1".into();
            c.placement = Placement::Fixed;
            c.history.cpu = Some(3);
        });
        let r = judged(&c);
        assert!(r.errors.is_empty() && r.warnings.is_empty(), "{r:?}");
        assert!(
            r.text
                .contains("plan: --shards 2 --placement fixed --cpus 0-1"),
            "{}",
            r.text
        );
        assert!(r.text.contains("history writer -> cpu 3"), "{}", r.text);
    }

    #[test]
    fn offline_cpus_are_errors_and_crowding_is_a_warning() {
        let offline = judged(&cfg(|c| {
            c.shards = 2;
            c.cpus = "3-4".into();
            c.placement = Placement::Fixed;
        }));
        assert_eq!(offline.errors.len(), 1, "{offline:?}");
        assert!(offline.errors[0].contains("CPU(s) 4 not online (online: 0-3)"));
        let shared = judged(&cfg(|c| {
            c.shards = 3;
            c.cpus = "1".into();
            c.placement = Placement::Fixed;
        }));
        assert!(shared.errors.is_empty(), "{shared:?}");
        assert!(
            shared.warnings[0].contains("3 shards on 1 CPU(s)"),
            "{shared:?}"
        );
        let siblings = judged(&cfg(|c| {
            c.shards = 2;
            c.cpus = "0,2".into();
            c.placement = Placement::Fixed;
        }));
        assert!(
            siblings.warnings[0].contains("SMT siblings"),
            "{siblings:?}"
        );
    }

    #[test]
    fn the_history_writer_is_judged_too() {
        let offline = judged(&cfg(|c| {
            c.placement = Placement::Unbound;
            c.history.cpu = Some(9);
        }));
        assert!(
            offline.warnings[0].contains("history.cpu = 9: not online"),
            "{offline:?}"
        );
        let on_a_shard = judged(&cfg(|c| {
            c.shards = 2;
            c.cpus = "0-1".into();
            c.placement = Placement::Fixed;
            c.history.cpu = Some(1);
        }));
        assert!(on_a_shard.warnings[0].contains("shard 1 is pinned there too"));
        let off = judged(&cfg(|c| {
            c.placement = Placement::Unbound;
            c.history.cpu = Some(9);
            c.history.backend = HistoryBackend::Off;
        }));
        assert!(off.warnings.is_empty() && !off.text.contains("history writer"));
    }
}
