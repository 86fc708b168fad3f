//! How the process's C allocator treats the large host buffers of a training step.
//!
//! libtorch's CPU tensors come from glibc's malloc. By default glibc serves every allocation
//! above a threshold (at most 32 MiB) with its own `mmap` and returns it to the kernel with
//! `munmap` when freed, and trims the heap's free top back to the kernel too. A training
//! step allocates and frees the same large buffers every step (logits of `[tokens, vocab]`,
//! gradients of vocab x hidden heads, optimizer temporaries), so each step the kernel hands
//! out and zeroes the same gigabytes again, page by page: on the demo target's Medusa step,
//! about 2 million page faults over five steps (`/usr/bin/time -v`). [`keep_freed_memory`]
//! raises both thresholds so that freed buffers stay in the heap for the next step: the
//! process's resident memory stays at its peak instead of breathing (what PyTorch's CUDA
//! caching allocator does on a GPU). `forge` calls it at start-up unless
//! `FORGE_MALLOC=default` is set.

/// Keeps freed host memory in the process for reuse (see the module). Returns whether the
/// allocator took the settings (false off glibc, or when `FORGE_MALLOC=default`).
pub fn keep_freed_memory() -> bool {
    if std::env::var("FORGE_MALLOC").is_ok_and(|v| v == "default") {
        return false;
    }
    set()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set() -> bool {
    use std::ffi::c_int;
    extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }
    // glibc's malloc.h
    const M_TRIM_THRESHOLD: c_int = -1;
    const M_TOP_PAD: c_int = -2;
    const M_MMAP_THRESHOLD: c_int = -3;
    // SAFETY: mallopt only changes allocator parameters; called before any other thread of
    // this process allocates through libtorch (at start-up).
    unsafe {
        mallopt(M_MMAP_THRESHOLD, c_int::MAX) == 1
            && mallopt(M_TRIM_THRESHOLD, c_int::MAX) == 1
            && mallopt(M_TOP_PAD, 256 << 20) == 1
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set() -> bool {
    false
}
