//! The command line as a person and a script meet it: exit codes that say what went wrong (the
//! same for every command, distinct from a wrong command line), `SHOAL_*` variables for
//! repeatable flags and `--set` for every config field, `-q` silencing notes, no ANSI escapes
//! off a terminal, and completions and man pages generated from the parser itself.
//!
//! Needs the `shoal` binary only.

use std::net::TcpListener;
use std::process::{Command, Output};

use anyhow::{ensure, Result};
use shoal_e2e::{paths, run, Need, TestCtx};

const NEEDS: &[Need] = &[Need::Shoal];

fn shoal(args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
    let mut c = Command::new(paths::shoal_bin()?);
    c.args(args).env_remove("RUST_LOG");
    for (k, _) in std::env::vars() {
        if k.starts_with("SHOAL_") && k != "SHOAL_BIN" {
            c.env_remove(k);
        }
    }
    for (k, v) in env {
        c.env(k, v);
    }
    Ok(c.output()?)
}

fn text(o: &Output) -> String {
    format!(
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A port nothing listens on.
fn dead_addr() -> Result<String> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    Ok(format!("127.0.0.1:{}", l.local_addr()?.port()))
}

/// 2 for a wrong command line, 3 for a service that cannot be reached, whichever command.
#[test]
fn exit_codes_are_the_same_for_every_command() {
    run(
        "exit_codes_are_the_same_for_every_command",
        NEEDS,
        |t: &TestCtx| {
            for bad in [
                &["frobnicate"][..],
                &["status", "--node", "not-an-address"],
                &["mount"],
                &["prewarm", "Not An Image!"],
                &["prewarm", "status", "nope"],
                &["node", "--store-quota", "lots"],
                &["-q", "-v", "status"],
            ] {
                let o = shoal(bad, &[])?;
                ensure!(o.status.code() == Some(2), "shoal {bad:?}: {}", text(&o));
            }
            let dead = dead_addr()?;
            let socket = t.dir().join("no-such.sock");
            let socket = socket.to_string_lossy();
            for args in [
                vec!["status", "--node", &dead],
                vec!["mounts", "--control", &socket],
                vec!["umount", "/nonexistent", "--control", &socket],
                vec!["prewarm", "registry.example/app:1", "--scheduler", &dead],
            ] {
                let o = shoal(&args, &[])?;
                ensure!(o.status.code() == Some(3), "shoal {args:?}: {}", text(&o));
                let err = String::from_utf8_lossy(&o.stderr);
                ensure!(
                    !err.contains('\x1b'),
                    "ANSI escapes off a terminal: {err:?}"
                );
            }
            // A config that does not validate is a failed check (1), with the field named.
            let o = shoal(
                &["config", "check", "--set", "store.high_watermark=2.0"],
                &[],
            )?;
            ensure!(o.status.code() == Some(1), "{}", text(&o));
            ensure!(
                String::from_utf8_lossy(&o.stderr).contains("store.high_watermark"),
                "{}",
                text(&o)
            );
            Ok(())
        },
    );
}

/// Repeatable flags have their variables (comma-separated) and every config field is reachable
/// through `--set` or `SHOAL_SET`, in the documented precedence: flag > variable > file.
#[test]
fn variables_and_set_reach_the_effective_config() {
    run("variables_and_set_reach_the_effective_config", NEEDS, |t| {
        let file = t.dir().join("node.toml");
        std::fs::write(
            &file,
            "[mirror]\nmax_tunnels = 9\nmax_origin_downloads = 5\n",
        )?;
        let file = file.to_string_lossy();
        let o = shoal(
            &[
                "config",
                "print",
                "--config",
                &file,
                "--set",
                "p2p.zone=rack-b",
            ],
            &[
                (
                    "SHOAL_UPSTREAM",
                    "a.example=http://a.example:5000,https://b.example",
                ),
                ("SHOAL_SCHEDULER", "s1:5060,s2:5060"),
                ("SHOAL_SET", "mirror.max_tunnels=64;p2p.upload_rate=100MiB"),
            ],
        )?;
        ensure!(o.status.success(), "{}", text(&o));
        let printed: toml::Table = toml::from_str(&String::from_utf8_lossy(&o.stdout))?;
        let mirror = &printed["mirror"];
        // The flag wins over the variable (SHOAL_SET is the flag's variable: the flag replaces it).
        ensure!(mirror["max_tunnels"].as_integer() == Some(9), "{printed}");
        ensure!(
            mirror["max_origin_downloads"].as_integer() == Some(5),
            "{printed}"
        );
        ensure!(
            printed["p2p"]["zone"].as_str() == Some("rack-b"),
            "{printed}"
        );
        let schedulers = printed["p2p"]["schedulers"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        ensure!(schedulers.len() == 2, "{printed}");
        let ups = printed["upstream"].as_array().cloned().unwrap_or_default();
        ensure!(ups.len() == 2, "{printed}");
        ensure!(ups[0]["host"].as_str() == Some("a.example"), "{printed}");

        // Without the flag, SHOAL_SET applies.
        let o = shoal(
            &["config", "print"],
            &[("SHOAL_SET", "mirror.max_tunnels=64;p2p.upload_rate=100MiB")],
        )?;
        ensure!(o.status.success(), "{}", text(&o));
        let printed: toml::Table = toml::from_str(&String::from_utf8_lossy(&o.stdout))?;
        ensure!(
            printed["mirror"]["max_tunnels"].as_integer() == Some(64),
            "{printed}"
        );
        ensure!(
            printed["p2p"]["upload_rate"].as_str() == Some("100MiB"),
            "{printed}"
        );

        // A misspelt field is refused with its name.
        let o = shoal(&["config", "check", "--set", "mirror.max_tunels=3"], &[])?;
        ensure!(o.status.code() == Some(1), "{}", text(&o));
        ensure!(
            String::from_utf8_lossy(&o.stderr).contains("max_tunels"),
            "{}",
            text(&o)
        );
        Ok(())
    });
}

/// Completions for the usual shells and man pages for every subcommand, from the parser.
#[test]
fn completions_and_man_pages() {
    run("completions_and_man_pages", NEEDS, |t| {
        for shell in ["bash", "zsh", "fish"] {
            let o = shoal(&["completions", shell], &[])?;
            ensure!(o.status.success(), "{}", text(&o));
            let script = String::from_utf8_lossy(&o.stdout);
            ensure!(
                script.contains("prewarm") && script.contains("store-quota"),
                "{shell}: {script}"
            );
        }
        if let Some(bash) = paths::which("bash") {
            // bash accepts the script.
            let o = shoal(&["completions", "bash"], &[])?;
            let file = t.dir().join("shoal.bash");
            std::fs::write(&file, &o.stdout)?;
            let check = Command::new(bash).arg("-n").arg(&file).output()?;
            ensure!(check.status.success(), "{}", text(&check));
        }
        let dir = t.dir().join("man1");
        let o = shoal(&["man", "--out-dir", &dir.to_string_lossy()], &[])?;
        ensure!(o.status.success(), "{}", text(&o));
        for page in [
            "shoal.1",
            "shoal-node.1",
            "shoal-mount.1",
            "shoal-config-containerd.1",
            "shoal-prewarm.1",
        ] {
            let body = std::fs::read_to_string(dir.join(page))?;
            ensure!(body.contains(".TH"), "{page}: {body}");
        }
        if let Some(man) = paths::which("man") {
            let o = Command::new(man)
                .args(["-l", "-P", "cat"])
                .arg(dir.join("shoal-mount.1"))
                .env("MANWIDTH", "100")
                .output()?;
            ensure!(
                o.status.success() && String::from_utf8_lossy(&o.stdout).contains("control"),
                "{}",
                text(&o)
            );
        }
        Ok(())
    });
}
