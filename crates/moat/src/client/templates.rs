//! `moat template`: root filesystems from OCI images, kept in the state directory (run where
//! sandboxes run, as their user). Pulls show a bar per layer on a terminal, plain lines
//! otherwise.

use super::{default_state_dir, print_json, Error, Result};
use moat_engine::templates::{Progress, ProgressEvent, PullOptions, Store, Template};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

#[derive(clap::Subcommand)]
pub enum TemplateCmd {
    /// Pull an image from an OCI registry (Docker Hub, GHCR, a private one) as a template.
    ///
    /// Anonymous unless --username is given or ~/.docker/config.json has credentials for the
    /// registry. localhost registries are reached over plain HTTP.
    Pull {
        /// The image: `busybox`, `python:3.12-slim`, `ghcr.io/org/img:tag`, `host:5000/x@sha256:...`.
        reference: String,
        #[command(flatten)]
        opts: PullArgs,
    },
    /// Import a `docker save` archive or an OCI image layout (a directory or a tar of one).
    Import {
        file: PathBuf,
        #[command(flatten)]
        opts: PullArgs,
    },
    /// List templates.
    Ls {
        #[command(flatten)]
        dir: StateDir,
        /// Print a JSON array.
        #[arg(long)]
        json: bool,
    },
    /// Show one template as JSON (its image's environment, user, command, layers' root).
    Inspect {
        name: String,
        #[command(flatten)]
        dir: StateDir,
    },
    /// Remove templates (their files go once no other template shares them).
    Rm {
        #[arg(required = true)]
        names: Vec<String>,
        #[command(flatten)]
        dir: StateDir,
    },
}

#[derive(clap::Args)]
pub struct StateDir {
    /// State directory (default: /var/lib/moat as root, else $XDG_STATE_HOME/moat or
    /// ~/.local/state/moat).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct PullArgs {
    /// The template's name (default: the image's repository and tag, e.g. `busybox:latest`).
    #[arg(long)]
    name: Option<String>,
    /// Plain HTTP for this registry (localhost ones always are).
    #[arg(long)]
    insecure: bool,
    /// Registry user name; the password is read from $MOAT_REGISTRY_PASSWORD.
    #[arg(long)]
    username: Option<String>,
    /// The most the image may take once extracted, e.g. 8G (a guard against layer bombs).
    #[arg(long, value_name = "SIZE")]
    max_size: Option<String>,
    /// The platform to take from a multi-platform image, e.g. linux/arm64 (default: this host's).
    #[arg(long)]
    platform: Option<String>,
    /// Print the template as JSON when done.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    dir: StateDir,
}

impl PullArgs {
    fn options(&self) -> Result<PullOptions> {
        let max_bytes = match &self.max_size {
            Some(s) => Some(
                moat_policy::parse_bytes(s)
                    .map_err(|e| Error::Msg(format!("--max-size {s}: {e}")))?,
            ),
            None => None,
        };
        let password = match &self.username {
            Some(_) => Some(std::env::var("MOAT_REGISTRY_PASSWORD").map_err(|_| {
                Error::Msg("--username needs the password in $MOAT_REGISTRY_PASSWORD".into())
            })?),
            None => None,
        };
        Ok(PullOptions {
            name: self.name.clone(),
            insecure: self.insecure,
            username: self.username.clone(),
            password,
            max_bytes,
            platform: self.platform.clone(),
        })
    }
}

fn open(dir: &StateDir) -> Result<Store> {
    let d = dir.state_dir.clone().unwrap_or_else(default_state_dir);
    Store::open(&d).map_err(|e| Error::Msg(e.to_string()))
}

