//! Progress of a conversion: the events the converter sends, and the one task that renders
//! them — a line per layer redrawn in place on a terminal, plain log lines (one per finished
//! step) otherwise.
//!
//! Invariants: byte counters are sent with `try_send` and dropped when the renderer lags (the
//! next one supersedes them); step changes are awaited, so none is lost. The renderer owns all
//! state; nothing else writes to stderr while it runs except through it.

use std::io::Write as _;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

/// What a layer is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Waiting,
    Fetching,
    Building,
    Pushing,
    Done,
}

impl Stage {
    fn name(self) -> &'static str {
        match self {
            Stage::Waiting => "waiting",
            Stage::Fetching => "fetching",
            Stage::Building => "building",
            Stage::Pushing => "pushing",
            Stage::Done => "done",
        }
    }
}

/// One progress event.
#[derive(Debug, Clone)]
pub enum Event {
    /// The layers about to be converted (short names), in order.
    Layers(Vec<String>),
    /// Layer `layer` is at `stage`, `done` of `total` bytes (0 when unknown).
    Layer {
        layer: usize,
        stage: Stage,
        done: u64,
        total: u64,
    },
    /// A finished step worth a line of its own (`layer 2/3 … built …`, `pushed manifest …`).
    Line(String),
}

/// The converter's handle for sending events (cheap to clone; a no-op when detached).
#[derive(Debug, Clone)]
pub struct Progress {
    tx: Option<mpsc::Sender<Event>>,
}

impl Progress {
    /// A handle that drops every event.
    pub fn none() -> Self {
        Self { tx: None }
    }

    /// Send a step change or a line (waits for room).
    pub async fn step(&self, ev: Event) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(ev).await;
        }
    }

    /// Send a byte counter if there is room (from any thread, including blocking ones).
    pub fn bytes(&self, layer: usize, stage: Stage, done: u64, total: u64) {
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(Event::Layer {
                layer,
                stage,
                done,
                total,
            });
        }
    }
}

/// Start the renderer; `tty` chooses in-place bars over log lines. Await the handle after
/// dropping every [`Progress`] clone to flush the last state.
pub fn start(tty: bool) -> (Progress, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(256);
    let task = tokio::spawn(render(rx, tty));
    (Progress { tx: Some(tx) }, task)
}

struct Row {
    name: String,
    stage: Stage,
    done: u64,
    total: u64,
    since: Instant,
}

async fn render(mut rx: mpsc::Receiver<Event>, tty: bool) {
    let mut rows: Vec<Row> = Vec::new();
    let mut drawn = 0usize;
    let mut last = Instant::now() - Duration::from_secs(1);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    loop {
        let ev = tokio::select! {
            ev = rx.recv() => match ev { Some(ev) => Some(ev), None => break },
            _ = tick.tick() => None,
        };
        match ev {
            Some(Event::Layers(names)) => {
                rows = names
                    .into_iter()
                    .map(|name| Row {
                        name,
                        stage: Stage::Waiting,
                        done: 0,
                        total: 0,
                        since: Instant::now(),
                    })
                    .collect();
            }
            Some(Event::Layer {
                layer,
                stage,
                done,
                total,
            }) => {
                if let Some(r) = rows.get_mut(layer) {
                    if r.stage != stage {
                        r.since = Instant::now();
                    }
                    (r.stage, r.done, r.total) = (stage, done, total);
                }
            }
            Some(Event::Line(line)) => {
                if tty {
                    clear(drawn);
                    drawn = 0;
                }
                eprintln!("{line}");
            }
            None => {}
        }
        if tty && last.elapsed() >= Duration::from_millis(150) {
            clear(drawn);
            drawn = draw(&rows);
            last = Instant::now();
        }
    }
    if tty {
        clear(drawn);
        draw(&rows);
    }
}

/// Move up over the `n` bar lines drawn last and clear them.
fn clear(n: usize) {
    let mut err = std::io::stderr().lock();
    for _ in 0..n {
        let _ = write!(err, "\x1b[1A\x1b[2K");
    }
    let _ = err.flush();
}

fn draw(rows: &[Row]) -> usize {
    let mut err = std::io::stderr().lock();
    for (i, r) in rows.iter().enumerate() {
        let _ = writeln!(err, "{}", bar(i, rows.len(), r));
    }
    let _ = err.flush();
    rows.len()
}

fn bar(i: usize, n: usize, r: &Row) -> String {
    let mib = |b: u64| b as f64 / 1048576.0;
    let head = format!("layer {}/{n} {} {:9}", i + 1, r.name, r.stage.name());
    match (r.stage, r.total) {
        (Stage::Waiting | Stage::Done, _) => head,
        (_, 0) => format!("{head} {:8.1} MiB", mib(r.done)),
        (_, t) => {
            let frac = (r.done as f64 / t as f64).clamp(0.0, 1.0);
            let filled = (frac * 24.0) as usize;
            let rate = mib(r.done) / r.since.elapsed().as_secs_f64().max(0.001);
            format!(
                "{head} [{}{}] {:5.1}% of {:.1} MiB {rate:6.1} MiB/s",
                "#".repeat(filled),
                " ".repeat(24 - filled),
                frac * 100.0,
                mib(t)
            )
        }
    }
}
