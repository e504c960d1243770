//! The policy document. Every knob has its default in its doc comment; everything unknown is
//! rejected; [`Policy::validate`] checks the whole document once, before anything runs.

use crate::units::{de_bytes, de_duration, ser_bytes, ser_duration};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

/// A policy that fails validation, with what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("policy is not valid TOML or has an unknown or mistyped field: {0}")]
    Parse(#[source] toml::de::Error),
    #[error("policy: {field}: {message}")]
    Invalid { field: String, message: String },
}

fn invalid(field: &str, message: impl Into<String>) -> PolicyError {
    PolicyError::Invalid {
        field: field.to_string(),
        message: message.into(),
    }
}

/// A sandbox policy. Secure by default: no network, tight limits, every layer required.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Policy {
    pub limits: Limits,
    pub fs: Fs,
    /// Environment variables passed to the workload, on top of moat's clean base
    /// (`PATH`, `HOME`, `USER`, `LANG`). Default: none. The host's environment never passes.
    pub env: BTreeMap<String, String>,
    pub process: Process,
    pub network: Network,
    pub security: Security,
    /// The isolation tier: `native` (default: namespaces, seccomp, Landlock, cgroups on the
    /// host kernel) or `gvisor` (the same sandbox behind gVisor's user-space kernel, `runsc`).
    pub tier: Tier,
}

/// An isolation tier (see DESIGN.md).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    #[default]
    Native,
    Gvisor,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Native => "native",
            Tier::Gvisor => "gvisor",
        }
    }

    /// Parses `native` or `gvisor`.
    pub fn parse(s: &str) -> Result<Tier, PolicyError> {
        match s {
            "native" => Ok(Tier::Native),
            "gvisor" => Ok(Tier::Gvisor),
            _ => Err(invalid(
                "tier",
                format!("`{s}` is not a tier: write `native` or `gvisor`"),
            )),
        }
    }
}

/// Resource limits. Enforced by the kernel (cgroups, rlimits) and watched by moat.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Memory for the whole sandbox, swap 0. Default `512M`.
    #[serde(deserialize_with = "de_bytes", serialize_with = "ser_bytes")]
    pub memory: u64,
    /// Processes and threads in the whole sandbox. Default `128`.
    pub pids: u64,
    /// CPU quota in cores (`0.5` = half a core). Default `1.0`.
    pub cpus: f64,
    /// Wall-clock timeout for the whole run; the sandbox is killed when it fires. Default `30s`.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub timeout: Duration,
    /// Cap on captured stdout and on stderr, each; over it the sandbox is killed with status
    /// `output_limit`. Default `16M`.
    #[serde(deserialize_with = "de_bytes", serialize_with = "ser_bytes")]
    pub output: u64,
    /// Open files per process (`RLIMIT_NOFILE`). Default `1024`.
    pub nofile: u64,
    /// Largest file a process may write (`RLIMIT_FSIZE`). Default `1G`.
    #[serde(deserialize_with = "de_bytes", serialize_with = "ser_bytes")]
    pub fsize: u64,
    /// Stack size (`RLIMIT_STACK`). Default `8M`.
    #[serde(deserialize_with = "de_bytes", serialize_with = "ser_bytes")]
    pub stack: u64,
    /// Size of the writable `/tmp` (a tmpfs, counted in the memory limit). Default `64M`.
    #[serde(deserialize_with = "de_bytes", serialize_with = "ser_bytes")]
    pub tmp_size: u64,
    /// Size of the writable working directory (a tmpfs). Default `256M`.
    #[serde(deserialize_with = "de_bytes", serialize_with = "ser_bytes")]
    pub workdir_size: u64,
    /// Size of the writable layer over a template's files (`fs.template`): what the sandbox
    /// may add or change outside `/tmp` and the working directory. Default `1G`.
    #[serde(deserialize_with = "de_bytes", serialize_with = "ser_bytes")]
    pub root_size: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory: 512 << 20,
            pids: 128,
            cpus: 1.0,
            timeout: Duration::from_secs(30),
            output: 16 << 20,
            nofile: 1024,
            fsize: 1 << 30,
            stack: 8 << 20,
            tmp_size: 64 << 20,
            workdir_size: 256 << 20,
            root_size: 1 << 30,
        }
    }
}