pub fn main(cmd: TemplateCmd) -> Result<i32> {
    match cmd {
        TemplateCmd::Pull { reference, opts } => {
            let store = open(&opts.dir)?;
            let mut p = Bars::new();
            let t = store
                .pull(&reference, &opts.options()?, &mut p)
                .map_err(|e| Error::Msg(e.to_string()))?;
            done(&t, opts.json);
        }
        TemplateCmd::Import { file, opts } => {
            let store = open(&opts.dir)?;
            let mut p = Bars::new();
            let t = store
                .import(&file, &opts.options()?, &mut p)
                .map_err(|e| Error::Msg(e.to_string()))?;
            done(&t, opts.json);
        }
        TemplateCmd::Ls { dir, json } => {
            let list = open(&dir)?.list().map_err(|e| Error::Msg(e.to_string()))?;
            if json {
                print_json(&serde_json::to_value(&list).unwrap_or_default());
            } else {
                println!("{:<32} {:>10} {:<20} SOURCE", "NAME", "SIZE", "DIGEST");
                for t in &list {
                    println!(
                        "{:<32} {:>10} {:<20} {}",
                        t.name,
                        human(t.size_bytes),
                        t.digest.chars().take(19).collect::<String>(),
                        t.source
                    );
                }
            }
        }
        TemplateCmd::Inspect { name, dir } => {
            let t = open(&dir)?
                .get(&name)
                .map_err(|e| Error::Msg(e.to_string()))?;
            print_json(&serde_json::to_value(&t).unwrap_or_default());
        }
        TemplateCmd::Rm { names, dir } => {
            let store = open(&dir)?;
            for n in &names {
                store.remove(n).map_err(|e| Error::Msg(e.to_string()))?;
                println!("removed {n}");
            }
        }
    }
    Ok(0)
}

fn done(t: &Template, json: bool) {
    if json {
        print_json(&serde_json::to_value(t).unwrap_or_default());
    } else {
        println!(
            "template {} ({}, {}): moat run --template {} -- CMD",
            t.name,
            human(t.size_bytes),
            t.digest,
            t.name
        );
    }
}

fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Progress on stderr: one bar per layer, redrawn in place, on a terminal; a line per step
/// otherwise.
struct Bars {
    tty: bool,
    sizes: Vec<u64>,
    last_draw: std::time::Instant,
}

impl Bars {
    fn new() -> Bars {
        Bars {
            tty: std::io::stderr().is_terminal(),
            sizes: Vec::new(),
            last_draw: std::time::Instant::now(),
        }
    }

    fn bar(&self, index: usize, done: u64) -> String {
        let size = self.sizes.get(index).copied().unwrap_or(0).max(1);
        let frac = (done as f64 / size as f64).min(1.0);
        let n = (frac * 30.0) as usize;
        format!(
            "layer {:>2}/{} [{}{}] {:>10} / {}",
            index + 1,
            self.sizes.len(),
            "#".repeat(n),
            " ".repeat(30 - n),
            human(done),
            human(size)
        )
    }
}

impl Progress for Bars {
    fn event(&mut self, ev: ProgressEvent) {
        let mut err = std::io::stderr().lock();
        match ev {
            ProgressEvent::Resolved {
                reference,
                digest,
                layers,
            } => {
                self.sizes = vec![0; layers];
                let _ = writeln!(err, "{reference}: {digest}, {layers} layer(s)");
            }
            ProgressEvent::LayerStart {
                index,
                digest,
                size,
            } => {
                if let Some(s) = self.sizes.get_mut(index) {
                    *s = size;
                }
                if !self.tty {
                    let _ = writeln!(
                        err,
                        "layer {}/{} {digest} ({})",
                        index + 1,
                        self.sizes.len(),
                        human(size)
                    );
                }
            }
            ProgressEvent::LayerBytes { index, done } => {
                if self.tty && self.last_draw.elapsed().as_millis() >= 100 {
                    self.last_draw = std::time::Instant::now();
                    let _ = write!(err, "\r{}", self.bar(index, done));
                }
            }
            ProgressEvent::LayerDone { index } => {
                if self.tty {
                    let size = self.sizes.get(index).copied().unwrap_or(0);
                    let _ = writeln!(err, "\r{}", self.bar(index, size));
                }
            }
            ProgressEvent::Extracting { index } => {
                if !self.tty {
                    let _ = writeln!(err, "layer {}/{} extracting", index + 1, self.sizes.len());
                }
            }
            ProgressEvent::Done => {}
        }
        let _ = err.flush();
    }
}
