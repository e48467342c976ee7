//! containerd: one `hosts.toml` per registry in the CRI plugin's
//! `config_path` (the node first, with a short dial timeout; the registry
//! itself as `server`, so a node that is down costs a pull one dial timeout),
//! `config_path` set in config.toml when it is missing, and with
//! `--snapshotter` the `shoal` proxy snapshotter and the CRI settings that
//! use it.
//!
//! Never writes `_default/hosts.toml` (it would send every registry's
//! fallback to one host). Refuses, writing nothing, a config with the legacy
//! `registry.mirrors` / `registry.configs.*.tls` (containerd's CRI plugin
//! does not load when those and `config_path` are both set). Runtime layouts:
//! stock (`/etc/containerd/config.toml`), k3s and RKE2 (config.toml is
//! generated at every start from config.toml.tmpl, so it is only read; their
//! `config_path` must already be set), k0s (a drop-in in
//! `/etc/k0s/containerd.d/`).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use toml_edit::{value, DocumentMut, Item, Table};

use super::files::{self, Plan, Wanted};
use super::Registry;

/// containerd's proxy plugin name and CRI `snapshotter` name for shoal.
pub const SNAPSHOTTER: &str = "shoal";
/// How long containerd waits to connect to the node before it goes to the
/// registry itself.
pub const DIAL_TIMEOUT: &str = "500ms";

/// Which distribution's containerd this is, found from the files present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Layout {
    /// Plain containerd: its config file, edited in place.
    Stock { config: PathBuf },
    /// k3s / RKE2: a generated config.toml (read only) and its certs.d.
    Generated {
        distro: &'static str,
        config: PathBuf,
        template: PathBuf,
    },
    /// k0s: `/etc/k0s/containerd.toml` imports `/etc/k0s/containerd.d/*.toml`.
    K0s { dropin: PathBuf },
}

const K3S: &str = "/var/lib/rancher/k3s/agent/etc/containerd/config.toml";
const RKE2: &str = "/var/lib/rancher/rke2/agent/etc/containerd/config.toml";
const K0S: &str = "/etc/k0s/containerd.toml";
const STOCK: &str = "/etc/containerd/config.toml";
const STOCK_HOSTS: &str = "/etc/containerd/certs.d";

/// Finds the layout under `root`; `config` (a host path) overrides it.
pub fn detect(root: &Path, config: Option<&Path>) -> Result<Layout> {
    if let Some(c) = config {
        return Ok(Layout::Stock { config: c.into() });
    }
    let exists = |p: &str| files::under(root, Path::new(p)).map(|p| p.exists());
    for (distro, path) in [("k3s", K3S), ("RKE2", RKE2)] {
        if exists(path)? {
            return Ok(Layout::Generated {
                distro,
                config: path.into(),
                template: format!("{path}.tmpl").into(),
            });
        }
    }
    if exists(K0S)? {
        return Ok(Layout::K0s {
            dropin: "/etc/k0s/containerd.d/shoal.toml".into(),
        });
    }
    Ok(Layout::Stock {
        config: STOCK.into(),
    })
}

/// What to write.
#[derive(Debug, Clone)]
pub struct Options {
    pub registries: Vec<Registry>,
    /// The node's mirror, `http://127.0.0.1:5050`.
    pub mirror: String,
    /// Also configure the `shoal` snapshotter.
    pub snapshotter: bool,
    pub snapshotter_socket: PathBuf,
}