/// The filesystem the workload sees.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Fs {
    /// A host directory to use as the root, read-only. Default: none, which gives a fresh
    /// root with the host's `/usr`, `/bin`, `/lib*`, `/sbin` read-only and a sanitised `/etc`.
    /// A given root must contain the directories `proc`, `dev` and `tmp`.
    pub root: Option<String>,
    /// The writable working directory (a size-capped tmpfs), also `HOME`. Default `/work`.
    pub workdir: String,
    /// Mount a read-only `/sys`. Default `false`.
    pub sys: bool,
    /// Host paths bound into the sandbox, read-only unless `rw = true`. Default: none.
    #[serde(rename = "mount")]
    pub mounts: Vec<Mount>,
    /// A template (`moat template ls`) whose files are the root: shared read-only by every
    /// sandbox of it, with a writable layer of the sandbox's own over them
    /// (`limits.root_size`). Default: none, the host view.
    pub template: Option<String>,
    /// Where moat found `template` on the host and what its image says. moat sets this when
    /// it resolves `template`; a policy or a client that sets it is refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageRoot>,
}

/// A template's root as moat resolved it (see [`Fs::image`]).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct ImageRoot {
    /// The template's root directory on the host (read-only to sandboxes).
    pub rootfs: String,
    /// The template's name, for messages.
    pub name: String,
}

impl Default for Fs {
    fn default() -> Self {
        Fs {
            root: None,
            workdir: "/work".to_string(),
            sys: false,
            mounts: Vec::new(),
            template: None,
            image: None,
        }
    }
}

/// One bind mount of a host path.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Mount {
    /// Host path (absolute).
    pub src: String,
    /// Path inside the sandbox (absolute).
    pub dst: String,
    /// Writable. Default `false`.
    #[serde(default)]
    pub rw: bool,
}

impl Mount {
    /// Parses the CLI form `SRC:DST[:rw|:ro]`.
    pub fn parse_cli(s: &str) -> Result<Mount, PolicyError> {
        let parts: Vec<&str> = s.split(':').collect();
        let (src, dst, rw) = match parts.as_slice() {
            [src, dst] => (*src, *dst, false),
            [src, dst, "rw"] => (*src, *dst, true),
            [src, dst, "ro"] => (*src, *dst, false),
            _ => {
                return Err(invalid(
                    "--mount",
                    format!("`{s}`: write SRC:DST, SRC:DST:ro or SRC:DST:rw"),
                ))
            }
        };
        Ok(Mount {
            src: src.to_string(),
            dst: dst.to_string(),
            rw,
        })
    }
}

/// The workload's identity inside the sandbox.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Process {
    /// uid of the workload inside the sandbox. Default `1000`. Root (0) is refused: root inside
    /// is only for moat's own init.
    pub uid: u32,
    /// gid of the workload inside the sandbox. Default `1000`.
    pub gid: u32,
    /// Hostname inside the sandbox. Default `sandbox`.
    pub hostname: String,
}

impl Default for Process {
    fn default() -> Self {
        Process {
            uid: 1000,
            gid: 1000,
            hostname: "sandbox".to_string(),
        }
    }
}

/// Network access. The sandbox never has a route out: in `allowlist` mode its agent relays
/// each connection made to its loopback proxy port to moat's egress proxy, which applies
/// these rules.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Network {
    /// `none` (default): the sandbox has only its own loopback. `allowlist`: connections
    /// through moat's proxy (HTTP CONNECT, plain HTTP, SOCKS5) to the hosts `allow` names.
    pub mode: NetworkMode,
    /// Hosts the sandbox may reach: `example.com`, `*.example.com` (subdomains only),
    /// either with `:PORT`, or a CIDR (`203.0.113.0/24`, `[2001:db8::/32]:443`) for IP
    /// literals. Default: none (nothing is reachable).
    pub allow: Vec<String>,
    /// Rules that win over `allow`, same syntax. Default: none.
    pub deny: Vec<String>,
    /// Kill the sandbox after this many denied connections. Default: never (`0`).
    pub max_denials: u32,
    /// Connections through the proxy at once. Default `64`.
    pub max_connections: u32,
    /// Bytes through the proxy over the sandbox's life, both ways together. Default `1G`.
    #[serde(deserialize_with = "de_bytes", serialize_with = "ser_bytes")]
    pub max_bytes: u64,
    /// A proxied connection with no traffic either way for this long is closed. Default `60s`.
    #[serde(deserialize_with = "de_duration", serialize_with = "ser_duration")]
    pub idle_timeout: Duration,
    /// Secrets bound to hosts: `OPENAI_API_KEY = ["api.openai.com"]`. The sandbox's
    /// environment holds only a placeholder; the proxy puts the real value (given to
    /// `moat run` in its own environment, or in the create call) into request headers sent
    /// to those hosts, over TLS it terminates with a per-sandbox CA. Default: none.
    pub secrets: BTreeMap<String, Vec<String>>,
    /// The PEM certificate of the sandbox's own CA, which its proxy signs intercepted
    /// connections with: set by moat when secrets are bound, never by a policy document.
    /// The sandbox trusts it (`/etc/ssl/certs/ca-certificates.crt`, `SSL_CERT_FILE`, ...).
    #[serde(skip)]
    pub ca_pem: Option<String>,
}

