//! Training: batch -> loss -> gradients -> step. Anchor matching and loss
//! targets (`matcher`, `atss`, `targets`), the losses (`loss`), optimisers and the
//! learning-rate schedule (`optim`, `schedule`), one step (`step`), the
//! data-parallel gradient average (`distributed`) and how its ranks meet
//! (`rendezvous`), and the loop that ties
//! them to the run folder (`trainer`, `metrics`); `bench` times a step.

mod atss;
mod bench;
mod distributed;
mod ema;
mod loss;
mod matcher;
mod metrics;
mod optim;
mod rendezvous;
mod schedule;
mod step;
mod targets;
mod trainer;

pub use bench::{run as bench, BenchMode, BenchReport};
pub use distributed::{any_rank, Collective, SingleProcess};
#[cfg(feature = "nccl")]
pub use distributed::{new_group_id, NcclGroup};
pub use metrics::MetricsEntry;
pub use rendezvous::{meet, Master, Place, RENDEZVOUS_TIMEOUT_ENV};
pub use step::{StepOutcome, StepRunner, StepValues};
pub use trainer::{EventSink, Start, TrainEvent, TrainOutcome, Trainer};
