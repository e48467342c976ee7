//! The multi-host harness itself: hosts reach each other and the origin
//! across the bridge, a shaped link still carries data correctly, and
//! everything is gone after the network is dropped.

use std::io::Read as _;
use std::process::{Command, Stdio};

use anyhow::{ensure, Context};
use shoal_e2e::netns::{self, Net};
use shoal_e2e::{run, Need};

#[test]
fn hosts_reach_each_other_through_a_shaped_link_and_are_cleaned_up() {
    if let Some(why) = netns::unavailable() {
        shoal_e2e::skip(
            "hosts_reach_each_other_through_a_shaped_link_and_are_cleaned_up",
            &why,
        );
        return;
    }
    run("netns_harness", &[Need::Root, Need::Bin("python3")], |t| {
        let names;
        {
            let mut net = Net::new()?;
            let a = net.add_host()?;
            let b = net.add_host()?;
            names = (a.ns.clone(), b.ns.clone());
            net.shape_egress(&a, 200)?;
            net.shape_ingress(&b, 1000)?;
            // A file served from host A, fetched from host B.
            let dir = t.subdir("www")?;
            let data: Vec<u8> = (0..4u32 << 20)
                .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
                .collect();
            std::fs::write(dir.join("blob"), &data)?;
            let mut server = net
                .command(&a, "python3")
                .args([
                    "-m",
                    "http.server",
                    "8080",
                    "--bind",
                    &a.ip.to_string(),
                    "--directory",
                ])
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting the server in host A")?;
            let url = format!("http://{}:8080/blob", a.ip);
            let mut got = Vec::new();
            for _ in 0..100 {
                let out = net.command(&b, "curl").args(["-fsS", &url]).output()?;
                if out.status.success() {
                    got = out.stdout;
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let _ = server.kill();
            let _ = server.wait();
            ensure!(
                got == data,
                "host B got {} bytes, not the {} host A serves",
                got.len(),
                data.len()
            );
            // The root namespace (where tests run origins) is reachable at the gateway.
            let mut root_server = Command::new("python3")
                .args([
                    "-m",
                    "http.server",
                    "8081",
                    "--bind",
                    &net.gateway().to_string(),
                    "--directory",
                ])
                .arg(&dir)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?;
            let url = format!("http://{}:8081/blob", net.gateway());
            let mut reached = false;
            for _ in 0..100 {
                let out = net
                    .command(&b, "curl")
                    .args(["-fsS", "-o", "/dev/null", &url])
                    .output()?;
                if out.status.success() {
                    reached = true;
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let _ = root_server.kill();
            let _ = root_server.wait();
            ensure!(
                reached,
                "host B cannot reach a server on the gateway address"
            );
        }
        let mut listing = String::new();
        Command::new("ip")
            .args(["netns", "list"])
            .stdout(Stdio::piped())
            .spawn()?
            .stdout
            .context("no stdout")?
            .read_to_string(&mut listing)?;
        ensure!(
            !listing.contains(&names.0) && !listing.contains(&names.1),
            "namespaces left behind: {listing}"
        );
        Ok(())
    });
}