impl Default for Network {
    fn default() -> Self {
        Network {
            mode: NetworkMode::None,
            allow: Vec::new(),
            deny: Vec::new(),
            max_denials: 0,
            max_connections: 64,
            max_bytes: 1 << 30,
            idle_timeout: Duration::from_secs(60),
            secrets: BTreeMap::new(),
            ca_pem: None,
        }
    }
}

#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum NetworkMode {
    #[default]
    None,
    Allowlist,
}

/// A defence layer that a host may lack.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "snake_case")]
pub enum Layer {
    /// cgroup limits (memory, pids, cpu): missing when rootless without delegation.
    Cgroups,
    /// Landlock filesystem rules: missing on kernels before 5.13 or without the LSM.
    Landlock,
}

impl Layer {
    pub fn as_str(self) -> &'static str {
        match self {
            Layer::Cgroups => "cgroups",
            Layer::Landlock => "landlock",
        }
    }
}

/// Which layers must be present.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct Security {
    /// Layers the run may go without when the host lacks them, e.g. `["cgroups"]` for a
    /// rootless run on a host without cgroup delegation. Default: none (refuse to run).
    /// Namespaces, seccomp, no_new_privs and dropped capabilities are never optional.
    pub allow_missing: Vec<Layer>,
    /// The lowest Landlock ABI the run accepts. Default `1`.
    pub landlock_min_abi: u32,
}

impl Default for Security {
    fn default() -> Self {
        Security {
            allow_missing: Vec::new(),
            landlock_min_abi: 1,
        }
    }
}

impl Security {
    pub fn allows_missing(&self, layer: Layer) -> bool {
        self.allow_missing.contains(&layer)
    }
}

/// Paths the sandbox builds itself; a mount or workdir may not replace them.
const RESERVED: &[&str] = &["/proc", "/dev", "/sys", "/etc", "/tmp"];

/// Checks that `p` is absolute and normal: no `.`/`..`, no empty components, no NUL, short.
fn check_path(field: &str, p: &str) -> Result<(), PolicyError> {
    if !p.starts_with('/') {
        return Err(invalid(field, format!("`{p}` must be an absolute path")));
    }
    if p.len() > 1024 {
        return Err(invalid(field, "path is longer than 1024 bytes"));
    }
    if p.contains('\0') {
        return Err(invalid(field, "path contains a NUL byte"));
    }
    if p != "/" {
        for c in p[1..].split('/') {
            if c.is_empty() || c == "." || c == ".." {
                return Err(invalid(
                    field,
                    format!("`{p}` must be a normal path: no `.`, `..` or `//`, no trailing `/`"),
                ));
            }
        }
    }
    Ok(())
}

fn is_under(p: &str, base: &str) -> bool {
    p == base || p.strip_prefix(base).is_some_and(|r| r.starts_with('/'))
}

impl Policy {
    /// Parses and validates a TOML policy document.
    pub fn from_toml(text: &str) -> Result<Policy, PolicyError> {
        let p: Policy = toml::from_str(text).map_err(PolicyError::Parse)?;
        p.validate()?;
        Ok(p)
    }

