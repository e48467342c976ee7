//! `shoal prewarm IMAGE`, `shoal prewarm status|cancel JOB`, `shoal prewarm list`: submit a
//! cluster-wide prewarm job to a scheduler, follow it, cancel it.
//!
//! Exit codes (`cli::exit`): 0 submitted (or, with `--wait`, every node done); 1 the scheduler
//! refused or some node failed; 2 bad input; 3 the scheduler could not be reached; 4 the job was
//! cancelled.

use std::fmt::Write as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use shoal_proto::sched::{
    ErrorCode, JobId, JobNodeStatus, JobRequest, JobState, JobStatus, NodeJobState, NodeSelector,
};
use shoal_scheduler::client::{ClientError, ClientOptions, SchedulerClient};

use crate::mount::image::ImageRef;
use crate::units::ByteSize;

/// Where `shoal scheduler` listens by default (`scheduler.listen`).
const DEFAULT_SCHEDULER: &str = "127.0.0.1:5060";
/// How often `--wait` asks the scheduler.
const POLL: Duration = Duration::from_millis(500);
/// How long `--wait` rides out an unreachable scheduler.
const UNREACHABLE_GRACE: Duration = Duration::from_secs(15);

/// Warm an image across the cluster.
///
/// The scheduler hands the job to the selected live nodes; each resolves IMAGE with its own
/// upstreams and credentials and fetches it through its normal download path, so the origin is
/// read about once and the nodes swarm the rest between them. OCI images: every layer. Nydus
/// images: the bootstrap (with `--full`, every data blob too). Prints the job id; `--wait`
/// follows the job until every node is done.
///
/// Also: `shoal prewarm status JOB`, `shoal prewarm cancel JOB`, `shoal prewarm list`.
///
/// Exit codes: 0 submitted, or with `--wait` done on every node; 1 the scheduler refused, or the
/// job failed on some node (each node's reason is printed); 2 bad input; 3 the scheduler could
/// not be reached; 4 the job was cancelled.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct PrewarmArgs {
    #[command(subcommand)]
    pub command: Option<PrewarmCommand>,
    /// The image, `host[:port]/repo[:tag|@digest]`.
    #[arg(required = true)]
    pub image: Option<String>,
    /// Which live nodes: `all`, a number of them, or `zone=NAME`.
    #[arg(long, default_value = "all")]
    pub nodes: NodeSelector,
    /// Follow the job until every node finished (live progress per node).
    #[arg(long)]
    pub wait: bool,
    /// Nydus images: fetch every data blob too, not only the bootstrap.
    #[arg(long)]
    pub full: bool,
    /// Print JSON (the job status) instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// The scheduler's address (`host:port`).
    #[arg(long, global = true, env = "SHOAL_SCHEDULER", default_value = DEFAULT_SCHEDULER)]
    pub scheduler: String,
    /// The cluster join secret, needed to submit or cancel jobs at a
    /// scheduler that has one.
    #[arg(
        long,
        global = true,
        env = "SHOAL_JOIN_SECRET_FILE",
        value_name = "FILE"
    )]
    pub join_secret_file: Option<std::path::PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum PrewarmCommand {
    /// Show where a job stands on each node.
    Status {
        /// The job id, as `shoal prewarm` printed it.
        job: String,
        /// Follow it until every node finished.
        #[arg(long)]
        wait: bool,
    },
    /// Cancel a job: its nodes stop (blobs already downloading finish).
    Cancel {
        /// The job id.
        job: String,
    },
    /// List the scheduler's jobs, newest first.
    List,
}

pub fn run(args: PrewarmArgs) -> anyhow::Result<ExitCode> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

