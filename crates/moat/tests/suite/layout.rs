//! The crate layout stays as DESIGN.md draws it: dependencies point one way, the agent (the
//! program inside every sandbox) depends only on the protocol, the policy and the syscalls,
//! and `unsafe` has one home. Read from each crate's Cargo.toml, so a new `[dependencies]`
//! line that breaks a rule fails here.

use std::collections::BTreeMap;
use std::path::Path;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(Path::parent)
        .expect("the workspace root")
}

/// Every workspace crate and its manifest.
fn manifests() -> BTreeMap<String, toml::Table> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(root().join("crates")).expect("crates/") {
        let path = entry.expect("crates/ entry").path().join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let table: toml::Table = text.parse().expect("a Cargo.toml that parses");
        let name = table["package"]["name"]
            .as_str()
            .expect("package.name")
            .to_string();
        out.insert(name, table);
    }
    out
}

/// The moat crates a manifest lists under `[dependencies]` (what the crate's code can use;
/// tests' dev-dependencies are not its surface).
fn moat_deps(m: &toml::Table) -> Vec<String> {
    m.get("dependencies")
        .and_then(toml::Value::as_table)
        .map(|d| {
            d.keys()
                .filter(|k| k.starts_with("moat"))
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

/// The layers, bottom first: a crate may depend only on crates of lower layers.
const LAYERS: &[&[&str]] = &[
    &["moat-api", "moat-policy", "moat-sys"],
    &["moat-proto"],
    &["moat-agent"],
    &["moat-tls"],
    &["moat-egress", "moat-backend", "moat-image"],
    &["moat-engine"],
    &["moat-server"],
    &["moat"],
];

fn layer_of(name: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&name))
}

#[test]
fn every_crate_has_a_place_in_the_layers() {
    let m = manifests();
    assert!(m.len() >= 10, "found only {:?}", m.keys());
    for name in m.keys() {
        assert!(
            layer_of(name).is_some(),
            "crate {name} is in no layer: add it to LAYERS (and DESIGN.md's layout)"
        );
    }
}

#[test]
fn dependencies_point_down() {
    for (name, m) in manifests() {
        let mine = layer_of(&name).expect("a layer");
        for dep in moat_deps(&m) {
            let theirs = layer_of(&dep).unwrap_or(usize::MAX);
            assert!(
                theirs < mine,
                "{name} depends on {dep}, which is not below it in the layers"
            );
        }
    }
}

#[test]
fn the_agent_depends_on_proto_policy_and_sys_only() {
    let m = manifests();
    let mut deps = moat_deps(&m["moat-agent"]);
    deps.sort();
    for d in &deps {
        assert!(
            ["moat-policy", "moat-proto", "moat-sys"].contains(&d.as_str()),
            "moat-agent depends on {d}: the agent's dependencies are its attack surface"
        );
    }
    // And it does use them: the rule is not met by an empty crate.
    assert_eq!(deps, ["moat-policy", "moat-proto", "moat-sys"]);
    let proto = moat_deps(&m["moat-proto"]);
    assert!(
        proto.iter().all(|d| d == "moat-api" || d == "moat-policy"),
        "moat-proto depends on {proto:?}"
    );
}

#[test]
fn the_server_only_adapts() {
    // The HTTP and MCP front ends reach sandboxes through the engine alone: no tier, no
    // syscall, no agent of their own.
    let m = manifests();
    let deps = moat_deps(&m["moat-server"]);
    for banned in [
        "moat-backend",
        "moat-sys",
        "moat-agent",
        "moat-egress",
        "moat-tls",
    ] {
        assert!(
            !deps.iter().any(|d| d == banned),
            "moat-server depends on {banned}: that belongs to moat-engine (the lifecycle)"
        );
    }
    assert!(deps.iter().any(|d| d == "moat-engine"), "{deps:?}");
    // And the lifecycle's modules live in the engine, not in the server.
    let src = root().join("crates/moat-server/src");
    for moved in [
        "app.rs",
        "pool.rs",
        "agent_client.rs",
        "egress.rs",
        "events.rs",
    ] {
        assert!(
            !src.join(moved).exists(),
            "crates/moat-server/src/{moved} is lifecycle code: it belongs in moat-engine"
        );
    }
}

#[test]
fn the_cli_owns_no_lifecycle() {
    // `moat run` is the engine's one-shot path, not a pipeline of the CLI's own.
    let src = root().join("crates/moat/src");
    assert!(
        !src.join("run_agent.rs").exists(),
        "crates/moat/src/run_agent.rs: a one-shot pipeline belongs in moat-engine (oneshot.rs)"
    );
    let main = std::fs::read_to_string(src.join("main.rs")).expect("main.rs");
    for call in ["moat_backend::run(", "spawn_any(", "destroy_spawned("] {
        assert!(
            !main.contains(call),
            "main.rs calls {call}: the CLI starts sandboxes through moat_engine::oneshot"
        );
    }
}

#[test]
fn unsafe_is_forbidden_outside_moat_sys() {
    let ws: toml::Table = std::fs::read_to_string(root().join("Cargo.toml"))
        .expect("Cargo.toml")
        .parse()
        .expect("the workspace manifest parses");
    assert_eq!(
        ws["workspace"]["lints"]["rust"]["unsafe_code"].as_str(),
        Some("forbid")
    );
    for (name, m) in manifests() {
        if name == "moat-sys" {
            continue;
        }
        let inherits = m
            .get("lints")
            .and_then(|l| l.get("workspace"))
            .and_then(toml::Value::as_bool);
        assert_eq!(
            inherits,
            Some(true),
            "{name} must take the workspace lints (unsafe_code = forbid)"
        );
    }
}
