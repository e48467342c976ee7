//! Progress of a conversion: the events the converter sends, and the one task that renders
//! them — a bar per layer (stage, bytes, rate, ETA) on a terminal, plain log lines (one per
//! finished step) otherwise.
//!
//! Invariants: byte counters are sent with `try_send` and dropped when the renderer lags (the
//! next one supersedes them); step changes are awaited, so none is lost. The renderer owns all
//! state; nothing else writes to stderr while it runs except through it.

use indicatif::ProgressBar;
use tokio::sync::mpsc;

use crate::cli::bars::{self, Bars};

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

/// Start the renderer on `bars` (bars drawn in place for a person at a terminal; plain lines
/// otherwise). Await the handle after dropping every [`Progress`] clone to flush the last state.
pub fn start(bars: Bars) -> (Progress, tokio::task::JoinHandle<()>) {
    let (tx, rx) = mpsc::channel(256);
    let task = tokio::spawn(render(rx, bars));
    (Progress { tx: Some(tx) }, task)
}

struct Row {
    bar: ProgressBar,
    stage: Stage,
    total: u64,
}

async fn render(mut rx: mpsc::Receiver<Event>, bars: Bars) {
    let mut rows: Vec<Row> = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Layers(names) => {
                let n = names.len();
                rows = names
                    .into_iter()
                    .enumerate()
                    .map(|(i, name)| {
                        let bar = bars.bytes(format!("layer {}/{n} {name}", i + 1), None);
                        bar.set_message(Stage::Waiting.name());
                        Row {
                            bar,
                            stage: Stage::Waiting,
                            total: 0,
                        }
                    })
                    .collect();
            }
            Event::Layer {
                layer,
                stage,
                done,
                total,
            } => {
                let Some(r) = rows.get_mut(layer) else {
                    continue;
                };
                if r.stage != stage {
                    r.stage = stage;
                    r.bar.reset();
                    r.bar.set_message(stage.name());
                }
                if total != r.total {
                    r.total = total;
                    bars::set_total(&r.bar, (total > 0).then_some(total));
                }
                r.bar.set_position(done);
                if stage == Stage::Done {
                    r.bar.finish();
                }
            }
            Event::Line(line) => bars.println(&line),
        }
    }
    bars.clear();
}
