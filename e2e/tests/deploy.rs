//! What `deploy/` ships agrees with shoal itself:
//! - every Kubernetes manifest (the base and each rendered overlay) parses into the Kubernetes API
//!   types, and its container args parse with shoal's own CLI, its config maps with shoal's config
//!   parsers, its probes, ports and Services name ports the processes really listen on;
//! - the systemd units pass `systemd-analyze verify` and their ExecStart lines parse with the CLI;
//! - every metric the Grafana dashboards query is exported by a running node or scheduler.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use clap::Parser as _;
use k8s_openapi::api::apps::v1::{DaemonSet, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, PodSpec, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use shoal_e2e::node::Node;
use shoal_e2e::scheduler::Scheduler;
use shoal_e2e::{run, setup, skopeo, Need, TestCtx};
use shoal_node::cli::{Cli, Command as Sub};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every object of the manifests, typed.
#[derive(Default)]
struct Objects {
    daemonsets: Vec<DaemonSet>,
    statefulsets: Vec<StatefulSet>,
    services: Vec<Service>,
    configmaps: Vec<ConfigMap>,
    policies: Vec<NetworkPolicy>,
    namespaces: Vec<Namespace>,
    /// Custom resources (ServiceMonitor), untyped.
    custom: Vec<serde_yaml::Value>,
}

impl Objects {
    fn parse(text: &str, origin: &str) -> Result<Self> {
        let mut o = Self::default();
        for doc in serde_yaml::Deserializer::from_str(text) {
            let v =
                serde_yaml::Value::deserialize(doc).with_context(|| format!("{origin}: YAML"))?;
            if v.is_null() {
                continue;
            }
            let kind = v["kind"].as_str().unwrap_or_default().to_owned();
            let ctx = || format!("{origin}: {kind} {:?}", v["metadata"]["name"]);
            match kind.as_str() {
                "DaemonSet" => o
                    .daemonsets
                    .push(serde_yaml::from_value(v.clone()).with_context(ctx)?),
                "StatefulSet" => o
                    .statefulsets
                    .push(serde_yaml::from_value(v.clone()).with_context(ctx)?),
                "Service" => o
                    .services
                    .push(serde_yaml::from_value(v.clone()).with_context(ctx)?),
                "ConfigMap" => o
                    .configmaps
                    .push(serde_yaml::from_value(v.clone()).with_context(ctx)?),
                "NetworkPolicy" => o
                    .policies
                    .push(serde_yaml::from_value(v.clone()).with_context(ctx)?),
                "Namespace" => o
                    .namespaces
                    .push(serde_yaml::from_value(v.clone()).with_context(ctx)?),
                "ServiceMonitor" => o.custom.push(v),
                "Kustomization" => {}
                other => bail!("{origin}: a {other:?} the test does not know; add it here"),
            }
        }
        Ok(o)
    }

    fn extend(&mut self, other: Self) {
        self.daemonsets.extend(other.daemonsets);
        self.statefulsets.extend(other.statefulsets);
        self.services.extend(other.services);
        self.configmaps.extend(other.configmaps);
        self.policies.extend(other.policies);
        self.namespaces.extend(other.namespaces);
        self.custom.extend(other.custom);
    }

    fn config(&self, name: &str, key: &str) -> Result<&str> {
        self.configmaps
            .iter()
            .find(|c| c.metadata.name.as_deref() == Some(name))
            .and_then(|c| c.data.as_ref()?.get(key))
            .map(String::as_str)
            .with_context(|| format!("ConfigMap {name} has no {key}"))
    }
}

use serde::Deserialize as _;

/// `$(VAR)` in args replaced the way kubelet does, with sample values.
fn expand(arg: &str, env: &BTreeMap<&str, &str>) -> String {
    let mut s = arg.to_owned();
    for (k, v) in env {
        s = s.replace(&format!("$({k})"), v);
    }
    s
}

fn parse_cli(container: &Container, env: &BTreeMap<&str, &str>) -> Result<Cli> {
    let mut argv = vec!["shoal".to_owned()];
    argv.extend(container.args.iter().flatten().map(|a| expand(a, env)));
    ensure!(
        !argv.iter().any(|a| a.contains("$(")),
        "{}: an unexpanded variable in {argv:?}",
        container.name
    );
    Cli::try_parse_from(&argv).with_context(|| format!("{}: {argv:?}", container.name))
}

/// The named container port's number and protocol.
fn port(container: &Container, name: &str) -> Result<(i32, String)> {
    container
        .ports
        .iter()
        .flatten()
        .find(|p| p.name.as_deref() == Some(name))
        .map(|p| {
            (
                p.container_port,
                p.protocol.clone().unwrap_or_else(|| "TCP".into()),
            )
        })
        .with_context(|| format!("{}: no port named {name}", container.name))
}

fn probe_port(container: &Container, probe: &str) -> Result<(String, String)> {
    let p = match probe {
        "readiness" => container.readiness_probe.as_ref(),
        "liveness" => container.liveness_probe.as_ref(),
        _ => container.startup_probe.as_ref(),
    }
    .with_context(|| format!("{}: no {probe} probe", container.name))?;
    let get = p.http_get.as_ref().context("an HTTP probe")?;
    let port = match &get.port {
        IntOrString::String(s) => s.clone(),
        IntOrString::Int(i) => i.to_string(),
    };
    Ok((port, get.path.clone().unwrap_or_default()))
}

fn mounts_resolve(spec: &PodSpec) -> Result<()> {
    let volumes: BTreeSet<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    for c in spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
    {
        for m in c.volume_mounts.iter().flatten() {
            ensure!(
                volumes.contains(m.name.as_str()),
                "{}: mount of unknown volume {}",
                c.name,
                m.name
            );
        }
    }
    Ok(())
}

/// The checks on one full set of objects (the base, or an overlay rendered).
fn check_objects(o: &Objects, containerd_dir: &str) -> Result<()> {
    let env = BTreeMap::from([("NODE_IP", "10.0.0.5"), ("POD_NAME", "shoal-scheduler-1")]);
    // The node config and the DaemonSet.
    let node_toml = o.config("shoal-node", "node.toml")?;
    let node_cfg = shoal_node::config::FileConfig::parse(node_toml)
        .map_err(|e| anyhow::anyhow!("node.toml in the ConfigMap: {e}"))?;
    let ds = o
        .daemonsets
        .iter()
        .find(|d| d.metadata.name.as_deref() == Some("shoal-node"))
        .context("no node DaemonSet")?;
    let pod = ds
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .context("no pod spec")?;
    ensure!(
        pod.host_network == Some(true),
        "the node runs on the host network"
    );
    ensure!(
        pod.automount_service_account_token == Some(false),
        "the node needs no API token"
    );
    mounts_resolve(pod)?;
    let node = pod
        .containers
        .iter()
        .find(|c| c.name == "node")
        .context("no node container")?;
    let Sub::Node(args) = parse_cli(node, &env)?.command else {
        bail!("the node container does not run `shoal node`");
    };
    let config_path = args.config.clone().context("the node gets --config")?;
    let mounted = node
        .volume_mounts
        .iter()
        .flatten()
        .any(|m| Path::new(&m.mount_path) == config_path);
    ensure!(mounted, "--config {} is not mounted", config_path.display());
    let admin = args
        .admin
        .context("--admin on the node IP (probes and Prometheus reach it)")?;
    ensure!(admin.ip().to_string() == env["NODE_IP"], "--admin {admin}");
    let p2p = args.p2p.unwrap_or(node_cfg.p2p.listen);
    ensure!(
        port(node, "admin")?.0 == i32::from(admin.port()),
        "admin port"
    );
    ensure!(
        port(node, "mirror")?.0 == i32::from(node_cfg.listen.port()),
        "mirror port"
    );
    ensure!(
        port(node, "p2p")? == (i32::from(p2p.port()), "UDP".into()),
        "p2p port is UDP {}",
        p2p.port()
    );
    let dht = node_cfg.p2p.dht_listen.map_or(5053, |a| a.port());
    ensure!(
        port(node, "dht")? == (i32::from(dht), "TCP".into()),
        "dht port"
    );
    for (probe, path) in [
        ("readiness", "/readyz"),
        ("liveness", "/healthz"),
        ("startup", "/readyz"),
    ] {
        let (p, got) = probe_port(node, probe)?;
        ensure!(p == "admin" && got == path, "{probe} probe: {p} {got}");
    }
    let pre_stop = node
        .lifecycle
        .as_ref()
        .and_then(|l| l.pre_stop.as_ref())
        .context("no preStop")?;
    ensure!(pre_stop.exec.is_some(), "preStop drains by exec");
    // The join secret: the file the config names is the mounted Secret's key.
    let secret_file = node_cfg
        .p2p
        .join_secret_file
        .clone()
        .context("p2p.join_secret_file")?;
    let secret_vol = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.secret.is_some())
        .context("no Secret volume")?;
    let secret_mount = node
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == secret_vol.name)
        .context("Secret not mounted")?;
    ensure!(
        secret_file.parent() == Some(Path::new(&secret_mount.mount_path)),
        "join secret at {}",
        secret_file.display()
    );
    // The init container writes containerd's config for this layout.
    let init = pod
        .init_containers
        .iter()
        .flatten()
        .find(|c| c.name == "containerd-config")
        .context("no containerd-config init container")?;
    let Sub::Config(shoal_node::cli::config::ConfigCommand::Containerd(cargs)) =
        parse_cli(init, &env)?.command
    else {
        bail!("the init container does not run `shoal config containerd`");
    };
    ensure!(cargs.common.write, "the init container writes");
    let host_dir = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == "containerd-config")
        .and_then(|v| v.host_path.as_ref())
        .context("containerd-config hostPath")?;
    ensure!(
        host_dir.path == containerd_dir,
        "containerd dir {} (want {containerd_dir})",
        host_dir.path
    );
    let root = cargs.common.root.display().to_string();
    let in_init = init.volume_mounts.iter().flatten().any(|m| {
        m.name == "containerd-config" && m.mount_path == format!("{root}{containerd_dir}")
    });
    ensure!(
        in_init,
        "the host's {containerd_dir} is not at --root {root} in the init container"
    );
    for m in node
        .volume_mounts
        .iter()
        .flatten()
        .filter(|m| m.name == "data" || m.name == "run")
    {
        ensure!(
            m.mount_propagation.as_deref() == Some("Bidirectional"),
            "{} must propagate mounts to the host",
            m.name
        );
    }

    // Schedulers: each replica's --advertise is in the cluster list, which equals the nodes' list.
    let sched_toml = o.config("shoal-scheduler", "scheduler.toml")?;
    let sched_cfg = shoal_scheduler::FileConfig::parse(sched_toml)
        .map_err(|e| anyhow::anyhow!("scheduler.toml in the ConfigMap: {e}"))?;
    ensure!(
        sched_cfg.cluster == node_cfg.p2p.schedulers,
        "nodes and schedulers list different schedulers"
    );
    let sts = o
        .statefulsets
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("shoal-scheduler"))
        .context("no scheduler StatefulSet")?;
    let spec = sts.spec.as_ref().context("spec")?;
    let replicas = spec.replicas.unwrap_or(1);
    ensure!(
        usize::try_from(replicas)? == sched_cfg.cluster.len(),
        "{replicas} replicas, {} in cluster",
        sched_cfg.cluster.len()
    );
    let spod = spec.template.spec.as_ref().context("pod spec")?;
    mounts_resolve(spod)?;
    let sc = spod.containers.first().context("scheduler container")?;
    for i in 0..replicas {
        let pod_name = format!("shoal-scheduler-{i}");
        let env = BTreeMap::from([("POD_NAME", pod_name.as_str())]);
        let Sub::Scheduler(a) = parse_cli(sc, &env)?.command else {
            bail!("the scheduler container does not run `shoal scheduler`");
        };
        let adv = a.advertise.context("--advertise")?;
        ensure!(
            sched_cfg.cluster.contains(&adv),
            "{adv} is not in the cluster list"
        );
        let mut file = sched_cfg.clone();
        file.advertise = Some(adv);
        file.join_secret_file = None;
        file.validate()
            .map_err(|e| anyhow::anyhow!("scheduler {i}: {e}"))?;
    }
    ensure!(
        port(sc, "http")?.0 == i32::from(sched_cfg.listen.port()),
        "scheduler port"
    );
    let (p, path) = probe_port(sc, "readiness")?;
    ensure!(
        p == "http" && path == "/healthz",
        "scheduler probe {p} {path}"
    );
    let svc_name = spec.service_name.clone().unwrap_or_default();
    // The names in `cluster` resolve through the StatefulSet's headless Service.
    for (i, entry) in sched_cfg.cluster.iter().enumerate() {
        let want = format!(
            "shoal-scheduler-{i}.{svc_name}.shoal.svc:{}",
            sched_cfg.listen.port()
        );
        ensure!(*entry == want, "cluster[{i}] = {entry}, the pod is {want}");
    }

    // Services point at ports that exist on the pods they select.
    for svc in &o.services {
        let name = svc.metadata.name.clone().unwrap_or_default();
        let spec = svc.spec.as_ref().context("service spec")?;
        let sel = spec.selector.as_ref().context("selector")?;
        let target: &Container =
            if sel.get("app.kubernetes.io/name").map(String::as_str) == Some("shoal-node") {
                node
            } else {
                sc
            };
        for p in spec.ports.iter().flatten() {
            let Some(IntOrString::String(t)) = &p.target_port else {
                bail!("{name}: name target ports")
            };
            let (num, proto) = port(target, t)?;
            ensure!(
                num == p.port && proto == p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                "{name}: port {t}"
            );
        }
    }
    let dht_svc = node_cfg.p2p.peers.first().context("p2p.peers")?;
    ensure!(
        o.services.iter().any(|s| dht_svc.starts_with(&format!(
            "{}.shoal.svc:",
            s.metadata.name.clone().unwrap_or_default()
        ))),
        "{dht_svc} names no Service"
    );
    // The ServiceMonitor scrapes ports the Services have.
    let svc_ports: BTreeSet<String> = o
        .services
        .iter()
        .flat_map(|s| {
            s.spec
                .iter()
                .flat_map(|sp| sp.ports.iter().flatten().filter_map(|p| p.name.clone()))
        })
        .collect();
    for sm in &o.custom {
        for ep in sm["spec"]["endpoints"].as_sequence().context("endpoints")? {
            let p = ep["port"].as_str().context("port")?;
            ensure!(
                svc_ports.contains(p),
                "ServiceMonitor port {p} is on no Service"
            );
            ensure!(
                ep["path"].as_str() == Some("/metrics"),
                "ServiceMonitor path"
            );
        }
    }
    let np = o.policies.first().context("no NetworkPolicy")?;
    let allowed: Vec<i32> = np
        .spec
        .as_ref()
        .and_then(|s| s.ingress.as_ref())
        .into_iter()
        .flatten()
        .flat_map(|r| r.ports.iter().flatten())
        .filter_map(|p| match p.port {
            Some(IntOrString::Int(i)) => Some(i),
            _ => None,
        })
        .collect();
    ensure!(
        allowed == vec![i32::from(sched_cfg.listen.port())],
        "NetworkPolicy allows {allowed:?}"
    );
    Ok(())
}

