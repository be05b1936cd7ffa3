//! Optimisers with PyTorch's update rules: SGD with momentum and weight
//! decay (candle-nn's SGD has neither) and AdamW; global-norm gradient
//! clipping; state that saves and loads for exact resumption.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Result, Tensor, Var};

use crate::config::{OptimizerKind, TrainConfig};
use crate::ops::sgd::{self, SgdStep};

/// One trainable tensor with its state-dict name.
#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub var: Var,
    /// Whether weight decay applies (off for norm and bias parameters when
    /// `train.no_decay_norm_bias`).
    pub decay: bool,
}

/// True for parameters that detectron2 and torchvision recipes exempt from
/// weight decay: biases and normalisation affines.
pub(super) fn is_norm_or_bias(name: &str) -> bool {
    name.ends_with(".bias") || name.contains(".bn") || name.contains("norm") || name.contains("downsample.1.")
}

/// AdamW's fixed hyper-parameters (PyTorch defaults).
const ADAM_BETAS: (f64, f64) = (0.9, 0.999);
const ADAM_EPS: f64 = 1e-8;

/// SGD (momentum, weight decay) or AdamW over a fixed parameter list.
pub struct Optimizer {
    kind: OptimizerKind,
    params: Vec<Param>,
    momentum: f64,
    weight_decay: f64,
    /// Steps taken (AdamW's bias correction needs it).
    steps: u64,
    /// SGD momentum buffers or AdamW first moments, by parameter name.
    first: HashMap<String, Tensor>,
    /// AdamW second moments.
    second: HashMap<String, Tensor>,
}

impl Optimizer {
    pub fn new(params: Vec<(String, Var)>, cfg: &TrainConfig) -> Self {
        let params = params
            .into_iter()
            .map(|(name, var)| {
                let decay = !(cfg.no_decay_norm_bias && is_norm_or_bias(&name));
                Param { name, var, decay }
            })
            .collect();
        Self {
            kind: cfg.optimizer,
            params,
            momentum: cfg.momentum,
            weight_decay: cfg.weight_decay,
            steps: 0,
            first: HashMap::new(),
            second: HashMap::new(),
        }
    }

    pub fn params(&self) -> &[Param] {
        &self.params
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Global L2 norm of the gradients (parameters without one count 0).
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        let mut total = 0.0;
        let mut squares = Vec::new();
        for p in &self.params {
            match grads.get(p.var.as_tensor()) {
                Some(g) if sgd::applies(&[g]) => total += sgd::squared_sum(g)?,
                Some(g) => squares.push(g.sqr()?.sum_all()?),
                None => {}
            }
        }
        if !squares.is_empty() {
            total += Tensor::stack(&squares, 0)?.sum_all()?.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?;
        }
        Ok(total.sqrt())
    }

