//! The README's two opening commands stay true: the first runs moat (a `cargo run` in this
//! workspace must name its package, since the workspace has more than one binary), and the
//! second is the test command that `.ci/run` runs, letter for letter.

use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .and_then(Path::parent)
        .expect("the workspace root")
}

/// The command lines of the README's first `sh` block (comments dropped).
fn opening_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md");
    let block = readme
        .split("```sh\n")
        .nth(1)
        .and_then(|b| b.split("```").next())
        .expect("the README opens with a sh block");
    block
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(str::to_owned)
        .collect()
}

#[test]
fn the_readme_s_first_command_names_the_binary_it_runs() {
    let cmds = opening_commands();
    assert_eq!(cmds.len(), 2, "{cmds:?}");
    let run = &cmds[0];
    assert!(run.starts_with("cargo run --release"), "{run}");
    let meta = Command::new(env!("CARGO"))
        .args(["metadata", "--no-deps", "--format-version", "1"])
        .current_dir(root())
        .output()
        .expect("cargo metadata");
    assert!(
        meta.status.success(),
        "{}",
        String::from_utf8_lossy(&meta.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&meta.stdout).unwrap();
    let bins: Vec<String> = v["packages"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter())
        .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "bin"))
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(bins.contains(&"moat".to_string()), "{bins:?}");
    if bins.len() > 1 {
        // Else cargo stops with "could not determine which binary to run".
        assert!(
            run.contains(" -p moat ") || run.contains(" --bin moat "),
            "the workspace has the binaries {bins:?}: `{run}` must name moat's"
        );
    }
}

#[test]
fn ci_runs_the_readme_s_test_command() {
    let cmds = opening_commands();
    let ci = std::fs::read_to_string(root().join(".ci/run")).expect(".ci/run");
    assert!(
        ci.contains(&cmds[1]),
        ".ci/run does not run the README's test command `{}`",
        cmds[1]
    );
}
