//! The CQL schema of the `scylla` backend: the template `schema/presenced.cql`, rendered for a
//! configuration (`presenced schema print`), split into statements and applied one by one
//! (`presenced schema apply`).

use crate::config::ScyllaConfig;

/// The template, as shipped in `schema/`.
pub const TEMPLATE: &str = include_str!("../../schema/presenced.cql");

/// Session buckets per hour in `sessions_by_hour`. Part of the data layout: readers look in
/// exactly these buckets, so changing it hides what was written before.
pub const SESSION_BUCKETS: u32 = 8;

/// The longest TTL CQL accepts (20 years).
const TTL_MAX_S: u64 = 630_720_000;

/// TimeWindowCompactionStrategy works best with a few tens of windows over the retention.
const WINDOWS_PER_RETENTION: u32 = 30;

/// Seconds rows live: the retention.
pub fn ttl_s(retention_days: u32) -> u64 {
    (u64::from(retention_days) * 86_400).min(TTL_MAX_S)
}

/// Days per compaction window: about [`WINDOWS_PER_RETENTION`] windows over the retention.
pub fn window_days(retention_days: u32) -> u32 {
    retention_days.div_ceil(WINDOWS_PER_RETENTION).max(1)
}

/// A CQL string literal.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The keyspace's replication map. Errors name the config key.
pub fn replication(cfg: &ScyllaConfig) -> Result<String, String> {
    match cfg.replication.as_str() {
        "SimpleStrategy" => {
            if cfg.replication_factor == 0 {
                return Err("history.scylla.replication_factor: at least 1".into());
            }
            Ok(format!(
                "{{'class': 'SimpleStrategy', 'replication_factor': {}}}",
                cfg.replication_factor
            ))
        }
        "NetworkTopologyStrategy" => {
            if cfg.datacenters.is_empty() || cfg.datacenters.values().any(|&n| n == 0) {
                return Err(
                    "history.scylla.datacenters: NetworkTopologyStrategy needs at least one \
                     datacenter, each with at least one replica"
                        .into(),
                );
            }
            let dcs: Vec<String> = cfg
                .datacenters
                .iter()
                .map(|(dc, n)| format!("{}: {n}", quote(dc)))
                .collect();
            Ok(format!(
                "{{'class': 'NetworkTopologyStrategy', {}}}",
                dcs.join(", ")
            ))
        }
        other => Err(format!(
            "history.scylla.replication: `{other}`: NetworkTopologyStrategy or SimpleStrategy"
        )),
    }
}

/// The schema for `cfg`, as `schema print` shows it and `schema apply` runs it.
pub fn render(cfg: &ScyllaConfig, retention_days: u32) -> Result<String, String> {
    let ok_name = !cfg.keyspace.is_empty()
        && cfg
            .keyspace
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !ok_name {
        return Err("history.scylla.keyspace: letters, digits and _ only".into());
    }
    Ok(TEMPLATE
        .replace("{keyspace}", &cfg.keyspace)
        .replace("{replication}", &replication(cfg)?)
        .replace("{ttl_s}", &ttl_s(retention_days).to_string())
        .replace("{window_days}", &window_days(retention_days).to_string()))
}