#[test]
fn kubernetes_base_agrees_with_the_cli_and_config() {
    let base = deploy_dir().join("kubernetes/base");
    let kustomization: serde_yaml::Value = serde_yaml::from_str(
        &std::fs::read_to_string(base.join("kustomization.yaml")).expect("kustomization"),
    )
    .expect("YAML");
    let listed: BTreeSet<String> = kustomization["resources"]
        .as_sequence()
        .expect("resources")
        .iter()
        .filter_map(|r| r.as_str().map(str::to_owned))
        .collect();
    let mut all = Objects::default();
    for entry in std::fs::read_dir(&base).expect("base dir").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.ends_with(".yaml") || name == "kustomization.yaml" {
            continue;
        }
        assert!(
            listed.contains(&name),
            "{name} is not in kustomization.yaml"
        );
        let text = std::fs::read_to_string(entry.path()).expect("read");
        all.extend(Objects::parse(&text, &name).unwrap_or_else(|e| panic!("{e:#}")));
    }
    check_objects(&all, "/etc/containerd").unwrap_or_else(|e| panic!("base: {e:#}"));
}

/// The base's documents, as YAML values.
fn base_docs() -> Result<Vec<serde_yaml::Value>> {
    let base = deploy_dir().join("kubernetes/base");
    let mut docs = Vec::new();
    let mut names: Vec<PathBuf> = std::fs::read_dir(&base)?
        .flatten()
        .map(|e| e.path())
        .collect();
    names.sort();
    for p in names {
        if p.extension().is_some_and(|e| e == "yaml") && !p.ends_with("kustomization.yaml") {
            for doc in serde_yaml::Deserializer::from_str(&std::fs::read_to_string(&p)?) {
                docs.push(serde_yaml::Value::deserialize(doc)?);
            }
        }
    }
    Ok(docs)
}

