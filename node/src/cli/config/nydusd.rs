//! nydusd: the registry backend's `proxy` section pointing at the node, as
//! nydusd documents it (`url`, `ping_url`, `fallback`, `check_interval`), in
//! a nydusd JSON config — v1 (`device.backend.config.proxy`) or v2
//! (`backend.registry.proxy`). With `fallback`, nydusd reads from the
//! registry itself while the node's ping fails. The file must exist (shoal
//! does not invent a nydusd config) and use the `registry` backend.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};

use super::files::{self, Plan, Wanted};

/// nydus-snapshotter's default nydusd config.
pub const NYDUSD_JSON: &str = "/etc/nydus/nydusd-config.json";
/// Seconds between nydusd's health checks of the node.
pub const CHECK_INTERVAL: u64 = 5;

/// The plan for the nydusd config at `path` (a host path) under `root`.
pub fn plan(root: &Path, path: Option<&Path>, mirror: &str) -> Result<Plan> {
    let path = path.unwrap_or(Path::new(NYDUSD_JSON)).to_path_buf();
    let Some(current) = files::read(root, &path)? else {
        bail!(
            "{}: no nydusd config there; pass the one nydusd uses with --file",
            path.display()
        );
    };
    let mut doc: Value = serde_json::from_slice(&current)
        .with_context(|| format!("{}: not valid JSON", path.display()))?;
    let v2 = doc.get("version").and_then(Value::as_u64) == Some(2);
    let backend = if v2 {
        doc.get_mut("backend")
    } else {
        doc.get_mut("device").and_then(|d| d.get_mut("backend"))
    };
    let Some(backend) = backend.and_then(Value::as_object_mut) else {
        bail!("{}: no backend section", path.display());
    };
    let kind = backend.get("type").and_then(Value::as_str).unwrap_or("");
    if kind != "registry" {
        bail!(
            "{}: the backend is {kind:?}, not \"registry\": the node serves registry reads only",
            path.display()
        );
    }
    let section = if v2 { "registry" } else { "config" };
    let Some(config) = backend
        .entry(section)
        .or_insert_with(|| json!({}))
        .as_object_mut()
    else {
        bail!("{}: backend.{section} is not an object", path.display());
    };
    let proxy = json!({
        "url": mirror,
        "ping_url": format!("{mirror}/ping"),
        "fallback": true,
        "check_interval": CHECK_INTERVAL,
    });
    let mut plan = Plan {
        runtime: "nydusd",
        ..Plan::default()
    };
    if config.get("proxy") != Some(&proxy) {
        config.insert("proxy".into(), proxy);
        let mut text = serde_json::to_string_pretty(&doc)?;
        text.push('\n');
        plan.files.push(Wanted {
            path,
            content: text.into_bytes(),
        });
        plan.notes.push(
            "restart nydusd (or nydus-snapshotter) so new mounts read through the node".into(),
        );
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root_with(text: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("etc/nydus");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("nydusd-config.json"), text).expect("write");
        root
    }

    #[test]
    fn v1_and_v2_get_the_proxy_section() {
        let v1 = r#"{"device":{"backend":{"type":"registry","config":{"scheme":"https","timeout":5}},"cache":{"type":"blobcache"}},"mode":"direct"}"#;
        let root = root_with(v1);
        let p = plan(root.path(), None, "http://127.0.0.1:5050").expect("plan");
        let v: Value = serde_json::from_slice(&p.files[0].content).expect("json");
        let proxy = &v["device"]["backend"]["config"]["proxy"];
        assert_eq!(proxy["url"], "http://127.0.0.1:5050");
        assert_eq!(proxy["ping_url"], "http://127.0.0.1:5050/ping");
        assert_eq!(proxy["fallback"], true);
        assert_eq!(v["device"]["backend"]["config"]["timeout"], 5);
        let v2 = r#"{"version":2,"backend":{"type":"registry","registry":{"scheme":"https"}}}"#;
        let root = root_with(v2);
        let p = plan(root.path(), None, "http://127.0.0.1:5050").expect("plan");
        let v: Value = serde_json::from_slice(&p.files[0].content).expect("json");
        assert_eq!(v["backend"]["registry"]["proxy"]["check_interval"], 5);
    }

    #[test]
    fn other_backends_are_refused() {
        let root = root_with(r#"{"device":{"backend":{"type":"localfs","config":{}}}}"#);
        assert!(plan(root.path(), None, "http://m").is_err());
    }
}
