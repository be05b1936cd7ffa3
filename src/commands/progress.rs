//! What `retinanet train` shows while it trains: a progress bar with the
//! loss terms, lr, speed and ETA on a terminal, or plain periodic log lines
//! when stderr is not one, with the trainer's warnings and notes between.

use std::io::IsTerminal;
use std::time::Instant;

use candle_retinanet::train::{MetricsEntry, TrainEvent};
use indicatif::{ProgressBar, ProgressStyle};

/// Shows a run's events; the bar appears when training starts.
#[derive(Default)]
pub(super) struct TrainDisplay {
    progress: Option<Progress>,
}

impl TrainDisplay {
    pub(super) fn show(&mut self, event: TrainEvent<'_>) {
        match event {
            TrainEvent::Warning(line) => self.println(&format!("warning: {line}")),
            TrainEvent::Note(line) => self.println(&format!("note: {line}")),
            TrainEvent::Started { run, start_step, total_steps } => {
                eprintln!("training for {total_steps} steps; run folder {}", run.root().display());
                self.progress = Some(Progress::new(total_steps, start_step));
            }
            TrainEvent::Logged(entry) => {
                if let Some(progress) = &self.progress {
                    progress.show(entry);
                }
            }
            TrainEvent::Evaluating { step, images } => {
                self.println(&format!("evaluating on {images} val images at step {step}"))
            }
            TrainEvent::Evaluated { step, result } => {
                self.println(&format!("step {step}: AP {:.4} AP50 {:.4}", result.stats[0], result.stats[1]));
            }
        }
    }

    /// Clears the bar when training has ended.
    pub(super) fn finish(&self) {
        if let Some(progress) = &self.progress {
            progress.finish();
        }
    }

    fn println(&self, line: &str) {
        match &self.progress {
            Some(progress) => progress.println(line),
            None => eprintln!("{line}"),
        }
    }
}

/// The bar (on a terminal) or log lines (otherwise).
struct Progress {
    bar: Option<ProgressBar>,
    total: usize,
    started: Instant,
    first_step: usize,
}

impl Progress {
    fn new(total_steps: usize, start_step: usize) -> Self {
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
    fn show(&self, entry: &MetricsEntry) {
        let MetricsEntry::Train { step, epoch, loss, loss_cls, loss_box, grad_norm, lr, images_per_second, .. } = entry
        else {
            return;
        };
        let text = format!(
            "loss {loss:.4} (cls {loss_cls:.4} box {loss_box:.4}) grad {grad_norm:.3} lr {lr:.2e} {images_per_second:.1} img/s"
        );
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
    fn println(&self, line: &str) {
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

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
