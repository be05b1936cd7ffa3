//! Configuration: what to train and run, and where. Every key has a serde
//! default (`schema`; the augmentations of `input.augment` in `augment`), presets are compiled in (`presets`), a config file
//! may inherit a `base` and `--set a.b=VALUE` overrides any key
//! (`resolve`); `--device` names the Candle device (`device`).
//!
//! A relative `data.root` in a config file is relative to that file's
//! folder; in a preset, to the assets folder ([`assets_dir`]); in `--set`,
//! to the working directory.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use candle_retinanet::config::Config;
//! let config = Config::resolve(Some("bccd"), &["train.batch_size=2".to_string()])?;
//! assert_eq!(config.train.batch_size, 2);
//! # Ok(())
//! # }
//! ```

mod augment;
mod device;
mod presets;
mod resolve;
mod schema;

pub use augment::*;
pub use device::parse_device;
pub use presets::{assets_dir, ASSETS_ENV, DEFAULT_PRESET, PRESETS};
pub use schema::*;
