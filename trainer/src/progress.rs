//! Progress reporting without a user interface: long library operations take a
//! `&mut dyn Progress` and the caller draws it (the `forge` binary with indicatif bars, a test
//! or another program with [`NoProgress`] or its own counter).

/// What a long operation reports: phases of known (or not yet known) length and the units
/// done in them. Every method has a no-op default.
pub trait Progress: Send {
    /// A new phase named `what` of `len` units (0 when not known yet).
    fn start(&mut self, what: &str, len: u64) {
        let _ = (what, len);
    }
    /// The phase's length is now `len` units (the position restarts at 0 when it changes).
    fn set_len(&mut self, len: u64) {
        let _ = len;
    }
    /// `pos` units of the phase are done.
    fn set_position(&mut self, pos: u64) {
        let _ = pos;
    }
    /// `n` more units are done.
    fn inc(&mut self, n: u64) {
        let _ = n;
    }
    /// A short status beside the count (e.g. `tau 3.21`).
    fn set_message(&mut self, msg: &str) {
        let _ = msg;
    }
    /// The phase is over.
    fn finish(&mut self) {}
}

/// Reports nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {}