/// The statements of a CQL script: `--` comments dropped, split at `;`. (The schema has no `;`
/// or `--` inside string literals, so this needs no real lexer.)
pub fn statements(cql: &str) -> Vec<String> {
    let code: String = cql
        .lines()
        .map(|l| l.split_once("--").map_or(l, |(code, _)| code))
        .collect::<Vec<_>>()
        .join("\n");
    code.split(';')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Runs `cql`'s statements in order (each `IF NOT EXISTS`: applying twice changes nothing) and
/// returns how many ran. With `auto_await_schema_agreement` on the session (the default), each
/// waits until every node has the change.
pub async fn apply(
    session: &::scylla::client::session::Session,
    cql: &str,
) -> Result<usize, String> {
    let all = statements(cql);
    for (i, s) in all.iter().enumerate() {
        let first_line = s.lines().next().unwrap_or_default();
        session
            .query_unpaged(s.as_str(), ())
            .await
            .map_err(|e| format!("statement {} (`{first_line}`): {e}", i + 1))?;
    }
    Ok(all.len())
}

/// Columns added to tables after they were first released: (table, column, CQL type). A
/// keyspace made by an older `schema apply` has the table without them; `CREATE TABLE IF NOT
/// EXISTS` does not add them, so `apply_config` does.
pub const ADDED_COLUMNS: &[(&str, &str, &str)] = &[("sessions_by_hour", "status", "text")];

/// The `ALTER TABLE` statements that bring `table` (with `existing` columns) up to date. No
/// columns known (the cluster did not list any) means nothing to do: the table was just created
/// with every column, or cannot be read, and an `ALTER` would then be a guess.
pub fn migrations(keyspace: &str, table: &str, existing: &[String]) -> Vec<String> {
    if existing.is_empty() {
        return Vec::new();
    }
    ADDED_COLUMNS
        .iter()
        .filter(|(t, c, _)| *t == table && !existing.iter().any(|e| e == c))
        .map(|(t, c, ty)| format!("ALTER TABLE {keyspace}.{t} ADD {c} {ty}"))
        .collect()
}

/// Adds the columns of [`ADDED_COLUMNS`] that an older keyspace lacks; returns how many.
async fn migrate(
    session: &::scylla::client::session::Session,
    keyspace: &str,
) -> Result<usize, String> {
    let mut ran = 0;
    let tables: std::collections::BTreeSet<&str> = ADDED_COLUMNS.iter().map(|a| a.0).collect();
    for table in tables {
        let failed =
            |e: &dyn std::fmt::Display| format!("reading the columns of {keyspace}.{table}: {e}");
        let rows = session
            .query_unpaged(
                "SELECT column_name FROM system_schema.columns \
                 WHERE keyspace_name = ? AND table_name = ?",
                (keyspace, table),
            )
            .await
            .map_err(|e| failed(&e))?
            .into_rows_result()
            .map_err(|e| failed(&e))?;
        let existing: Vec<String> = rows
            .rows::<(String,)>()
            .map_err(|e| failed(&e))?
            .filter_map(Result::ok)
            .map(|(c,)| c)
            .collect();
        for alter in migrations(keyspace, table, &existing) {
            session
                .query_unpaged(alter.as_str(), ())
                .await
                .map_err(|e| format!("`{alter}`: {e}"))?;
            ran += 1;
        }
    }
    Ok(ran)
}

/// Connects to `cfg.nodes` and applies the schema rendered for `cfg`, then adds the columns an
/// older keyspace lacks: what `presenced schema apply` does. Idempotent.
pub async fn apply_config(cfg: &ScyllaConfig, retention_days: u32) -> Result<usize, String> {
    let cql = render(cfg, retention_days)?;
    let session = super::scylla::connect(cfg).await.map_err(|e| e.message)?;
    let created = apply(&session, &cql).await?;
    Ok(created + migrate(&session, &cfg.keyspace).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_add_only_the_missing_columns() {
        let old: Vec<String> = ["hour", "bucket", "ts", "user", "kind"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            migrations("ks", "sessions_by_hour", &old),
            vec!["ALTER TABLE ks.sessions_by_hour ADD status text"]
        );
        let mut new = old.clone();
        new.push("status".into());
        assert!(migrations("ks", "sessions_by_hour", &new).is_empty());
        assert!(migrations("ks", "events_by_user", &old).is_empty());
        assert!(
            migrations("ks", "sessions_by_hour", &[]).is_empty(),
            "nothing known: no guess"
        );
    }

    fn cfg() -> ScyllaConfig {
        ScyllaConfig::default()
    }

    #[test]
    fn renders_every_placeholder() {
        let cql = render(&cfg(), 30).unwrap();
        assert!(
            !cql.contains("{keyspace}") && !cql.contains("{ttl_s}"),
            "{cql}"
        );
        assert!(!cql.contains("{window_days}") && !cql.contains("{replication}"));
        assert!(cql.contains("default_time_to_live = 2592000"));
        assert!(cql.contains("'compaction_window_size': 1}"));
        assert!(cql.contains(
            "CREATE KEYSPACE IF NOT EXISTS presenced\n    WITH replication = \
             {'class': 'NetworkTopologyStrategy', 'datacenter1': 3}"
        ));
    }

    #[test]
    fn every_statement_is_idempotent_and_every_table_expires_and_uses_twcs() {
        let all = statements(&render(&cfg(), 7).unwrap());
        assert_eq!(all.len(), 4, "a keyspace and three tables");
        for s in &all {
            assert!(s.contains(" IF NOT EXISTS "), "{s}");
            assert!(!s.contains("--"), "comments are stripped: {s}");
        }
        for s in &all[1..] {
            assert!(s.contains("default_time_to_live = 604800"), "{s}");
            assert!(s.contains("TimeWindowCompactionStrategy"), "{s}");
        }
    }

    #[test]
    fn replication_follows_the_config() {
        let mut c = cfg();
        c.replication = "SimpleStrategy".into();
        c.replication_factor = 2;
        assert_eq!(
            replication(&c).unwrap(),
            "{'class': 'SimpleStrategy', 'replication_factor': 2}"
        );
        c.replication = "NetworkTopologyStrategy".into();
        c.datacenters = [("eu'west".to_owned(), 3), ("us".to_owned(), 2)].into();
        assert_eq!(
            replication(&c).unwrap(),
            "{'class': 'NetworkTopologyStrategy', 'eu''west': 3, 'us': 2}"
        );
        c.datacenters.clear();
        assert!(replication(&c)
            .unwrap_err()
            .starts_with("history.scylla.datacenters"));
    }

    #[test]
    fn windows_and_ttl_scale_with_retention() {
        assert_eq!(
            (window_days(1), window_days(30), window_days(31)),
            (1, 1, 2)
        );
        assert_eq!(window_days(365), 13);
        assert_eq!(ttl_s(1), 86_400);
        assert_eq!(ttl_s(u32::MAX), TTL_MAX_S);
    }
}
