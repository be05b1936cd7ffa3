//! Training: batch -> loss -> gradients -> step. Anchor matching and loss
//! targets (`matcher`, `targets`), the losses (`loss`), optimisers and the
//! learning-rate schedule (`optim`, `schedule`), one step (`step`), the
//! data-parallel gradient average (`distributed`), and the loop that ties
//! them to the run folder (`trainer`, `metrics`); `bench` times a step.

mod bench;
mod distributed;
mod ema;
mod loss;
mod matcher;
mod metrics;
mod optim;
mod schedule;
mod step;
mod targets;
mod trainer;

pub use bench::{run as bench, BenchMode, BenchReport};
pub use distributed::{any_rank, rank_from_env, Collective, SingleProcess, NCCL_ID_ENV, RANK_ENV, WORLD_SIZE_ENV};
#[cfg(feature = "nccl")]
pub use distributed::{new_group_id, NcclGroup};
pub use metrics::MetricsEntry;
pub use step::{StepOutcome, StepRunner};
pub use trainer::{EventSink, Start, TrainEvent, TrainOutcome, Trainer};
