//! What a run records while it trains: `metrics.jsonl`, one JSON object per
//! log step and per evaluation, and `loss.png`, drawn from it.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::viz::plot::{write_panels, Panel};

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
pub(super) struct MetricsLog {
    path: PathBuf,
    pub entries: Vec<MetricsEntry>,
}

impl MetricsLog {
    /// Opens the log of a run; when resuming from `step`, entries after it
    /// (from the interrupted part) are dropped so the file stays one history.
    pub(super) fn open(path: &Path, resume_step: Option<usize>) -> Result<Self> {
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

    pub(super) fn push(&mut self, entry: MetricsEntry) -> Result<()> {
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
pub(super) struct Window {
    steps: usize,
    images: usize,
    loss_cls: f64,
    loss_box: f64,
    started: Instant,
}

impl Window {
    /// An empty window whose clock starts now.
    pub(super) fn start() -> Self {
        Self { steps: 0, images: 0, loss_cls: 0.0, loss_box: 0.0, started: Instant::now() }
    }

    pub(super) fn add(&mut self, loss_cls: f64, loss_box: f64, images: usize) {
        self.steps += 1;
        self.images += images;
        self.loss_cls += loss_cls;
        self.loss_box += loss_box;
    }

    /// The averaged entry, and a reset window.
    pub(super) fn take(&mut self, step: usize, epoch: usize, lr: f64) -> MetricsEntry {
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

/// loss.png: the loss terms and the learning rate against the step.
pub(super) fn write_loss_plot(path: &Path, entries: &[MetricsEntry]) -> Result<()> {
    let mut series: [Vec<(f64, f64)>; 4] = Default::default();
    for e in entries {
        if let MetricsEntry::Train { step, loss, loss_cls, loss_box, lr, .. } = e {
            let x = *step as f64;
            for (s, y) in series.iter_mut().zip([*loss, *loss_cls, *loss_box, *lr]) {
                s.push((x, y));
            }
        }
    }
    let [total, cls, bx, lr] = series;
    let panels = [
        Panel {
            title: "training loss".into(),
            x_desc: "step".into(),
            y_desc: "loss".into(),
            series: vec![("total".into(), total), ("classification".into(), cls), ("box regression".into(), bx)],
        },
        Panel {
            title: "learning rate".into(),
            x_desc: "step".into(),
            y_desc: "lr".into(),
            series: vec![("lr".into(), lr)],
        },
    ];
    write_panels(path, &panels, (800, 360))
}
