//! The config schema: one struct per table of the TOML file, every key with
//! its default (the paper's and torchvision's values unless a comment says
//! otherwise), and the range checks that types alone cannot express.

use anyhow::{bail, Result};
use serde::{Deserialize, Serialize};

use super::augment::AugmentConfig;
use super::presets::DEFAULT_PRESET;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Preset name or file this config inherits from ("" for none).
    pub base: String,
    /// Run name, used for the default output folder `runs/<name>`.
    pub name: String,
    pub data: DataConfig,
    pub input: InputConfig,
    pub model: ModelConfig,
    pub loss: LossConfig,
    pub train: TrainConfig,
    pub eval: EvalConfig,
    pub runtime: RuntimeConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            base: String::new(),
            name: DEFAULT_PRESET.to_string(),
            data: DataConfig::default(),
            input: InputConfig::default(),
            model: ModelConfig::default(),
            loss: LossConfig::default(),
            train: TrainConfig::default(),
            eval: EvalConfig::default(),
            runtime: RuntimeConfig::default(),
        }
    }
}

/// Where the dataset lives and how it is read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataConfig {
    /// Dataset folder. Empty: the synthetic shapes set, generated on first
    /// use into the cache folder (see `data.synth`).
    pub root: String,
    /// The layout of `root` (docs/FORMATS.md); `auto` detects it.
    pub format: DataFormat,
    /// COCO: training annotations, relative to `root`.
    pub train: String,
    /// COCO: validation annotations, relative to `root`.
    pub val: String,
    /// COCO: image folder, relative to `root`.
    pub images: String,
    /// Pascal VOC: what `difficult` boxes become.
    pub voc_difficult: VocDifficult,
    /// How category ids become labels.
    pub label_mode: LabelMode,
    /// Drop training images without annotations (they are kept as negatives
    /// by default).
    pub drop_empty: bool,
    /// Skip (and count) images that are missing or cannot be decoded,
    /// instead of stopping with an error.
    pub skip_bad_images: bool,
    /// Class names, filled in from the dataset when a run starts. Pascal VOC
    /// reads them from here when set (else from the XML files, sorted).
    pub classes: Vec<String>,
    /// The COCO category id of each of `classes`, likewise.
    pub category_ids: Vec<u64>,
    pub synth: SynthConfig,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            root: String::new(),
            format: DataFormat::Auto,
            train: "annotations/instances_train.json".into(),
            val: "annotations/instances_val.json".into(),
            images: "images".into(),
            voc_difficult: VocDifficult::Ignore,
            label_mode: LabelMode::Contiguous,
            drop_empty: false,
            skip_bad_images: false,
            classes: Vec::new(),
            category_ids: Vec::new(),
            synth: SynthConfig::default(),
        }
    }
}

/// The layout of a dataset folder (`data.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// Detected from the folder: COCO, then Pascal VOC, YOLO and CSV.
    Auto,
    /// COCO detection JSON (`data.train`, `data.val`, `data.images`).
    Coco,
    /// Pascal VOC XML: the devkit layout or `annotations/` + `images/`.
    Voc,
    /// Ultralytics YOLO: `data.yaml`, `images/<split>/`, `labels/<split>/`.
    Yolo,
    /// keras-retinanet's CSV: `<split>.csv` and `classes.csv`.
    Csv,
}

/// What a Pascal VOC `difficult` box becomes (`data.voc_difficult`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VocDifficult {
    /// An ignored region, as VOC's own evaluation treats it: neither
    /// foreground nor background in training, ignored in evaluation (a crowd
    /// box).
    Ignore,
    /// An ordinary box.
    Train,
    /// Left out.
    Drop,
}

/// How dataset category ids become model labels (`data.label_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LabelMode {
    /// Categories sorted by id get labels 0, 1, 2, ...
    #[default]
    Contiguous,
    /// The label is the category id itself (torchvision's COCO weights).
    CategoryId,
}

/// The synthetic shapes dataset used when `data.root` is empty.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SynthConfig {
    pub train: usize,
    pub val: usize,
    /// Square image side in pixels.
    pub size: u32,
    pub seed: u64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self { train: 2000, val: 200, size: 192, seed: 0 }
    }
}

