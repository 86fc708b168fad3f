//! What a drafter reads of the target's forward, shared by training (online and offline
//! features) and decoding (`speculative.rs` captures it at verified positions).

/// What a drafter reads from the frozen target's forward, per batch. Online training computes
/// exactly this; offline shards must hold it (`forge prepare-hidden` writes it); decoding
/// captures it at verified positions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FeatureNeeds {
    /// The last hidden state after the final norm (`[B, T, H]`).
    pub last_hidden: bool,
    /// Outputs of these target layers, concatenated (`[B, T, A*H]`).
    pub aux_layers: Vec<i64>,
    /// The target's top-k next-token log-probabilities and ids at every position (0 = none).
    pub target_topk: usize,
}