async fn run_async(args: PrewarmArgs) -> anyhow::Result<ExitCode> {
    let mut client = SchedulerClient::new(&args.scheduler, &ClientOptions::default())
        .map_err(|e| super::exit::usage(format!("--scheduler {}: {e}", args.scheduler)))?;
    if let Some(path) = &args.join_secret_file {
        let contents = std::fs::read(path)
            .map_err(|e| anyhow::anyhow!("--join-secret-file {}: {e}", path.display()))?;
        let secret = shoal_proto::auth::parse_secret(&contents)
            .map_err(|e| anyhow::anyhow!("--join-secret-file {}: {e}", path.display()))?;
        client = client.with_auth(shoal_proto::auth::derive_key(
            &secret,
            shoal_proto::auth::SCHEDULER_LABEL,
        ));
    }
    let ui = Ui {
        json: args.json,
        addr: args.scheduler.clone(),
    };
    match args.command {
        Some(PrewarmCommand::Status { job, wait }) => {
            let id = parse_job(&job)?;
            if wait {
                return ui.follow(&client, id).await;
            }
            let status = client.job(id).await.map_err(|e| ui.error(e, Some(id)))?;
            ui.print_once(&status);
            Ok(exit_code(status.state))
        }
        Some(PrewarmCommand::Cancel { job }) => {
            let id = parse_job(&job)?;
            let status = client
                .cancel_job(id)
                .await
                .map_err(|e| ui.error(e, Some(id)))?;
            if ui.json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                println!("job {id}: {}", status.state.as_str());
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(PrewarmCommand::List) => {
            let list = client.jobs().await.map_err(|e| ui.error(e, None))?;
            if ui.json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else if list.jobs.is_empty() {
                println!("no prewarm jobs");
            } else {
                for j in &list.jobs {
                    println!("{}", job_line(j));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        None => {
            let image = args.image.unwrap_or_default();
            ImageRef::parse(&image).map_err(|e| super::exit::usage(e.to_string()))?;
            let req = JobRequest {
                image,
                nodes: args.nodes,
                full: args.full,
            };
            let status = client
                .create_job(&req)
                .await
                .map_err(|e| ui.error(e, None))?;
            if !args.wait {
                if ui.json {
                    println!("{}", serde_json::to_string_pretty(&status)?);
                } else {
                    eprintln!(
                        "prewarm job {} started: {} on {} node(s); follow it with `shoal prewarm status {} --wait`",
                        status.id,
                        status.image,
                        status.nodes.len(),
                        status.id
                    );
                    println!("{}", status.id);
                }
                return Ok(ExitCode::SUCCESS);
            }
            if !ui.json {
                eprintln!(
                    "prewarm job {}: {} on {} node(s)",
                    status.id,
                    status.image,
                    status.nodes.len()
                );
            }
            ui.follow(&client, status.id).await
        }
    }
}

fn parse_job(raw: &str) -> anyhow::Result<JobId> {
    raw.trim()
        .parse()
        .map_err(|e| super::exit::usage(format!("{e} (job ids look like 3f2a9c0b1d4e5f60)")))
}

fn exit_code(state: JobState) -> ExitCode {
    match state {
        JobState::Running | JobState::Done => ExitCode::SUCCESS,
        JobState::Failed | JobState::Unknown => ExitCode::from(super::exit::FAILED),
        JobState::Cancelled => ExitCode::from(super::exit::CANCELLED),
    }
}

struct Ui {
    json: bool,
    addr: String,
}

impl Ui {
    /// Follow job `id` until it is final; print progress as it goes.
    async fn follow(&self, client: &SchedulerClient, id: JobId) -> anyhow::Result<ExitCode> {
        let mut view = JobView::new(super::bars::Bars::for_command(self.json));
        let mut last_states: Vec<NodeJobState> = Vec::new();
        let mut unreachable_since: Option<Instant> = None;
        loop {
            let status = match client.job(id).await {
                Ok(s) => {
                    unreachable_since = None;
                    s
                }
                Err(e) if e.is_transient() => {
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > UNREACHABLE_GRACE {
                        view.bars.clear();
                        return Err(self.error(e, Some(id)));
                    }
                    tokio::time::sleep(POLL).await;
                    continue;
                }
                Err(e) => {
                    view.bars.clear();
                    return Err(self.error(e, Some(id)));
                }
            };
            if view.bars.shown() {
                view.update(&status);
            } else if !self.json && !super::Verbosity::get().quiet {
                // Plain output: a line per node whenever its state changes.
                for (i, n) in status.nodes.iter().enumerate() {
                    if last_states.get(i) != Some(&n.state) {
                        eprintln!("{}", node_line(n));
                    }
                }
                last_states = status.nodes.iter().map(|n| n.state).collect();
            }
            if status.state.is_final() {
                view.bars.clear();
                return Ok(self.finish(&status));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    fn finish(&self, s: &JobStatus) -> ExitCode {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(s)
                    .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
            );
            return exit_code(s.state);
        }
        let took = Duration::from_millis(s.elapsed_ms);
        match s.state {
            JobState::Done => println!(
                "prewarm job {} done: {} on {} node(s) in {:.1}s ({} fetched)",
                s.id,
                s.image,
                s.nodes.len(),
                took.as_secs_f64(),
                ByteSize(s.bytes_done)
            ),
            JobState::Cancelled => eprintln!("shoal: prewarm job {} was cancelled", s.id),
            _ => {
                let failed: Vec<&JobNodeStatus> = s
                    .nodes
                    .iter()
                    .filter(|n| n.state != NodeJobState::Done)
                    .collect();
                eprintln!(
                    "shoal: prewarm job {} failed on {} of {} node(s):",
                    s.id,
                    failed.len(),
                    s.nodes.len()
                );
                for n in failed {
                    eprintln!(
                        "  node {}: {}",
                        n.node.short(),
                        n.message.as_deref().unwrap_or(n.state.as_str())
                    );
                }
            }
        }
        exit_code(s.state)
    }

    fn print_once(&self, s: &JobStatus) {
        if self.json {
            println!(
                "{}",
                serde_json::to_string_pretty(s)
                    .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
            );
            return;
        }
        println!("{}", job_line(s));
        for n in &s.nodes {
            println!("  {}", node_line(n));
        }
    }

    /// A scheduler error in words that say what to do.
    fn error(&self, e: ClientError, job: Option<JobId>) -> anyhow::Error {
        let addr = &self.addr;
        match &e {
            ClientError::Unreachable { .. } | ClientError::Timeout { .. } => super::exit::unreachable(format!(
                "cannot reach the scheduler at {addr}: {e}\n(is `shoal scheduler` running there? set --scheduler or SHOAL_SCHEDULER)"
            )),
            ClientError::Rejected {
                code: ErrorCode::NotFound,
                ..
            } => match job {
                Some(id) => anyhow::anyhow!(
                    "scheduler {addr} has no prewarm job {id} (jobs live in the scheduler's memory: finished ones are kept for an hour, all are lost when it restarts)"
                ),
                None => anyhow::anyhow!("{e}"),
            },
            ClientError::Rejected { message, .. } => {
                anyhow::anyhow!("scheduler {addr} refused: {message}")
            }
            _ => anyhow::anyhow!("{e}"),
        }
    }
}

/// Above this many nodes the live view summarizes by state instead of a bar per node.
const BARS_PER_NODE_UP_TO: usize = 8;

/// The live view of a job on a terminal: a bar per node for a few nodes; for many, one bar of
/// nodes finished with the count in each state, and one of bytes across the cluster.
struct JobView {
    bars: super::bars::Bars,
    nodes: Vec<indicatif::ProgressBar>,
    summary: Option<(indicatif::ProgressBar, indicatif::ProgressBar)>,
}

impl JobView {
    fn new(bars: super::bars::Bars) -> Self {
        Self {
            bars,
            nodes: Vec::new(),
            summary: None,
        }
    }

    fn update(&mut self, s: &JobStatus) {
        if s.nodes.len() > BARS_PER_NODE_UP_TO {
            let (nodes, bytes) = self.summary.get_or_insert_with(|| {
                (
                    self.bars.count("nodes", s.nodes.len() as u64),
                    self.bars.bytes("bytes", None),
                )
            });
            nodes.set_length(s.nodes.len() as u64);
            nodes.set_position(s.nodes.iter().filter(|n| n.state.is_final()).count() as u64);
            nodes.set_message(state_counts(&s.nodes));
            super::bars::set_total(bytes, (s.bytes_total > 0).then_some(s.bytes_total));
            bytes.set_position(s.bytes_done);
            return;
        }
        while self.nodes.len() < s.nodes.len() {
            let n = &s.nodes[self.nodes.len()];
            let prefix = format!("node {}", n.node.short());
            self.nodes.push(self.bars.bytes(prefix, None));
        }
        for (bar, n) in self.nodes.iter().zip(&s.nodes) {
            super::bars::set_total(bar, (n.bytes_total > 0).then_some(n.bytes_total));
            bar.set_position(n.bytes_done);
            let mut msg = format!(
                "{} {}/{} blobs",
                n.state.as_str(),
                n.blobs_done,
                n.blobs_total
            );
            if let Some(m) = &n.message {
                let _ = write!(msg, " — {m}");
            }
            bar.set_message(msg);
        }
    }
}

/// `1 failed, 12 done, 3 running`: how many nodes are in each state, by state name.
fn state_counts(nodes: &[JobNodeStatus]) -> String {
    let mut counts: Vec<(NodeJobState, usize)> = Vec::new();
    for n in nodes {
        match counts.iter_mut().find(|(s, _)| *s == n.state) {
            Some((_, c)) => *c += 1,
            None => counts.push((n.state, 1)),
        }
    }
    counts.sort_by_key(|(s, _)| s.as_str());
    counts
        .iter()
        .map(|(s, c)| format!("{c} {}", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn job_line(j: &JobStatus) -> String {
    format!(
        "{}  {:9}  {}{}  nodes {} ({})  {}/{}  {:.1}s",
        j.id,
        j.state.as_str(),
        j.image,
        if j.full { " (full)" } else { "" },
        j.nodes.len(),
        j.nodes_selector,
        ByteSize(j.bytes_done),
        ByteSize(j.bytes_total),
        Duration::from_millis(j.elapsed_ms).as_secs_f64()
    )
}

fn node_line(n: &JobNodeStatus) -> String {
    let frac = if n.bytes_total > 0 {
        n.bytes_done as f64 / n.bytes_total as f64
    } else if n.state == NodeJobState::Done {
        1.0
    } else {
        0.0
    };
    let mut line = format!("node {} {:9}", n.node.short(), n.state.as_str());
    let _ = write!(
        line,
        " {:>5.1}% {}/{} ({}/{} blobs)",
        frac * 100.0,
        ByteSize(n.bytes_done),
        ByteSize(n.bytes_total),
        n.blobs_done,
        n.blobs_total
    );
    if let Some(z) = &n.zone {
        let _ = write!(line, " zone {z}");
    }
    if let Some(m) = &n.message {
        let _ = write!(line, " — {m}");
    }
    line
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::Parser as _;

    #[test]
    fn command_line_forms() {
        let p = |args: &[&str]| crate::cli::Cli::try_parse_from(args);
        let Ok(crate::cli::Cli {
            command: crate::cli::Command::Prewarm(a),
            ..
        }) = p(&[
            "shoal",
            "prewarm",
            "reg:5000/app:1",
            "--nodes",
            "zone=eu",
            "--wait",
        ])
        else {
            panic!("not parsed")
        };
        assert_eq!(a.image.as_deref(), Some("reg:5000/app:1"));
        assert_eq!(a.nodes, NodeSelector::Zone("eu".into()));
        assert!(a.wait && a.command.is_none());
        let Ok(crate::cli::Cli {
            command: crate::cli::Command::Prewarm(a),
            ..
        }) = p(&[
            "shoal",
            "prewarm",
            "status",
            "00000000000000ab",
            "--scheduler",
            "s:1",
        ])
        else {
            panic!("not parsed")
        };
        assert!(matches!(a.command, Some(PrewarmCommand::Status { .. })));
        assert_eq!(a.scheduler, "s:1");
        assert!(p(&["shoal", "prewarm"]).is_err(), "IMAGE is required");
        assert!(p(&["shoal", "prewarm", "x:1", "--nodes", "0"]).is_err());
        assert!(parse_job("nope").is_err());
    }

    #[test]
    fn many_nodes_are_summarized_by_state() {
        let node = |i: u8, state| JobNodeStatus {
            node: shoal_proto::node_id::NodeId::from([i; 32]),
            zone: None,
            state,
            bytes_done: 0,
            bytes_total: 0,
            blobs_done: 0,
            blobs_total: 0,
            message: None,
            finished_after_ms: None,
        };
        let mut nodes: Vec<JobNodeStatus> = (0..12).map(|i| node(i, NodeJobState::Done)).collect();
        nodes.push(node(12, NodeJobState::Running));
        nodes.push(node(13, NodeJobState::Failed));
        nodes.push(node(14, NodeJobState::Running));
        assert_eq!(state_counts(&nodes), "12 done, 1 failed, 2 running");
        assert_eq!(state_counts(&[]), "");
    }
}
