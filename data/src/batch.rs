//! Epoch plans (deterministic, length-aware, rank-sharded) and padded micro-batches.
//!
//! An epoch's plan is built the same way on every rank from (seed, epoch, sample lengths):
//! samples are shuffled, grouped into windows of `micro_batch_size * WINDOW` samples, sorted by
//! length inside each window (so a micro-batch holds similar lengths and pads little), cut into
//! micro-batches, and the micro-batches are shuffled. The global list is padded with empty
//! micro-batches to a multiple of the world size and rank r takes micro-batches r, r+w, r+2w, ...
//! So the ranks' shards are disjoint, together they cover every sample once, every rank runs the
//! same number of micro-batches, and `world` ranks with micro-batch b see exactly the micro-batches
//! one rank would see over `world` consecutive gradient-accumulation steps.

/// Micro-batches per sorting window.
const WINDOW: usize = 64;

/// splitmix64: a small, seedable, platform-independent generator.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (n > 0), without modulo bias.
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let x = self.next_u64();
            if x < zone {
                return x % n;
            }
        }
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// How an epoch is planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PlanOptions {
    pub micro_batch_size: usize,
    pub seed: u64,
    pub shuffle: bool,
    /// Group similar lengths into the same micro-batch.
    pub length_grouping: bool,
}

/// Every micro-batch (sample indices) of an epoch, for all ranks, in global order.
pub fn global_plan(lengths: &[usize], epoch: u64, opts: &PlanOptions) -> Vec<Vec<usize>> {
    let mb = opts.micro_batch_size.max(1);
    let mut order: Vec<usize> = (0..lengths.len()).collect();
    let mut rng = Rng::new(
        opts.seed
            .wrapping_mul(0x2545_f491_4f6c_dd1d)
            .wrapping_add(epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15))
            ^ 0x5eed,
    );
    if opts.shuffle {
        rng.shuffle(&mut order);
    }
    let mut batches: Vec<Vec<usize>> = Vec::with_capacity(order.len().div_ceil(mb));
    if opts.length_grouping && mb > 1 {
        for window in order.chunks(mb * WINDOW) {
            let mut w = window.to_vec();
            // stable: equal lengths keep their shuffled order
            w.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
            batches.extend(w.chunks(mb).map(<[usize]>::to_vec));
        }
        if opts.shuffle {
            rng.shuffle(&mut batches);
        }
    } else {
        batches.extend(order.chunks(mb).map(<[usize]>::to_vec));
    }
    batches
}

/// Like [`global_plan`], but visiting groups of samples (hidden-state shards) one after the
/// other: the group order is shuffled, and samples are shuffled and length-grouped inside each
/// group, so a reader streaming shards loads each one once per epoch.
pub fn global_plan_grouped(
    lengths: &[usize],
    groups: &[std::ops::Range<usize>],
    epoch: u64,
    opts: &PlanOptions,
) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..groups.len()).collect();
    if opts.shuffle {
        let mut rng = Rng::new(opts.seed ^ epoch.wrapping_mul(0xd1b5_4a32_d192_ed03) ^ 0x6709);
        rng.shuffle(&mut order);
    }
    let mut out = Vec::new();
    for g in order {
        let range = groups[g].clone();
        let local = global_plan(&lengths[range.clone()], epoch ^ ((g as u64) << 32), opts);
        out.extend(
            local
                .into_iter()
                .map(|b| b.into_iter().map(|i| i + range.start).collect::<Vec<_>>()),
        );
    }
    out
}

/// The micro-batches rank `rank` of `world` runs from a global plan (empty ones pad the end so
/// every rank runs the same number; an empty micro-batch contributes nothing).
pub fn shard_plan(mut global: Vec<Vec<usize>>, rank: usize, world: usize) -> Vec<Vec<usize>> {
    let world = world.max(1);
    let padded = global.len().div_ceil(world) * world;
    global.resize(padded, Vec::new());
    global.into_iter().skip(rank).step_by(world).collect()
}

/// [`shard_plan`] of [`global_plan`].
pub fn rank_plan(lengths: &[usize], epoch: u64, opts: &PlanOptions, rank: usize, world: usize) -> Vec<Vec<usize>> {
    shard_plan(global_plan(lengths, epoch, opts), rank, world)
}

/// A right-padded micro-batch, row-major `[batch, len]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub batch: usize,
    pub len: usize,
    pub input_ids: Vec<i64>,
    /// 1 on real tokens, 0 on padding.
    pub attention_mask: Vec<i64>,
    /// 0.. per row on real tokens, 0 on padding.
    pub position_ids: Vec<i64>,
    pub loss_mask: Vec<i64>,
    /// Number of real tokens per row.
    pub lengths: Vec<usize>,
}

impl Batch {
    /// Pads samples `(input_ids, loss_mask)` to the longest with `pad_id`.
    pub fn collate(samples: &[(&[u32], &[u8])], pad_id: u32) -> Batch {
        let len = samples.iter().map(|(ids, _)| ids.len()).max().unwrap_or(0);
        let n = samples.len();
        let mut b = Batch {
            batch: n,
            len,
            input_ids: vec![pad_id as i64; n * len],
            attention_mask: vec![0; n * len],
            position_ids: vec![0; n * len],
            loss_mask: vec![0; n * len],
            lengths: Vec::with_capacity(n),
        };
        for (r, (ids, mask)) in samples.iter().enumerate() {
            let row = r * len;
            for (j, (&t, &m)) in ids.iter().zip(mask.iter()).enumerate() {
                b.input_ids[row + j] = t as i64;
                b.attention_mask[row + j] = 1;
                b.position_ids[row + j] = j as i64;
                b.loss_mask[row + j] = m as i64;
            }
            b.lengths.push(ids.len());
        }
        b
    }

    pub fn tokens(&self) -> usize {
        self.lengths.iter().sum()
    }

    pub fn trainable_tokens(&self) -> usize {
        self.loss_mask.iter().filter(|&&m| m != 0).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_below_is_in_range_and_shuffle_is_a_permutation() {
        let mut r = Rng::new(7);
        for n in 1..50 {
            assert!(r.below(n) < n);
        }
        let mut v: Vec<usize> = (0..100).collect();
        r.shuffle(&mut v);
        let mut s = v.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_ne!(v, s);
    }

    #[test]
    fn collate_pads_right() {
        let a: (&[u32], &[u8]) = (&[5, 6, 7], &[0, 1, 1]);
        let b: (&[u32], &[u8]) = (&[8], &[1]);
        let batch = Batch::collate(&[a, b], 0);
        assert_eq!(batch.input_ids, vec![5, 6, 7, 8, 0, 0]);
        assert_eq!(batch.attention_mask, vec![1, 1, 1, 1, 0, 0]);
        assert_eq!(batch.position_ids, vec![0, 1, 2, 0, 0, 0]);
        assert_eq!(batch.loss_mask, vec![0, 1, 1, 1, 0, 0]);
        assert_eq!(batch.tokens(), 4);
        assert_eq!(batch.trainable_tokens(), 3);
    }
}