/// Applies an overlay's JSON 6902 `replace` patches to the base (what kustomize does for the
/// overlays we ship), so the overlays are checked without kubectl too.
fn render_overlay(overlay: &Path) -> Result<String> {
    let k: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(
        overlay.join("kustomization.yaml"),
    )?)?;
    let resources: Vec<&str> = k["resources"]
        .as_sequence()
        .context("resources")?
        .iter()
        .filter_map(|r| r.as_str())
        .collect();
    ensure!(
        resources == ["../../base"],
        "{}: resources {resources:?}",
        overlay.display()
    );
    let mut docs = base_docs()?;
    for patch in k["patches"].as_sequence().context("patches")? {
        let (kind, name) = (
            patch["target"]["kind"].as_str(),
            patch["target"]["name"].as_str(),
        );
        let doc = docs
            .iter_mut()
            .find(|d| d["kind"].as_str() == kind && d["metadata"]["name"].as_str() == name)
            .with_context(|| format!("patch target {kind:?} {name:?} is not in the base"))?;
        let ops: Vec<serde_yaml::Value> =
            serde_yaml::from_str(patch["patch"].as_str().context("patch")?)?;
        for op in ops {
            ensure!(
                op["op"].as_str() == Some("replace"),
                "only replace ops are rendered here: {op:?}"
            );
            let path = op["path"].as_str().context("path")?;
            let mut at = &mut *doc;
            for part in path.trim_start_matches('/').split('/') {
                at = match part.parse::<usize>() {
                    Ok(i) => at.get_mut(i),
                    Err(_) => at.get_mut(part),
                }
                .with_context(|| format!("{path}: no {part} (replace needs an existing value)"))?;
            }
            *at = op["value"].clone();
        }
    }
    let mut out = String::new();
    for d in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&d)?);
    }
    Ok(out)
}

