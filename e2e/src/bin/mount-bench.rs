//! Lazy-mount benchmark (not a test): the origin registry runs in its own network namespace with
//! its egress shaped (tbf, 200 Mbit/s by default) and the node in another, so every byte the node
//! or the baseline pulls crosses the shaped link.
//!
//! 1. Cold start, same run, same link: time from `shoal mount IMAGE DIR` (FUSE, then EROFS; a fresh
//!    node each time) to the end of `chroot DIR python3 -c 'import json'`, versus a full pull and
//!    unpack of the OCI image of the same content (`skopeo copy` + `umoci unpack`) followed by the
//!    same command in the unpacked tree.
//! 2. Warm reads of the image's files of 256 KiB or more — sequential (1 MiB reads) and random
//!    (4 KiB reads) — and of every file of the image (open, read to the end), through the FUSE mount, the EROFS mount and the unpacked tree on the local
//!    disk. "Warm": the node's store holds every chunk; each pass starts with the files' page
//!    cache dropped (`posix_fadvise(DONTNEED)`; for EROFS that drops the EROFS files' pages, the
//!    decoded blob files below them stay cached, as a nydusd blob cache would).
//!
//! `cargo run -p shoal-e2e --bin mount-bench -- [--mbit 200] [--rounds 2]`
//! Needs root, iproute2, nsenter, /dev/fuse, docker-registry, skopeo, umoci, python3, Linux 6.12+
//! for EROFS, and the `shoal` binary (`cargo build -p shoal-node`, or SHOAL_BIN).

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::unix::fs::FileExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use shoal_e2e::netns::{self, Host, Net};
use shoal_e2e::registry::Registry;
use shoal_e2e::wait::poll;
use shoal_e2e::{http, nydus, paths, skopeo, TestCtx};

const NYDUS_REPO: &str = "bench/nydus-python";
const OCI_IMAGE: &str = "bench/python:1";
const ORIGIN_PORT: u16 = 5000;
const ADMIN_PORT: u16 = 5051;
const MIN_FILE: u64 = 256 << 10;

fn main() -> Result<()> {
    let mut mbit = 200u32;
    let mut rounds = 2usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mbit" => mbit = args.next().context("--mbit N")?.parse()?,
            "--rounds" => rounds = args.next().context("--rounds N")?.parse()?,
            other => bail!("unknown argument {other:?} (use --mbit N, --rounds N)"),
        }
    }
    if let Some(why) = netns::unavailable() {
        bail!("cannot run: {why}");
    }
    for bin in [
        "nsenter",
        "docker-registry",
        "skopeo",
        "umoci",
        "python3",
        "chroot",
    ] {
        ensure!(
            paths::which(bin).is_some(),
            "cannot run: `{bin}` is not installed"
        );
    }
    let ctx = TestCtx::standalone("mount-bench")?;
    let bench = Bench::setup(&ctx, mbit)?;
    bench.run(rounds)
}

struct Bench<'a> {
    ctx: &'a TestCtx,
    /// Torn down (namespaces, bridge, the processes in them) when the bench ends.
    _net: Net,
    /// Its storage is the shaped origin's.
    _registry: Registry,
    origin: Host,
    node_host: Host,
    mbit: u32,
    nydus_bytes: u64,
    _origin: Child,
}

/// A node running in the node namespace; stopped (SIGTERM, which unmounts) on drop.
struct NodeProc {
    child: Child,
    admin: String,
    /// Its control socket (mounts).
    control: PathBuf,
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Default, Clone, Copy)]
struct Cold {
    total: Duration,
    pull: Duration,
    unpack: Duration,
    run: Duration,
    bytes: u64,
}

