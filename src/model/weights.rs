//! Checkpoints as safetensors with torchvision's state_dict names, so a
//! torchvision RetinaNet saved with safetensors loads unchanged (its
//! `num_batches_tracked` entries are ignored) and our checkpoints load in
//! torchvision.
//!
//! Parameters live in a `VarMap`. Loading first records the name and shape
//! of every tensor the model asks for (without allocating them), checks the
//! checkpoint against that list, puts the checkpoint's tensors into the
//! `VarMap`, and then builds the model once: only tensors the checkpoint
//! does not provide get torchvision's random init.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

use crate::config::ModelConfig;
use crate::model::init::SeededInit;
use crate::model::resnet;
use crate::model::retinanet::RetinaNet;

/// Where the backbone sits in the state_dict.
pub const BODY_PREFIX: &str = "backbone.body.";
/// The only tensors whose shape depends on the class count.
pub(super) const CLS_LOGITS_PREFIX: &str = "head.classification_head.cls_logits.";
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

impl LoadMode {
    /// How pretrained weights (`model.backbone.weights`) load: a whole
    /// detector (torchvision's names, `backbone.body.*`) with a
    /// classification layer of any class count, or only an ImageNet
    /// backbone.
    pub fn for_pretrained(tensors: &HashMap<String, Tensor>) -> Self {
        match tensors.keys().any(|k| k.starts_with(BODY_PREFIX)) {
            true => Self::NewClasses,
            false => Self::Backbone,
        }
    }
}

/// A model and the variables it was built from.
pub struct LoadedModel {
    /// Built on the variables: its outputs keep the graph for `backward`.
    pub model: RetinaNet,
    /// The same weights without gradient tracking, for inference. Candle has
    /// no `no_grad`: an op keeps its inputs alive whenever one of them is a
    /// variable, so running `model` holds every activation of the forward
    /// pass until its outputs are dropped (2.4 GB at 800x1333 for R50-FPN).
    /// These tensors share the variables' storage, so optimiser steps,
    /// running statistics and the weight average's swap show here too.
    pub inference: RetinaNet,
    /// Every parameter and BatchNorm buffer, by state_dict name.
    pub varmap: VarMap,
    /// What loading changed or ignored, for the user (e.g. a re-initialised
    /// classification output).
    pub notes: Vec<String>,
}

/// Builds a model on `device`; tensors not in `checkpoint` (all of them
/// without one) get torchvision's init. The checkpoint is checked as `mode`
/// says, every problem listed in one error.
pub fn build(
    cfg: &ModelConfig,
    num_classes: usize,
    device: &Device,
    seed: u64,
    checkpoint: Option<(&HashMap<String, Tensor>, LoadMode)>,
) -> Result<LoadedModel> {
    let varmap = VarMap::new();
    let mut notes = Vec::new();
    if let Some((tensors, mode)) = checkpoint {
        let expected = expected_shapes(cfg, num_classes)?;
        let plan = match_checkpoint(&expected, tensors, mode)?;
        notes = plan.notes;
        let mut data = varmap.data().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for (name, tensor) in plan.assignments {
            let value = tensor.to_dtype(DType::F32)?.to_device(device)?;
            data.insert(name, Var::from_tensor(&value)?);
        }
    }
    let backend = SeededInit { varmap: varmap.clone(), seed };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, device.clone());
    let model = RetinaNet::new(cfg, num_classes, vb).context("building the model")?;
    let inference = RetinaNet::new(cfg, num_classes, detached(&varmap, device)).context("building the model")?;
    Ok(LoadedModel { model, inference, varmap, notes })
}

/// Every variable of `varmap`, detached (same storage, no graph).
fn detached(varmap: &VarMap, device: &Device) -> VarBuilder<'static> {
    let data = varmap.data().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    let tensors = data.iter().map(|(name, var)| (name.clone(), var.as_tensor().detach())).collect();
    VarBuilder::from_tensors(tensors, DType::F32, device)
}

/// Records the name and shape of each tensor the model asks for and hands
/// out broadcast zeros, so nothing is allocated or initialised.
struct ShapeRecorder(Arc<Mutex<BTreeMap<String, Vec<usize>>>>);

impl SimpleBackend for ShapeRecorder {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).insert(name.to_string(), s.dims().to_vec());
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("shape recorder: {name} requested without a shape")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        false
    }
}

/// Every tensor of the model, by state_dict name, with its shape.
pub(super) fn expected_shapes(cfg: &ModelConfig, num_classes: usize) -> Result<BTreeMap<String, Vec<usize>>> {
    let shapes = Arc::new(Mutex::new(BTreeMap::new()));
    let backend: Box<dyn SimpleBackend> = Box::new(ShapeRecorder(shapes.clone()));
    RetinaNet::new(cfg, num_classes, VarBuilder::from_backend(backend, DType::F32, Device::Cpu))
        .context("building the model")?;
    let shapes = shapes.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone();
    Ok(shapes)
}