/// The files for `layout`, read from under `root`.
pub fn plan(root: &Path, layout: &Layout, opts: &Options) -> Result<Plan> {
    let mut plan = Plan {
        runtime: "containerd",
        ..Plan::default()
    };
    let hosts_dir = match layout {
        Layout::Stock { config } => {
            let text = read_text(root, config)?;
            let mut doc = parse(config, text.as_deref().unwrap_or(""))?;
            let cri = CriPaths::of(config, &doc)?;
            refuse_legacy(config, &doc, &cri)?;
            let hosts = match config_path(&doc, &cri) {
                Some(p) => p,
                None => {
                    set(&mut doc, &cri.registry, "config_path", value(STOCK_HOSTS));
                    PathBuf::from(STOCK_HOSTS)
                }
            };
            if opts.snapshotter {
                add_snapshotter(&mut doc, &cri, &opts.snapshotter_socket);
            }
            let new = doc.to_string();
            let changed = text.as_deref() != Some(new.as_str());
            plan.files.push(Wanted {
                path: config.clone(),
                content: new.into_bytes(),
            });
            if changed {
                plan.notes.push(format!(
                    "restart containerd to load {} (systemctl restart containerd)",
                    config.display()
                ));
            }
            hosts
        }
        Layout::Generated {
            distro,
            config,
            template,
        } => {
            let text = read_text(root, config)?.with_context(|| {
                format!(
                    "{distro}: {} is missing; start {distro} once first",
                    config.display()
                )
            })?;
            let doc = parse(config, &text)?;
            let cri = CriPaths::of(config, &doc)?;
            refuse_legacy(config, &doc, &cri)?;
            let Some(hosts) = config_path(&doc, &cri) else {
                bail!(
                    "containerd's config_path is unset in {} ({distro} writes that file at every \
                     start, so shoal does not edit it): containerd would ignore hosts.toml files. \
                     Use a {distro} release that sets it (k3s and RKE2 do since 2024), or set \
                     [{}] config_path in {}",
                    config.display(),
                    cri.registry.join("."),
                    template.display()
                );
            };
            if opts.snapshotter {
                bail!(
                    "{distro} generates {} at every start: add the shoal snapshotter to {} \
                     instead (see `shoal config containerd --snapshotter` on a plain containerd \
                     for the stanza), or run again without --snapshotter",
                    config.display(),
                    template.display()
                );
            }
            plan.notes.push(format!(
                "{distro}: hosts.toml files are read per pull, no restart needed; a registry also \
                 listed in /etc/rancher/{}/registries.yaml is managed by {distro} and its file \
                 replaced at the next start",
                distro.to_lowercase()
            ));
            hosts
        }
        Layout::K0s { dropin } => {
            let mut doc = DocumentMut::new();
            doc["version"] = value(2);
            let cri = CriPaths::v2();
            set(&mut doc, &cri.registry, "config_path", value(STOCK_HOSTS));
            if opts.snapshotter {
                add_snapshotter(&mut doc, &cri, &opts.snapshotter_socket);
            }
            plan.files.push(Wanted {
                path: dropin.clone(),
                content: doc.to_string().into_bytes(),
            });
            plan.notes
                .push("k0s: restart the k0s worker to load the drop-in".into());
            PathBuf::from(STOCK_HOSTS)
        }
    };
    for r in &opts.registries {
        if r.host == "_default" {
            bail!("refusing to write _default/hosts.toml: name each registry");
        }
        plan.files.push(Wanted {
            path: hosts_dir.join(&r.host).join("hosts.toml"),
            content: hosts_toml(r, &opts.mirror).into_bytes(),
        });
    }
    Ok(plan)
}

/// `hosts.toml` for one registry: the node first, the registry as fallback.
pub fn hosts_toml(r: &Registry, mirror: &str) -> String {
    format!(
        "# Written by `shoal config containerd` (undo: `shoal config containerd --undo`).\n\
         # Pulls of {host} go through the local shoal node; if it does not answer within\n\
         # dial_timeout, containerd goes to the registry itself (server).\n\
         server = \"{server}\"\n\
         \n\
         [host.\"{mirror}\"]\n\
         \x20 capabilities = [\"pull\", \"resolve\"]\n\
         \x20 dial_timeout = \"{DIAL_TIMEOUT}\"\n",
        host = r.host,
        server = r.server,
    )
}

/// Where the CRI settings live in this config version.
#[derive(Debug, Clone)]
struct CriPaths {
    /// The table holding `config_path` and (v2) `mirrors`/`configs`.
    registry: Vec<&'static str>,
    /// The table holding `snapshotter` and `disable_snapshot_annotations`.
    snapshotter: Vec<&'static str>,
}

impl CriPaths {
    fn v2() -> Self {
        Self {
            registry: vec!["plugins", "io.containerd.grpc.v1.cri", "registry"],
            snapshotter: vec!["plugins", "io.containerd.grpc.v1.cri", "containerd"],
        }
    }

    fn v3() -> Self {
        Self {
            registry: vec!["plugins", "io.containerd.cri.v1.images", "registry"],
            snapshotter: vec!["plugins", "io.containerd.cri.v1.images"],
        }
    }

