//! Reading and writing safetensors files as tch tensors (the one place that converts between
//! the two, used by target loading, checkpoints and exports).

use crate::error::{io_err, ModelError, Result};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn kind_of(path: &Path, name: &str, d: Dtype) -> Result<Kind> {
    Ok(match d {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        other => {
            return Err(ModelError::Safetensors {
                path: path.to_path_buf(),
                msg: format!("tensor {name} has dtype {other:?}, which forge does not read"),
            })
        }
    })
}

fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        other => {
            return Err(ModelError::Invalid(format!(
                "cannot write tensors of kind {other:?} to safetensors"
            )))
        }
    })
}

/// A safetensors file held in memory; tensors are materialised one at a time.
pub struct SafetensorsFile {
    path: std::path::PathBuf,
    bytes: Vec<u8>,
}

impl SafetensorsFile {
    pub fn open(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(io_err(path))?;
        // Validate the header once up front so later accesses cannot fail on format.
        SafeTensors::deserialize(&bytes).map_err(|e| ModelError::Safetensors {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        Ok(Self {
            path: path.to_path_buf(),
            bytes,
        })
    }

    fn parsed(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.bytes).map_err(|e| ModelError::Safetensors {
            path: self.path.clone(),
            msg: e.to_string(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn names(&self) -> Result<Vec<String>> {
        Ok(self.parsed()?.names().into_iter().map(|s| s.to_string()).collect())
    }

    /// The `__metadata__` map of the file (empty when absent).
    pub fn metadata(&self) -> Result<HashMap<String, String>> {
        let (_, meta) = SafeTensors::read_metadata(&self.bytes).map_err(|e| ModelError::Safetensors {
            path: self.path.clone(),
            msg: e.to_string(),
        })?;
        Ok(meta.metadata().clone().unwrap_or_default())
    }

    /// Materialises one tensor on the CPU in its stored dtype.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let st = self.parsed()?;
        let view = st.tensor(name).map_err(|e| ModelError::Safetensors {
            path: self.path.clone(),
            msg: e.to_string(),
        })?;
        self.to_tensor(name, &view)
    }

    fn to_tensor(&self, name: &str, view: &TensorView<'_>) -> Result<Tensor> {
        let kind = kind_of(&self.path, name, view.dtype())?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        Ok(Tensor::f_from_data_size(view.data(), &shape, kind)?)
    }

    /// All tensors of the file, on the CPU, in stored dtype.
    pub fn tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let st = self.parsed()?;
        let mut out = Vec::new();
        for (name, view) in st.tensors() {
            out.push((name.clone(), self.to_tensor(&name, &view)?));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

/// Writes tensors (any device, any supported kind) to a safetensors file with metadata.
/// The file is written to `<path>.tmp` and renamed, so readers never see a partial file.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)], metadata: &HashMap<String, String>) -> Result<()> {
    let mut buffers: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let t = t.detach().to_device(Device::Cpu).contiguous();
        let dtype = dtype_of(t.kind())?;
        let numel = t.numel();
        let mut buf = vec![0u8; numel * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut buf, numel)?;
        let shape = t.size().iter().map(|&d| d as usize).collect();
        buffers.push((name.clone(), dtype, shape, buf));
    }
    let mut views = Vec::with_capacity(buffers.len());
    for (name, dtype, shape, buf) in &buffers {
        let v = TensorView::new(*dtype, shape.clone(), buf)
            .map_err(|e| ModelError::Invalid(format!("tensor {name}: {e}")))?;
        views.push((name.clone(), v));
    }
    let meta = if metadata.is_empty() {
        None
    } else {
        Some(metadata.clone())
    };
    let bytes = safetensors::serialize(views, meta).map_err(|e| ModelError::Safetensors {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    let tmp = path.with_extension("safetensors.tmp");
    std::fs::write(&tmp, &bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    Ok(())
}