const OVERLAYS: [(&str, &str); 2] = [
    ("overlays/k3s", "/var/lib/rancher/k3s/agent/etc/containerd"),
    (
        "overlays/rke2",
        "/var/lib/rancher/rke2/agent/etc/containerd",
    ),
];

#[test]
fn kubernetes_overlays_agree() {
    for (overlay, dir) in OVERLAYS {
        let text = render_overlay(&deploy_dir().join("kubernetes").join(overlay))
            .unwrap_or_else(|e| panic!("{overlay}: {e:#}"));
        let o = Objects::parse(&text, overlay).unwrap_or_else(|e| panic!("{e:#}"));
        check_objects(&o, dir).unwrap_or_else(|e| panic!("{overlay}: {e:#}"));
    }
}

/// With kubectl on the machine, kustomize itself renders the base and the overlays.
#[test]
fn kubernetes_kustomize_renders_and_agrees() {
    if shoal_e2e::paths::which("kubectl").is_none() {
        eprintln!(
            "kubectl not installed: the overlays were rendered by kubernetes_overlays_agree only"
        );
        return;
    }
    for (overlay, dir) in [("base", "/etc/containerd")].into_iter().chain(OVERLAYS) {
        let path = deploy_dir().join("kubernetes").join(overlay);
        let out = Command::new("kubectl")
            .arg("kustomize")
            .arg(&path)
            .output()
            .expect("kubectl");
        assert!(
            out.status.success(),
            "kubectl kustomize {overlay}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let o = Objects::parse(&String::from_utf8_lossy(&out.stdout), overlay)
            .unwrap_or_else(|e| panic!("{e:#}"));
        check_objects(&o, dir).unwrap_or_else(|e| panic!("rendered {overlay}: {e:#}"));
    }
}

#[test]
fn systemd_units_verify_and_parse() {
    let dir = deploy_dir().join("systemd");
    for unit in ["shoal-node.service", "shoal-scheduler.service"] {
        let text = std::fs::read_to_string(dir.join(unit)).expect("unit");
        let exec = text
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart="))
            .expect("ExecStart");
        let argv: Vec<&str> = exec.split_whitespace().collect();
        assert_eq!(argv[0], "/usr/local/bin/shoal", "{unit}");
        let mut cli = vec!["shoal"];
        cli.extend(&argv[1..]);
        Cli::try_parse_from(&cli).unwrap_or_else(|e| panic!("{unit}: {e}"));
    }
    run(
        "systemd_units_verify",
        &[Need::Bin("systemd-analyze")],
        |t: &TestCtx| {
            // A root with the system's units (sysinit.target, …), the binary ExecStart names and ours.
            let root = t.subdir("root")?;
            std::fs::create_dir_all(root.join("lib/systemd"))?;
            let cp = Command::new("cp")
                .arg("-a")
                .arg("/lib/systemd/system")
                .arg(root.join("lib/systemd/"))
                .status()?;
            ensure!(cp.success(), "copying /lib/systemd/system");
            let bin = root.join("usr/local/bin/shoal");
            std::fs::create_dir_all(bin.parent().context("parent")?)?;
            std::fs::write(&bin, "#!/bin/sh\n")?;
            std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
            let units = root.join("etc/systemd/system");
            std::fs::create_dir_all(&units)?;
            for unit in ["shoal-node.service", "shoal-scheduler.service"] {
                std::fs::copy(dir.join(unit), units.join(unit))?;
            }
            let out = Command::new("systemd-analyze")
                .arg(format!("--root={}", root.display()))
                .args(["verify", "shoal-node.service", "shoal-scheduler.service"])
                .output()?;
            let said = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            ensure!(
                out.status.success() && said.trim().is_empty(),
                "systemd-analyze verify: {said}"
            );
            Ok(())
        },
    );
}

/// Metric names in a PromQL expression: identifiers of our metric families.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts = (bytes[i].is_ascii_alphabetic() || bytes[i] == b'_')
            && (i == 0
                || !(bytes[i - 1].is_ascii_alphanumeric()
                    || bytes[i - 1] == b'_'
                    || bytes[i - 1] == b'$'
                    || bytes[i - 1] == b'"'));
        if starts {
            let j = (i..bytes.len())
                .find(|&j| !(bytes[j].is_ascii_alphanumeric() || bytes[j] == b'_'))
                .unwrap_or(bytes.len());
            let word = &expr[i..j];
            if word.starts_with("shoal_") || word.starts_with("process_") {
                out.insert(word.to_owned());
            }
            i = j;
        } else {
            i += 1;
        }
    }
    out
}

