//! `moat cp`: files into and out of a sandbox, streamed both ways (never the whole file in
//! memory).

use super::{print_json, read_json, sandbox_path, Client, Conn, Error, Result};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

#[derive(clap::Args)]
pub struct CpArgs {
    /// Source: `ID:/path` in a sandbox, a local path, or `-` for stdin.
    #[arg(value_name = "SRC")]
    pub src: String,
    /// Destination: `ID:/path` in a sandbox, a local path, or `-` for stdout.
    #[arg(value_name = "DST")]
    pub dst: String,
    /// Print the API's JSON for an upload (`{"path","bytes"}`), or `{"path","bytes"}` of the
    /// local file for a download.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub conn: Conn,
}

/// One side of a copy.
#[derive(Debug, PartialEq, Eq)]
pub enum Side {
    /// A path inside a sandbox.
    Remote { id: String, path: String },
    /// A local path.
    Local(PathBuf),
    /// stdin or stdout.
    Std,
}

/// `ID:/abs/path` is remote (an id is letters, digits, `_` and `-`); `-` is stdin/stdout;
/// anything else is local (write `./a:b` for a local file with a colon).
pub fn parse_side(s: &str) -> Side {
    if s == "-" {
        return Side::Std;
    }
    if let Some((id, path)) = s.split_once(':') {
        if !id.is_empty()
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
            && path.starts_with('/')
        {
            return Side::Remote {
                id: id.to_string(),
                path: path.to_string(),
            };
        }
    }
    Side::Local(PathBuf::from(s))
}

fn base_name(path: &str) -> Option<&str> {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
}

pub fn cp(a: CpArgs) -> Result<i32> {
    match (parse_side(&a.src), parse_side(&a.dst)) {
        (Side::Remote { .. }, Side::Remote { .. }) => Err(Error::Msg(
            "moat cp copies between a sandbox and this machine: copy to a local file first".into(),
        )),
        (Side::Remote { id, path }, dst) => download(&a, &id, &path, dst),
        (src, Side::Remote { id, path }) => upload(&a, src, &id, &path),
        _ => Err(Error::Msg(
            "one side of moat cp must be in a sandbox: ID:/path (e.g. moat cp ./a.txt \
             sbx_123:/work/a.txt)"
                .into(),
        )),
    }
}

fn upload(a: &CpArgs, src: Side, id: &str, path: &str) -> Result<i32> {
    let c = Client::new(&a.conn)?;
    let (reader, mode, name): (Box<dyn Read>, u32, Option<String>) = match &src {
        Side::Local(p) => {
            let f = File::open(p)
                .map_err(|e| Error::Msg(format!("cannot read {}: {e}", p.display())))?;
            let meta = f
                .metadata()
                .map_err(|e| Error::Msg(format!("cannot read {}: {e}", p.display())))?;
            if meta.is_dir() {
                return Err(Error::Msg(format!(
                    "{} is a directory: moat cp copies one file (use tar through `moat exec` \
                     for a tree)",
                    p.display()
                )));
            }
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned());
            (Box::new(f), meta.permissions().mode() & 0o777, name)
        }
        _ => (Box::new(std::io::stdin()), 0o644, None),
    };
    let mut dest = path.to_string();
    if dest.ends_with('/') {
        match name {
            Some(n) => dest.push_str(&n),
            None => {
                return Err(Error::Msg(format!(
                    "{path} is a directory: name the file to write from stdin"
                )))
            }
        }
    }
    let resp = c.check(
        c.put(&sandbox_path(id, "/files"))
            .query("path", &dest)
            .query("mode", format!("{mode:04o}"))
            .content_type("application/octet-stream")
            .send(ureq::SendBody::from_owned_reader(reader)),
    )?;
    let v = read_json(resp)?;
    if a.json {
        print_json(&v);
    }
    Ok(0)
}

fn download(a: &CpArgs, id: &str, path: &str, dst: Side) -> Result<i32> {
    let c = Client::new(&a.conn)?;
    // Decide the local file before the request, so a bad destination costs no transfer.
    let target = match &dst {
        Side::Local(p) if p.is_dir() => {
            let n = base_name(path)
                .ok_or_else(|| Error::Msg(format!("{path} has no file name to copy to")))?;
            Some(p.join(n))
        }
        Side::Local(p) => Some(p.clone()),
        _ => None,
    };
    let resp = c.check(
        c.get(&sandbox_path(id, "/files"))
            .query("path", path)
            .call(),
    )?;
    let mut body = resp.into_body().into_reader();
    let bytes = match &target {
        Some(t) => copy_to_file(&mut body, t)?,
        None => {
            let mut out = std::io::stdout().lock();
            let n = std::io::copy(&mut body, &mut out)
                .map_err(|e| Error::Msg(format!("copying {id}:{path} to stdout: {e}")))?;
            out.flush()
                .map_err(|e| Error::Msg(format!("writing stdout: {e}")))?;
            n
        }
    };
    if a.json {
        let p = target.map_or_else(|| "-".to_string(), |t| t.display().to_string());
        print_json(&serde_json::json!({"path": p, "bytes": bytes}));
    }
    Ok(0)
}

/// Streams `r` into `path`; a partial file is removed when the copy fails.
fn copy_to_file(r: &mut dyn Read, path: &Path) -> Result<u64> {
    let mut f = File::create(path)
        .map_err(|e| Error::Msg(format!("cannot write {}: {e}", path.display())))?;
    let res = std::io::copy(r, &mut f).and_then(|n| f.sync_all().map(|()| n));
    match res {
        Ok(n) => Ok(n),
        Err(e) => {
            drop(f);
            let _ = std::fs::remove_file(path);
            Err(Error::Msg(format!(
                "copying to {} failed (the partial file was removed): {e}",
                path.display()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_parse() {
        assert_eq!(
            parse_side("sbx_12ab:/work/a.txt"),
            Side::Remote {
                id: "sbx_12ab".into(),
                path: "/work/a.txt".into()
            }
        );
        assert_eq!(parse_side("-"), Side::Std);
        assert_eq!(parse_side("./a:b"), Side::Local("./a:b".into()));
        assert_eq!(parse_side("/tmp/x:/y"), Side::Local("/tmp/x:/y".into()));
        assert_eq!(parse_side("sbx_1:rel"), Side::Local("sbx_1:rel".into()));
        assert_eq!(parse_side("a.txt"), Side::Local("a.txt".into()));
    }

    #[test]
    fn base_names() {
        assert_eq!(base_name("/work/a.bin"), Some("a.bin"));
        assert_eq!(base_name("/work/dir/"), Some("dir"));
        assert_eq!(base_name("/"), None);
        assert_eq!(base_name("/work/.."), None);
    }

    #[test]
    fn a_failed_download_leaves_no_partial_file() {
        struct Broken(u32);
        impl Read for Broken {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.0 == 0 {
                    return Err(std::io::Error::other("connection reset"));
                }
                self.0 -= 1;
                buf[0] = b'x';
                Ok(1)
            }
        }
        let dir = std::env::temp_dir().join(format!("moat-cp-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("out");
        let e = copy_to_file(&mut Broken(3), &p).unwrap_err();
        assert!(e.to_string().contains("partial file was removed"), "{e}");
        assert!(!p.exists());
        assert_eq!(copy_to_file(&mut &b"abc"[..], &p).unwrap(), 3);
        assert_eq!(std::fs::read(&p).unwrap(), b"abc");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
