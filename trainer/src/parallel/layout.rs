//! The flat layout of the trainable parameters used by data-parallel gradient buckets and
//! ZeRO sharding: parameters (sorted by name) laid end to end, padded to a multiple of the
//! world size, cut into buckets whose lengths are multiples of the world size; rank r owns
//! the r-th 1/world of every bucket.

use tch::{Device, Kind, Tensor};

/// A contiguous run of one parameter's flattened elements inside a rank's shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub param: usize,
    /// Offset in the flattened parameter.
    pub param_offset: i64,
    /// Offset in this rank's shard.
    pub shard_offset: i64,
    pub len: i64,
}

/// The flat layout: parameter offsets, buckets and this rank's pieces of them.
#[derive(Debug, Clone)]
pub struct Layout {
    /// Start of each parameter in the flat index space.
    starts: Vec<i64>,
    numels: Vec<i64>,
    pub total: i64,
    pub padded: i64,
    /// (start, len) of each bucket; len is a multiple of the world size.
    pub buckets: Vec<(i64, i64)>,
    world: i64,
    rank: i64,
}

impl Layout {
    pub fn new(numels: &[i64], bucket_elems: i64, rank: usize, world: usize) -> Layout {
        let w = world.max(1) as i64;
        let mut starts = Vec::with_capacity(numels.len());
        let mut total = 0;
        for &n in numels {
            starts.push(total);
            total += n;
        }
        let padded = ((total + w - 1) / w).max(1) * w;
        let bucket = (bucket_elems / w).max(1) * w;
        let mut buckets = Vec::new();
        let mut s = 0;
        while s < padded {
            let len = bucket.min(padded - s);
            buckets.push((s, len));
            s += len;
        }
        Layout {
            starts,
            numels: numels.to_vec(),
            total,
            padded,
            buckets,
            world: w,
            rank: rank as i64,
        }
    }

    /// Elements of one rank's shard.
    pub fn shard_len(&self) -> i64 {
        self.padded / self.world
    }

    /// This rank's piece of bucket k: (flat start, len, shard offset).
    pub fn piece(&self, k: usize) -> (i64, i64, i64) {
        let (s, l) = self.buckets[k];
        let part = l / self.world;
        (s + self.rank * part, part, s / self.world)
    }

    /// Parameter runs covering the flat range [start, start+len) (padding excluded), with
    /// `shard_offset` = position inside that range.
    pub fn runs(&self, start: i64, len: i64) -> Vec<Segment> {
        let end = start + len;
        let mut out = Vec::new();
        for (i, (&ps, &n)) in self.starts.iter().zip(&self.numels).enumerate() {
            let (a, b) = (ps.max(start), (ps + n).min(end));
            if a < b {
                out.push(Segment {
                    param: i,
                    param_offset: a - ps,
                    shard_offset: a - start,
                    len: b - a,
                });
            }
        }
        out
    }

    /// Every segment of this rank's shard (shard_offset relative to the whole shard).
    pub fn shard_segments(&self) -> Vec<Segment> {
        let mut out = Vec::new();
        for k in 0..self.buckets.len() {
            let (s, l, off) = self.piece(k);
            for mut seg in self.runs(s, l) {
                seg.shard_offset += off;
                out.push(seg);
            }
        }
        out
    }
}

/// The flat range [start, start+len) of `tensors` (flattened, laid out as in `layout`) as one
/// new fp32 tensor; padding and undefined tensors read as zeros.
pub(crate) fn gather_flat(layout: &Layout, tensors: &[Tensor], start: i64, len: i64, device: Device) -> Tensor {
    let out = Tensor::zeros([len], (Kind::Float, device));
    tch::no_grad(|| {
        for seg in layout.runs(start, len) {
            let t = &tensors[seg.param];
            if !t.defined() {
                continue;
            }
            let src = t.view(-1).narrow(0, seg.param_offset, seg.len);
            out.narrow(0, seg.shard_offset, seg.len).copy_(&src);
        }
    });
    out
}

/// Writes `flat` (the range [start, start+len)) back into `tensors` (defined ones only).
pub(crate) fn scatter_flat(layout: &Layout, tensors: &[Tensor], start: i64, flat: &Tensor) {
    tch::no_grad(|| {
        for seg in layout.runs(start, flat.size()[0]) {
            let t = &tensors[seg.param];
            if !t.defined() {
                continue;
            }
            let mut dst = t.view(-1).narrow(0, seg.param_offset, seg.len);
            dst.copy_(&flat.narrow(0, seg.shard_offset, seg.len));
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_pieces_partition_the_flat_space() {
        // params of 5, 3 and 9 elements = 17, world 2 -> padded 18, buckets of 4
        let l0 = Layout::new(&[5, 3, 9], 4, 0, 2);
        let l1 = Layout::new(&[5, 3, 9], 4, 1, 2);
        assert_eq!((l0.total, l0.padded, l0.shard_len()), (17, 18, 9));
        assert_eq!(l0.buckets, vec![(0, 4), (4, 4), (8, 4), (12, 4), (16, 2)]);
        let mut seen = vec![0; 17];
        for l in [&l0, &l1] {
            let mut shard_cover = [0; 9];
            for seg in l.shard_segments() {
                let flat = l.starts[seg.param] + seg.param_offset;
                for i in 0..seg.len {
                    seen[(flat + i) as usize] += 1;
                    shard_cover[(seg.shard_offset + i) as usize] += 1;
                }
            }
            // 17 real elements: rank 1's last slot is padding
            assert!(shard_cover.iter().all(|&c| c <= 1));
        }
        assert!(seen.iter().all(|&c| c == 1), "{seen:?}");
        // rank 1 owns flat [2,4), [6,8), [10,12), [14,16), [17,18) = padding at 17
        let segs1 = l1.shard_segments();
        let flat1: Vec<i64> = segs1
            .iter()
            .flat_map(|s| (0..s.len).map(move |i| (s.param, s.param_offset + i)))
            .map(|(p, o)| l1.starts[p] + o)
            .collect();
        assert_eq!(flat1, vec![2, 3, 6, 7, 10, 11, 14, 15]);
    }
}
