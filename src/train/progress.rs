//! What a run tells a person while it trains: a progress bar with the loss
//! terms, lr, speed and ETA on a terminal, or plain periodic log lines when
//! stderr is not one; and `metrics.jsonl`, one JSON object per log step and
//! per evaluation.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MetricsEntry {
    /// Averages over the steps since the previous entry.
    Train { step: usize, epoch: usize, loss: f64, loss_cls: f64, loss_box: f64, lr: f64, images_per_second: f64 },
    /// A val evaluation: the 12 COCO stats.
    Eval { step: usize, epoch: usize, stats: Vec<f64> },
}

impl MetricsEntry {
    pub fn step(&self) -> usize {
        match self {
            Self::Train { step, .. } | Self::Eval { step, .. } => *step,
        }
    }
}

/// Appends to `metrics.jsonl`, keeping the entries in memory for plots.
pub struct MetricsLog {
    path: PathBuf,
    pub entries: Vec<MetricsEntry>,
}

impl MetricsLog {
    /// Opens the log of a run; when resuming from `step`, entries after it
    /// (from the interrupted part) are dropped so the file stays one history.
    pub fn open(path: &Path, resume_step: Option<usize>) -> Result<Self> {
        let mut entries = Vec::new();
        if let (Some(step), Ok(file)) = (resume_step, File::open(path)) {
            for line in BufReader::new(file).lines() {
                let line = line.with_context(|| format!("cannot read {}", path.display()))?;
                if let Ok(entry) = serde_json::from_str::<MetricsEntry>(&line) {
                    if entry.step() <= step {
                        entries.push(entry);
                    }
                }
            }
        }
        let text: String =
            entries.iter().map(|e| serde_json::to_string(e).expect("entries serialise") + "\n").collect();
        std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(Self { path: path.to_path_buf(), entries })
    }

    pub fn push(&mut self, entry: MetricsEntry) -> Result<()> {
        let mut file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot open {}", self.path.display()))?;
        writeln!(file, "{}", serde_json::to_string(&entry).expect("entries serialise"))
            .with_context(|| format!("cannot write {}", self.path.display()))?;
        self.entries.push(entry);
        Ok(())
    }
}

/// Running sums between two log lines.
#[derive(Debug)]
pub struct Window {
    steps: usize,
    images: usize,
    loss_cls: f64,
    loss_box: f64,
    started: Instant,
}

impl Window {
    /// An empty window whose clock starts now.
    pub fn start() -> Self {
        Self { steps: 0, images: 0, loss_cls: 0.0, loss_box: 0.0, started: Instant::now() }
    }

    pub fn add(&mut self, loss_cls: f64, loss_box: f64, images: usize) {
        self.steps += 1;
        self.images += images;
        self.loss_cls += loss_cls;
        self.loss_box += loss_box;
    }

    /// The averaged entry, and a reset window.
    pub fn take(&mut self, step: usize, epoch: usize, lr: f64) -> MetricsEntry {
        let n = self.steps.max(1) as f64;
        let seconds = self.started.elapsed().as_secs_f64();
        let entry = MetricsEntry::Train {
            step,
            epoch,
            loss: (self.loss_cls + self.loss_box) / n,
            loss_cls: self.loss_cls / n,
            loss_box: self.loss_box / n,
            lr,
            images_per_second: if seconds > 0.0 { self.images as f64 / seconds } else { 0.0 },
        };
        *self = Self::start();
        entry
    }
}

/// The bar (on a terminal) or log lines (otherwise).
pub struct Progress {
    bar: Option<ProgressBar>,
    total: usize,
    started: Instant,
    first_step: usize,
}

impl Progress {
    pub fn new(total_steps: usize, start_step: usize) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(total_steps as u64).with_style(
                ProgressStyle::with_template("{prefix} {bar:25} {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]")
                    .expect("valid template"),
            );
            bar.set_position(start_step as u64);
            bar
        });
        Self { bar, total: total_steps, started: Instant::now(), first_step: start_step }
    }

    /// Shows a train entry: updates the bar, or prints one line.
    pub fn show(&self, entry: &MetricsEntry) {
        let MetricsEntry::Train { step, epoch, loss, loss_cls, loss_box, lr, images_per_second } = entry else {
            return;
        };
        let text =
            format!("loss {loss:.4} (cls {loss_cls:.4} box {loss_box:.4}) lr {lr:.2e} {images_per_second:.1} img/s");
        match &self.bar {
            Some(bar) => {
                bar.set_prefix(format!("epoch {epoch}"));
                bar.set_message(text);
                bar.set_position(*step as u64);
            }
            None => eprintln!("step {step}/{} epoch {epoch} {text} eta {}", self.total, self.eta(*step)),
        }
    }

    /// Prints a line without breaking the bar.
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn eta(&self, step: usize) -> String {
        let done = step.saturating_sub(self.first_step);
        if done == 0 {
            return "?".into();
        }
        let per_step = self.started.elapsed().as_secs_f64() / done as f64;
        let seconds = (per_step * self.total.saturating_sub(step) as f64) as u64;
        format!("{}m{:02}s", seconds / 60, seconds % 60)
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