/// The model's input transform (torchvision's GeneralizedRCNNTransform).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct InputConfig {
    /// Target short side; training picks one per image at random, evaluation
    /// uses the last.
    pub min_size: Vec<u32>,
    /// Cap on the long side.
    pub max_size: u32,
    /// Batches are zero-padded to a multiple of this.
    pub size_divisible: u32,
    /// Per-channel mean and std of RGB in [0, 1] (ImageNet's by default).
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Probability of a horizontal flip in training.
    pub hflip_prob: f32,
    /// Training-time augmentations beyond flips and `min_size` (each off
    /// by default).
    pub augment: AugmentConfig,
}

impl Default for InputConfig {
    fn default() -> Self {
        Self {
            min_size: vec![800],
            max_size: 1333,
            size_divisible: 32,
            mean: [0.485, 0.456, 0.406],
            std: [0.229, 0.224, 0.225],
            hflip_prob: 0.5,
            augment: AugmentConfig::default(),
        }
    }
}

/// Normalisation layers of the backbone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BackboneNorm {
    /// Fixed statistics and affine (pretrained backbones); folded into the
    /// preceding convolution at load time.
    FrozenBn,
    /// BatchNorm with batch statistics in training, running ones in eval.
    Bn,
    /// GroupNorm (`model.backbone.gn_groups` groups).
    Gn,
}

/// How backbone convolutions start when not loaded from weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConvInit {
    /// torchvision's ResNet: `kaiming_normal_(mode="fan_out", nonlinearity="relu")`.
    KaimingFanOut,
    /// PyTorch's `nn.Conv2d` default, `kaiming_uniform_(a=sqrt(5))`:
    /// U(+-1/sqrt(fan_in)), about 2.4x smaller. Behind BatchNorm a smaller
    /// weight only raises the effective learning rate of the layer, which
    /// trains small bodies from scratch faster (BENCHMARKS.md, quickstart).
    TorchDefault,
}

/// Where P6 is computed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum P6Source {
    /// torchvision v1: `LastLevelP6P7(256, 256)` on P5.
    P5,
    /// The paper, detectron2 and torchvision v2: on C5.
    C5,
}

/// Normalisation in the head towers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HeadNorm {
    None,
    /// GroupNorm([`HEAD_GN_GROUPS`]) after each tower conv, as torchvision v2.
    Gn,
}

/// Groups of the head's GroupNorm (`model.head.norm = "gn"`), torchvision
/// v2's `GroupNorm(32)`.
pub const HEAD_GN_GROUPS: usize = 32;

/// Pyramid levels P3-P7: one anchor size each.
pub const PYRAMID_LEVELS: usize = 5;

