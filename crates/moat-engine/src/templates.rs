//! Templates in a sandbox's life: a policy that names `fs.template` gets the template's root
//! (`fs.image`), its image's environment and user, resolved here once for `moat run` and the
//! daemon alike. The store itself (pull, import, layers) is `moat-image`.

use moat_policy::{ImageRoot, Policy};
use std::path::Path;
use std::sync::Arc;

use crate::error::{EngineError, EngineResult, ErrorKind};
use crate::lifecycle::{Caller, Engine};

pub use moat_image::{
    ImageConfig, ImageError, NoProgress, Progress, ProgressEvent, PullOptions, Store, Template,
};

/// The uid and gid a policy has when it names none (`moat_policy::Process::default`).
const DEFAULT_IDS: (u32, u32) = (1000, 1000);

/// Resolves `policy.fs.template` in the store under `state_dir`: sets `fs.image`, adds the
/// image's environment under the policy's own variables, and takes the image's user when it
/// is not root and the policy keeps the default ids. A policy that sets `fs.image` itself is
/// refused: only moat says where a template's files are.
pub fn resolve(state_dir: &Path, policy: &mut Policy) -> Result<Option<Template>, String> {
    if policy.fs.image.is_some() {
        return Err(
            "policy: fs.image is moat's own: name a template with fs.template (see `moat template ls`)"
                .into(),
        );
    }
    let Some(name) = policy.fs.template.clone() else {
        return Ok(None);
    };
    let store = Store::open(state_dir).map_err(|e| e.to_string())?;
    let t = store.get(&name).map_err(|e| e.to_string())?;
    policy.fs.image = Some(ImageRoot {
        rootfs: t.rootfs.display().to_string(),
        name: t.name.clone(),
    });
    for kv in &t.config.env {
        if let Some((k, v)) = kv.split_once('=') {
            policy
                .env
                .entry(k.to_string())
                .or_insert_with(|| v.to_string());
        }
    }
    if (policy.process.uid, policy.process.gid) == DEFAULT_IDS {
        if let Some((uid, gid)) = t
            .config
            .user
            .as_deref()
            .and_then(|u| image_user(&t.rootfs, u))
        {
            if uid != 0 {
                policy.process.uid = uid;
                policy.process.gid = gid;
            }
        }
    }
    policy.validate().map_err(|e| format!("policy: {e}"))?;
    Ok(Some(t))
}

/// The ids of an image's `User` (`uid`, `uid:gid`, `name`, `name:group`), names looked up in
/// the template's own `/etc/passwd` and `/etc/group`.
fn image_user(rootfs: &Path, user: &str) -> Option<(u32, u32)> {
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let lookup = |file: &str, name: &str| -> Option<(u32, u32)> {
        let text = read_in_root(rootfs, file)?;
        text.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&name)).then(|| {
                let id = f.get(2).and_then(|x| x.parse().ok());
                let gid = f.get(3).and_then(|x| x.parse().ok());
                Some((id?, gid.unwrap_or(0)))
            })?
        })
    };
    let (uid, pgid) = match u.parse::<u32>() {
        Ok(n) => (n, lookup_by_id(rootfs, n).unwrap_or(n)),
        Err(_) => lookup("etc/passwd", u)?,
    };
    let gid = match g {
        None => pgid,
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => lookup("etc/group", g)?.0,
        },
    };
    Some((uid, gid))
}

/// A small file of the template, its path resolved inside the template's root (an image's
/// `etc/passwd -> /etc/shadow` symlink must not read the host's file).
fn read_in_root(rootfs: &Path, rel: &str) -> Option<String> {
    use std::io::Read;
    let f = moat_image::open_in_root(rootfs, Path::new(rel)).ok()?;
    let mut text = String::new();
    f.take(1 << 20).read_to_string(&mut text).ok()?;
    Some(text)
}

/// The primary gid of uid `n` in the template's `/etc/passwd`.
fn lookup_by_id(rootfs: &Path, n: u32) -> Option<u32> {
    let text = read_in_root(rootfs, "etc/passwd")?;
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.get(2).and_then(|x| x.parse::<u32>().ok()) == Some(n))
            .then(|| f.get(3).and_then(|x| x.parse().ok()))?
    })
}

/// The engine's error for a store's.
pub fn engine_error(e: ImageError) -> EngineError {
    let msg = e.to_string();
    match e {
        ImageError::NotFound(_) => EngineError::new(ErrorKind::NotFound, "no_such_template", msg),
        ImageError::Registry(_) => EngineError::new(ErrorKind::Unavailable, "registry_error", msg),
        ImageError::TooLarge(_) => EngineError::too_large(msg),
        ImageError::Io(_) => EngineError::internal(msg),
        _ => EngineError::new(ErrorKind::Unprocessable, "bad_image", msg),
    }
}

/// The templates API of the engine: anyone with a key lists and reads them (they are the
/// host's, like its `/usr`); only an admin key pulls or removes one.
impl Engine {
    fn store(&self) -> EngineResult<Store> {
        Store::open(&self.cfg.state_dir).map_err(engine_error)
    }

    pub async fn templates(self: &Arc<Self>) -> EngineResult<Vec<Template>> {
        let store = self.store()?;
        blocking(move || store.list()).await
    }

    pub async fn template(self: &Arc<Self>, name: &str) -> EngineResult<Template> {
        let store = self.store()?;
        let name = name.to_string();
        blocking(move || store.get(&name)).await
    }

    pub async fn pull_template(
        self: &Arc<Self>,
        caller: &Caller,
        reference: &str,
        opts: PullOptions,
    ) -> EngineResult<Template> {
        admin_only(caller)?;
        let store = self.store()?;
        let reference = reference.to_string();
        blocking(move || store.pull(&reference, &opts, &mut NoProgress)).await
    }

    pub async fn remove_template(
        self: &Arc<Self>,
        caller: &Caller,
        name: &str,
    ) -> EngineResult<()> {
        admin_only(caller)?;
        let store = self.store()?;
        let name = name.to_string();
        blocking(move || store.remove(&name)).await
    }
}

fn admin_only(caller: &Caller) -> EngineResult<()> {
    if caller.is_admin() {
        Ok(())
    } else {
        Err(EngineError::forbidden(
            "templates are shared by every key of this daemon: pulling or removing one needs \
             the admin key (or run `moat template` where the daemon runs)",
        ))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ImageError> + Send + 'static,
) -> EngineResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| EngineError::internal(format!("template task: {e}")))?
        .map_err(engine_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_users_resolve_from_the_template_files() {
        let d = std::env::temp_dir().join(format!("moat-imguser-{}", std::process::id()));
        std::fs::create_dir_all(d.join("etc")).expect("mkdir");
        std::fs::write(
            d.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:1234:2345::/app:/bin/sh\n",
        )
        .expect("passwd");
        std::fs::write(d.join("etc/group"), "root:x:0:\nstaff:x:50:\n").expect("group");
        assert_eq!(image_user(&d, "app"), Some((1234, 2345)));
        assert_eq!(image_user(&d, "1234"), Some((1234, 2345)));
        assert_eq!(image_user(&d, "4000"), Some((4000, 4000)));
        assert_eq!(image_user(&d, "app:staff"), Some((1234, 50)));
        assert_eq!(image_user(&d, "4000:51"), Some((4000, 51)));
        assert_eq!(image_user(&d, "nobody-here"), None);
        assert_eq!(image_user(&d, "app:nogroup"), None);
        let _ = std::fs::remove_dir_all(&d);
    }
}
