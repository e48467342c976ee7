//! `shoal status`: ask a node's admin API what it holds and has done.

use std::net::SocketAddr;

use clap::Args;

use crate::admin::Status;
use crate::units::ByteSize;

/// Show what a running node holds and has done.
#[derive(Args, Debug)]
pub struct StatusArgs {
    /// The node's admin address.
    #[arg(long, default_value = "127.0.0.1:5051", env = "SHOAL_ADMIN")]
    pub node: SocketAddr,
    /// Print JSON (the admin API's /api/v1/status) instead of a summary.
    #[arg(long)]
    pub json: bool,
    /// Ask over the node's control socket instead (root, the node's user or the control
    /// group): the same status plus the repositories each blob came from, which the admin
    /// listener does not show.
    #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = "")]
    pub control: Option<std::path::PathBuf>,
}

pub fn run(args: StatusArgs) -> anyhow::Result<std::process::ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let body = match &args.control {
        Some(path) => {
            let path = if path.as_os_str().is_empty() {
                crate::control::default_path()
            } else {
                path.clone()
            };
            let (code, bytes) = rt
                .block_on(crate::control::request(
                    &path,
                    axum::http::Method::GET,
                    "/api/v1/status",
                    None,
                ))
                .map_err(|e| super::exit::unreachable(e.to_string()))?;
            if !code.is_success() {
                anyhow::bail!(
                    "control socket {}: {code} {}",
                    path.display(),
                    String::from_utf8_lossy(&bytes)
                );
            }
            String::from_utf8_lossy(&bytes).into_owned()
        }
        None => {
            let url = format!("http://{}/api/v1/status", args.node);
            let body = rt.block_on(async {
                let resp = reqwest::get(&url).await?.error_for_status()?;
                resp.text().await
            });
            body.map_err(|e| {
                super::exit::unreachable(format!(
                    "cannot reach the node's admin API at {}: {e}",
                    args.node
                ))
            })?
        }
    };
    if args.json {
        println!("{body}");
        return Ok(std::process::ExitCode::SUCCESS);
    }
    let s: Status = serde_json::from_str(&body)?;
    print!("{}", render(&s));
    Ok(std::process::ExitCode::SUCCESS)
}

fn render(s: &Status) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "shoal node {} (mirror {}, admin {})",
        s.node.version, s.node.listen, s.node.admin
    );
    let _ = writeln!(o, "data dir:  {}", s.node.data_dir);
    let _ = writeln!(
        o,
        "upstreams: {}",
        if s.node.upstreams.is_empty() {
            "(none)".into()
        } else {
            s.node.upstreams.join(", ")
        }
    );
    let quota = if s.store.quota_bytes == 0 {
        "unlimited".into()
    } else {
        ByteSize(s.store.quota_bytes).to_string()
    };
    let _ = writeln!(
        o,
        "store:     {} in {} blobs ({} complete), quota {}",
        ByteSize(s.store.bytes),
        s.store.blobs,
        s.store.complete,
        quota
    );
    let t = &s.traffic;
    let _ = writeln!(
        o,
        "traffic:   {} served to clients, {} from origin, {} from peers; blob cache hits {}, misses {}; downloads running {}",
        ByteSize(t.served_bytes),
        ByteSize(t.origin_bytes),
        ByteSize(t.peer_bytes),
        t.cache_hits,
        t.cache_misses,
        s.downloads_in_flight
    );
    match &s.p2p {
        None => {
            let _ = writeln!(o, "peers:     standalone (no join secret)");
        }
        Some(p) => {
            let scheds: Vec<String> = p
                .schedulers
                .iter()
                .map(|x| {
                    format!(
                        "{} ({})",
                        x.addr,
                        if x.reachable { "up" } else { "unreachable" }
                    )
                })
                .collect();
            let _ = writeln!(
                o,
                "peers:     node {} at {}{}; {} sent to peers; {} upload slots free; {} origin leases",
                p.node_id,
                p.p2p_addr,
                p.zone.as_ref().map(|z| format!(", zone {z}")).unwrap_or_default(),
                ByteSize(p.uploaded_bytes),
                p.upload_slots_free,
                p.leases
            );
            let _ = writeln!(
                o,
                "           schedulers: {}; DHT {} ({} peers)",
                if scheds.is_empty() {
                    "none".into()
                } else {
                    scheds.join(", ")
                },
                p.dht_addr.as_deref().unwrap_or("off"),
                p.dht_peers.map_or("?".into(), |n| n.to_string())
            );
        }
    }
    if let Some(sn) = &s.snapshotter {
        let _ = writeln!(
            o,
            "snapshots: {} active, {} views, {} committed ({} Nydus layers provided without a download); {} images mounted under containers",
            sn.active,
            sn.views,
            sn.committed,
            sn.provided_layers,
            sn.images.len()
        );
        for i in &sn.images {
            let _ = writeln!(
                o,
                "           {} at {} ({}, {} containers)",
                i.image,
                i.dir.display(),
                i.state,
                i.containers
            );
        }
    }
    if !s.blobs.is_empty() {
        let _ = writeln!(
            o,
            "\n{:<73} {:>10} {:>8}  repositories",
            "BLOB", "SIZE", "HELD"
        );
        for b in &s.blobs {
            let held = if b.complete {
                "100%".to_string()
            } else {
                let pct = (b.present_bytes * 100).checked_div(b.size).unwrap_or(0);
                format!("{pct}%")
            };
            let _ = writeln!(
                o,
                "{:<73} {:>10} {:>8}  {}",
                b.digest,
                ByteSize(b.size).to_string(),
                held,
                b.repos.join(", ")
            );
        }
    }
    o
}