/// Anchor conventions differ in rounding and ordering.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AnchorConvention {
    /// Integer-truncated sizes, rounded base anchors, ratio-major order,
    /// stride = padded size // grid size.
    Torchvision,
    /// Float sizes, size-major order, exact strides.
    Detectron2,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelConfig {
    /// Classification outputs; 0 takes the number from the dataset.
    pub num_classes: usize,
    pub backbone: BackboneConfig,
    pub fpn: FpnConfig,
    pub head: HeadConfig,
    pub anchors: AnchorConfig,
    pub box_coder: BoxCoderConfig,
    pub postprocess: PostprocessConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackboneConfig {
    /// ResNet depth: 18, 34 (BasicBlock), 50, 101 (Bottleneck).
    pub depth: usize,
    /// Stem channels; torchvision's ResNets use 64. Stage widths scale with it.
    pub width: usize,
    pub norm: BackboneNorm,
    /// BatchNorm epsilon: 0.0 for torchvision's COCO RetinaNet weights,
    /// 1e-5 for PyTorch's default.
    pub norm_eps: f64,
    /// Groups when `norm = "gn"`.
    pub gn_groups: usize,
    /// Initialisation of the convolutions (ignored for loaded weights).
    pub init: ConvInit,
    /// torchvision's `zero_init_residual`: the last norm of each residual
    /// block starts with a zero scale, so every block starts as the
    /// identity (ignored for loaded weights).
    pub zero_init_residual: bool,
    /// detectron2's FREEZE_AT: 0 trains everything, 1 freezes the stem,
    /// 2 the stem and layer1, and so on.
    pub freeze_at: usize,
    /// Pretrained weights: "" for none, a local .safetensors path, or
    /// `hf:<repo>[/<file>]`.
    pub weights: String,
}

impl Default for BackboneConfig {
    fn default() -> Self {
        Self {
            depth: 50,
            width: 64,
            norm: BackboneNorm::FrozenBn,
            norm_eps: 1e-5,
            gn_groups: 32,
            init: ConvInit::KaimingFanOut,
            zero_init_residual: false,
            freeze_at: 2,
            weights: String::new(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FpnConfig {
    /// Channels of P3-P7 (and of the head towers).
    pub channels: usize,
    pub p6_from: P6Source,
}

impl Default for FpnConfig {
    fn default() -> Self {
        Self { channels: 256, p6_from: P6Source::P5 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HeadConfig {
    /// Convolutions in each tower before the output layer.
    pub num_convs: usize,
    pub norm: HeadNorm,
    /// Initial foreground probability of every anchor (sets the cls bias).
    pub prior_prob: f64,
}

impl Default for HeadConfig {
    fn default() -> Self {
        Self { num_convs: 4, norm: HeadNorm::None, prior_prob: 0.01 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AnchorConfig {
    /// Base anchor size on each level P3..P7.
    pub sizes: Vec<f64>,
    /// Scales applied to each base size.
    pub scales: Vec<f64>,
    /// Aspect ratios h / w.
    pub ratios: Vec<f64>,
    pub convention: AnchorConvention,
}

impl Default for AnchorConfig {
    fn default() -> Self {
        Self {
            sizes: vec![32.0, 64.0, 128.0, 256.0, 512.0],
            scales: vec![1.0, 2f64.powf(1.0 / 3.0), 2f64.powf(2.0 / 3.0)],
            ratios: vec![0.5, 1.0, 2.0],
            convention: AnchorConvention::Torchvision,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BoxCoderConfig {
    /// Weights (wx, wy, ww, wh) of the encoded deltas.
    pub weights: [f64; 4],
}

impl Default for BoxCoderConfig {
    fn default() -> Self {
        Self { weights: [1.0; 4] }
    }
}

/// torchvision's RetinaNet postprocess parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostprocessConfig {
    /// Per level, keep (anchor, class) pairs scoring above this.
    pub score_thresh: f64,
    /// Per level, keep at most this many candidates.
    pub topk_candidates: usize,
    /// Class-wise NMS: suppress boxes with IoU above this.
    pub nms_thresh: f64,
    /// NMS across classes as well: a box also suppresses lower-scoring boxes
    /// of other classes (Ultralytics' `agnostic_nms`). Off in torchvision
    /// and detectron2, whose NMS is class-wise.
    pub class_agnostic_nms: bool,
    /// Keep the best this many detections per image.
    pub detections_per_img: usize,
}

impl Default for PostprocessConfig {
    fn default() -> Self {
        Self {
            score_thresh: 0.05,
            topk_candidates: 1000,
            nms_thresh: 0.5,
            class_agnostic_nms: false,
            detections_per_img: 300,
        }
    }
}

/// Box regression loss on foreground anchors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BoxLoss {
    L1,
    SmoothL1,
    Giou,
}

/// Which rule makes anchors foreground (`loss.matcher`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MatcherKind {
    /// torchvision and detectron2: IoU >= `fg_iou_thresh` is foreground,
    /// below `bg_iou_thresh` background, in between ignored.
    MaxIou,
    /// ATSS (mmdetection's `ATSSAssigner`): per box, the `atss_topk` anchors
    /// nearest its centre on each level, foreground at IoU >= their mean +
    /// std with the centre inside the box; no ignored band. The IoU
    /// thresholds are unused.
    Atss,
}

/// How the summed losses are normalised.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossNormalizer {
    /// torchvision: per image, sum / max(1, foreground anchors), then mean.
    PerImage,
    /// detectron2: batch sum / EMA of the foreground count.
    Ema,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LossConfig {
    pub focal_alpha: f64,
    pub focal_gamma: f64,
    pub box_loss: BoxLoss,
    /// Beta of the smooth L1 loss.
    pub smooth_l1_beta: f64,
    /// Weight of the box-regression term in the total loss (torchvision and
    /// detectron2: 1; mmdetection's GIoU-trained heads such as ATSS and GFL: 2).
    pub box_weight: f64,
    pub normalizer: LossNormalizer,
    /// How anchors are matched to boxes.
    pub matcher: MatcherKind,
    /// ATSS candidates per pyramid level and box (`matcher = "atss"`).
    pub atss_topk: usize,
    /// Anchors with IoU >= this are foreground.
    pub fg_iou_thresh: f64,
    /// Anchors with IoU < this are background; between the two, ignored.
    pub bg_iou_thresh: f64,
    /// Give each ground-truth box its best anchors even below `fg_iou_thresh`.
    pub allow_low_quality_matches: bool,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            focal_alpha: 0.25,
            focal_gamma: 2.0,
            box_loss: BoxLoss::L1,
            smooth_l1_beta: 0.1,
            box_weight: 1.0,
            matcher: MatcherKind::MaxIou,
            atss_topk: 9,
            normalizer: LossNormalizer::PerImage,
            fg_iou_thresh: 0.5,
            bg_iou_thresh: 0.4,
            allow_low_quality_matches: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// SGD with momentum and weight decay.
    Sgd,
    AdamW,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LrSchedule {
    /// Multiply by `lr_gamma` at each of `lr_steps`.
    Multistep,
    /// Cosine decay from `lr` to 0 over the run.
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    F32,
    Bf16,
    F16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub epochs: usize,
    /// Total optimiser steps; 0 derives it from `epochs`. When set, it wins.
    pub max_steps: usize,
    pub batch_size: usize,
    pub seed: u64,
    /// Steps between checkpoints (one is also written at the end).
    pub checkpoint_every: usize,
    /// Epochs between evaluations on the val split (0: only at the end).
    pub eval_every: usize,
    /// Steps between evaluations as well (0: none by steps).
    pub eval_every_steps: usize,
    /// Stop after this many evaluations in a row without a better val AP
    /// (0: never stop early).
    pub patience: usize,
    /// Decay of an exponential moving average of the weights and BatchNorm
    /// statistics, used for evaluation, `best` and the final weights
    /// (0: none; Ultralytics uses 0.9999).
    pub ema_decay: f64,
    /// The average's decay ramps up as `ema_decay * (1 - exp(-step /
    /// ema_warmup_steps))` (Ultralytics' `ModelEMA` tau).
    pub ema_warmup_steps: usize,
    /// Steps between log lines and `metrics.jsonl` entries.
    pub log_every: usize,
    pub optimizer: OptimizerKind,
    /// Base learning rate for `batch_size` images per step.
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// No weight decay on normalisation and bias parameters.
    pub no_decay_norm_bias: bool,
    /// Linear warmup length in steps, starting at `warmup_factor * lr`.
    pub warmup_steps: usize,
    pub warmup_factor: f64,
    pub schedule: LrSchedule,
    /// Steps at which the multistep schedule decays.
    pub lr_steps: Vec<usize>,
    pub lr_gamma: f64,
    /// Clip gradients to this global L2 norm (0: no clipping).
    pub clip_grad_norm: f64,
    /// "f32", or "bf16" mixed precision: the layers compute in bf16, while
    /// parameters, gradients, optimiser state and losses stay f32. ("f16"
    /// would need loss scaling, which is not built.)
    pub precision: Precision,
    /// Image decoding threads of the loader.
    pub workers: usize,
    /// Batches decoded ahead of the training step.
    pub prefetch: usize,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            epochs: 12,
            max_steps: 0,
            batch_size: 16,
            seed: 0,
            checkpoint_every: 1000,
            eval_every: 1,
            eval_every_steps: 0,
            patience: 0,
            ema_decay: 0.0,
            ema_warmup_steps: 2000,
            log_every: 20,
            optimizer: OptimizerKind::Sgd,
            lr: 0.01,
            momentum: 0.9,
            weight_decay: 1e-4,
            no_decay_norm_bias: false,
            warmup_steps: 1000,
            warmup_factor: 0.001,
            schedule: LrSchedule::Multistep,
            lr_steps: Vec::new(),
            lr_gamma: 0.1,
            clip_grad_norm: 0.0,
            precision: Precision::F32,
            workers: 2,
            prefetch: 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// Images per inference batch.
    pub batch_size: usize,
    /// COCOeval maxDets.
    pub max_dets: Vec<usize>,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self { batch_size: 8, max_dets: vec![1, 10, 100] }
    }
}

/// Which kernels the process runs; the model and the recipe do not change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// On CUDA: "fused" runs this project's ops (cuDNN convolutions with
    /// their own backward, in a `cudnn` build), "stock" Candle's ops
    /// everywhere, to fall back while the fused path is unproven.
    pub cuda_kernels: CudaKernels,
    /// f32 convolutions on CUDA may use TF32 tensor cores (PyTorch's
    /// default for convolutions, `torch.backends.cudnn.allow_tf32`).
    pub tf32: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self { cuda_kernels: CudaKernels::Fused, tf32: true }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CudaKernels {
    Fused,
    Stock,
}

impl Config {
    /// Checks value ranges that types alone cannot express; errors name the
    /// key.
    pub fn validate(&self) -> Result<()> {
        self.model.validate()?;
        if self.input.min_size.is_empty() || self.input.min_size.contains(&0) {
            bail!("config key input.min_size: expected a non-empty list of positive sizes");
        }
        if self.input.size_divisible == 0 {
            bail!("config key input.size_divisible: expected a positive integer");
        }
        if self.train.batch_size == 0 {
            bail!("config key train.batch_size: expected a positive integer");
        }
        if !(0.0..=1.0).contains(&self.input.hflip_prob) {
            bail!("config key input.hflip_prob: expected a probability in [0, 1]");
        }
        self.input.augment.validate()?;
        self.loss.validate()?;
        if !(0.0..1.0).contains(&self.train.ema_decay) {
            bail!("config key train.ema_decay: expected a decay in [0, 1), got {}", self.train.ema_decay);
        }
        if self.train.ema_decay > 0.0 && self.train.ema_warmup_steps == 0 {
            bail!("config key train.ema_warmup_steps: expected a positive number of steps");
        }
        Ok(())
    }
}

impl LossConfig {
    /// Checks each key's range, naming the key.
    pub fn validate(&self) -> Result<()> {
        if !(0.0..=1.0).contains(&self.focal_alpha) {
            bail!("config key loss.focal_alpha: expected a weight in [0, 1], got {}", self.focal_alpha);
        }
        if !(self.focal_gamma >= 0.0 && self.focal_gamma.is_finite()) {
            bail!("config key loss.focal_gamma: expected a finite value >= 0, got {}", self.focal_gamma);
        }
        if !(self.box_weight > 0.0 && self.box_weight.is_finite()) {
            bail!("config key loss.box_weight: expected a finite weight > 0, got {}", self.box_weight);
        }
        if !(self.smooth_l1_beta >= 0.0 && self.smooth_l1_beta.is_finite()) {
            bail!("config key loss.smooth_l1_beta: expected a finite value >= 0, got {}", self.smooth_l1_beta);
        }
        if self.atss_topk == 0 {
            bail!("config key loss.atss_topk: expected a positive integer");
        }
        let (fg, bg) = (self.fg_iou_thresh, self.bg_iou_thresh);
        if !((0.0..=1.0).contains(&fg) && (0.0..=1.0).contains(&bg) && bg <= fg) {
            bail!("config key loss.fg_iou_thresh / bg_iou_thresh: expected 0 <= bg_iou_thresh <= fg_iou_thresh <= 1, got {fg} / {bg}");
        }
        Ok(())
    }
}

impl ModelConfig {
    /// Checks each key's own range, naming the key. What depends on several
    /// keys (group counts that must divide channel counts) and on the class
    /// count (0 here means "from the dataset") is checked when the model is
    /// built.
    pub fn validate(&self) -> Result<()> {
        let b = &self.backbone;
        if ![18, 34, 50, 101].contains(&b.depth) {
            bail!("config key model.backbone.depth: expected 18, 34, 50 or 101, got {}", b.depth);
        }
        let a = &self.anchors;
        if a.sizes.len() != PYRAMID_LEVELS || a.sizes.iter().any(|&s| s <= 0.0) {
            bail!(
                "config key model.anchors.sizes: expected {PYRAMID_LEVELS} positive sizes (P3-P7), got {:?}",
                a.sizes
            );
        }
        if a.scales.is_empty() || a.scales.iter().any(|&s| s <= 0.0) {
            bail!("config key model.anchors.scales: expected positive scales, got {:?}", a.scales);
        }
        if a.ratios.is_empty() || a.ratios.iter().any(|&r| r <= 0.0) {
            bail!("config key model.anchors.ratios: expected positive ratios, got {:?}", a.ratios);
        }
        if !(self.head.prior_prob > 0.0 && self.head.prior_prob < 1.0) {
            bail!("config key model.head.prior_prob: expected a probability in (0, 1), got {}", self.head.prior_prob);
        }
        if b.width == 0 || self.fpn.channels == 0 {
            bail!("config key model.backbone.width / fpn.channels: expected positive channel counts");
        }
        Ok(())
    }
}
