//! Several test hosts on one machine: a Linux bridge, one network namespace
//! per host joined to it by a veth pair, optional `tc tbf` shaping, and
//! programs started "on" a host with `ip netns exec`.
//!
//! Everything is named from a per-run tag (process id + counter), so
//! parallel tests and leftovers of a crashed run never collide, and each run
//! gets its own /24 in 10.231.0.0/16 (10.231.<run>.0/24, the bridge .1,
//! hosts from .2). Addresses belong to hosts the test creates: traffic never
//! leaves the machine. `Drop` tears it all down in reverse (processes in
//! each namespace, namespaces, bridge), also when the test fails.
//!
//! Needs root and iproute2 (`ip`, `tc`); see `shared/reference/netns-howto.md`.

use std::net::Ipv4Addr;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

static RUNS: AtomicU32 = AtomicU32::new(0);

/// One emulated host.
#[derive(Debug, Clone)]
pub struct Host {
    /// Namespace name (`ip netns exec <ns> ...`).
    pub ns: String,
    /// Bridge-side veth device (shape here to cap what the host receives).
    pub veth: String,
    pub ip: Ipv4Addr,
}

/// A bridge with hosts attached.
#[derive(Debug)]
pub struct Net {
    tag: String,
    bridge: String,
    subnet: u8,
    hosts: Vec<Host>,
}

impl Net {
    /// A new empty network.
    pub fn new() -> Result<Self> {
        let run = RUNS.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        // Interface names are limited to 15 bytes.
        let tag = format!("{:x}{:x}", pid % 0xffff, run % 0xff);
        let subnet = ((pid as u64 * 7 + run as u64 * 13) % 250 + 2) as u8;
        let bridge = format!("shb{tag}");
        ip(&["link", "add", &bridge, "type", "bridge"])?;
        let net = Self {
            tag,
            bridge,
            subnet,
            hosts: Vec::new(),
        };
        ip(&["link", "set", &net.bridge, "address", &net.mac(1)])?;
        ip(&["link", "set", &net.bridge, "up"])?;
        ip(&[
            "addr",
            "add",
            &format!("10.231.{}.1/24", net.subnet),
            "dev",
            &net.bridge,
        ])?;
        Ok(net)
    }

