//! Seeded parameter initialisation.
//!
//! Candle's CPU random generator cannot be seeded, so a model built through
//! a plain `VarMap` starts differently in every process. This backend
//! creates each missing tensor from its own generator, seeded by the run's
//! seed and the tensor's name: the same seed gives the same model whatever
//! the build order, and a resumed run can replay an interrupted one.

use candle_core::{DType, Device, Result, Shape, Tensor, Var};
use candle_nn::init::NormalOrUniform;
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// A `VarMap` backend: existing tensors are returned (shape-checked),
/// missing ones are created with `Init`, seeded by name.
pub(super) struct SeededInit {
    pub varmap: VarMap,
    pub seed: u64,
}

impl SimpleBackend for SeededInit {
    fn get(&self, shape: Shape, name: &str, init: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut data = self.varmap.data().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(var) = data.get(name) {
            if var.shape() != &shape {
                candle_core::bail!("{name}: shape {:?}, expected {:?}", var.dims(), shape.dims());
            }
            return Ok(var.as_tensor().clone());
        }
        let values = sample(&init, &shape, name_seed(self.seed, name));
        let var = Var::from_tensor(&Tensor::from_vec(values, shape, dev)?.to_dtype(dtype)?)?;
        data.insert(name.to_string(), var.clone());
        Ok(var.as_tensor().clone())
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        let data = self.varmap.data().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match data.get(name) {
            Some(var) => Ok(var.as_tensor().clone()),
            None => candle_core::bail!("{name}: requested without a shape and not present"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap.data().lock().unwrap_or_else(|poisoned| poisoned.into_inner()).contains_key(name)
    }
}

/// FNV-1a of the name, mixed with the seed.
fn name_seed(seed: u64, name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325 ^ seed, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// Values of `init` for `shape`, as Candle's `Init::var` draws them.
fn sample(init: &Init, shape: &Shape, seed: u64) -> Vec<f32> {
    let n = shape.elem_count();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = |rng: &mut ChaCha8Rng, mean: f64, std: f64| -> Vec<f32> {
        let d = Normal::new(mean, std.max(0.0)).expect("finite standard deviation");
        (0..n).map(|_| d.sample(rng) as f32).collect()
    };
    let uniform = |rng: &mut ChaCha8Rng, lo: f64, up: f64| -> Vec<f32> {
        (0..n).map(|_| rng.random_range(lo..up) as f32).collect()
    };
    match *init {
        Init::Const(v) => vec![v as f32; n],
        Init::Randn { mean, stdev } => normal(&mut rng, mean, stdev),
        Init::Uniform { lo, up } => uniform(&mut rng, lo, up),
        Init::Kaiming { dist, fan, non_linearity } => {
            let std = non_linearity.gain() / (fan.for_shape(shape) as f64).sqrt();
            match dist {
                NormalOrUniform::Normal => normal(&mut rng, 0.0, std),
                NormalOrUniform::Uniform => {
                    let bound = 3f64.sqrt() * std;
                    uniform(&mut rng, -bound, bound)
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn get(seed: u64, name: &str) -> Vec<f32> {
        let backend = SeededInit { varmap: VarMap::new(), seed };
        let t = backend.get(Shape::from((4, 3)), name, Init::Randn { mean: 0.0, stdev: 0.5 }, DType::F32, &Device::Cpu);
        t.unwrap().flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn same_seed_and_name_same_values() {
        assert_eq!(get(1, "a.weight"), get(1, "a.weight"));
        assert_ne!(get(1, "a.weight"), get(2, "a.weight"));
        assert_ne!(get(1, "a.weight"), get(1, "b.weight"));
    }

    #[test]
    fn kaiming_uniform_stays_in_bounds() {
        let init = candle_nn::init::DEFAULT_KAIMING_UNIFORM;
        let shape = Shape::from((8, 4, 3, 3));
        let values = sample(&init, &shape, 3);
        let bound = 3f64.sqrt() * init_gain(&init) / 36f64.sqrt();
        assert!(values.iter().all(|v| (v.abs() as f64) <= bound));
    }

    fn init_gain(init: &Init) -> f64 {
        match init {
            Init::Kaiming { non_linearity, .. } => non_linearity.gain(),
            _ => 1.0,
        }
    }
}
