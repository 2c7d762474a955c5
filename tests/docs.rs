//! Proves the documentation keeps up with the code: every configuration key the server accepts
//! appears in docs/CONFIG.md, and every error code and close code the server can send appears in
//! docs/PROTOCOL.md.

use std::path::Path;

fn doc(name: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("docs")
            .join(name),
    )
    .unwrap()
}

/// All keys of a TOML table, as `section.key` paths.
fn keys(prefix: &str, table: &toml::Table, out: &mut Vec<String>) {
    for (k, v) in table {
        match v {
            // A map whose keys the operator names (datacenters): the map is the key.
            toml::Value::Table(_) if k == "datacenters" => out.push(format!("{prefix}{k}")),
            toml::Value::Table(t) => keys(&format!("{prefix}{k}."), t, out),
            _ => out.push(format!("{prefix}{k}")),
        }
    }
}

#[test]
fn config_md_lists_every_key() {
    // Optional keys only serialise when set.
    let mut cfg = presenced::Config {
        jwt_secret: Some("x".into()),
        ..presenced::Config::default()
    };
    cfg.admin.token = Some("t".into());
    cfg.history.cpu = Some(1);
    cfg.history.scylla.local_dc = Some("dc".into());
    cfg.history.scylla.username = Some("u".into());
    cfg.history.scylla.password = Some("p".into());
    cfg.tls.cert = Some("c".into());
    cfg.tls.key = Some("k".into());
    cfg.tls.listen = Some("127.0.0.1:1".parse().unwrap());
    cfg.auth.jwks = Some("j".into());
    cfg.auth.issuer = Some("i".into());
    cfg.cluster = Some(presenced::config::ClusterConfig {
        node_id: Some("n".into()),
        user: Some("u".into()),
        password: Some("p".into()),
        token: Some("t".into()),
        credentials_file: Some("c".into()),
        tls_ca: Some("ca".into()),
        tls_cert: Some("c".into()),
        tls_key: Some("k".into()),
        ..Default::default()
    });
    let table: toml::Table = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
    let mut all = Vec::new();
    keys("", &table, &mut all);
    let text = doc("CONFIG.md");
    let missing: Vec<&String> = all
        .iter()
        .filter(|k| {
            let leaf = k.rsplit('.').next().unwrap();
            !text.contains(&format!("`{leaf}`"))
        })
        .collect();
    assert!(missing.is_empty(), "undocumented keys: {missing:?}");
    assert!(all.len() > 30, "walked the whole config: {}", all.len());
}

#[test]
fn protocol_md_lists_every_code() {
    let text = doc("PROTOCOL.md");
    for code in presenced::protocol::ErrorCode::ALL {
        let code = code.as_str();
        assert!(text.contains(&format!("`{code}`")), "error code {code}");
    }
    for close in [
        "1000", "1001", "1002", "1007", "1009", "1011", "4001", "4003", "4008", "4009",
    ] {
        assert!(text.contains(&format!("| {close} |")), "close code {close}");
    }
    for status in [
        "400", "401", "403", "404", "405", "408", "429", "431", "503",
    ] {
        assert!(
            text.contains(&format!("| {status} |")),
            "HTTP status {status}"
        );
    }
}

#[test]
fn config_md_lists_every_range() {
    let text = doc("CONFIG.md");
    for (key, min, max) in presenced::config::RANGES {
        let row = format!("| `{key}` | {min} | {max} |");
        assert!(text.contains(&row), "CONFIG.md lacks the range row {row}");
    }
}
