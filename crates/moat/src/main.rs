//! The `moat` command: `moat run` runs one command in a fresh sandbox; `moat doctor` says what
//! this host supports; `moat serve` runs the daemon and the other commands are its client
//! (see `client`).

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use moat_api::{ExecResult, Layers, Status, Truncated};
use moat_backend::probe;
use moat_policy::{parse_bytes, parse_duration, Layer, Mount, Policy};
use std::io::Write;

mod client;
mod egress_args;
mod mcp;

#[derive(Parser)]
#[command(
    name = "moat",
    version,
    about = "A sandbox for code that AI agents write"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one command in a fresh sandbox and exit with its exit code.
    ///
    /// Exit codes: the command's own; 128+N when it was killed by signal N; 124 on timeout;
    /// 137 when it ran out of memory; 141 when its output went over the cap; 125 when moat
    /// could not run it; 126/127 when the command cannot be executed / was not found.
    Run(Box<RunArgs>),
    /// Say what this host supports, and how to fix what is missing.
    Doctor {
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Serve moat's sandbox tools to an MCP client over stdin/stdout (a client of `moat
    /// serve`: set MOAT_URL and MOAT_API_KEY as for the other client commands).
    ///
    /// The same tools are served over streamable HTTP at /mcp on `moat serve` itself.
    Mcp(mcp::McpArgs),
    #[command(flatten)]
    Client(client::Command),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Policy file (TOML). Flags below override it.
    #[arg(long, value_name = "FILE")]
    policy: Option<String>,
    /// Isolation tier: `native` (namespaces, seccomp, Landlock, cgroups) or `gvisor` (the same
    /// sandbox behind gVisor's user-space kernel, runsc; see `moat doctor`). Default: the
    /// policy's, else $MOAT_TIER, else native.
    #[arg(long)]
    tier: Option<String>,
    /// Memory limit for the whole sandbox, e.g. 256M, 1G.
    #[arg(long)]
    memory: Option<String>,
    /// Process and thread limit for the whole sandbox.
    #[arg(long)]
    pids: Option<u64>,
    /// CPU quota in cores, e.g. 0.5.
    #[arg(long)]
    cpus: Option<f64>,
    /// Wall-clock timeout, e.g. 500ms, 5s, 2m.
    #[arg(long)]
    timeout: Option<String>,
    /// Cap on stdout and on stderr, each, e.g. 1M.
    #[arg(long)]
    output_limit: Option<String>,
    /// Bind a host path: SRC:DST (read-only) or SRC:DST:rw. Repeatable.
    #[arg(long, value_name = "SRC:DST[:rw]")]
    mount: Vec<String>,
    /// Set an environment variable in the sandbox. Repeatable.
    #[arg(long, short = 'e', value_name = "K=V")]
    env: Vec<String>,
    /// Working directory inside the sandbox (a fresh writable tmpfs).
    #[arg(long)]
    workdir: Option<String>,
    /// Use this host directory as the root, read-only.
    #[arg(long)]
    root: Option<String>,
    /// Use a template's files as the root (`moat template ls`): shared read-only, with a
    /// writable layer of this sandbox's own (`limits.root_size`, default 1G).
    #[arg(long, value_name = "NAME", conflicts_with = "root")]
    template: Option<String>,
    /// State directory holding the templates (default: /var/lib/moat as root, else
    /// $XDG_STATE_HOME/moat or ~/.local/state/moat).
    #[arg(long, value_name = "DIR")]
    state_dir: Option<std::path::PathBuf>,
    /// Mount a read-only /sys.
    #[arg(long)]
    sys: bool,
    /// Run even when this host lacks a layer: `cgroups` or `landlock`. Repeatable.
    #[arg(long, value_name = "LAYER")]
    allow_missing: Vec<String>,
    /// Network: `none` (default: only the sandbox's own loopback) or `allow:HOST,...`:
    /// connections through moat's egress proxy to those hosts (`example.com`,
    /// `*.example.com`, either with `:PORT`; CIDRs for IP literals), e.g.
    /// `--net allow:pypi.org,*.pythonhosted.org`. Proxy variables are set in the sandbox.
    #[arg(long, value_name = "none|allow:HOST,...")]
    net: Option<String>,
    /// Deny rules that win over the allowlist, same syntax. Repeatable.
    #[arg(long, value_name = "HOST")]
    net_deny: Vec<String>,
    /// Bind a secret from moat's own environment to hosts: `NAME=HOST,...`. The sandbox
    /// sees a placeholder in $NAME; the proxy puts the real value into request headers sent
    /// to those hosts only (over TLS it terminates with a per-sandbox CA). Repeatable.
    #[arg(long, value_name = "NAME=HOST,...")]
    secret: Vec<String>,
    #[command(flatten)]
    egress: egress_args::EgressArgs,
    /// Print one JSON result instead of passing the output through.
    #[arg(long)]
    json: bool,
    /// The command and its arguments.
    #[arg(last = true, required = true, value_name = "CMD")]
    cmd: Vec<String>,
}