/// `# TYPE family type` lines of an exposition.
fn families(exposition: &str) -> BTreeMap<String, String> {
    exposition
        .lines()
        .filter_map(|l| {
            let mut f = l.strip_prefix("# TYPE ")?.split_whitespace();
            Some((f.next()?.to_owned(), f.next()?.to_owned()))
        })
        .collect()
}

/// Checks that `name` (a series name) is exported by a family of the right type.
fn exported(name: &str, fams: &BTreeMap<String, String>) -> Result<()> {
    for (suffix, ty) in [
        ("_total", "counter"),
        ("_bucket", "histogram"),
        ("_sum", "histogram"),
        ("_count", "histogram"),
    ] {
        if let Some(base) = name.strip_suffix(suffix) {
            if fams.get(base).map(String::as_str) == Some(ty) {
                return Ok(());
            }
        }
    }
    match fams.get(name).map(String::as_str) {
        Some("gauge") => Ok(()),
        Some(other) => bail!("{name} is a {other}: query it with its suffix"),
        None => bail!("{name} is not exported"),
    }
}

fn dashboard_exprs(file: &str) -> Result<Vec<String>> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        deploy_dir().join("grafana").join(file),
    )?)?;
    let mut out = Vec::new();
    for p in v["panels"].as_array().context("panels")? {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().context("expr")?.to_owned());
        }
    }
    for var in v["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = var["query"]["query"].as_str() {
            out.push(q.to_owned());
        }
    }
    ensure!(out.len() > 5, "{file}: few queries");
    Ok(out)
}

