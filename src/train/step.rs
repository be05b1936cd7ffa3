//! One training step (forward, matching, losses, backward, clipping,
//! optimiser), shared by the trainer and `retinanet bench`.

use candle_core::{DType, Device, Result};
use candle_nn::VarMap;

use super::distributed::{average_over_ranks, Collective, SingleProcess};
use super::ema::WeightEma;
use super::loss::{retinanet_loss, LossTerms, Normalizer};
use super::optim::Optimizer;
use super::targets::{build_targets, AnchorMatcher};
use crate::config::{Config, Precision};
use crate::data::Batch;
use crate::model::{self, LoadedModel, RetinaNet};

/// What one optimiser step reports: the two loss terms (means over the
/// ranks in a data-parallel run) and the gradient norm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepValues {
    pub loss_cls: f64,
    pub loss_box: f64,
    /// Global L2 norm of the gradients before clipping.
    pub grad_norm: f64,
}

/// What a step produced.
#[derive(Debug, Clone, PartialEq)]
pub enum StepOutcome {
    /// The parameters were updated.
    Updated(StepValues),
    /// Nothing was updated: the loss or the gradient is not finite.
    NonFinite { what: &'static str, detail: String },
}

/// The dtype the layers compute in for `precision` (see
/// `RetinaNet::forward`), or an error naming the key.
pub(super) fn compute_dtype(precision: Precision) -> Result<DType> {
    match precision {
        Precision::F32 => Ok(DType::F32),
        Precision::Bf16 => Ok(DType::BF16),
        // f16's narrow range needs loss scaling, which is not built.
        Precision::F16 => {
            candle_core::bail!("config key train.precision: \"f16\" is not built; use \"bf16\" or \"f32\"")
        }
    }
}

/// The model with everything a step updates.
pub struct StepRunner {
    /// Trained: built on the variables.
    pub model: RetinaNet,
    /// Evaluated: the same weights without gradient tracking
    /// ([`LoadedModel::inference`]).
    pub inference: RetinaNet,
    /// Every parameter and buffer, by state-dict name.
    pub varmap: VarMap,
    pub optimizer: Optimizer,
    pub normalizer: Normalizer,
    /// The weight average, with `train.ema_decay`.
    pub ema: Option<WeightEma>,
    matcher: AnchorMatcher,
    config: Config,
    num_classes: usize,
    device: Device,
    /// The dtype the layers compute in (`train.precision`); parameters,
    /// gradients, optimiser state and losses stay f32.
    compute_dtype: DType,
    /// The ranks that average gradients each step (one process: none).
    collective: Box<dyn Collective>,
}

impl StepRunner {
    /// `config.model.num_classes` must already be resolved.
    pub fn new(loaded: LoadedModel, config: &Config, device: &Device) -> Result<Self> {
        let LoadedModel { model, inference, varmap, .. } = loaded;
        let compute_dtype = compute_dtype(config.train.precision)?;
        let optimizer = Optimizer::new(model::trainable_vars(&varmap, &config.model), &config.train);
        let matcher = AnchorMatcher::new(&config.loss);
        let ema = WeightEma::new(&varmap, &config.train)?;
        Ok(Self {
            num_classes: model.num_classes(),
            model,
            inference,
            varmap,
            optimizer,
            ema,
            normalizer: Normalizer::new(config.loss.normalizer),
            matcher,
            config: config.clone(),
            device: device.clone(),
            compute_dtype,
            collective: Box::new(SingleProcess),
        })
    }

    /// The same runner as one rank of a data-parallel run: each step then
    /// averages the gradients and losses over `collective`'s ranks.
    pub fn with_collective(mut self, collective: Box<dyn Collective>) -> Self {
        self.collective = collective;
        self
    }

    pub fn collective(&self) -> &dyn Collective {
        &*self.collective
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The loss terms of `batch` in training mode (graph attached).
    pub fn losses(&mut self, batch: &Batch) -> Result<LossTerms> {
        let images = batch.images.to_device(&self.device)?.to_dtype(self.compute_dtype)?;
        let outputs = self.model.forward(&images, true)?;
        let (targets, _) = build_targets(
            &batch.targets,
            &outputs.anchors,
            self.num_classes,
            &self.matcher,
            &mut self.normalizer,
            &self.device,
        )?;
        retinanet_loss(
            &outputs.cls_logits,
            &outputs.bbox_regression,
            &targets,
            &self.config.loss,
            self.model.box_coder(),
        )
    }

    /// One optimiser step on `batch` with learning rate `lr`. In a
    /// data-parallel run the losses reported are the means over the ranks,
    /// so every rank reaches the same outcome.
    pub fn step(&mut self, batch: &Batch, lr: f64) -> Result<StepOutcome> {
        let terms = self.losses(batch)?;
        let mut grads = terms.total()?.backward()?;
        let losses = [&terms.classification, &terms.box_regression];
        let [loss_cls, loss_box] = average_over_ranks(&*self.collective, self.optimizer.params(), &mut grads, losses)?;
        if !(loss_cls.is_finite() && loss_box.is_finite()) {
            return Ok(StepOutcome::NonFinite { what: "loss", detail: format!("cls {loss_cls}, box {loss_box}") });
        }
        let grad_norm = self.optimizer.grad_norm(&grads)?;
        if !grad_norm.is_finite() {
            let detail = format!("cls {loss_cls}, box {loss_box}, gradient norm {grad_norm}");
            return Ok(StepOutcome::NonFinite { what: "gradient", detail });
        }
        let max_norm = self.config.train.clip_grad_norm;
        // torch.nn.utils.clip_grad_norm_: scale by max / (norm + 1e-6), at most 1.
        let scale = if max_norm > 0.0 { (max_norm / (grad_norm + 1e-6)).min(1.0) } else { 1.0 };
        self.optimizer.step(&grads, lr, scale)?;
        if let Some(ema) = &mut self.ema {
            ema.update()?;
        }
        Ok(StepOutcome::Updated(StepValues { loss_cls, loss_box, grad_norm }))
    }
}
