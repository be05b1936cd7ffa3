//! An exponential moving average of the weights (`train.ema_decay`), as
//! Ultralytics' `ModelEMA` keeps it: every parameter and BatchNorm running
//! statistic, updated after each optimiser step with a decay that ramps up
//! from 0, `d = ema_decay * (1 - exp(-updates / ema_warmup_steps))`, so the
//! average follows the fast-moving early weights and settles later.
//!
//! The average lives beside the model, not in it: evaluation swaps it into
//! the model's variables and back ([`WeightEma::swap`]), so one model serves
//! both and nothing is rebuilt.

use std::collections::HashMap;

use candle_core::{Result, Tensor, Var};
use candle_nn::VarMap;

use crate::config::TrainConfig;

pub struct WeightEma {
    decay: f64,
    warmup_steps: f64,
    /// Updates so far (saved in the checkpoint's state).
    updates: u64,
    /// `(name, variable of the model, its average)`, sorted by name.
    entries: Vec<(String, Var, Tensor)>,
}

impl WeightEma {
    /// An average that starts at the model's current weights, or `None`
    /// when `train.ema_decay` is 0.
    pub fn new(varmap: &VarMap, cfg: &TrainConfig) -> Result<Option<Self>> {
        if cfg.ema_decay <= 0.0 {
            return Ok(None);
        }
        let data = varmap.data().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut entries: Vec<(String, Var, Tensor)> = data
            .iter()
            .map(|(name, var)| Ok((name.clone(), var.clone(), var.as_tensor().detach().copy()?)))
            .collect::<Result<_>>()?;
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(Some(Self { decay: cfg.ema_decay, warmup_steps: cfg.ema_warmup_steps as f64, updates: 0, entries }))
    }

    pub fn updates(&self) -> u64 {
        self.updates
    }

    /// The decay the next update uses.
    fn next_decay(&self) -> f64 {
        self.decay * (1.0 - (-((self.updates + 1) as f64) / self.warmup_steps).exp())
    }

    /// Moves the average towards the model's current weights. The average
    /// is detached: computed from a variable, it would otherwise keep a
    /// graph holding every earlier average alive.
    pub fn update(&mut self) -> Result<()> {
        let d = self.next_decay();
        for (_, var, average) in &mut self.entries {
            *average = ((&*average * d)? + (var.as_tensor().detach() * (1.0 - d))?)?;
        }
        self.updates += 1;
        Ok(())
    }

    /// Exchanges the model's weights with the average: called once before
    /// evaluating with the average and once after, it leaves both as they
    /// were.
    pub fn swap(&mut self) -> Result<()> {
        for (_, var, average) in &mut self.entries {
            let live = var.as_tensor().detach().copy()?;
            var.set(average)?;
            *average = live;
        }
        Ok(())
    }

    /// The average by state-dict name (what `model.safetensors` holds).
    pub fn state_dict(&self) -> HashMap<String, Tensor> {
        self.entries.iter().map(|(name, _, average)| (name.clone(), average.clone())).collect()
    }

    /// Continues from a checkpoint's average after `updates` updates. A
    /// name the checkpoint lacks keeps the model's weights.
    pub fn restore(&mut self, averages: &HashMap<String, Tensor>, updates: u64) -> Result<()> {
        for (name, _, average) in &mut self.entries {
            if let Some(saved) = averages.get(name) {
                if saved.shape() != average.shape() {
                    candle_core::bail!(
                        "checkpoint average {name}: shape {:?}, the model has {:?}",
                        saved.shape(),
                        average.shape()
                    );
                }
                *average = saved.to_dtype(average.dtype())?.to_device(average.device())?;
            }
        }
        self.updates = updates;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    fn varmap_with(value: f32) -> VarMap {
        let varmap = VarMap::new();
        varmap.get(2, "w", candle_nn::Init::Const(value as f64), DType::F32, &Device::Cpu).unwrap();
        varmap
    }

    fn value(t: &Tensor) -> f32 {
        t.to_vec1::<f32>().unwrap()[0]
    }

    #[test]
    fn the_decay_ramps_up_as_ultralytics_model_ema() {
        let cfg = TrainConfig { ema_decay: 0.9999, ema_warmup_steps: 2000, ..TrainConfig::default() };
        let varmap = varmap_with(1.0);
        let mut ema = WeightEma::new(&varmap, &cfg).unwrap().unwrap();
        // ModelEMA.update: self.updates += 1; d = decay * (1 - exp(-updates / tau))
        let expected = 0.9999 * (1.0 - (-1.0f64 / 2000.0).exp());
        assert!((ema.next_decay() - expected).abs() < 1e-15);
        let var = varmap.data().lock().unwrap()["w"].clone();
        var.set(&Tensor::new(&[3f32, 3.0], &Device::Cpu).unwrap()).unwrap();
        ema.update().unwrap();
        let want = (1.0 * expected + 3.0 * (1.0 - expected)) as f32;
        assert!((value(&ema.state_dict()["w"]) - want).abs() < 1e-6);
        // No graph: a tracked average would keep every earlier one alive.
        assert!(!ema.state_dict()["w"].track_op(), "the average holds a graph");
    }

    #[test]
    fn swapping_twice_restores_both() {
        let cfg = TrainConfig { ema_decay: 0.5, ema_warmup_steps: 1, ..TrainConfig::default() };
        let varmap = varmap_with(2.0);
        let mut ema = WeightEma::new(&varmap, &cfg).unwrap().unwrap();
        let var = varmap.data().lock().unwrap()["w"].clone();
        var.set(&Tensor::new(&[4f32, 4.0], &Device::Cpu).unwrap()).unwrap();
        ema.update().unwrap();
        let average = value(&ema.state_dict()["w"]);
        ema.swap().unwrap();
        assert_eq!(value(var.as_tensor()), average);
        ema.swap().unwrap();
        assert!(!ema.state_dict()["w"].track_op(), "the swapped-out weights hold a graph");
        assert_eq!(value(var.as_tensor()), 4.0);
        assert_eq!(value(&ema.state_dict()["w"]), average);
    }

    #[test]
    fn no_average_without_a_decay() {
        assert!(WeightEma::new(&varmap_with(1.0), &TrainConfig::default()).unwrap().is_none());
    }
}
