//! What a run does: presets (`idle`, `churn`, `fanout`, `storm`), a TOML scenario file with the
//! same keys, and flags on top — merged in that order.

use serde::{Deserialize, Serialize};

use crate::plan::Pattern;

/// A fully resolved run. Every field bounded (see [`Scenario::check`]).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Connections in the whole fleet (all workers together).
    pub connections: usize,
    /// New connections per second (this worker's share of the fleet rate); 0 = as fast as possible.
    pub rate: u64,
    /// Users each connection watches.
    pub watch: usize,
    pub pattern: Pattern,
    /// Groups: 0 = none; else user i carries group `g{i % groups}` and subscribes to it.
    pub groups: usize,
    /// Fraction of users that flap their status in the run phase.
    pub flap_fraction: f64,
    /// Status changes per second, whole fleet.
    pub flaps_per_sec: u64,
    /// Length of the run phase, seconds.
    pub duration_s: f64,
}

/// Hard caps: a run always stops by itself and stays within what one machine can hold.
pub const MAX_CONNECTIONS: usize = 1_000_000;
pub const MAX_DURATION_S: f64 = 3600.0;
pub const MAX_WATCH: usize = 1000;

impl Scenario {
    pub fn preset(name: &str) -> Option<Scenario> {
        let base = Scenario {
            connections: 1000,
            rate: 2000,
            watch: 20,
            pattern: Pattern::Ring,
            groups: 0,
            flap_fraction: 0.0,
            flaps_per_sec: 0,
            duration_s: 10.0,
        };
        Some(match name {
            // Hold connections and subscriptions open: memory per idle connection.
            "idle" => base,
            // Everyone watches a few others; a tenth of the users change status steadily.
            "churn" => Scenario {
                flap_fraction: 0.1,
                flaps_per_sec: 500,
                watch: 10,
                ..base
            },
            // Popular users (Zipf): one change reaches many subscribers.
            "fanout" => Scenario {
                pattern: Pattern::Zipf,
                flap_fraction: 0.01,
                flaps_per_sec: 200,
                ..base
            },
            // Everyone connects at once, then statuses flap: handshake throughput.
            "storm" => Scenario {
                rate: 0,
                watch: 5,
                flap_fraction: 0.2,
                flaps_per_sec: 1000,
                duration_s: 5.0,
                ..base
            },
            _ => return None,
        })
    }

    /// A scenario file: any subset of the keys, applied over `self`.
    pub fn merge_toml(self, text: &str) -> Result<Scenario, String> {
        let mut table = toml::Table::try_from(&self).map_err(|e| e.to_string())?;
        let patch: toml::Table = toml::from_str(text).map_err(|e| e.to_string())?;
        for (k, v) in patch {
            if !table.contains_key(&k) {
                return Err(format!("unknown scenario key `{k}`"));
            }
            table.insert(k, v);
        }
        table.try_into().map_err(|e: toml::de::Error| e.to_string())
    }

    pub fn check(&self) -> Result<(), String> {
        if self.connections == 0 || self.connections > MAX_CONNECTIONS {
            return Err(format!("connections: 1 to {MAX_CONNECTIONS}"));
        }
        if !(self.duration_s > 0.0 && self.duration_s <= MAX_DURATION_S) {
            return Err(format!("duration: above 0 and at most {MAX_DURATION_S} s"));
        }
        if self.watch > MAX_WATCH {
            return Err(format!("watch: at most {MAX_WATCH}"));
        }
        if !(0.0..=1.0).contains(&self.flap_fraction) {
            return Err("flap_fraction: between 0 and 1".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid_and_files_patch_them() {
        for p in ["idle", "churn", "fanout", "storm"] {
            Scenario::preset(p).unwrap().check().unwrap();
        }
        let s = Scenario::preset("churn")
            .unwrap()
            .merge_toml("connections = 50\npattern = \"zipf\"\n")
            .unwrap();
        assert_eq!((s.connections, s.pattern, s.watch), (50, Pattern::Zipf, 10));
        assert!(Scenario::preset("idle")
            .unwrap()
            .merge_toml("conections = 1")
            .is_err());
        let mut bad = Scenario::preset("idle").unwrap();
        bad.duration_s = 0.0;
        assert!(bad.check().is_err());
    }
}
