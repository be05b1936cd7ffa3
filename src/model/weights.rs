//! Checkpoints as safetensors with torchvision's state_dict names, so a
//! torchvision RetinaNet saved with safetensors loads unchanged (its
//! `num_batches_tracked` entries are ignored) and our checkpoints load in
//! torchvision.
//!
//! Parameters live in a `VarMap`: the model is built once to create them
//! (with torchvision's init), the checkpoint is copied in, and the model is
//! built again from the same variables so that frozen BatchNorms fold the
//! loaded statistics.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::config::ModelConfig;
use crate::model::resnet;
use crate::model::retinanet::RetinaNet;

/// Where the backbone sits in the state_dict.
pub const BODY_PREFIX: &str = "backbone.body.";
/// The only tensors whose shape depends on the class count.
pub const CLS_LOGITS_PREFIX: &str = "head.classification_head.cls_logits.";
/// Problems listed by name in one error before the rest are only counted.
const MAX_LISTED: usize = 12;

/// How checkpoint tensors are matched to the model's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadMode {
    /// Every model tensor present with its shape, nothing unexpected.
    Exact,
    /// As `Exact`, but a classification output of another class count is
    /// re-initialised (fine-tuning to a new dataset).
    NewClasses,
    /// An ImageNet ResNet (torchvision names without prefix: `conv1.weight`,
    /// `layer1.0.bn1.running_mean`, ...) into `backbone.body.*`; its
    /// classifier (`fc.*`) is ignored, the FPN and heads keep their init.
    Backbone,
}

/// A model and the variables it was built from.
pub struct LoadedModel {
    pub model: RetinaNet,
    /// Every parameter and BatchNorm buffer, by state_dict name.
    pub varmap: VarMap,
    /// What loading changed or ignored, for the user (e.g. a re-initialised
    /// classification output).
    pub notes: Vec<String>,
}

/// Builds a model on `device` with torchvision's init, then, if given,
/// copies `checkpoint`'s tensors in (checked as `mode` says).
pub fn build(
    cfg: &ModelConfig,
    num_classes: usize,
    device: &Device,
    checkpoint: Option<(&HashMap<String, Tensor>, LoadMode)>,
) -> Result<LoadedModel> {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    let model = RetinaNet::new(cfg, num_classes, vb.clone()).context("building the model")?;
    let Some((tensors, mode)) = checkpoint else {
        return Ok(LoadedModel { model, varmap, notes: Vec::new() });
    };
    let notes = load_into(&varmap, tensors, mode)?;
    let model = RetinaNet::new(cfg, num_classes, vb).context("building the model from the loaded weights")?;
    Ok(LoadedModel { model, varmap, notes })
}

/// Reads a safetensors file onto the CPU.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("cannot read safetensors weights {}", path.display()))
}

/// Writes every variable under its state_dict name.
pub fn save(varmap: &VarMap, path: &Path) -> Result<()> {
    let data = varmap.data().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let tensors: HashMap<String, Tensor> = data.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
    candle_core::safetensors::save(&tensors, path).with_context(|| format!("cannot write weights {}", path.display()))
}

/// The variables the optimiser updates, by name (sorted): everything but
/// running statistics, frozen BatchNorm affines and frozen stages.
pub fn trainable_vars(varmap: &VarMap, cfg: &ModelConfig) -> Vec<(String, Var)> {
    let data = varmap.data().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let mut vars: Vec<(String, Var)> = data
        .iter()
        .filter(|(name, _)| match name.strip_prefix(BODY_PREFIX) {
            Some(key) => resnet::is_trainable(&cfg.backbone, key),
            None => true,
        })
        .map(|(name, var)| (name.clone(), var.clone()))
        .collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    vars
}

/// Shapes as `[a, b, c]`.
fn dims(t: &Tensor) -> String {
    format!("{:?}", t.dims())
}