impl<'a> Bench<'a> {
    fn setup(ctx: &'a TestCtx, mbit: u32) -> Result<Self> {
        let registry = Registry::start(ctx)?;
        let work = ctx.subdir("nydus-build")?;
        let layout = paths::debian_python_layout();
        let image = nydus::build_and_push(&registry, &layout, "python", NYDUS_REPO, "1", &work)?;
        std::fs::remove_dir_all(&work)?;
        skopeo::push_fixture(ctx, &registry, OCI_IMAGE)?;
        let mut net = Net::new()?;
        let origin = net.add_host()?;
        let node_host = net.add_host()?;
        net.shape_egress(&origin, mbit)?;
        // A second registry process over the same storage, inside the origin namespace.
        let config = ctx.dir().join("origin.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 0.0.0.0:{ORIGIN_PORT}\n  secret: shoal-bench\n",
                registry.storage_dir().display()
            ),
        )?;
        let log = File::create(ctx.dir().join("origin.log"))?;
        let child = net
            .command(&origin, "docker-registry")
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let client = http::client()?;
        let url = format!("http://{}:{ORIGIN_PORT}/v2/", origin.ip);
        poll("the shaped origin", Duration::from_secs(30), || {
            Ok(client
                .get(&url)
                .send()
                .is_ok_and(|r| r.status().is_success())
                .then_some(()))
        })?;
        Ok(Bench {
            ctx,
            _net: net,
            _registry: registry,
            origin,
            node_host,
            mbit,
            nydus_bytes: image.data_bytes(),
            _origin: child,
        })
    }

    fn origin_addr(&self) -> String {
        format!("{}:{ORIGIN_PORT}", self.origin.ip)
    }

    /// Start a node with a fresh data dir in the node namespace.
    fn node(&self, label: &str) -> Result<NodeProc> {
        let data = self.ctx.subdir(&format!("node-{label}"))?;
        let log = File::create(data.join("node.log"))?;
        let admin = format!("{}:{ADMIN_PORT}", self.node_host.ip);
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.node_host.ns))
            .arg(paths::shoal_bin()?)
            .arg("node")
            .arg("--data-dir")
            .arg(data.join("data"))
            .args(["--listen", &format!("{}:5050", self.node_host.ip)])
            .args(["--admin", &admin])
            .arg("--control")
            .arg(data.join("control.sock"))
            .args(["--upstream", &format!("http://{}", self.origin_addr())])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        let node = NodeProc {
            child,
            admin,
            control: data.join("control.sock"),
        };
        let client = http::client()?;
        let url = format!("http://{}/healthz", node.admin);
        poll("the node", Duration::from_secs(30), || {
            Ok(client
                .get(&url)
                .send()
                .is_ok_and(|r| r.status().is_success())
                .then_some(()))
        })?;
        Ok(node)
    }

    fn mount(&self, node: &NodeProc, dir: &Path, mode: &str) -> Result<()> {
        let reference = format!("{}/{NYDUS_REPO}:1", self.origin_addr());
        let out = Command::new(paths::shoal_bin()?)
            .arg("mount")
            .arg(&reference)
            .arg(dir)
            .args(["--mode", mode, "--control"])
            .arg(&node.control)
            .output()?;
        ensure!(
            out.status.success(),
            "shoal mount --mode {mode}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    fn origin_bytes(&self, node: &NodeProc) -> Result<u64> {
        let out = Command::new(paths::shoal_bin()?)
            .args(["mounts", "--json", "--control"])
            .arg(&node.control)
            .output()?;
        ensure!(
            out.status.success(),
            "shoal mounts: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["mounts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["stats"]["source"]["origin_bytes"].as_u64())
            .sum())
    }

    fn lazy_cold(&self, mode: &str, round: usize) -> Result<Cold> {
        let node = self.node(&format!("{mode}-{round}"))?;
        let dir = self.ctx.subdir(&format!("mnt-{mode}-{round}"))?;
        let t = Instant::now();
        self.mount(&node, &dir, mode)?;
        let mounted = t.elapsed();
        python(&dir)?;
        let total = t.elapsed();
        let bytes = self.origin_bytes(&node)?;
        drop(node);
        let _ = std::fs::remove_dir_all(self.ctx.dir().join(format!("node-{mode}-{round}")));
        Ok(Cold {
            total,
            pull: mounted,
            run: total - mounted,
            bytes,
            ..Cold::default()
        })
    }

    fn oci_cold(&self, round: usize) -> Result<(Cold, PathBuf)> {
        let layout = self.ctx.dir().join(format!("oci-{round}"));
        let bundle = self.ctx.dir().join(format!("bundle-{round}"));
        let policy = self.ctx.dir().join("policy.json");
        std::fs::write(
            &policy,
            r#"{"default":[{"type":"insecureAcceptAnything"}]}"#,
        )?;
        let t = Instant::now();
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.node_host.ns))
            .arg("skopeo")
            .arg("--policy")
            .arg(&policy)
            .args(["copy", "--src-tls-verify=false", "--src-no-creds"])
            .arg(format!("docker://{}/{OCI_IMAGE}", self.origin_addr()))
            .arg(format!("oci:{}:python", layout.display()))
            .env("HOME", self.ctx.dir())
            .env("XDG_RUNTIME_DIR", self.ctx.dir())
            .env("REGISTRY_AUTH_FILE", self.ctx.dir().join("no-auth.json"))
            .output()?;
        ensure!(
            out.status.success(),
            "skopeo copy: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let pull = t.elapsed();
        let st = Command::new("umoci")
            .arg("unpack")
            .arg("--image")
            .arg(format!("{}:python", layout.display()))
            .arg(&bundle)
            .stdout(Stdio::null())
            .status()?;
        ensure!(st.success(), "umoci unpack failed");
        let unpacked = t.elapsed();
        python(&bundle.join("rootfs"))?;
        let total = t.elapsed();
        let bytes = dir_bytes(&layout.join("blobs"))?;
        std::fs::remove_dir_all(&layout)?;
        Ok((
            Cold {
                total,
                pull,
                unpack: unpacked - pull,
                run: total - unpacked,
                bytes,
            },
            bundle,
        ))
    }

    fn run(&self, rounds: usize) -> Result<()> {
        println!(
            "origin link: tbf {} Mbit/s on the origin namespace's egress; node in its own namespace",
            self.mbit
        );
        let (mut oci, mut fuse, mut erofs) = (Vec::new(), Vec::new(), Vec::new());
        let mut rootfs = None;
        for r in 0..rounds {
            let (o, bundle) = self.oci_cold(r)?;
            oci.push(o);
            match rootfs.take() {
                None => rootfs = Some(bundle),
                Some(old) => {
                    let _ = std::fs::remove_dir_all(&bundle);
                    rootfs = Some(old);
                }
            }
            fuse.push(self.lazy_cold("fuse", r)?);
            erofs.push(self.lazy_cold("erofs", r)?);
            println!(
                "round {}: OCI {:.2?}  FUSE {:.2?}  EROFS {:.2?}",
                r + 1,
                o.total,
                fuse[r].total,
                erofs[r].total
            );
        }
        let (o, f, e) = (median(&oci), median(&fuse), median(&erofs));
        println!();
        println!(
            "cold start to the end of `python3 -c 'import json'` (median of {rounds}; image data {:.1} MB as Nydus blobs):",
            self.nydus_bytes as f64 / 1e6
        );
        println!("| path | total | pull / mount | unpack | run | bytes over the link | vs OCI |");
        println!("|---|---|---|---|---|---|---|");
        for (name, c) in [
            ("skopeo copy + umoci unpack + run", o),
            ("shoal mount --mode fuse + run", f),
            ("shoal mount --mode erofs + run", e),
        ] {
            println!(
                "| {name} | {:.2} s | {:.2} s | {:.2} s | {:.2} s | {:.1} MB | {:.1}x |",
                c.total.as_secs_f64(),
                c.pull.as_secs_f64(),
                c.unpack.as_secs_f64(),
                c.run.as_secs_f64(),
                c.bytes as f64 / 1e6,
                o.total.as_secs_f64() / c.total.as_secs_f64().max(1e-9)
            );
        }
        let rootfs = rootfs.context("no unpacked tree")?.join("rootfs");
        self.warm(&rootfs)?;
        println!(
            "machine: nproc {}, Linux {}, {}",
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            std::fs::read_to_string("/proc/sys/kernel/osrelease")?.trim(),
            paths::shoal_build()
        );
        Ok(())
    }

    fn warm(&self, rootfs: &Path) -> Result<()> {
        let files = big_files(rootfs)?;
        let every = files_at_least(rootfs, 0)?;
        let every_bytes: u64 = every.iter().map(|(_, s)| s).sum();
        let total: u64 = files.iter().map(|(_, s)| s).sum();
        let node = self.node("warm")?;
        let (fdir, edir) = (self.ctx.subdir("mnt-fuse")?, self.ctx.subdir("mnt-erofs")?);
        self.mount(&node, &fdir, "fuse")?;
        self.mount(&node, &edir, "erofs")?;
        // Prime: every chunk of the files into the node's store (over the shaped link).
        let t = Instant::now();
        read_all(&fdir, &files)?;
        let cold_fuse = t.elapsed();
        read_all(&edir, &files)?;
        read_all(&fdir, &every)?;
        read_all(&edir, &every)?;
        println!();
        println!(
            "warm reads: {} files of ≥256 KiB, {:.1} MB (first FUSE pass, chunks from the shaped origin: {:.1} MB/s)",
            files.len(),
            total as f64 / 1e6,
            total as f64 / 1e6 / cold_fuse.as_secs_f64()
        );
        println!(
            "| where | sequential 1 MiB reads | random 4 KiB reads | page cache hot, sequential | every file ({} files, {:.1} MB), page cache dropped |",
            every.len(),
            every_bytes as f64 / 1e6
        );
        println!("|---|---|---|---|---|");
        let mut every_file = Vec::new();
        for (name, dir) in [
            ("local disk (umoci unpack)", rootfs),
            ("FUSE mount", fdir.as_path()),
            ("EROFS mount", edir.as_path()),
        ] {
            let mut seq = Vec::new();
            let mut rnd = Vec::new();
            let mut hot = Vec::new();
            let mut all = Vec::new();
            for pass in 0..3u64 {
                drop_cache(dir, &every)?;
                all.push(timed(|| read_all(dir, &every))?);
                drop_cache(dir, &files)?;
                seq.push(timed(|| read_all(dir, &files))?);
                drop_cache(dir, &files)?;
                rnd.push(timed(|| random_reads(dir, &files, 4000, pass))?);
                hot.push(timed(|| read_all(dir, &files))?);
            }
            let (s, r, h, a) = (median_d(seq), median_d(rnd), median_d(hot), median_d(all));
            println!(
                "| {name} | {:.0} MB/s | {:.1} MB/s ({:.0} reads/s) | {:.0} MB/s | {:.2} s |",
                total as f64 / 1e6 / s.as_secs_f64(),
                4000.0 * 4096.0 / 1e6 / r.as_secs_f64(),
                4000.0 / r.as_secs_f64(),
                total as f64 / 1e6 / h.as_secs_f64(),
                a.as_secs_f64()
            );
            every_file.push(a);
        }
        if let [disk, fuse, erofs] = every_file[..] {
            let row = |mode: &str, t: Duration, goal: &str| {
                shoal_e2e::rows::row(
                    &format!(
                        "warm read of every file of the debian-python Nydus image, page cache dropped, {mode}"
                    ),
                    &format!("{:.2} s", t.as_secs_f64()),
                    &format!("local disk (umoci unpack) {:.2} s", disk.as_secs_f64()),
                    t.as_secs_f64() / disk.as_secs_f64(),
                    goal,
                )
            };
            row("FUSE", fuse, "≤ stock nydusd's time (see the README)");
            row("EROFS", erofs, "≤ 1.1× ext4's time");
        }
        drop(node);
        Ok(())
    }
}

