//! The status page (`GET /`): the same data as `/api/v1/status` as plain,
//! self-contained HTML tables (no scripts), refreshed by the browser every
//! few seconds.
//!
//! Invariant: every string that came from a node (zone, version) is escaped.

use std::fmt::Write as _;

use shoal_proto::sched::StatusResponse;

/// Render the page.
pub fn render(s: &StatusResponse) -> String {
    let mut out = String::with_capacity(4096);
    let t = &s.totals;
    let peer_share = share(t.from_peers, t.from_origin.saturating_add(t.from_peers));
    let _ = write!(
        out,
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"5\">\
         <title>shoal scheduler</title><style>{STYLE}</style></head><body>\
         <h1>shoal scheduler</h1><p>version {} · protocol {} · up {} · heartbeat {} · node ttl {} · \
         max origin leases {}{}</p>",
        esc(&s.scheduler.version),
        s.scheduler.protocol,
        ms(s.scheduler.uptime_ms),
        ms(s.scheduler.heartbeat_interval_ms),
        ms(s.scheduler.node_ttl_ms),
        s.scheduler.max_origin_leases,
        match &s.scheduler.advertise {
            Some(me) => format!(
                " · shard {} of [{}]",
                esc(me),
                esc(&s.scheduler.cluster.join(", "))
            ),
            None => String::new(),
        },
    );
    let _ = write!(
        out,
        "<h2>Traffic</h2><table><tr><th>from origin</th><th>from peers</th><th>to peers</th>\
         <th>served locally</th><th>peer share of downloads</th></tr>\
         <tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{peer_share}</td></tr></table>",
        bytes(t.from_origin),
        bytes(t.from_peers),
        bytes(t.to_peers),
        bytes(t.served_local),
    );
    nodes_table(&mut out, s);
    jobs_table(&mut out, s);
    blobs_table(&mut out, s);
    out.push_str("<p><a href=\"/api/v1/status\">JSON</a> · <a href=\"/metrics\">metrics</a></p></body></html>");
    out
}

const STYLE: &str =
    "body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse;margin-bottom:1em}\
    th,td{border:1px solid #ccc;padding:.2em .6em;text-align:right}th{background:#eee}\
    td.l{text-align:left;font-family:monospace}";

fn nodes_table(out: &mut String, s: &StatusResponse) {
    let _ = write!(
        out,
        "<h2>Nodes ({})</h2><table><tr><th>id</th><th>p2p address</th><th>zone</th><th>version</th>\
         <th>last seen</th><th>blobs</th><th>complete</th><th>leases</th><th>free slots</th>\
         <th>from origin</th><th>from peers</th><th>to peers</th><th>blame</th></tr>",
        s.nodes.len()
    );
    for n in &s.nodes {
        let _ = write!(
            out,
            "<tr><td class=\"l\" title=\"{id}\">{}</td><td class=\"l\">{}</td><td>{}</td><td>{}</td>\
             <td>{} ago</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}</td><td>{:.2}</td></tr>",
            n.id.short(),
            n.p2p_addr,
            esc(n.zone.as_deref().unwrap_or("")),
            esc(&n.version),
            ms(n.last_seen_ms_ago),
            n.blobs_held,
            n.blobs_complete,
            n.leases,
            n.upload_slots_free,
            bytes(n.traffic.from_origin),
            bytes(n.traffic.from_peers),
            bytes(n.traffic.to_peers),
            n.blame,
            id = n.id,
        );
    }
    out.push_str("</table>");
}

fn jobs_table(out: &mut String, s: &StatusResponse) {
    if s.jobs.is_empty() {
        return;
    }
    let _ = write!(
        out,
        "<h2>Prewarm jobs ({})</h2><table><tr><th>job</th><th>image</th><th>nodes</th><th>state</th>\
         <th>progress</th><th>age</th><th>took</th><th>per node</th></tr>",
        s.jobs.len()
    );
    for j in &s.jobs {
        let per_node = j
            .nodes
            .iter()
            .map(|n| {
                let msg = n
                    .message
                    .as_deref()
                    .map(|m| format!(": {}", esc(m)))
                    .unwrap_or_default();
                format!(
                    "{} {} {}/{}{msg}",
                    n.node.short(),
                    n.state.as_str(),
                    bytes(n.bytes_done),
                    bytes(n.bytes_total)
                )
            })
            .collect::<Vec<_>>()
            .join("<br>");
        let _ = write!(
            out,
            "<tr><td class=\"l\">{}</td><td class=\"l\">{}{}</td><td>{}</td><td>{}</td>\
             <td>{} / {}</td><td>{}</td><td>{}</td><td class=\"l\">{per_node}</td></tr>",
            j.id,
            esc(&j.image),
            if j.full { " (full)" } else { "" },
            esc(&j.nodes_selector.to_string()),
            j.state.as_str(),
            bytes(j.bytes_done),
            bytes(j.bytes_total),
            ms(j.created_ms_ago),
            ms(j.elapsed_ms),
        );
    }
    out.push_str("</table>");
}

