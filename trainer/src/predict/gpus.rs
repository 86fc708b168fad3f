//! The GPUs `forge predict` knows, as data: peak dense bf16 tensor throughput and HBM bandwidth
//! from each vendor datasheet (the source is in the row). Sparse ("with sparsity") figures are
//! halved to the dense figure the roofline needs.

use super::PredictError;

/// One GPU: what the roofline needs and where the numbers come from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Gpu {
    /// The name `--gpu` takes (lower case).
    pub name: &'static str,
    /// The product as its datasheet names it.
    pub label: &'static str,
    /// Peak dense bf16 tensor-core throughput, FLOP/s.
    pub bf16_flops: f64,
    /// Peak memory bandwidth, bytes/s.
    pub bandwidth: f64,
    /// Memory, GB (as the datasheet states it).
    pub memory_gb: f64,
    /// The vendor page or datasheet the numbers are read from.
    pub source: &'static str,
    /// How the numbers were read from it.
    pub note: &'static str,
}

/// Every GPU `forge predict --gpu` accepts.
pub const GPUS: &[Gpu] = &[
    Gpu {
        name: "a100",
        label: "NVIDIA A100 80GB SXM",
        bf16_flops: 312e12,
        bandwidth: 2.039e12,
        memory_gb: 80.0,
        source: "https://www.nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf",
        note: "BF16 Tensor Core 312 TFLOPS (624 with sparsity); 80GB HBM2e SXM: 2,039 GB/s",
    },
    Gpu {
        name: "h100",
        label: "NVIDIA H100 SXM",
        bf16_flops: 989.5e12,
        bandwidth: 3.35e12,
        memory_gb: 80.0,
        source: "https://www.nvidia.com/en-us/data-center/h100/",
        note: "BF16 Tensor Core 1,979 TFLOPS with sparsity (989.5 dense); 3.35 TB/s HBM3",
    },
    Gpu {
        name: "h200",
        label: "NVIDIA H200 SXM",
        bf16_flops: 989.5e12,
        bandwidth: 4.8e12,
        memory_gb: 141.0,
        source: "https://www.nvidia.com/en-us/data-center/h200/",
        note: "BF16 Tensor Core 1,979 TFLOPS with sparsity (989.5 dense); 4.8 TB/s HBM3e",
    },
    Gpu {
        name: "b200",
        label: "NVIDIA B200 (HGX, 1000 W)",
        bf16_flops: 2.25e15,
        bandwidth: 8.0e12,
        memory_gb: 180.0,
        source: "https://www.nvidia.com/en-us/data-center/hgx/",
        note: "HGX B200 per GPU: FP16/BF16 Tensor Core 4.5 PFLOPS with sparsity (2.25 dense); 8 TB/s HBM3e",
    },
    Gpu {
        name: "l40s",
        label: "NVIDIA L40S",
        bf16_flops: 362.05e12,
        bandwidth: 0.864e12,
        memory_gb: 48.0,
        source: "https://www.nvidia.com/en-us/data-center/l40s/",
        note: "BF16 Tensor Core 362.05 TFLOPS (733 with sparsity); 48GB GDDR6: 864 GB/s",
    },
];

/// The GPU called `name` (case-insensitive; `h100-sxm`-style suffixes are not accepted, only
/// the names in [`GPUS`]).
pub fn gpu(name: &str) -> Result<&'static Gpu, PredictError> {
    let key = name.trim().to_ascii_lowercase();
    GPUS.iter()
        .find(|g| g.name == key)
        .ok_or_else(|| PredictError::UnknownGpu {
            name: name.to_string(),
            known: GPUS.iter().map(|g| g.name).collect::<Vec<_>>().join(", "),
        })
}
