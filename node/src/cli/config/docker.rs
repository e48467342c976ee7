//! Docker: the node first in `registry-mirrors` of `/etc/docker/daemon.json`.
//! Docker consults `registry-mirrors` for Docker Hub only; pulls from any
//! other registry do not use the node (say so, and point at containerd's
//! hosts.toml for those). Other keys of the file are kept; a file that is not
//! a JSON object is refused, never replaced.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use super::files::{self, Plan, Wanted};

/// Docker's daemon config.
pub const DAEMON_JSON: &str = "/etc/docker/daemon.json";

/// The plan for `daemon.json` at `path` (a host path) under `root`.
pub fn plan(root: &Path, path: Option<&Path>, mirror: &str) -> Result<Plan> {
    let path: PathBuf = path.map_or_else(|| DAEMON_JSON.into(), Path::to_path_buf);
    let current = files::read(root, &path)?;
    let mut doc = match &current {
        None => Value::Object(serde_json::Map::new()),
        Some(b) if b.iter().all(u8::is_ascii_whitespace) => Value::Object(serde_json::Map::new()),
        Some(b) => serde_json::from_slice(b)
            .with_context(|| format!("{}: not valid JSON; fix it first", path.display()))?,
    };
    let Some(obj) = doc.as_object_mut() else {
        bail!("{}: not a JSON object", path.display());
    };
    let mirrors = obj
        .entry("registry-mirrors")
        .or_insert_with(|| Value::Array(Vec::new()));
    let Some(list) = mirrors.as_array_mut() else {
        bail!("{}: registry-mirrors is not a list", path.display());
    };
    let mut plan = Plan {
        runtime: "docker",
        ..Plan::default()
    };
    plan.notes.push(
        "Docker uses registry-mirrors for Docker Hub (docker.io) only: pulls from other \
         registries do not go through the node"
            .into(),
    );
    let first = list.first().and_then(Value::as_str) == Some(mirror);
    if !first {
        list.retain(|v| v.as_str() != Some(mirror));
        list.insert(0, Value::String(mirror.to_owned()));
        let mut text = serde_json::to_string_pretty(&doc)?;
        text.push('\n');
        plan.files.push(Wanted {
            path,
            content: text.into_bytes(),
        });
        plan.notes
            .push("restart Docker to use the mirror (systemctl restart docker)".into());
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_the_mirror_first_and_keeps_other_keys() {
        let root = tempfile::tempdir().expect("tempdir");
        let p = root.path().join("etc/docker");
        std::fs::create_dir_all(&p).expect("mkdir");
        std::fs::write(
            p.join("daemon.json"),
            r#"{"log-driver": "journald", "registry-mirrors": ["https://other"]}"#,
        )
        .expect("write");
        let plan = plan(root.path(), None, "http://127.0.0.1:5050").expect("plan");
        let v: Value = serde_json::from_slice(&plan.files[0].content).expect("json");
        assert_eq!(v["log-driver"], "journald");
        assert_eq!(
            v["registry-mirrors"],
            serde_json::json!(["http://127.0.0.1:5050", "https://other"])
        );
        files::apply(root.path(), &plan).expect("apply");
        let again = super::plan(root.path(), None, "http://127.0.0.1:5050").expect("plan");
        assert!(again.files.is_empty(), "second run changes nothing");
    }

    #[test]
    fn refuses_what_is_not_an_object() {
        let root = tempfile::tempdir().expect("tempdir");
        let p = root.path().join("etc/docker");
        std::fs::create_dir_all(&p).expect("mkdir");
        std::fs::write(p.join("daemon.json"), "[1, 2").expect("write");
        assert!(plan(root.path(), None, "http://m").is_err());
        std::fs::write(p.join("daemon.json"), "[1]").expect("write");
        assert!(plan(root.path(), None, "http://m").is_err());
    }
}
