//! Training: anchor matching, losses, optimisers, schedules, checkpoints.

pub mod checkpoint;
pub mod distributed;
pub mod loss;
pub mod matcher;
pub mod optim;
pub mod progress;
pub mod schedule;
pub mod step;
pub mod targets;
pub mod trainer;