fn python(root: &Path) -> Result<()> {
    let out = Command::new("chroot")
        .arg(root)
        .args(["python3", "-c", "import json"])
        .output()?;
    ensure!(
        out.status.success(),
        "chroot {} python3: {}",
        root.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Regular files of at least [`MIN_FILE`] bytes below `root` (relative paths), largest first.
fn big_files(root: &Path) -> Result<Vec<(PathBuf, u64)>> {
    files_at_least(root, MIN_FILE)
}

/// Regular files of at least `min` bytes below `root` (relative paths), largest first.
fn files_at_least(root: &Path, min: u64) -> Result<Vec<(PathBuf, u64)>> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            let ft = e.file_type()?;
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                let len = e.metadata()?.len();
                if len >= min {
                    out.push((e.path().strip_prefix(root)?.to_path_buf(), len));
                }
            }
        }
    }
    out.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    Ok(out)
}

fn read_all(root: &Path, files: &[(PathBuf, u64)]) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    for (p, len) in files {
        let mut f = File::open(root.join(p))?;
        let mut got = 0u64;
        loop {
            let n = f.read(&mut buf)?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        ensure!(got == *len, "{}: read {got} of {len} bytes", p.display());
    }
    Ok(())
}

fn random_reads(root: &Path, files: &[(PathBuf, u64)], n: usize, seed: u64) -> Result<()> {
    let handles: Vec<File> = files
        .iter()
        .map(|(p, _)| File::open(root.join(p)))
        .collect::<std::io::Result<_>>()?;
    let total: u64 = files.iter().map(|(_, s)| s / 4096).sum();
    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
    let mut buf = [0u8; 4096];
    for _ in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        // A block chosen uniformly over all the files' blocks.
        let mut block = x % total.max(1);
        for (i, (_, size)) in files.iter().enumerate() {
            let blocks = size / 4096;
            if block < blocks {
                handles[i].read_exact_at(&mut buf, block * 4096)?;
                break;
            }
            block -= blocks;
        }
    }
    Ok(())
}