    fn of(file: &Path, doc: &DocumentMut) -> Result<Self> {
        match doc.get("version").and_then(Item::as_integer) {
            Some(2) => Ok(Self::v2()),
            Some(3) => Ok(Self::v3()),
            // An empty or missing file: containerd's defaults, written as v2.
            None if doc.is_empty() => Ok(Self::v2()),
            None => bail!(
                "{}: a version 1 containerd config (no `version = 2`); convert it with \
                 `containerd config migrate` (2.x) or rewrite it as version 2, then run again",
                file.display()
            ),
            Some(v) => bail!("{}: unknown containerd config version {v}", file.display()),
        }
    }
}

fn read_text(root: &Path, path: &Path) -> Result<Option<String>> {
    match files::read(root, path)? {
        None => Ok(None),
        Some(b) => String::from_utf8(b)
            .map(Some)
            .with_context(|| format!("{}: not UTF-8", path.display())),
    }
}

fn parse(path: &Path, text: &str) -> Result<DocumentMut> {
    text.parse::<DocumentMut>()
        .with_context(|| format!("{}: not valid TOML", path.display()))
}

fn table<'a>(doc: &'a DocumentMut, path: &[&str]) -> Option<&'a Table> {
    let mut t = doc.as_table();
    for k in path {
        t = t.get(k)?.as_table()?;
    }
    Some(t)
}

fn config_path(doc: &DocumentMut, cri: &CriPaths) -> Option<PathBuf> {
    let p = table(doc, &cri.registry)?.get("config_path")?.as_str()?;
    // containerd takes a `:`-separated list; hosts go in the first.
    p.split(':').find(|s| !s.is_empty()).map(PathBuf::from)
}

/// The legacy mirror settings containerd refuses next to `config_path`.
fn refuse_legacy(file: &Path, doc: &DocumentMut, cri: &CriPaths) -> Result<()> {
    let Some(reg) = table(doc, &cri.registry) else {
        return Ok(());
    };
    let mut found = Vec::new();
    if let Some(m) = reg.get("mirrors").and_then(Item::as_table_like) {
        found.extend(m.iter().map(|(k, _)| format!("mirrors.\"{k}\"")));
    }
    if let Some(c) = reg.get("configs").and_then(Item::as_table_like) {
        for (k, v) in c.iter() {
            if v.as_table_like().is_some_and(|t| t.contains_key("tls")) {
                found.push(format!("configs.\"{k}\".tls"));
            }
        }
    }
    if found.is_empty() {
        return Ok(());
    }
    bail!(
        "{}: uses containerd's legacy registry settings ([{}] {}). containerd's CRI plugin does \
         not start when they are set together with config_path, so shoal wrote nothing. Move \
         each mirror to <config_path>/<registry>/hosts.toml (and TLS settings to ca/client \
         entries there), delete the legacy tables, then run this again",
        file.display(),
        cri.registry.join("."),
        found.join(", ")
    )
}

/// Sets `key` in the table at `path`, creating tables (not inline) on the
/// way.
fn set(doc: &mut DocumentMut, path: &[&str], key: &str, v: Item) {
    let mut t = doc.as_table_mut();
    for k in path {
        let entry = t.entry(k).or_insert_with(|| {
            let mut new = Table::new();
            new.set_implicit(true);
            Item::Table(new)
        });
        if !entry.is_table() {
            *entry = Item::Table(Table::new());
        }
        let Some(next) = entry.as_table_mut() else {
            return;
        };
        t = next;
    }
    let same = t
        .get(key)
        .map(|cur| cur.to_string().trim() == v.to_string().trim());
    if same != Some(true) {
        t.insert(key, v);
    }
}