fn build_policy(a: &RunArgs) -> Result<Policy> {
    let mut p = match &a.policy {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the policy file {path}"))?;
            Policy::from_toml(&text).with_context(|| format!("in {path}"))?
        }
        None => Policy::default(),
    };
    if let Some(m) = &a.memory {
        p.limits.memory = parse_bytes(m)
            .map_err(anyhow::Error::msg)
            .context("--memory")?;
    }
    if let Some(n) = a.pids {
        p.limits.pids = n;
    }
    if let Some(c) = a.cpus {
        p.limits.cpus = c;
    }
    if let Some(t) = &a.timeout {
        p.limits.timeout = parse_duration(t)
            .map_err(anyhow::Error::msg)
            .context("--timeout")?;
    }
    if let Some(o) = &a.output_limit {
        p.limits.output = parse_bytes(o)
            .map_err(anyhow::Error::msg)
            .context("--output-limit")?;
    }
    for m in &a.mount {
        p.fs.mounts.push(Mount::parse_cli(m)?);
    }
    for kv in &a.env {
        let Some((k, v)) = kv.split_once('=') else {
            bail!("--env {kv}: write K=V");
        };
        p.env.insert(k.to_string(), v.to_string());
    }
    if let Some(w) = &a.workdir {
        p.fs.workdir = w.clone();
    }
    if let Some(r) = &a.root {
        p.fs.root = Some(r.clone());
    }
    if let Some(t) = &a.template {
        p.fs.template = Some(t.clone());
    }
    if a.sys {
        p.fs.sys = true;
    }
    match a.net.as_deref() {
        None => {}
        Some("none") => p.network.mode = moat_policy::NetworkMode::None,
        Some(n) => {
            let Some(list) = n.strip_prefix("allow:") else {
                bail!("--net {n}: write `none` or `allow:HOST,HOST,...`");
            };
            p.network.mode = moat_policy::NetworkMode::Allowlist;
            p.network
                .allow
                .extend(list.split(',').filter(|h| !h.is_empty()).map(String::from));
        }
    }
    p.network.deny.extend(a.net_deny.iter().cloned());
    for s in &a.secret {
        let Some((name, hosts)) = s.split_once('=') else {
            bail!("--secret {s}: write NAME=HOST,... e.g. OPENAI_API_KEY=api.openai.com");
        };
        p.network.secrets.insert(
            name.to_string(),
            hosts
                .split(',')
                .filter(|h| !h.is_empty())
                .map(String::from)
                .collect(),
        );
    }
    if let Some(t) = &a.tier {
        p.tier = moat_policy::Tier::parse(t).context("--tier")?;
    } else if a.policy.is_none() {
        if let Some(t) = std::env::var("MOAT_TIER").ok().filter(|t| !t.is_empty()) {
            p.tier = moat_policy::Tier::parse(&t).context("$MOAT_TIER")?;
        }
    }
    for l in &a.allow_missing {
        let layer = match l.as_str() {
            "cgroups" => Layer::Cgroups,
            "landlock" => Layer::Landlock,
            other => bail!("--allow-missing {other}: the layers that may be missing are `cgroups` and `landlock`"),
        };
        if !p.security.allow_missing.contains(&layer) {
            p.security.allow_missing.push(layer);
        }
    }
    p.validate()?;
    Ok(p)
}

fn error_result(message: String) -> ExecResult {
    ExecResult {
        stdout: String::new(),
        stderr: String::new(),
        exit_code: None,
        signal: None,
        status: Status::Error,
        wall_ms: 0,
        cpu_ms: 0,
        max_rss_kb: 0,
        truncated: Truncated::default(),
        message: Some(message),
        sandbox: Layers::default(),
    }
}