/// Drop the page cache of the files (posix_fadvise DONTNEED, through python3: no libc here).
fn drop_cache(root: &Path, files: &[(PathBuf, u64)]) -> Result<()> {
    let mut child = Command::new("python3")
        .args([
            "-c",
            "import os,sys\n\
             for p in sys.stdin.read().split('\\0'):\n\
             \x20   if p:\n\
             \x20       fd = os.open(p, os.O_RDONLY)\n\
             \x20       os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)\n\
             \x20       os.close(fd)\n",
        ])
        .stdin(Stdio::piped())
        .spawn()?;
    {
        let mut stdin = child.stdin.take().context("python stdin")?;
        for (p, _) in files {
            stdin.write_all(root.join(p).as_os_str().as_encoded_bytes())?;
            stdin.write_all(b"\0")?;
        }
    }
    ensure!(child.wait()?.success(), "dropping the page cache failed");
    Ok(())
}

fn timed(f: impl FnOnce() -> Result<()>) -> Result<Duration> {
    let t = Instant::now();
    f()?;
    Ok(t.elapsed())
}

fn median(v: &[Cold]) -> Cold {
    let mut s = v.to_vec();
    s.sort_by_key(|c| c.total);
    s[s.len() / 2]
}

fn median_d(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn dir_bytes(dir: &Path) -> Result<u64> {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let e = e?;
            if e.file_type()?.is_dir() {
                stack.push(e.path());
            } else {
                total += e.metadata()?.len();
            }
        }
    }
    Ok(total)
}
