//! Command-line contract of the `retinanet` binary (docs/CLI.md).
//!
//! Outside scripts call these commands exactly as written here: keep the
//! names, flags and outputs stable.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "retinanet",
    version,
    about = "Train, evaluate and run RetinaNet object detectors on COCO, Pascal VOC, YOLO or CSV datasets",
    long_about = "Train, evaluate and run RetinaNet object detectors on COCO, Pascal VOC, YOLO or CSV datasets, \
on CPU, CUDA or Metal. `retinanet train` with no arguments trains the `shapes` preset \
on a synthetic dataset it generates on first use."
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Train a detector (default: the `shapes` preset on synthetic data).
    Train(TrainArgs),
    /// Score a model on a split, or a COCO results file against ground truth.
    Eval(EvalArgs),
    /// Run a model on images or folders and draw or print its detections.
    Predict(PredictArgs),
    /// Generate the synthetic shapes dataset (COCO layout).
    Synth(SynthArgs),
    /// Validate a dataset and print its statistics (exit 1 on a problem).
    Inspect(InspectArgs),
    /// Write a dataset of any readable format (COCO, Pascal VOC, YOLO, CSV)
    /// in the COCO layout.
    Convert(ConvertArgs),
    /// Write a weights file (safetensors or a PyTorch .pth/.pt) as safetensors.
    ConvertWeights(ConvertWeightsArgs),
    /// Time a training step or inference on random data.
    Bench(BenchArgs),
}

impl Command {
    /// Whether the command runs a model without training it: `eval`,
    /// `predict` and `bench --mode infer` (the allocator is set up for
    /// that, see `runtime::configure`).
    pub(crate) fn only_infers(&self) -> bool {
        match self {
            Command::Eval(_) | Command::Predict(_) => true,
            Command::Bench(args) => matches!(args.mode, BenchModeArg::Infer),
            _ => false,
        }
    }
}

/// Options shared by every command that reads a config.
#[derive(Debug, Args, Clone, Default)]
pub(crate) struct ConfigArgs {
    /// Preset name (shapes, bccd, finetune, finetune_coco,
    /// retinanet_r50_fpn_coco, torchvision_retinanet_r50_fpn,
    /// torchvision_retinanet_r50_fpn_v2) or path to a TOML config.
    #[arg(long, value_name = "CFG")]
    pub config: Option<String>,
    /// Override a config key, e.g. `--set train.batch_size=8`
    /// (VALUE is parsed as TOML, falling back to a string). Repeatable.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,
}

/// `--device`, shared by every command that runs a model.
#[derive(Debug, Args, Clone)]
pub(crate) struct DeviceArg {
    /// Device: auto, cpu, cuda, cuda:N, metal, metal:N.
    #[arg(id = "device", long = "device", default_value = "auto", value_name = "D")]
    pub spec: String,
}

#[derive(Debug, Args)]
pub(crate) struct TrainArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(flatten)]
    pub device: DeviceArg,
    /// Run folder (default runs/<config-name>, suffixed -2, -3 ... if taken).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Continue a run exactly: a run folder or a checkpoint folder.
    #[arg(long, value_name = "RUN_OR_CKPT")]
    pub resume: Option<PathBuf>,
    /// Data-parallel training on these CUDA GPUs, one process each, e.g.
    /// `0,1,2,3` (needs a build with `--features nccl`). `train.batch_size`
    /// is per GPU; rank 0 logs, evaluates and checkpoints.
    #[arg(long, value_name = "LIST", conflicts_with = "device")]
    pub gpus: Option<String>,
}

