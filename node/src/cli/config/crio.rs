//! CRI-O and podman (containers-registries.conf v2): a `[[registry.mirror]]`
//! pointing at the node, first in the entry of one registry in
//! `/etc/containers/registries.conf`, the entry created when missing.
//!
//! Only one registry: a CRI-O mirror request names no registry (no `?ns=` as
//! containerd sends), so the node serves it from its default upstream —
//! mirror the registry that is the node's default upstream (docker.io unless
//! configured otherwise). The rest of the file, comments included, is kept;
//! the v1 format (`[registries.search]`) is refused.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use toml_edit::{value, ArrayOfTables, DocumentMut, Item, Table};

use super::files::{self, Plan, Wanted};
use super::Registry;

/// The system registries.conf.
pub const REGISTRIES_CONF: &str = "/etc/containers/registries.conf";

/// The plan for `registries.conf` at `path` (a host path) under `root`.
/// `mirror` is `host:port` (containers-registries.conf has no scheme).
pub fn plan(root: &Path, path: Option<&Path>, registry: &Registry, mirror: &str) -> Result<Plan> {
    let path: PathBuf = path.map_or_else(|| REGISTRIES_CONF.into(), Path::to_path_buf);
    let current = match files::read(root, &path)? {
        Some(b) => {
            String::from_utf8(b).with_context(|| format!("{}: not UTF-8", path.display()))?
        }
        None => String::new(),
    };
    let mut doc: DocumentMut = current
        .parse()
        .with_context(|| format!("{}: not valid TOML", path.display()))?;
    if doc.contains_key("registries") {
        bail!(
            "{}: the v1 registries.conf format ([registries.*]); convert it to v2 \
             ([[registry]] entries, containers-registries.conf(5)) first",
            path.display()
        );
    }
    let regs = doc
        .entry("registry")
        .or_insert_with(|| Item::ArrayOfTables(ArrayOfTables::new()));
    let Some(regs) = regs.as_array_of_tables_mut() else {
        bail!(
            "{}: `registry` is not a list of [[registry]] tables",
            path.display()
        );
    };
    let prefix = registry.host.as_str();
    let found = regs.iter_mut().find(|t| {
        let p = t.get("prefix").and_then(Item::as_str);
        let l = t.get("location").and_then(Item::as_str);
        p == Some(prefix) || (p.is_none() && l == Some(prefix))
    });
    let entry = match found {
        Some(t) => t,
        None => {
            let mut t = Table::new();
            t.insert("prefix", value(prefix));
            t.insert("location", value(registry.location()));
            regs.push(t);
            let last = regs.len() - 1;
            regs.get_mut(last).context("the entry just added")?
        }
    };
    let mirrors = entry
        .entry("mirror")
        .or_insert_with(|| Item::ArrayOfTables(ArrayOfTables::new()));
    let Some(mirrors) = mirrors.as_array_of_tables_mut() else {
        bail!(
            "{}: registry.mirror of {prefix} is not a list",
            path.display()
        );
    };
    let first = mirrors
        .get(0)
        .and_then(|t| t.get("location"))
        .and_then(Item::as_str)
        == Some(mirror);
    let mut plan = Plan {
        runtime: "crio",
        ..Plan::default()
    };
    plan.notes.push(format!(
        "CRI-O/podman send mirror requests without naming the registry: only {prefix} (the \
         node's default upstream) is mirrored"
    ));
    if !first {
        let mut keep = ArrayOfTables::new();
        let mut ours = Table::new();
        ours.insert("location", value(mirror));
        ours.insert("insecure", value(true));
        keep.push(ours);
        for t in mirrors.iter() {
            if t.get("location").and_then(Item::as_str) != Some(mirror) {
                keep.push(t.clone());
            }
        }
        *mirrors = keep;
        plan.files.push(Wanted {
            path,
            content: doc.to_string().into_bytes(),
        });
        plan.notes
            .push("restart CRI-O to use the mirror (systemctl restart crio)".into());
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_a_first_mirror_to_an_existing_entry_and_keeps_comments() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("etc/containers");
        std::fs::create_dir_all(&dir).expect("mkdir");
        let text = "# site settings\nunqualified-search-registries = [\"docker.io\"]\n\n[[registry]]\nprefix = \"docker.io\"\nlocation = \"registry-1.docker.io\"\n\n[[registry.mirror]]\nlocation = \"mirror.example\"\n";
        std::fs::write(dir.join("registries.conf"), text).expect("write");
        let r = Registry::parse("docker.io").expect("registry");
        let p = plan(root.path(), None, &r, "127.0.0.1:5050").expect("plan");
        let out = std::str::from_utf8(&p.files[0].content).expect("utf8");
        assert!(out.starts_with("# site settings"), "{out}");
        let v: toml::Value = toml::from_str(out).expect("toml");
        let m = v["registry"][0]["mirror"].as_array().expect("mirrors");
        assert_eq!(m[0]["location"].as_str(), Some("127.0.0.1:5050"));
        assert_eq!(m[1]["location"].as_str(), Some("mirror.example"));
        files::apply(root.path(), &p).expect("apply");
        assert!(plan(root.path(), None, &r, "127.0.0.1:5050")
            .expect("again")
            .files
            .is_empty());
    }

    #[test]
    fn v1_format_is_refused() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("etc/containers");
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(
            dir.join("registries.conf"),
            "[registries.search]\nregistries = []\n",
        )
        .expect("write");
        let r = Registry::parse("docker.io").expect("registry");
        let e = plan(root.path(), None, &r, "127.0.0.1:5050").expect_err("v1");
        assert!(e.to_string().contains("v1"), "{e}");
    }
}