    /// Checks every field. Call after merging command-line flags.
    pub fn validate(&self) -> Result<(), PolicyError> {
        let l = &self.limits;
        if l.memory < 16 << 20 {
            return Err(invalid("limits.memory", "must be at least 16M"));
        }
        if l.pids == 0 || l.pids > 1 << 22 {
            return Err(invalid("limits.pids", "must be between 1 and 4194304"));
        }
        if !(l.cpus > 0.0 && l.cpus <= 4096.0) {
            return Err(invalid("limits.cpus", "must be above 0 and at most 4096"));
        }
        if l.timeout.is_zero() {
            return Err(invalid("limits.timeout", "must be above 0 (e.g. 30s)"));
        }
        if l.output == 0 {
            return Err(invalid("limits.output", "must be above 0 (e.g. 16M)"));
        }
        if l.nofile < 16 || l.nofile > 1 << 20 {
            return Err(invalid("limits.nofile", "must be between 16 and 1048576"));
        }
        if l.stack < 64 << 10 {
            return Err(invalid("limits.stack", "must be at least 64K"));
        }
        if l.tmp_size < 4096 || l.workdir_size < 4096 {
            return Err(invalid(
                "limits.tmp_size/workdir_size",
                "must be at least 4K",
            ));
        }
        check_path("fs.workdir", &self.fs.workdir)?;
        if self.fs.workdir == "/" || RESERVED.iter().any(|r| is_under(&self.fs.workdir, r)) {
            return Err(invalid(
                "fs.workdir",
                format!(
                    "`{}` is a path moat builds itself; choose another (default /work)",
                    self.fs.workdir
                ),
            ));
        }
        if let Some(root) = &self.fs.root {
            check_path("fs.root", root)?;
            if self.fs.template.is_some() {
                return Err(invalid(
                    "fs.template",
                    "give fs.root or fs.template, not both",
                ));
            }
        }
        if let Some(t) = &self.fs.template {
            if t.is_empty() || t.len() > 128 || t.contains("..") {
                return Err(invalid(
                    "fs.template",
                    format!("`{t}` is not a template name: see `moat template ls`"),
                ));
            }
        }
        if let Some(img) = &self.fs.image {
            check_path("fs.image.rootfs", &img.rootfs)?;
        }
        if l.root_size < 1 << 20 {
            return Err(invalid("limits.root_size", "must be at least 1M"));
        }
        let mut seen = Vec::new();
        for (i, m) in self.fs.mounts.iter().enumerate() {
            let field = format!("fs.mount[{i}]");
            check_path(&format!("{field}.src"), &m.src)?;
            check_path(&format!("{field}.dst"), &m.dst)?;
            if m.dst == "/" || RESERVED.iter().any(|r| is_under(&m.dst, r)) {
                return Err(invalid(
                    &format!("{field}.dst"),
                    format!(
                        "`{}` is under a path moat builds itself (/proc, /dev, /sys, /etc, /tmp)",
                        m.dst
                    ),
                ));
            }
            if is_under(&self.fs.workdir, &m.dst) {
                return Err(invalid(
                    &format!("{field}.dst"),
                    format!("`{}` would hide the working directory", m.dst),
                ));
            }
            if seen.contains(&m.dst) {
                return Err(invalid(
                    &format!("{field}.dst"),
                    format!("`{}` is mounted twice", m.dst),
                ));
            }
            seen.push(m.dst.clone());
        }
        for (k, v) in &self.env {
            let ok = !k.is_empty()
                && k.len() <= 256
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(invalid(
                    "env",
                    format!("`{k}` is not a valid variable name (letters, digits, `_`)"),
                ));
            }
            if v.contains('\0') {
                return Err(invalid(
                    "env",
                    format!("the value of `{k}` contains a NUL byte"),
                ));
            }
            if v.len() > 128 << 10 {
                return Err(invalid("env", format!("the value of `{k}` is over 128K")));
            }
        }
        if self.process.uid == 0 || self.process.uid > 65533 {
            return Err(invalid(
                "process.uid",
                "must be between 1 and 65533 (root inside is only for moat's init)",
            ));
        }
        if self.process.gid == 0 || self.process.gid > 65533 {
            return Err(invalid("process.gid", "must be between 1 and 65533"));
        }
        let h = &self.process.hostname;
        if h.is_empty() || h.len() > 63 || !h.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(invalid(
                "process.hostname",
                "must be 1-63 letters, digits or `-`",
            ));
        }
        if self.security.landlock_min_abi > 64 {
            return Err(invalid("security.landlock_min_abi", "no such Landlock ABI"));
        }
        self.network.validate()
    }
}

/// Most rules in `network.allow` and `network.deny` together, and most secrets.
const MAX_RULES: usize = 1024;
const MAX_SECRETS: usize = 64;

impl Network {
    /// The parsed allow and deny rules (valid once [`Policy::validate`] passed).
    pub fn rules(&self) -> Result<crate::egress::Rules, PolicyError> {
        crate::egress::Rules::parse(&self.allow, &self.deny)
            .map_err(|e| invalid("network.allow/deny", e.to_string()))
    }