    /// One update with learning rate `lr`. Gradients are multiplied by
    /// `grad_scale` first (global-norm clipping passes `max / norm`).
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.steps += 1;
        for i in 0..self.params.len() {
            let Some(grad) = grads.get(self.params[i].var.as_tensor()) else {
                continue;
            };
            // Detached: a gradient carries the graph that computed it, and a
            // momentum buffer built on it would keep every step's
            // activations alive (24 GB after 1000 steps of the shapes preset).
            let grad = grad.detach();
            if self.kind == OptimizerKind::Sgd && sgd::applies(&[&grad, self.params[i].var.as_tensor()]) {
                self.sgd_update_in_place(i, &grad, lr, grad_scale)?;
                continue;
            }
            let grad = if grad_scale == 1.0 { grad } else { (grad * grad_scale)? };
            match self.kind {
                OptimizerKind::Sgd => self.sgd_update(i, &grad, lr)?,
                OptimizerKind::AdamW => self.adamw_update(i, &grad, lr)?,
            }
        }
        Ok(())
    }

    /// `torch.optim.SGD`: `d = g + wd p; buf = m buf + d` (buf = d at
    /// first); `p -= lr buf`.
    fn sgd_update(&mut self, i: usize, grad: &Tensor, lr: f64) -> Result<()> {
        let p = &self.params[i];
        let value = &p.var.as_tensor().detach();
        let d = if p.decay && self.weight_decay != 0.0 { (grad + (value * self.weight_decay)?)? } else { grad.clone() };
        let direction = if self.momentum != 0.0 {
            let buf = match self.first.get(&p.name) {
                Some(buf) => ((buf * self.momentum)? + d)?,
                None => d,
            };
            self.first.insert(p.name.clone(), buf.clone());
            buf
        } else {
            d
        };
        p.var.set(&(value - (direction * lr)?)?)
    }

    /// [`Self::sgd_update`] on f32 CPU tensors, one pass in place per tensor
    /// (`ops/sgd.rs`): the same values in a fraction of the time. The
    /// momentum buffer starts at zero (`m 0 + d` is PyTorch's `buf = d`).
    fn sgd_update_in_place(&mut self, i: usize, grad: &Tensor, lr: f64, grad_scale: f64) -> Result<()> {
        let p = &self.params[i];
        let weight_decay = if p.decay { self.weight_decay } else { 0.0 };
        let step = SgdStep { lr, momentum: self.momentum, weight_decay, grad_scale };
        if self.momentum == 0.0 {
            return sgd::sgd_in_place(p.var.as_tensor(), None, grad, step);
        }
        let buf = match self.first.get(&p.name) {
            Some(buf) => buf.clone(),
            None => p.var.as_tensor().zeros_like()?,
        };
        if !sgd::applies(&[&buf]) {
            // A loaded buffer of another layout: the tensor ops.
            let grad = if grad_scale == 1.0 { grad.clone() } else { (grad * grad_scale)? };
            return self.sgd_update(i, &grad, lr);
        }
        sgd::sgd_in_place(p.var.as_tensor(), Some(&buf), grad, step)?;
        self.first.insert(p.name.clone(), buf);
        Ok(())
    }

    /// `torch.optim.AdamW`: decoupled decay `p *= 1 - lr wd`, then Adam with
    /// bias correction.
    fn adamw_update(&mut self, i: usize, grad: &Tensor, lr: f64) -> Result<()> {
        let (b1, b2) = ADAM_BETAS;
        let p = &self.params[i];
        let mut value = p.var.as_tensor().detach();
        if p.decay && self.weight_decay != 0.0 {
            value = (value * (1.0 - lr * self.weight_decay))?;
        }
        let m = match self.first.get(&p.name) {
            Some(m) => ((m * b1)? + (grad * (1.0 - b1))?)?,
            None => (grad * (1.0 - b1))?,
        };
        let v = match self.second.get(&p.name) {
            Some(v) => ((v * b2)? + (grad.sqr()? * (1.0 - b2))?)?,
            None => (grad.sqr()? * (1.0 - b2))?,
        };
        let t = self.steps as i32;
        let m_hat = (&m / (1.0 - b1.powi(t)))?;
        let v_hat = (&v / (1.0 - b2.powi(t)))?;
        let update = (m_hat / (v_hat.sqrt()? + ADAM_EPS)?)?;
        self.first.insert(p.name.clone(), m);
        self.second.insert(p.name.clone(), v);
        p.var.set(&(value - (update * lr)?)?)
    }

    /// Optimiser state as named tensors (`first.<param>`, `second.<param>`)
    /// for `optimizer.safetensors`; the step count goes in `state.json`.
    pub fn state_tensors(&self) -> HashMap<String, Tensor> {
        let first = self.first.iter().map(|(k, v)| (format!("first.{k}"), v.clone()));
        let second = self.second.iter().map(|(k, v)| (format!("second.{k}"), v.clone()));
        first.chain(second).collect()
    }

    /// Restores what [`Optimizer::state_tensors`] saved. Names of unknown
    /// parameters are an error, so a checkpoint of another model is caught.
    pub fn load_state(&mut self, tensors: HashMap<String, Tensor>, steps: u64) -> anyhow::Result<()> {
        let known: HashMap<&str, &Param> = self.params.iter().map(|p| (p.name.as_str(), p)).collect();
        for (key, tensor) in tensors {
            let (slot, name) =
                key.split_once('.').ok_or_else(|| anyhow::anyhow!("optimizer state: unexpected tensor {key}"))?;
            let Some(param) = known.get(name) else {
                anyhow::bail!("optimizer state: tensor {key} belongs to no parameter of this model");
            };
            if tensor.dims() != param.var.dims() {
                anyhow::bail!(
                    "optimizer state: tensor {key} has shape {:?}, parameter has {:?}",
                    tensor.dims(),
                    param.var.dims()
                );
            }
            let tensor = tensor.to_device(param.var.device())?;
            match slot {
                "first" => self.first.insert(name.to_string(), tensor),
                "second" => self.second.insert(name.to_string(), tensor),
                _ => anyhow::bail!("optimizer state: unexpected tensor {key}"),
            };
        }
        self.steps = steps;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn cfg(kind: OptimizerKind, wd: f64) -> TrainConfig {
        TrainConfig { optimizer: kind, momentum: 0.9, weight_decay: wd, ..TrainConfig::default() }
    }

    /// Two steps on f(p) = sum(p^2) / 2 (gradient p), against PyTorch:
    /// ```python
    /// p = torch.tensor([1.0, -2.0], requires_grad=True)
    /// opt = torch.optim.SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01)
    /// for _ in range(2):
    ///     opt.zero_grad(); (p.pow(2).sum() / 2).backward(); opt.step()
    /// print(p.tolist())  # [0.7173010110855103, -1.4346020221710205]
    /// ```
    #[test]
    fn sgd_momentum_matches_pytorch() {
        let var = Var::new(&[1.0f32, -2.0], &Device::Cpu).unwrap();
        let mut opt = Optimizer::new(vec![("w".into(), var.clone())], &cfg(OptimizerKind::Sgd, 0.01));
        for _ in 0..2 {
            let loss = (var.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
            opt.step(&loss.backward().unwrap(), 0.1, 1.0).unwrap();
        }
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        let expected = [0.717_301_f32, -1.434_602];
        assert!(got.iter().zip(expected).all(|(g, e)| (g - e).abs() < 1e-6), "{got:?}");
    }

    /// `torch.optim.AdamW([p], lr=0.01, weight_decay=0.0)` on `p.sum()` from
    /// `[3, -5]` gives `[2.99, -5.01]`.
    #[test]
    fn adamw_first_step_moves_by_lr() {
        let var = Var::new(&[3.0f32, -5.0], &Device::Cpu).unwrap();
        let mut opt = Optimizer::new(vec![("w".into(), var.clone())], &cfg(OptimizerKind::AdamW, 0.0));
        let loss = var.as_tensor().sum_all().unwrap();
        opt.step(&loss.backward().unwrap(), 0.01, 1.0).unwrap();
        let got = var.as_tensor().to_vec1::<f32>().unwrap();
        assert!((got[0] - 2.99).abs() < 1e-5 && (got[1] + 5.01).abs() < 1e-5, "{got:?}");
    }

    #[test]
    fn state_round_trips_and_rejects_foreign_tensors() {
        let var = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
        let mut opt = Optimizer::new(vec![("w".into(), var.clone())], &cfg(OptimizerKind::Sgd, 0.0));
        opt.step(&var.as_tensor().sum_all().unwrap().backward().unwrap(), 0.1, 1.0).unwrap();
        let saved = opt.state_tensors();
        let mut fresh = Optimizer::new(vec![("w".into(), var.clone())], &cfg(OptimizerKind::Sgd, 0.0));
        fresh.load_state(saved.clone(), opt.steps()).unwrap();
        assert_eq!(fresh.state_tensors()["first.w"].to_vec1::<f32>().unwrap(), vec![1.0, 1.0]);
        let foreign = HashMap::from([("first.other".to_string(), saved["first.w"].clone())]);
        let err = fresh.load_state(foreign, 1).unwrap_err().to_string();
        assert!(err.contains("first.other"), "{err}");
    }

    /// Optimiser state must hold values, not graphs: a buffer that tracks
    /// its ops keeps every earlier step's activations alive.
    #[test]
    fn state_holds_no_graph() {
        for kind in [OptimizerKind::Sgd, OptimizerKind::AdamW] {
            let var = Var::new(&[1.0f32, 2.0], &Device::Cpu).unwrap();
            let mut opt = Optimizer::new(vec![("w".into(), var.clone())], &cfg(kind, 0.01));
            for _ in 0..2 {
                let loss = (var.as_tensor().sqr().unwrap() * 3.0).unwrap().sum_all().unwrap();
                opt.step(&loss.backward().unwrap(), 0.1, 0.5).unwrap();
            }
            for (name, t) in opt.state_tensors() {
                assert!(!t.track_op(), "{kind:?}: {name} keeps a graph");
            }
        }
    }

    #[test]
    fn decay_exemptions_follow_names() {
        assert!(is_norm_or_bias("backbone.body.bn1.weight"));
        assert!(is_norm_or_bias("head.classification_head.cls_logits.bias"));
        assert!(is_norm_or_bias("backbone.body.layer1.0.downsample.1.weight"));
        assert!(!is_norm_or_bias("backbone.body.layer1.0.conv1.weight"));
    }
}
