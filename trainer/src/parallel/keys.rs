//! Agreeing on a set of names across ranks before a sum all-reduce of per-name values:
//! ranks may have seen different metric names (a Medusa head without loss positions in a
//! micro-batch reports no row; an empty padded micro-batch reports nothing), and a vector
//! all-reduce needs the same layout everywhere.

use super::{Comm, ReduceOp};
use crate::error::{Result, TrainerError};
use std::collections::BTreeSet;
use tch::{Device, Kind, Tensor};

/// FNV-1a over the sorted names (separated by NUL): equal sets give equal hashes.
fn fingerprint(keys: &BTreeSet<String>) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for k in keys {
        for b in k.bytes().chain(std::iter::once(0u8)) {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h as i64
}

/// The union of every rank's `keys` (the same sorted set on every rank). One small
/// all-reduce when all ranks already agree; otherwise the names are all-gathered.
pub fn union_keys(comm: &mut dyn Comm, keys: &BTreeSet<String>) -> Result<BTreeSet<String>> {
    let world = comm.world();
    if world == 1 {
        return Ok(keys.clone());
    }
    let h = fingerprint(keys);
    // max(h) and max(!h) = !min(h): every rank agrees iff max == min
    let dev = comm.device();
    let mut t = Tensor::from_slice(&[h, !h]).to_device(dev);
    comm.all_reduce(&mut t, ReduceOp::Max)?;
    let (mx, not_mn) = (t.int64_value(&[0]), t.int64_value(&[1]));
    if mx == !not_mn {
        return Ok(keys.clone());
    }
    let joined: Vec<u8> = keys
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes();
    let mut len = Tensor::from_slice(&[joined.len() as i64]).to_device(dev);
    comm.all_reduce(&mut len, ReduceOp::Max)?;
    let max_len = len.int64_value(&[0]).max(1);
    let mut mine = joined.clone();
    mine.resize(max_len as usize, 0);
    let input = Tensor::from_slice(&mine).to_device(dev);
    let mut all = Tensor::zeros([max_len * world as i64], (Kind::Uint8, dev));
    comm.all_gather(&mut all, &input)?;
    let bytes = Vec::<u8>::try_from(&all.to_device(Device::Cpu)).map_err(TrainerError::Torch)?;
    let mut out = BTreeSet::new();
    for chunk in bytes.chunks(max_len as usize) {
        let end = chunk.iter().position(|&b| b == 0).unwrap_or(chunk.len());
        let text = String::from_utf8_lossy(&chunk[..end]);
        out.extend(text.split('\n').filter(|s| !s.is_empty()).map(str::to_string));
    }
    Ok(out)
}