fn blobs_table(out: &mut String, s: &StatusResponse) {
    let _ = write!(
        out,
        "<h2>Blobs ({})</h2><table><tr><th>blob</th><th>size</th><th>pieces</th><th>holders</th>\
         <th>complete</th><th>piece hashes</th><th>origin lease</th></tr>",
        s.blobs.len()
    );
    for b in &s.blobs {
        let lease = b
            .leases
            .iter()
            .map(|l| {
                format!(
                    "{} (progress {} ago, expires in {})",
                    l.holder.short(),
                    ms(l.last_progress_ms_ago),
                    ms(l.expires_ms)
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        let _ =
            write!(
            out,
            "<tr><td class=\"l\" title=\"{}\">{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td>{}/{}</td><td class=\"l\">{}</td></tr>",
            b.blob,
            short_blob(&b.blob.to_string()),
            b.size.map_or("?".into(), bytes),
            b.pieces,
            b.holders,
            b.complete_holders,
            b.piece_sha256_known,
            b.pieces,
            if lease.is_empty() { "—".into() } else { lease },
        );
    }
    out.push_str("</table>");
}

/// HTML-escape text.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

fn short_blob(s: &str) -> String {
    match s.split_once(':') {
        Some((alg, hex)) => format!("{alg}:{}", hex.get(..12).unwrap_or(hex)),
        None => s.to_string(),
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < UNITS.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[i])
    }
}

fn ms(v: u64) -> String {
    if v < 1_000 {
        format!("{v}ms")
    } else if v < 120_000 {
        format!("{:.1}s", v as f64 / 1_000.0)
    } else {
        format!("{}m", v / 60_000)
    }
}

fn share(part: u64, total: u64) -> String {
    if total == 0 {
        "—".into()
    } else {
        format!("{:.1}%", part as f64 * 100.0 / total as f64)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use shoal_proto::sched::{
        JobId, JobNodeStatus, JobState, JobStatus, NodeJobState, NodeSelector, NodeStatus,
        SchedulerInfo, Traffic,
    };
    use shoal_proto::NodeId;

    #[test]
    fn escapes_node_strings_and_formats_numbers() {
        let s = StatusResponse {
            scheduler: SchedulerInfo {
                version: "0.1.0".into(),
                protocol: 1,
                uptime_ms: 65_000,
                advertise: None,
                cluster: Vec::new(),
                heartbeat_interval_ms: 2_000,
                node_ttl_ms: 6_000,
                max_origin_leases: 1,
            },
            nodes: vec![NodeStatus {
                id: NodeId::from_bytes([1; 32]),
                p2p_addr: "10.0.0.1:5062".parse().unwrap(),
                zone: Some("<script>alert(1)</script>".into()),
                version: "x\"y".into(),
                upload_slots_free: 2,
                last_seen_ms_ago: 500,
                registered_ms_ago: 1_000,
                blobs_held: 1,
                blobs_complete: 1,
                leases: 0,
                traffic: Traffic::default(),
                blame: 0.0,
            }],
            blobs: Vec::new(),
            totals: Traffic {
                from_origin: 3 << 20,
                from_peers: 1 << 20,
                ..Traffic::default()
            },
            jobs: vec![JobStatus {
                id: JobId(7),
                image: "reg/<img>:1".into(),
                nodes_selector: NodeSelector::All,
                full: false,
                state: JobState::Running,
                created_ms_ago: 1_000,
                elapsed_ms: 1_000,
                bytes_done: 1 << 20,
                bytes_total: 2 << 20,
                nodes: vec![JobNodeStatus {
                    node: NodeId::from_bytes([1; 32]),
                    zone: None,
                    state: NodeJobState::Failed,
                    bytes_done: 0,
                    bytes_total: 0,
                    blobs_done: 0,
                    blobs_total: 0,
                    message: Some("manifest <unknown>".into()),
                    finished_after_ms: Some(900),
                }],
            }],
        };
        let html = render(&s);
        assert!(!html.contains("<script>"));
        assert!(html.contains("&lt;script&gt;"));
        assert!(html.contains("x&quot;y"));
        assert!(html.contains("3.0 MiB"));
        assert!(html.contains("25.0%"));
        assert!(html.contains("65.0s"));
        assert!(html.contains("0000000000000007") && html.contains("reg/&lt;img&gt;:1"));
        assert!(html.contains("failed") && html.contains("manifest &lt;unknown&gt;"));
    }
}