/// Every variable under its state_dict name, as a checkpoint stores them.
pub fn state_dict(varmap: &VarMap) -> HashMap<String, Tensor> {
    let data = varmap.data().lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    data.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect()
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

/// Checkpoint tensors to use, by model name, and notes for the user.
struct LoadPlan<'a> {
    assignments: Vec<(String, &'a Tensor)>,
    notes: Vec<String>,
}

/// Matches checkpoint tensors to the model's; all missing, unexpected and
/// mis-shaped tensors are reported in one error.
fn match_checkpoint<'a>(
    expected: &BTreeMap<String, Vec<usize>>,
    tensors: &'a HashMap<String, Tensor>,
    mode: LoadMode,
) -> Result<LoadPlan<'a>> {
    let mut problems = Vec::new();
    let mut notes = Vec::new();
    let mut used = HashSet::new();
    let mut assignments = Vec::new();
    for (name, shape) in expected {
        let key = match mode {
            LoadMode::Backbone => match name.strip_prefix(BODY_PREFIX) {
                Some(key) => key,
                None => continue,
            },
            _ => name.as_str(),
        };
        match tensors.get(key) {
            None => problems.push(format!("missing {key} {shape:?}")),
            Some(t) => {
                used.insert(key);
                if t.dims() == shape.as_slice() {
                    assignments.push((name.clone(), t));
                } else if mode == LoadMode::NewClasses && name.starts_with(CLS_LOGITS_PREFIX) {
                    notes.push(format!(
                        "re-initialised {name}: checkpoint shape {:?}, model shape {shape:?} (another class count)",
                        t.dims()
                    ));
                } else {
                    problems.push(format!("shape of {key}: checkpoint {:?}, model {shape:?}", t.dims()));
                }
            }
        }
    }
    let mut unexpected: Vec<&String> =
        tensors.keys().filter(|k| !used.contains(k.as_str()) && !k.ends_with("num_batches_tracked")).collect();
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
        _ => problems.extend(unexpected.iter().map(|k| format!("unexpected {k} {:?}", tensors[*k].dims()))),
    }
    if !problems.is_empty() {
        let listed = problems.iter().take(MAX_LISTED).cloned().collect::<Vec<_>>().join("; ");
        let more = problems.len().saturating_sub(MAX_LISTED);
        let rest = if more > 0 { format!("; and {more} more") } else { String::new() };
        bail!("weights do not match the model ({} problems): {listed}{rest}", problems.len());
    }
    Ok(LoadPlan { assignments, notes })
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

    #[test]
    fn save_then_load_reproduces_outputs() -> Result<()> {
        let cfg = small_config();
        let dev = Device::Cpu;
        let a = build(&cfg, 3, &dev, 0, None)?;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("model.safetensors");
        candle_core::safetensors::save(&state_dict(&a.varmap), &path)?;
        let mut tensors = candle_core::safetensors::load(&path, &dev)?;
        tensors.insert("backbone.body.bn1.num_batches_tracked".into(), Tensor::new(&[0i64], &dev)?);
        // Another seed: only loading can make the outputs equal.
        let b = build(&cfg, 3, &dev, 1, Some((&tensors, LoadMode::Exact)))?;
        let x = Tensor::rand(0f32, 1., (1, 3, 64, 64), &dev)?;
        let (ya, yb) = (a.model.forward(&x, false)?, b.model.forward(&x, false)?);
        let diff = (ya.cls_logits - yb.cls_logits)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        Ok(())
    }

    /// The inference model keeps no graph, computes what the trained one
    /// computes, and follows in-place updates of the variables: a weight
    /// and a BatchNorm running statistic.
    #[test]
    fn the_inference_model_shares_the_weights_without_a_graph() -> Result<()> {
        let mut cfg = small_config();
        cfg.backbone.norm = BackboneNorm::Bn;
        let dev = Device::Cpu;
        let m = build(&cfg, 3, &dev, 0, None)?;
        let x = Tensor::rand(0f32, 1., (1, 3, 64, 64), &dev)?;
        let same =
            |a: &Tensor, b: &Tensor| -> Result<bool> { Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? == 0.0) };
        let (trained, inferred) = (m.model.forward(&x, false)?, m.inference.forward(&x, false)?);
        assert!(trained.cls_logits.track_op() && !inferred.cls_logits.track_op());
        assert!(same(&trained.cls_logits, &inferred.cls_logits)?);
        let before = inferred.bbox_regression;
        let data = m.varmap.data().lock().expect("varmap lock");
        for name in ["head.regression_head.bbox_reg.bias", "backbone.body.layer4.1.bn2.running_mean"] {
            let var = &data[name];
            var.set(&(var.as_tensor() + 0.5)?)?;
        }
        drop(data);
        let (trained, inferred) = (m.model.forward(&x, false)?, m.inference.forward(&x, false)?);
        assert!(same(&trained.bbox_regression, &inferred.bbox_regression)?);
        assert!(!same(&before, &inferred.bbox_regression)?);
        Ok(())
    }

    /// Under frozen BatchNorm, a trainable convolution's weight changes in
    /// place (the optimiser) and both models compute with the new value.
    #[test]
    fn frozen_norm_convolutions_follow_their_weights() -> Result<()> {
        let cfg = small_config();
        let dev = Device::Cpu;
        let m = build(&cfg, 3, &dev, 0, None)?;
        let x = Tensor::rand(0f32, 1., (1, 3, 64, 64), &dev)?;
        let before = m.inference.forward(&x, false)?.bbox_regression;
        let data = m.varmap.data().lock().expect("varmap lock");
        let var = &data["backbone.body.layer4.0.conv1.weight"];
        var.set(&(var.as_tensor() * 3.0)?)?;
        drop(data);
        for model in [&m.model, &m.inference] {
            let after = model.forward(&x, false)?.bbox_regression;
            assert!((&after - &before)?.abs()?.max_all()?.to_scalar::<f32>()? > 0.0);
        }
        Ok(())
    }

    #[test]
    fn mismatches_are_listed_by_name_in_one_error() -> Result<()> {
        let cfg = small_config();
        let dev = Device::Cpu;
        let mut tensors = state_dict(&build(&cfg, 3, &dev, 0, None)?.varmap);
        tensors.remove("backbone.body.layer1.0.conv1.weight");
        tensors.insert("backbone.fpn.layer_blocks.0.0.bias".into(), Tensor::zeros(7, DType::F32, &dev)?);
        tensors.insert("head.extra.weight".into(), Tensor::zeros(2, DType::F32, &dev)?);
        let Err(err) = build(&cfg, 3, &dev, 0, Some((&tensors, LoadMode::Exact))) else {
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
        let tensors = state_dict(&build(&cfg, 3, &dev, 0, None)?.varmap);
        assert!(build(&cfg, 5, &dev, 0, Some((&tensors, LoadMode::Exact))).is_err());
        // Another seed than the file's: only loading makes tensors equal.
        let b = build(&cfg, 5, &dev, 1, Some((&tensors, LoadMode::NewClasses)))?;
        assert_eq!(b.notes.len(), 2, "{:?}", b.notes);
        assert!(b.notes.iter().all(|n| n.contains(CLS_LOGITS_PREFIX)));
        let loaded = state_dict(&b.varmap);
        let same =
            |k: &str| -> Result<bool> { Ok((&loaded[k] - &tensors[k])?.abs()?.max_all()?.to_scalar::<f32>()? == 0.0) };
        assert!(same("head.classification_head.conv.0.0.weight")? && same("backbone.body.conv1.weight")?);
        Ok(())
    }

    #[test]
    fn backbone_weights_load_under_the_body_prefix() -> Result<()> {
        let cfg = small_config();
        let dev = Device::Cpu;
        let full = state_dict(&build(&cfg, 3, &dev, 0, None)?.varmap);
        let mut body: HashMap<String, Tensor> =
            full.iter().filter_map(|(k, v)| k.strip_prefix(BODY_PREFIX).map(|k| (k.to_string(), v.clone()))).collect();
        body.insert("fc.weight".into(), Tensor::zeros((10, 64), DType::F32, &dev)?);
        let b = build(&cfg, 3, &dev, 1, Some((&body, LoadMode::Backbone)))?;
        assert_eq!(b.notes.len(), 1);
        let loaded = state_dict(&b.varmap);
        let k = "backbone.body.layer4.1.conv2.weight";
        assert_eq!((&loaded[k] - &full[k])?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
        Ok(())
    }

    #[test]
    fn expected_shapes_list_every_variable() -> Result<()> {
        let cfg = small_config();
        let m = build(&cfg, 3, &Device::Cpu, 0, None)?;
        let data = m.varmap.data().lock().expect("varmap lock");
        let built: BTreeMap<String, Vec<usize>> = data.iter().map(|(k, v)| (k.clone(), v.dims().to_vec())).collect();
        assert_eq!(expected_shapes(&cfg, 3)?, built);
        Ok(())
    }

    #[test]
    fn trainable_vars_follow_freeze_at() -> Result<()> {
        let cfg = small_config(); // frozen_bn, freeze_at 2
        let m = build(&cfg, 3, &Device::Cpu, 0, None)?;
        let names: Vec<String> = trainable_vars(&m.varmap, &cfg).into_iter().map(|(n, _)| n).collect();
        assert!(names.contains(&"backbone.body.layer2.0.conv1.weight".to_string()));
        assert!(names.contains(&"head.classification_head.cls_logits.bias".to_string()));
        assert!(names.contains(&"backbone.fpn.extra_blocks.p7.weight".to_string()));
        assert!(!names.iter().any(|n| n.contains("layer1.") || n.contains(".bn") || n == "backbone.body.conv1.weight"));
        Ok(())
    }
}