fn cmd_run(a: RunArgs) -> i32 {
    let json = a.json;
    let fail = |msg: String| -> i32 {
        if json {
            println!(
                "{}",
                serde_json::to_string(&error_result(msg)).unwrap_or_default()
            );
        } else {
            eprintln!("moat: {msg}");
        }
        125
    };
    let mut policy = match build_policy(&a) {
        Ok(p) => p,
        Err(e) => return fail(format!("{e:#}")),
    };
    let state_dir = a
        .state_dir
        .clone()
        .unwrap_or_else(moat_engine::default_state_dir);
    if let Err(e) = moat_engine::templates::resolve(&state_dir, &mut policy) {
        return fail(e);
    }
    // The operator's egress settings are read where a sandbox runs through its agent.
    let operator = if policy.network.mode == moat_policy::NetworkMode::Allowlist
        || policy.tier != moat_policy::Tier::Native
    {
        match a.egress.operator() {
            Ok(op) => op,
            Err(e) => return fail(format!("{e:#}")),
        }
    } else {
        moat_egress::Operator::default()
    };
    match moat_engine::oneshot::run(policy, a.cmd, json, operator) {
        Ok((result, events)) => report(json, &result, events.as_deref()),
        Err(e) => fail(e),
    }
}

/// Prints a run's result (`--json`: one document, with the egress proxy's connections when
/// there was a proxy) and gives the exit code.
fn report(json: bool, result: &ExecResult, egress: Option<&[moat_egress::ConnEvent]>) -> i32 {
    if json {
        let mut doc = serde_json::to_value(result).unwrap_or_default();
        if let (Some(ev), Some(obj)) = (egress, doc.as_object_mut()) {
            obj.insert(
                "egress".into(),
                serde_json::to_value(ev).unwrap_or_default(),
            );
        }
        let mut out = std::io::stdout().lock();
        let _ = serde_json::to_writer(&mut out, &doc);
        let _ = out.write_all(b"\n");
        let _ = out.flush();
    } else if result.status != Status::Ok {
        if let Some(m) = &result.message {
            eprintln!("moat: {}: {m}", result.status);
        }
    }
    result.cli_exit_code()
}

/// Creates a throwaway user namespace (with pid, mount, net, ipc, uts) to prove it works.
fn try_userns() -> Result<(), String> {
    use moat_sys::process as sys;
    match sys::clone_fork(moat_backend::native::NAMESPACES) {
        Ok(sys::Forked::Child) => sys::exit_now(0),
        Ok(sys::Forked::Parent { pid, .. }) => match sys::wait4(pid, libc::__WALL) {
            Ok(Some(i)) if i.code == Some(0) => Ok(()),
            other => Err(format!("the probe child ended badly: {other:?}")),
        },
        Err(e) => Err(format!("clone with new namespaces failed: {e}")),
    }
}

fn cmd_doctor(json: bool) -> i32 {
    let checks = probe::doctor(try_userns);
    let native_ok = checks
        .iter()
        .filter(|c| ["user namespaces", "seccomp"].contains(&c.name.as_str()))
        .all(|c| c.ok);
    let gvisor_ok = probe::gvisor_available(&checks);
    if json {
        let doc = serde_json::json!({
            "checks": checks,
            "tiers": { "native": native_ok, "gvisor": gvisor_ok },
        });
        println!("{doc}");
    } else {
        for c in &checks {
            println!(
                "{} {:<16} {}",
                if c.ok { "ok  " } else { "MISS" },
                c.name,
                c.detail
            );
            if let Some(f) = &c.fix {
                println!("     {:<16} fix: {f}", "");
            }
        }
        let say = |ok: bool| {
            if ok {
                "available"
            } else {
                "NOT available (see above)"
            }
        };
        println!(
            "\ntiers: native {}, gvisor {}",
            say(native_ok),
            say(gvisor_ok)
        );
    }
    if native_ok {
        0
    } else {
        1
    }
}

fn main() {
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == moat_backend::gvisor::AGENT_ARG)
    {
        moat_agent::gvisor::main(moat_backend::seccomp_prog::DEFAULT_PROGRAM)
    }
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == moat_engine::oneshot::WATCH_ARG)
    {
        std::process::exit(moat_engine::oneshot::watch_main());
    }
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Run(a) => cmd_run(*a),
        Cmd::Doctor { json } => cmd_doctor(json),
        Cmd::Mcp(a) => mcp::main(a),
        Cmd::Client(c) => client::main(c),
    };
    std::process::exit(code);
}