    /// The bridge's own address (reachable from every host; the machine's
    /// root namespace).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 231, self.subnet, 1)
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    /// Add a host with the next free address.
    pub fn add_host(&mut self) -> Result<Host> {
        let i = self.hosts.len();
        if i >= 250 {
            bail!("at most 250 hosts per network");
        }
        let ns = format!("sh{}h{i}", self.tag);
        let veth = format!("shv{}{i:x}", self.tag);
        let ip4 = Ipv4Addr::new(10, 231, self.subnet, (i + 2) as u8);
        ip(&["netns", "add", &ns])?;
        let host = Host { ns, veth, ip: ip4 };
        // Record it first so Drop cleans up a half-made host too.
        self.hosts.push(host.clone());
        ip(&[
            "link", "add", &host.veth, "type", "veth", "peer", "name", "eth0", "netns", &host.ns,
        ])?;
        ip(&["link", "set", &host.veth, "master", &self.bridge, "up"])?;
        let mac = self.mac(i + 2);
        ip(&[
            "netns", "exec", &host.ns, "ip", "link", "set", "eth0", "address", &mac,
        ])?;
        ip(&[
            "netns",
            "exec",
            &host.ns,
            "ip",
            "addr",
            "add",
            &format!("{ip4}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["netns", "exec", &host.ns, "ip", "link", "set", "eth0", "up"])?;
        ip(&["netns", "exec", &host.ns, "ip", "link", "set", "lo", "up"])?;
        Ok(host)
    }

    /// Makes every neighbour (ARP) entry between the hosts, and between the machine and each
    /// host, permanent. The kernel's ARP table is shared by all namespaces and capped
    /// (`net.ipv4.neigh.default.gc_thresh3`, 1024 by default); a full mesh of N hosts needs about
    /// N² dynamic entries, so from about 30 hosts on lookups fail ("neighbor table overflow") and
    /// connections time out. Permanent entries do not count against the cap. Call it after the
    /// last `add_host`.
    pub fn pin_neighbors(&self) -> Result<()> {
        let entry = |ip: Ipv4Addr, mac: &str, dev: &str| {
            format!("neigh replace {ip} lladdr {mac} dev {dev} nud permanent\n")
        };
        let mut root = String::new();
        for (i, h) in self.hosts.iter().enumerate() {
            root.push_str(&entry(h.ip, &self.mac(i + 2), &self.bridge));
            let mut batch = entry(self.gateway(), &self.mac(1), "eth0");
            for (j, other) in self.hosts.iter().enumerate() {
                if j != i {
                    batch.push_str(&entry(other.ip, &self.mac(j + 2), "eth0"));
                }
            }
            ip_batch(Some(&h.ns), &batch)?;
        }
        ip_batch(None, &root)
    }

    /// Cap what `host` can send at `mbit` Mbit/s (tbf on its eth0).
    pub fn shape_egress(&self, host: &Host, mbit: u32) -> Result<()> {
        run_ok(
            Command::new("ip")
                .args([
                    "netns", "exec", &host.ns, "tc", "qdisc", "replace", "dev", "eth0", "root",
                ])
                .args(tbf(mbit)),
        )
    }

    /// Cap what `host` can receive at `mbit` Mbit/s (tbf on its bridge-side veth).
    pub fn shape_ingress(&self, host: &Host, mbit: u32) -> Result<()> {
        run_ok(
            Command::new("tc")
                .args(["qdisc", "replace", "dev", &host.veth, "root"])
                .args(tbf(mbit)),
        )
    }

    /// A command that runs `program` inside `host`'s namespace.
    pub fn command(&self, host: &Host, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &host.ns, program]);
        c
    }
}

impl Net {
    /// The MAC of the address ending in `octet` (1: the bridge, 2…: the hosts), locally
    /// administered and unique to this run's subnet.
    fn mac(&self, octet: usize) -> String {
        format!("02:e7:{:02x}:00:00:{:02x}", self.subnet, octet)
    }
}

/// Runs `ip [-n NS] -batch -` with `commands` on stdin.
fn ip_batch(netns: Option<&str>, commands: &str) -> Result<()> {
    use std::io::Write as _;
    let mut cmd = Command::new("ip");
    if let Some(ns) = netns {
        cmd.args(["-n", ns]);
    }
    let mut child = cmd
        .args(["-batch", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running ip -batch")?;
    child
        .stdin
        .take()
        .context("ip -batch without stdin")?
        .write_all(commands.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "ip -batch in {netns:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn tbf(mbit: u32) -> Vec<String> {
    // Burst of at least one jiffy's worth of bytes at this rate, as tbf needs.
    let burst_kb = (mbit as u64 * 1000 / 8 / 100).max(32);
    vec![
        "tbf".into(),
        "rate".into(),
        format!("{mbit}mbit"),
        "burst".into(),
        format!("{burst_kb}kb"),
        "latency".into(),
        "50ms".into(),
    ]
}

impl Drop for Net {
    fn drop(&mut self) {
        for h in self.hosts.iter().rev() {
            // Kill whatever still runs inside, then remove the namespace (its
            // eth0 goes with it, and the veth peer with that).
            if let Ok(out) = Command::new("ip").args(["netns", "pids", &h.ns]).output() {
                for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("kill").args(["-9", pid]).output();
                }
            }
            let _ = Command::new("ip").args(["netns", "del", &h.ns]).output();
            let _ = Command::new("ip").args(["link", "del", &h.veth]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

/// Whether this machine can make test hosts (root, `ip`, `tc`).
pub fn unavailable() -> Option<String> {
    if !crate::ctx::is_root() {
        return Some("network namespaces need root".into());
    }
    for bin in ["ip", "tc"] {
        let found = Command::new(bin).arg("-V").output().is_ok();
        if !found {
            return Some(format!("`{bin}` (iproute2) is not installed"));
        }
    }
    None
}

fn ip(args: &[&str]) -> Result<()> {
    run_ok(Command::new("ip").args(args))
}

fn run_ok(cmd: &mut Command) -> Result<()> {
    let out: Output = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