#[test]
fn dashboards_query_only_exported_metrics() {
    run(
        "dashboards_query_only_exported_metrics",
        &[
            Need::Bin("docker-registry"),
            Need::Bin("skopeo"),
            Need::Shoal,
        ],
        |t: &TestCtx| {
            // A real node with traffic (a pull through it) and a real scheduler.
            let (origin, _) = setup::anonymous_origin(t)?;
            let node = Node::start(t, &origin.url())?;
            let (pulled, _) = skopeo::copy_to_oci(t, &node.listen_addr(), setup::IMAGE, None)?;
            ensure!(pulled.success, "pull through the node: {pulled:?}");
            let sched_addr: std::net::SocketAddr =
                format!("127.0.0.1:{}", shoal_e2e::wait::free_port()?).parse()?;
            let scheduler = Scheduler::start(t, None, sched_addr)?;
            let node_metrics =
                reqwest::blocking::get(format!("http://{}/metrics", node.admin_addr()))?.text()?;
            let sched_metrics =
                reqwest::blocking::get(format!("http://{}/metrics", scheduler.addr()))?.text()?;
            for (file, exposition) in [
                ("shoal-node.json", &node_metrics),
                ("shoal-scheduler.json", &sched_metrics),
            ] {
                let fams = families(exposition);
                let mut names = BTreeSet::new();
                for e in dashboard_exprs(file)? {
                    names.extend(metric_names(&e));
                }
                ensure!(names.len() > 8, "{file}: found only {names:?}");
                let missing: Vec<String> = names
                    .iter()
                    .filter_map(|n| exported(n, &fams).err().map(|e| e.to_string()))
                    .collect();
                ensure!(
                    missing.is_empty(),
                    "{file}: {missing:?}\nexported: {fams:?}"
                );
            }
            // And the other observability promises hold on the live processes.
            for want in [
                "process_resident_memory_bytes",
                "shoal_build_info",
                "shoal_store_fs_size_bytes",
            ] {
                ensure!(
                    node_metrics.lines().any(|l| l.starts_with(want)),
                    "node: no {want} sample"
                );
            }
            let ready = reqwest::blocking::get(format!("http://{}/readyz", node.admin_addr()))?;
            ensure!(
                ready.status().as_u16() == 200,
                "node /readyz: {}",
                ready.status()
            );
            let health = reqwest::blocking::get(format!("http://{}/healthz", scheduler.addr()))?;
            ensure!(
                health.status().as_u16() == 200,
                "scheduler /healthz: {}",
                health.status()
            );
            ensure!(
                !node.log_tail(200).contains('\u{1b}'),
                "ANSI escapes in a node log written to a file"
            );
            Ok(())
        },
    );
}

#[test]
fn metric_names_are_found_in_expressions() {
    let got = metric_names(
        r#"sum by (le) (rate(shoal_request_duration_seconds_bucket{instance=~"$instance"}[5m])) / process_open_fds"#,
    );
    assert_eq!(
        got,
        BTreeSet::from([
            "shoal_request_duration_seconds_bucket".to_owned(),
            "process_open_fds".to_owned()
        ])
    );
    let fams = families("# TYPE shoal_x counter\n# TYPE shoal_h histogram\n# TYPE shoal_g gauge\n");
    assert!(exported("shoal_x_total", &fams).is_ok());
    assert!(exported("shoal_x", &fams).is_err());
    assert!(exported("shoal_h_bucket", &fams).is_ok());
    assert!(exported("shoal_g", &fams).is_ok());
    assert!(exported("shoal_nope", &fams).is_err());
}
