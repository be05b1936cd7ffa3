//! What a run records while it trains: `metrics.jsonl`, one JSON object per
//! log step and per evaluation, and `loss.png`, drawn from it.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use super::step::StepValues;
use crate::viz::plot::{write_panels, Panel};

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MetricsEntry {
    /// Averages over the steps since the previous entry; `grad_norm` is the
    /// mean and `grad_norm_max` the largest global L2 norm of the gradients
    /// before clipping (as mmdetection logs it), 0 in logs written before
    /// they were recorded.
    Train {
        step: usize,
        epoch: usize,
        loss: f64,
        loss_cls: f64,
        loss_box: f64,
        #[serde(default)]
        grad_norm: f64,
        #[serde(default)]
        grad_norm_max: f64,
        lr: f64,
        images_per_second: f64,
    },
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
    grad_norm: f64,
    grad_norm_max: f64,
    started: Instant,
}

impl Window {
    /// An empty window whose clock starts now.
    pub(super) fn start() -> Self {
        Self {
            steps: 0,
            images: 0,
            loss_cls: 0.0,
            loss_box: 0.0,
            grad_norm: 0.0,
            grad_norm_max: 0.0,
            started: Instant::now(),
        }
    }

    pub(super) fn add(&mut self, step: &StepValues, images: usize) {
        self.steps += 1;
        self.images += images;
        self.loss_cls += step.loss_cls;
        self.loss_box += step.loss_box;
        self.grad_norm += step.grad_norm;
        self.grad_norm_max = self.grad_norm_max.max(step.grad_norm);
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
            grad_norm: self.grad_norm / n,
            grad_norm_max: self.grad_norm_max,
            lr,
            images_per_second: if seconds > 0.0 { self.images as f64 / seconds } else { 0.0 },
        };
        *self = Self::start();
        entry
    }
}

/// loss.png: the loss terms, the gradient norm and the learning rate
/// against the step.
pub(super) fn write_loss_plot(path: &Path, entries: &[MetricsEntry]) -> Result<()> {
    let mut series: [Vec<(f64, f64)>; 6] = Default::default();
    for e in entries {
        if let MetricsEntry::Train { step, loss, loss_cls, loss_box, grad_norm, grad_norm_max, lr, .. } = e {
            let x = *step as f64;
            for (s, y) in series.iter_mut().zip([*loss, *loss_cls, *loss_box, *grad_norm, *grad_norm_max, *lr]) {
                s.push((x, y));
            }
        }
    }
    let [total, cls, bx, norm, norm_max, lr] = series;
    let panels = [
        Panel {
            title: "training loss".into(),
            x_desc: "step".into(),
            y_desc: "loss".into(),
            series: vec![("total".into(), total), ("classification".into(), cls), ("box regression".into(), bx)],
        },
        Panel {
            title: "gradient norm (before clipping)".into(),
            x_desc: "step".into(),
            y_desc: "L2 norm".into(),
            series: vec![("mean".into(), norm), ("largest".into(), norm_max)],
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

#[cfg(test)]
mod tests {
    use super::*;

    fn values(loss_cls: f64, grad_norm: f64) -> StepValues {
        StepValues { loss_cls, loss_box: 0.5, grad_norm }
    }

    #[test]
    fn a_window_averages_the_gradient_norm_and_keeps_its_largest() {
        let mut window = Window::start();
        for (cls, norm) in [(1.0, 2.0), (0.5, 9.0), (0.0, 1.0)] {
            window.add(&values(cls, norm), 4);
        }
        let MetricsEntry::Train { loss_cls, loss_box, grad_norm, grad_norm_max, .. } = window.take(3, 0, 0.01) else {
            panic!("a window gives a train entry");
        };
        assert_eq!((loss_cls, loss_box, grad_norm, grad_norm_max), (0.5, 0.5, 4.0, 9.0));
        // The window starts again empty.
        window.add(&values(0.0, 3.0), 4);
        let MetricsEntry::Train { grad_norm_max, .. } = window.take(4, 0, 0.01) else { unreachable!() };
        assert_eq!(grad_norm_max, 3.0);
    }

    #[test]
    fn a_log_written_before_gradient_norms_still_reads() {
        let line = r#"{"kind":"train","step":10,"epoch":0,"loss":1.5,"loss_cls":1.0,"loss_box":0.5,"lr":0.001,"images_per_second":2.0}"#;
        let entry: MetricsEntry = serde_json::from_str(line).unwrap();
        let MetricsEntry::Train { step, grad_norm, grad_norm_max, .. } = entry else { panic!("a train entry") };
        assert_eq!((step, grad_norm, grad_norm_max), (10, 0.0, 0.0));
    }
}