fn add_snapshotter(doc: &mut DocumentMut, cri: &CriPaths, socket: &Path) {
    let plugin = ["proxy_plugins", SNAPSHOTTER];
    set(doc, &plugin, "type", value("snapshot"));
    set(doc, &plugin, "address", value(socket.display().to_string()));
    set(doc, &cri.snapshotter, "snapshotter", value(SNAPSHOTTER));
    set(
        doc,
        &cri.snapshotter,
        "disable_snapshot_annotations",
        value(false),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN: &str = "version = 2\n\n[plugins]\n  [plugins.\"io.containerd.grpc.v1.cri\"]\n    [plugins.\"io.containerd.grpc.v1.cri\".cni]\n      bin_dir = \"/usr/lib/cni\"\n      conf_dir = \"/etc/cni/net.d\"\n  [plugins.\"io.containerd.internal.v1.opt\"]\n    path = \"/var/lib/containerd/opt\"\n";

    fn opts(snapshotter: bool) -> Options {
        Options {
            registries: vec![Registry::parse("docker.io").expect("registry")],
            mirror: "http://127.0.0.1:5050".into(),
            snapshotter,
            snapshotter_socket: "/run/shoal/snapshotter.sock".into(),
        }
    }

    fn root_with(path: &str, text: &str) -> tempfile::TempDir {
        let root = tempfile::tempdir().expect("tempdir");
        let p = files::under(root.path(), Path::new(path)).expect("path");
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, text).expect("write");
        root
    }

    #[test]
    fn debian_config_gets_config_path_and_keeps_the_rest() {
        let root = root_with(STOCK, DEBIAN);
        let layout = detect(root.path(), None).expect("layout");
        let plan = plan(root.path(), &layout, &opts(true)).expect("plan");
        let config = String::from_utf8(plan.files[0].content.clone()).expect("utf8");
        let v: toml::Value = toml::from_str(&config).expect("valid TOML");
        let cri = &v["plugins"]["io.containerd.grpc.v1.cri"];
        assert_eq!(cri["registry"]["config_path"].as_str(), Some(STOCK_HOSTS));
        assert_eq!(cri["cni"]["bin_dir"].as_str(), Some("/usr/lib/cni"));
        assert_eq!(cri["containerd"]["snapshotter"].as_str(), Some("shoal"));
        assert_eq!(
            cri["containerd"]["disable_snapshot_annotations"].as_bool(),
            Some(false)
        );
        assert_eq!(
            v["proxy_plugins"]["shoal"]["type"].as_str(),
            Some("snapshot")
        );
        assert!(config.starts_with(DEBIAN.lines().next().expect("line")));
        let hosts = &plan.files[1];
        assert_eq!(
            hosts.path,
            Path::new("/etc/containerd/certs.d/docker.io/hosts.toml")
        );
        let h: toml::Value =
            toml::from_str(std::str::from_utf8(&hosts.content).expect("utf8")).expect("toml");
        assert_eq!(h["server"].as_str(), Some("https://registry-1.docker.io"));
        assert_eq!(
            h["host"]["http://127.0.0.1:5050"]["dial_timeout"].as_str(),
            Some(DIAL_TIMEOUT)
        );
    }

    #[test]
    fn legacy_mirrors_are_refused_by_name() {
        let text = format!(
            "{DEBIAN}[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\n  endpoint = [\"https://m\"]\n"
        );
        let root = root_with(STOCK, &text);
        let layout = detect(root.path(), None).expect("layout");
        let e = plan(root.path(), &layout, &opts(false)).expect_err("refused");
        let msg = e.to_string();
        assert!(
            msg.contains("legacy") && msg.contains("mirrors.\"docker.io\""),
            "{msg}"
        );
    }

    #[test]
    fn k3s_layout_without_config_path_is_a_clear_error() {
        let root = root_with(K3S, "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  snapshotter = \"overlayfs\"\n");
        let layout = detect(root.path(), None).expect("layout");
        assert!(matches!(layout, Layout::Generated { distro: "k3s", .. }));
        let e = plan(root.path(), &layout, &opts(false)).expect_err("no config_path");
        assert!(e.to_string().contains("config_path is unset"), "{e}");
    }

    #[test]
    fn version_1_and_broken_files_are_refused() {
        let root = root_with(STOCK, "[plugins.cri]\n x = 1\n");
        let e = plan(
            root.path(),
            &Layout::Stock {
                config: STOCK.into(),
            },
            &opts(false),
        )
        .expect_err("v1");
        assert!(e.to_string().contains("version 1"), "{e}");
        let root = root_with(STOCK, "version = 2\n[plugins\n");
        let e = plan(
            root.path(),
            &Layout::Stock {
                config: STOCK.into(),
            },
            &opts(false),
        )
        .expect_err("broken");
        assert!(e.to_string().contains("not valid TOML"), "{e}");
    }

    #[test]
    fn v3_config_uses_the_images_plugin() {
        let root = root_with(STOCK, "version = 3\n");
        let p = plan(
            root.path(),
            &Layout::Stock {
                config: STOCK.into(),
            },
            &opts(true),
        )
        .expect("plan");
        let v: toml::Value =
            toml::from_str(std::str::from_utf8(&p.files[0].content).expect("utf8")).expect("toml");
        let images = &v["plugins"]["io.containerd.cri.v1.images"];
        assert_eq!(
            images["registry"]["config_path"].as_str(),
            Some(STOCK_HOSTS)
        );
        assert_eq!(images["snapshotter"].as_str(), Some("shoal"));
    }
}