    fn validate(&self) -> Result<(), PolicyError> {
        if self.allow.len() + self.deny.len() > MAX_RULES {
            return Err(invalid(
                "network.allow/deny",
                format!("more than {MAX_RULES} rules"),
            ));
        }
        self.rules()?;
        if self.max_connections == 0 || self.max_connections > 4096 {
            return Err(invalid(
                "network.max_connections",
                "must be between 1 and 4096",
            ));
        }
        if self.max_bytes == 0 {
            return Err(invalid("network.max_bytes", "must be above 0 (e.g. 1G)"));
        }
        if self.idle_timeout.is_zero() {
            return Err(invalid(
                "network.idle_timeout",
                "must be above 0 (e.g. 60s)",
            ));
        }
        if self.secrets.len() > MAX_SECRETS {
            return Err(invalid(
                "network.secrets",
                format!("more than {MAX_SECRETS} secrets"),
            ));
        }
        for (name, hosts) in &self.secrets {
            let field = format!("network.secrets.{name}");
            let ok = !name.is_empty()
                && name.len() <= 128
                && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
                && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(invalid(
                    &field,
                    "a secret's name is an environment variable name: letters, digits and `_`",
                ));
            }
            if hosts.is_empty() {
                return Err(invalid(
                    &field,
                    "bind the secret to at least one host, e.g. [\"api.openai.com\"]",
                ));
            }
            crate::egress::Rules::parse(hosts, &[]).map_err(|e| invalid(&field, e.to_string()))?;
        }
        if self.mode == NetworkMode::None && (!self.allow.is_empty() || !self.secrets.is_empty()) {
            return Err(invalid(
                "network.mode",
                "`allow` and `secrets` need mode = \"allowlist\" (mode `none` has no network)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_serialises_whole_and_reads_back_equal() {
        // Every field off its default, so that a field the serialiser dropped would show.
        let text = r#"
            tier = "gvisor"
            env = { A = "1", B = "two words" }
            [limits]
            memory = "100M"
            pids = 77
            cpus = 0.25
            timeout = "1500ms"
            output = "3M"
            nofile = 99
            fsize = "5M"
            stack = "2M"
            tmp_size = "7M"
            workdir_size = "9M"
            [fs]
            root = "/srv/root"
            workdir = "/w"
            sys = true
            [[fs.mount]]
            src = "/usr/share"
            dst = "/data"
            rw = true
            [process]
            uid = 1234
            gid = 4321
            hostname = "box"
            [network]
            mode = "allowlist"
            allow = ["example.com:443", "*.pypi.org"]
            deny = ["bad.example.com"]
            max_denials = 3
            max_connections = 5
            max_bytes = "10M"
            idle_timeout = "2.5s"
            secrets = { K = ["example.com"] }
            [security]
            allow_missing = ["landlock", "cgroups"]
            landlock_min_abi = 2
        "#;
        let mut p = Policy::from_toml(text).unwrap();
        assert_ne!(p, Policy::default());
        let json = serde_json::to_value(&p).unwrap();
        let back: Policy = serde_json::from_value(json.clone()).unwrap();
        assert_eq!(back, p, "{json}");
        // A sub-millisecond duration survives too.
        p.limits.timeout = Duration::from_micros(1500);
        let back: Policy = serde_json::from_value(serde_json::to_value(&p).unwrap()).unwrap();
        assert_eq!(back.limits.timeout, p.limits.timeout);
        // The sandbox CA is never part of a policy document.
        p.network.ca_pem = Some("-----BEGIN CERTIFICATE-----".into());
        let json = serde_json::to_string(&p).unwrap();
        assert!(!json.contains("BEGIN CERTIFICATE"), "{json}");
        let d = Policy::default();
        let back: Policy = serde_json::from_value(serde_json::to_value(&d).unwrap()).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn defaults_are_secure_and_valid() {
        let p = Policy::default();
        p.validate().unwrap();
        assert_eq!(p.network.mode, NetworkMode::None);
        assert_eq!(p.process.uid, 1000);
        assert!(p.security.allow_missing.is_empty());
        assert!(p.env.is_empty());
        assert_eq!(Policy::from_toml("").unwrap(), p);
    }

    #[test]
    fn full_document_parses() {
        let p = Policy::from_toml(
            r#"
            env = { FOO = "bar" }
            [limits]
            memory = "256M"
            pids = 64
            timeout = "500ms"
            cpus = 0.5
            [fs]
            workdir = "/home/user"
            [[fs.mount]]
            src = "/opt/data"
            dst = "/data"
            rw = true
            [security]
            allow_missing = ["cgroups"]
            landlock_min_abi = 3
            "#,
        )
        .unwrap();
        assert_eq!(p.limits.memory, 256 << 20);
        assert_eq!(p.limits.timeout, Duration::from_millis(500));
        assert_eq!(p.fs.mounts[0].dst, "/data");
        assert!(p.fs.mounts[0].rw);
        assert!(p.security.allows_missing(Layer::Cgroups));
        assert_eq!(p.env["FOO"], "bar");
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let e = Policy::from_toml("[limits]\nmemroy = \"1G\"").unwrap_err();
        assert!(e.to_string().contains("memroy"), "{e}");
        assert!(Policy::from_toml("netwrk = 1").is_err());
        assert!(Policy::from_toml("[network]\nmode = \"open\"").is_err());
        let p = Policy::from_toml(
            "[network]\nmode = \"allowlist\"\nallow = [\"pypi.org\", \"*.pythonhosted.org:443\"]\ndeny = [\"bad.pypi.org\"]\n[network.secrets]\nOPENAI_API_KEY = [\"api.openai.com\"]",
        )
        .unwrap();
        assert_eq!(p.network.mode, NetworkMode::Allowlist);
        assert!(p
            .network
            .rules()
            .unwrap()
            .decide_name("pypi.org", 443)
            .is_allow());
        assert!(!p
            .network
            .rules()
            .unwrap()
            .decide_name("evil.org", 443)
            .is_allow());
        assert_eq!(p.network.ca_pem, None);
        for bad in [
            "[network]\nmode = \"allowlist\"\nallow = [\"exa mple.com\"]",
            "[network]\nmode = \"allowlist\"\nallow = [\"example.com:99999\"]",
            "[network]\nallow = [\"example.com\"]",
            "[network]\nmode = \"allowlist\"\n[network.secrets]\nKEY = []",
            "[network]\nmode = \"allowlist\"\n[network.secrets]\n\"A-B\" = [\"x.com\"]",
            "[network]\nmode = \"allowlist\"\nmax_connections = 0",
            "[network]\nca_pem = \"x\"",
            "tier = \"firecracker\"",
        ] {
            assert!(Policy::from_toml(bad).is_err(), "{bad}");
        }
        assert_eq!(
            Policy::from_toml("tier = \"gvisor\"").unwrap().tier,
            Tier::Gvisor
        );
    }

    #[test]
    fn bad_values_are_explained() {
        let cases = [
            ("[limits]\nmemory = \"1M\"", "limits.memory"),
            ("[limits]\npids = 0", "limits.pids"),
            ("[limits]\ntimeout = \"0s\"", "limits.timeout"),
            ("[fs]\nworkdir = \"relative\"", "fs.workdir"),
            ("[fs]\nworkdir = \"/proc/x\"", "fs.workdir"),
            (
                "[[fs.mount]]\nsrc = \"/a\"\ndst = \"/x/../etc\"",
                "fs.mount[0].dst",
            ),
            (
                "[[fs.mount]]\nsrc = \"/a\"\ndst = \"/dev/sda\"",
                "fs.mount[0].dst",
            ),
            ("[[fs.mount]]\nsrc = \"/a\"\ndst = \"/\"", "fs.mount[0].dst"),
            ("[process]\nuid = 0", "process.uid"),
            ("[process]\nhostname = \"a b\"", "process.hostname"),
            ("env = { \"A=B\" = \"x\" }", "env"),
        ];
        for (doc, field) in cases {
            let e = Policy::from_toml(doc).unwrap_err();
            assert!(e.to_string().contains(field), "{doc}: {e}");
        }
    }

    #[test]
    fn cli_mounts() {
        assert_eq!(
            Mount::parse_cli("/a:/b:rw").unwrap(),
            Mount {
                src: "/a".into(),
                dst: "/b".into(),
                rw: true
            }
        );
        assert!(!Mount::parse_cli("/a:/b").unwrap().rw);
        assert!(Mount::parse_cli("/a").is_err());
        assert!(Mount::parse_cli("/a:/b:rx").is_err());
    }
}