/// Copies `tensors` into the matching variables; returns notes. All
/// missing, unexpected and mis-shaped tensors are reported in one error.
pub fn load_into(varmap: &VarMap, tensors: &HashMap<String, Tensor>, mode: LoadMode) -> Result<Vec<String>> {
    let data = varmap.data().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let file_name = |model_name: &str| -> Option<String> {
        match mode {
            LoadMode::Backbone => model_name.strip_prefix(BODY_PREFIX).map(str::to_string),
            _ => Some(model_name.to_string()),
        }
    };
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    let mut used = std::collections::HashSet::new();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let mut assignments = Vec::new();
    for name in names {
        let Some(key) = file_name(name) else { continue };
        let var = &data[name];
        match tensors.get(&key) {
            None => problems.push(format!("missing {key} {}", dims(var.as_tensor()))),
            Some(t) if t.dims() != var.dims() => {
                used.insert(key.clone());
                if mode == LoadMode::NewClasses && name.starts_with(CLS_LOGITS_PREFIX) {
                    notes.push(format!(
                        "re-initialised {name}: checkpoint shape {}, model shape {} (another class count)",
                        dims(t),
                        dims(var.as_tensor())
                    ));
                } else {
                    problems.push(format!("shape of {key}: checkpoint {}, model {}", dims(t), dims(var.as_tensor())));
                }
            }
            Some(t) => {
                used.insert(key.clone());
                assignments.push((var, t));
            }
        }
    }
    let mut unexpected: Vec<&String> =
        tensors.keys().filter(|k| !used.contains(*k) && !k.ends_with("num_batches_tracked")).collect();
    unexpected.sort();
    match mode {
        LoadMode::Backbone if !unexpected.is_empty() => {
            let listed: Vec<&str> = unexpected.iter().take(4).map(|s| s.as_str()).collect();
            notes.push(format!(
                "ignored {} backbone tensors not in the model ({} ...)",
                unexpected.len(),
                listed.join(", ")
            ));
        }
        LoadMode::Backbone => {}
        _ => problems.extend(unexpected.iter().map(|k| format!("unexpected {k} {}", dims(&tensors[*k])))),
    }
    if !problems.is_empty() {
        let listed = problems.iter().take(MAX_LISTED).cloned().collect::<Vec<_>>().join("; ");
        let more = problems.len().saturating_sub(MAX_LISTED);
        let rest = if more > 0 { format!("; and {more} more") } else { String::new() };
        bail!("weights do not match the model ({} problems): {listed}{rest}", problems.len());
    }
    for (var, t) in assignments {
        let value = t.to_dtype(var.dtype())?.to_device(var.device())?;
        var.set(&value).context("copying a checkpoint tensor")?;
    }
    Ok(notes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackboneNorm, HeadNorm};

    fn small_config() -> ModelConfig {
        let mut cfg = ModelConfig::default();
        cfg.backbone.depth = 18;
        cfg.backbone.width = 8;
        cfg.backbone.norm = BackboneNorm::FrozenBn;
        cfg.fpn.channels = 32;
        cfg.head.num_convs = 1;
        cfg.head.norm = HeadNorm::Gn;
        cfg
    }

    fn state(model: &LoadedModel) -> HashMap<String, Tensor> {
        let data = model.varmap.data().lock().expect("varmap lock");
        data.iter().map(|(k, v)| (k.clone(), v.as_tensor().copy().expect("copy"))).collect()
    }

    #[test]
    fn save_then_load_reproduces_outputs() -> Result<()> {
        let cfg = small_config();
        let dev = Device::Cpu;
        let a = build(&cfg, 3, &dev, None)?;
        let dir = std::env::temp_dir().join(format!("retinanet-weights-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("model.safetensors");
        save(&a.varmap, &path)?;
        let mut tensors = read_safetensors(&path)?;
        tensors.insert("backbone.body.bn1.num_batches_tracked".into(), Tensor::new(&[0i64], &dev)?);
        let b = build(&cfg, 3, &dev, Some((&tensors, LoadMode::Exact)))?;
        std::fs::remove_dir_all(&dir)?;
        let x = Tensor::rand(0f32, 1., (1, 3, 64, 64), &dev)?;
        let (ya, yb) = (a.model.forward(&x, false)?, b.model.forward(&x, false)?);
        let diff = (ya.cls_logits - yb.cls_logits)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }

    #[test]
    fn mismatches_are_listed_by_name_in_one_error() -> Result<()> {
        let cfg = small_config();
        let dev = Device::Cpu;
        let mut tensors = state(&build(&cfg, 3, &dev, None)?);
        tensors.remove("backbone.body.layer1.0.conv1.weight");
        tensors.insert("backbone.fpn.layer_blocks.0.0.bias".into(), Tensor::zeros(7, DType::F32, &dev)?);
        tensors.insert("head.extra.weight".into(), Tensor::zeros(2, DType::F32, &dev)?);
        let Err(err) = build(&cfg, 3, &dev, Some((&tensors, LoadMode::Exact))) else {
            panic!("mismatched weights loaded")
        };
        let err = err.to_string();
        assert!(err.contains("3 problems"), "{err}");
        assert!(err.contains("missing backbone.body.layer1.0.conv1.weight [8, 8, 3, 3]"), "{err}");
        assert!(err.contains("shape of backbone.fpn.layer_blocks.0.0.bias: checkpoint [7], model [32]"), "{err}");
        assert!(err.contains("unexpected head.extra.weight [2]"), "{err}");
        Ok(())
    }

    #[test]
    fn new_classes_reinitialise_only_the_cls_logits() -> Result<()> {
        let cfg = small_config();
        let dev = Device::Cpu;
        let tensors = state(&build(&cfg, 3, &dev, None)?);
        assert!(build(&cfg, 5, &dev, Some((&tensors, LoadMode::Exact))).is_err());
        let b = build(&cfg, 5, &dev, Some((&tensors, LoadMode::NewClasses)))?;
        assert_eq!(b.notes.len(), 2, "{:?}", b.notes);
        assert!(b.notes.iter().all(|n| n.contains(CLS_LOGITS_PREFIX)));
        let loaded = state(&b);
        let same =
            |k: &str| -> Result<bool> { Ok((&loaded[k] - &tensors[k])?.abs()?.max_all()?.to_scalar::<f32>()? == 0.0) };
        assert!(same("head.classification_head.conv.0.0.weight")? && same("backbone.body.conv1.weight")?);
        Ok(())
    }

    #[test]
    fn backbone_weights_load_under_the_body_prefix() -> Result<()> {
        let cfg = small_config();
        let dev = Device::Cpu;
        let full = state(&build(&cfg, 3, &dev, None)?);
        let mut body: HashMap<String, Tensor> =
            full.iter().filter_map(|(k, v)| k.strip_prefix(BODY_PREFIX).map(|k| (k.to_string(), v.clone()))).collect();
        body.insert("fc.weight".into(), Tensor::zeros((10, 64), DType::F32, &dev)?);
        let b = build(&cfg, 3, &dev, Some((&body, LoadMode::Backbone)))?;
        assert_eq!(b.notes.len(), 1);
        let loaded = state(&b);
        let k = "backbone.body.layer4.1.bn2.running_var";
        assert_eq!((&loaded[k] - &full[k])?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    #[test]
    fn trainable_vars_follow_freeze_at() -> Result<()> {
        let cfg = small_config(); // frozen_bn, freeze_at 2
        let m = build(&cfg, 3, &Device::Cpu, None)?;
        let names: Vec<String> = trainable_vars(&m.varmap, &cfg).into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"backbone.body.layer2.0.conv1.weight".to_string()));
        assert!(names.contains(&"head.classification_head.cls_logits.bias".to_string()));
        assert!(names.contains(&"backbone.fpn.extra_blocks.p7.weight".to_string()));
        assert!(!names.iter().any(|n| n.contains("layer1.") || n.contains(".bn") || n == "backbone.body.conv1.weight"));
        Ok(())
    }
}
