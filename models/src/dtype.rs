use crate::error::{ModelError, Result};
use tch::{Device, Kind};

/// Floating-point formats forge computes and stores in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
}

impl DType {
    pub const NAMES: &'static [&'static str] = &["fp32", "bf16", "fp16"];

    pub fn parse(s: &str) -> Option<DType> {
        match s {
            "fp32" | "f32" | "float32" => Some(DType::F32),
            "bf16" | "bfloat16" => Some(DType::BF16),
            "fp16" | "f16" | "float16" | "half" => Some(DType::F16),
            _ => None,
        }
    }
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "fp32",
            DType::BF16 => "bf16",
            DType::F16 => "fp16",
        }
    }
    /// The format of a tensor kind (None for kinds forge does not compute in).
    pub fn of(kind: Kind) -> Option<DType> {
        match kind {
            Kind::Float => Some(DType::F32),
            Kind::BFloat16 => Some(DType::BF16),
            Kind::Half => Some(DType::F16),
            _ => None,
        }
    }
    pub fn kind(self) -> Kind {
        match self {
            DType::F32 => Kind::Float,
            DType::BF16 => Kind::BFloat16,
            DType::F16 => Kind::Half,
        }
    }
}

/// Waits for the work queued on `device` (CUDA kernels run asynchronously): what a timer
/// around GPU work needs before it reads the clock. A no-op on the CPU.
pub fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// Parses `auto`, `cpu`, `cuda` or `cuda:N`. `auto` picks CUDA device 0 when available.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "auto" => Ok(Device::cuda_if_available()),
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(0),
        _ => match s.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()) {
            Some(i) => cuda(i),
            None => Err(ModelError::Invalid(format!(
                "device '{s}' is not one of auto, cpu, cuda, cuda:N"
            ))),
        },
    }
}

fn cuda(i: usize) -> Result<Device> {
    if !tch::Cuda::is_available() {
        return Err(ModelError::Invalid(format!(
            "device cuda:{i} requested but CUDA is not available in this build/machine (use cpu)"
        )));
    }
    let n = tch::Cuda::device_count() as usize;
    if i >= n {
        return Err(ModelError::Invalid(format!(
            "device cuda:{i} requested but only {n} GPU(s) are visible"
        )));
    }
    Ok(Device::Cuda(i))
}
