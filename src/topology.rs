//! `presenced topology`: the machine's CPUs as glommio sees them (CPU, core, package, NUMA
//! node), SMT siblings, and the shard → CPU plan the given flags would produce.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::config::Config;
use crate::shard::runtime::plan_cpus;

/// The report, as text. Errors are placement errors (e.g. a CPU that is not online).
pub fn report(cfg: &Config) -> Result<String, String> {
    let online = glommio::CpuSet::online().map_err(|e| e.to_string())?;
    let mut cpus: Vec<_> = online.iter().cloned().collect();
    cpus.sort_by_key(|c| c.cpu);
    let mut out = String::new();
    let w = &mut out;
    let _ = writeln!(w, "online CPUs: {}", cpus.len());
    let _ = writeln!(
        w,
        "{:>5} {:>5} {:>8} {:>5}",
        "cpu", "core", "package", "numa"
    );
    for c in &cpus {
        let _ = writeln!(
            w,
            "{:>5} {:>5} {:>8} {:>5}",
            c.cpu, c.core, c.package, c.numa_node
        );
    }
    let mut cores: BTreeMap<(usize, usize), Vec<usize>> = BTreeMap::new();
    let mut numa: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for c in &cpus {
        cores.entry((c.package, c.core)).or_default().push(c.cpu);
        numa.entry(c.numa_node).or_default().push(c.cpu);
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
    let shards = cfg.shard_count();
    let plan = plan_cpus(cfg, shards).map_err(|e| e.to_string())?;
    let _ = writeln!(
        w,
        "\nplan: {shards} shard(s), placement {:?}{}",
        cfg.placement,
        if cfg.cpus.is_empty() {
            String::new()
        } else {
            format!(", cpus {}", cfg.cpus)
        }
    );
    for (ix, cpu) in plan.iter().enumerate() {
        let place = match cpu {
            Some(c) => {
                let loc = cpus.iter().find(|l| l.cpu == *c);
                let detail = loc.map_or_else(
                    || " (not online!)".to_owned(),
                    |l| format!(" (core {}, numa {})", l.core, l.numa_node),
                );
                format!("cpu {c}{detail}")
            }
            None => "unpinned".to_owned(),
        };
        let _ = writeln!(w, "  shard {ix} -> {place}");
    }
    let pinned: Vec<usize> = plan.iter().flatten().copied().collect();
    let shared = cores
        .values()
        .filter(|sib| sib.iter().filter(|c| pinned.contains(c)).count() > 1)
        .count();
    if shared > 0 {
        let _ = writeln!(
            w,
            "warning: {shared} physical core(s) carry two shards on SMT siblings; prefer one shard per core"
        );
    }
    let mut dup = pinned.clone();
    dup.sort_unstable();
    dup.dedup();
    if dup.len() < pinned.len() {
        let _ = writeln!(w, "warning: several shards share a CPU");
    }
    Ok(out)
}
