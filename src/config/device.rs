//! `--device auto|cpu|cuda|cuda:N|metal|metal:N` to a Candle device.

use anyhow::{bail, Context, Result};
use candle_core::utils::{cuda_is_available, metal_is_available};
use candle_core::Device;

/// Parses and opens a device. `auto` takes CUDA if this binary was built
/// with it and a GPU opens, else Metal likewise, else the CPU.
pub fn parse_device(spec: &str) -> Result<Device> {
    let (kind, ordinal) = match spec.split_once(':') {
        Some((kind, n)) => {
            let n: usize = n.parse().with_context(|| format!("--device {spec}: `{n}` is not a device number"))?;
            (kind, n)
        }
        None => (spec, 0),
    };
    match kind {
        "cpu" if spec == "cpu" => Ok(Device::Cpu),
        "auto" if spec == "auto" => Ok(auto_device()),
        "cuda" if !cfg!(feature = "cuda") => {
            bail!("--device {spec}: this binary was built without CUDA (rebuild with `--features cuda`)")
        }
        "metal" if !cfg!(feature = "metal") => {
            bail!("--device {spec}: this binary was built without Metal (rebuild with `--features metal`)")
        }
        "cuda" => Device::new_cuda(ordinal).with_context(|| format!("--device {spec}: cannot open the GPU")),
        "metal" => Device::new_metal(ordinal).with_context(|| format!("--device {spec}: cannot open the GPU")),
        _ => bail!("--device {spec}: expected auto, cpu, cuda, cuda:N, metal or metal:N"),
    }
}

/// The first of CUDA, Metal and the CPU that this binary was built for and
/// that opens.
fn auto_device() -> Device {
    let cuda = cuda_is_available().then(|| Device::new_cuda(0).ok()).flatten();
    let metal = || metal_is_available().then(|| Device::new_metal(0).ok()).flatten();
    cuda.or_else(metal).unwrap_or(Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_auto_and_errors() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device("auto").is_ok());
        for (spec, expected) in
            [("gpu", "expected auto, cpu"), ("cuda:x", "not a device number"), ("cpu:1", "expected auto")]
        {
            let err = parse_device(spec).unwrap_err().to_string();
            assert!(err.contains(expected), "{spec}: {err}");
        }
        if !cfg!(feature = "cuda") {
            assert!(parse_device("cuda:0").unwrap_err().to_string().contains("built without CUDA"));
        }
    }
}