#[derive(Debug, Args)]
pub(crate) struct EvalArgs {
    /// Model weights: a run folder, a checkpoint folder, a .safetensors or
    /// PyTorch .pth/.pt file, or hf:<owner>/<repo>[@<revision>][/<file>].
    #[arg(long, value_name = "W", conflicts_with_all = ["gt", "dt"])]
    pub weights: Option<PathBuf>,
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Split to evaluate with --weights (train, val, or an annotation file name).
    #[arg(long, default_value = "val")]
    pub split: String,
    #[command(flatten)]
    pub device: DeviceArg,
    /// Output folder for detections and precision-recall plots.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// COCO ground-truth annotation file (scoring without a model).
    #[arg(long, value_name = "GT.json", requires = "dt")]
    pub gt: Option<PathBuf>,
    /// COCO results file to score against --gt.
    #[arg(long, value_name = "DT.json", requires = "gt")]
    pub dt: Option<PathBuf>,
    /// Print exactly one JSON object on stdout and nothing else there.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct PredictArgs {
    /// Model weights: a run folder, a checkpoint folder, a .safetensors or
    /// PyTorch .pth/.pt file, or hf:<owner>/<repo>[@<revision>][/<file>].
    #[arg(long, value_name = "W")]
    pub weights: PathBuf,
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Image files or folders of images.
    #[arg(value_name = "INPUT", required_unless_present = "split", conflicts_with = "split")]
    pub inputs: Vec<PathBuf>,
    /// Instead of INPUT: a split of the config's dataset (train, val, or a
    /// file naming one); predictions.json then has the split's image ids,
    /// for `eval --gt --dt`. Nothing is drawn.
    #[arg(long, value_name = "S")]
    pub split: Option<String>,
    /// Output folder for drawn images and predictions.json.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Keep detections scoring at least this.
    #[arg(long, value_name = "X")]
    pub score_thresh: Option<f32>,
    #[command(flatten)]
    pub device: DeviceArg,
    /// Print the detections as one JSON array on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct SynthArgs {
    /// Dataset folder to write (images/ and annotations/ inside).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// Number of training images.
    #[arg(long, default_value_t = 2000, value_name = "N")]
    pub train: usize,
    /// Number of validation images.
    #[arg(long, default_value_t = 200, value_name = "N")]
    pub val: usize,
    /// Image side in pixels (square images).
    #[arg(long, default_value_t = 192, value_name = "PX")]
    pub size: u32,
    /// Random seed: the same seed gives byte-identical files.
    #[arg(long, default_value_t = 0, value_name = "S")]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub(crate) struct InspectArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Split to inspect: train, val, or an annotation file relative to data.root.
    #[arg(long, default_value = "train", value_name = "S")]
    pub split: String,
    /// Folder to draw sample images with their boxes into.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// With --out: draw the training images as the model sees them, after
    /// the augmentations of `input.augment`, flips and resizing.
    #[arg(long, requires = "out")]
    pub augmented: bool,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub(crate) struct ConvertArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Folder to write (images/ and annotations/ inside); it must not exist
    /// or be empty.
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub(crate) struct ConvertWeightsArgs {
    /// Weights: a .safetensors file, a PyTorch .pth/.pt checkpoint, or
    /// hf:<owner>/<repo>[@REV][/<file>].
    #[arg(value_name = "IN")]
    pub input: String,
    /// The safetensors file to write.
    #[arg(long, value_name = "OUT.safetensors")]
    pub out: PathBuf,
    /// Check the weights against this config's model first (a whole
    /// detector, or an ImageNet backbone).
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// `--mode` of `bench` (the library's `BenchMode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub(crate) enum BenchModeArg {
    Train,
    Infer,
}

#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// What to time: a full training step, or inference.
    #[arg(long, value_enum, default_value_t = BenchModeArg::Train)]
    pub mode: BenchModeArg,
    /// Input height in pixels (and width, unless --width is given).
    #[arg(long, default_value_t = 512, value_name = "PX")]
    pub size: u32,
    /// Input width in pixels (default: --size).
    #[arg(long, value_name = "PX")]
    pub width: Option<u32>,
    /// Images per step.
    #[arg(long, default_value_t = 2, value_name = "B")]
    pub batch: usize,
    /// Timed steps after warm-up.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub steps: usize,
    #[command(flatten)]
    pub device: DeviceArg,
    /// Print exactly one JSON object on stdout.
    #[arg(long)]
    pub json: bool,
}
