//! libtorch's c10d through the C++ shim in trainer/csrc/c10d_shim.cpp (built by build.rs):
//! TCPStore rendezvous and a ProcessGroupGloo (or ProcessGroupNCCL) backend. C++ exceptions
//! come back as error strings and become [`TrainerError::Dist`] naming the collective.

use super::{check_chunked, Comm, ReduceOp};
use crate::error::{Result, TrainerError};
use std::ffi::{c_char, c_int, c_longlong, c_void, CStr, CString};
use std::time::Duration;
use tch::Tensor;
use torch_sys::C_tensor;

extern "C" {
    fn forge_c10d_has_nccl() -> c_int;
    fn forge_c10d_free_error(e: *mut c_char);
    fn forge_c10d_new(
        host: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        timeout_ms: c_longlong,
        backend: c_int,
        agent_store: c_int,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn forge_c10d_free(group: *mut c_void);
    fn forge_c10d_subgroup(
        parent: *mut c_void,
        name: *const c_char,
        rank: c_int,
        world: c_int,
        out: *mut *mut c_void,
    ) -> *mut c_char;
    fn forge_c10d_all_reduce(group: *mut c_void, t: *mut C_tensor, op: c_int) -> *mut c_char;
    fn forge_c10d_broadcast(group: *mut c_void, t: *mut C_tensor, root: c_int) -> *mut c_char;
    fn forge_c10d_all_gather(group: *mut c_void, out: *mut C_tensor, input: *mut C_tensor) -> *mut c_char;
    fn forge_c10d_reduce_scatter(
        group: *mut c_void,
        out: *mut C_tensor,
        input: *mut C_tensor,
        op: c_int,
    ) -> *mut c_char;
    fn forge_c10d_barrier(group: *mut c_void) -> *mut c_char;
    fn forge_cuda_peak_allocated(device: c_int) -> c_longlong;
    fn forge_cuda_reset_peak(device: c_int);
}

/// Peak bytes allocated by the CUDA caching allocator on `device` since the last
/// [`cuda_reset_peak`] (what `torch.cuda.max_memory_allocated` reads), or `None` when this
/// build has no CUDA support in its shim (it comes with NCCL) or the device is not CUDA.
pub fn cuda_peak_allocated(device: tch::Device) -> Option<u64> {
    let tch::Device::Cuda(i) = device else { return None };
    // SAFETY: a plain function taking an int; it catches every C++ exception.
    let v = unsafe { forge_cuda_peak_allocated(i as c_int) };
    (v >= 0).then_some(v as u64)
}

/// Resets the CUDA caching allocator's peak statistics of `device` (no-op elsewhere).
pub fn cuda_reset_peak(device: tch::Device) {
    if let tch::Device::Cuda(i) = device {
        // SAFETY: as above.
        unsafe { forge_cuda_reset_peak(i as c_int) }
    }
}

/// Which c10d backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    Gloo,
    Nccl,
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Gloo => "gloo",
            BackendKind::Nccl => "nccl",
        }
    }
}

/// True when this build's shim includes ProcessGroupNCCL.
pub fn has_nccl() -> bool {
    // SAFETY: a plain function without arguments.
    unsafe { forge_c10d_has_nccl() != 0 }
}

/// Turns the shim's error string (NULL = success) into a Result naming the collective.
fn check(op: &str, err: *mut c_char) -> Result<()> {
    if err.is_null() {
        return Ok(());
    }
    // SAFETY: a non-null return is a NUL-terminated string malloc'd by the shim; we copy it
    // and hand it back to the shim's free.
    let message = unsafe {
        let m = CStr::from_ptr(err).to_string_lossy().into_owned();
        forge_c10d_free_error(err);
        m
    };
    Err(TrainerError::Dist { op: op.into(), message })
}

fn op_code(op: ReduceOp) -> c_int {
    match op {
        ReduceOp::Sum => 0,
        ReduceOp::Max => 1,
        ReduceOp::Min => 2,
    }
}

/// A c10d process group (and the TCPStore it rendezvoused through).
pub struct ProcessGroup {
    handle: *mut c_void,
    rank: usize,
    world: usize,
    kind: BackendKind,
    device: tch::Device,
}

impl ProcessGroup {
    /// Rendezvous at `host:port` (rank 0 hosts the store and waits for `world` workers; with
    /// `agent_store` a launcher such as torchrun's agent hosts it and every rank connects),
    /// then creates the backend. `timeout` bounds the rendezvous and every collective;
    /// `device` is where this rank's tensors live (the CPU for Gloo, its GPU for NCCL).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        host: &str,
        port: u16,
        rank: usize,
        world: usize,
        timeout: Duration,
        kind: BackendKind,
        agent_store: bool,
        device: tch::Device,
    ) -> Result<Self> {
        let fail = |message: String| TrainerError::Dist {
            op: "init".into(),
            message,
        };
        if world == 0 || rank >= world {
            return Err(fail(format!("rank {rank} is not below world size {world}")));
        }
        if kind == BackendKind::Nccl && !has_nccl() {
            return Err(fail(
                "dist.backend nccl: this forge build has no NCCL (it was built against a libtorch without libtorch_cuda and the NCCL headers); use dist.backend gloo or rebuild with the CUDA torch wheel".into(),
            ));
        }
        let c_host = CString::new(host).map_err(|_| fail(format!("MASTER_ADDR '{host}' contains a NUL byte")))?;
        let mut handle: *mut c_void = std::ptr::null_mut();
        let timeout_ms = timeout.as_millis().min(i64::MAX as u128) as c_longlong;
        // SAFETY: valid C string and out-pointer; the shim catches every C++ exception.
        let err = unsafe {
            forge_c10d_new(
                c_host.as_ptr(),
                port as c_int,
                rank as c_int,
                world as c_int,
                timeout_ms,
                match kind {
                    BackendKind::Gloo => 0,
                    BackendKind::Nccl => 1,
                },
                agent_store as c_int,
                &mut handle,
            )
        };
        check("init", err).map_err(|e| match e {
            TrainerError::Dist { message, .. } => fail(format!(
                "rendezvous at {host}:{port} as rank {rank} of {world} ({}) failed: {message}",
                kind.name()
            )),
            other => other,
        })?;
        Ok(ProcessGroup {
            handle,
            rank,
            world,
            kind,
            device,
        })
    }

    pub fn backend(&self) -> BackendKind {
        self.kind
    }

    /// The group of `members` (ranks of this group, ascending; this rank among them), named
    /// `name`: every member calls it with the same name and members (the non-members create
    /// their own groups meanwhile), as `torch.distributed.new_group` does.
    pub fn subgroup(&self, name: &str, members: &[usize]) -> Result<ProcessGroup> {
        let fail = |message: String| TrainerError::Dist {
            op: format!("subgroup {name}"),
            message,
        };
        let rank = members
            .iter()
            .position(|&m| m == self.rank)
            .ok_or_else(|| fail(format!("rank {} is not one of the members {members:?}", self.rank)))?;
        if members.windows(2).any(|w| w[0] >= w[1]) || members.iter().any(|&m| m >= self.world) {
            return Err(fail(format!(
                "members {members:?} must be ascending ranks below {}",
                self.world
            )));
        }
        let c_name = CString::new(format!("{name}/")).map_err(|_| fail("the name contains a NUL byte".into()))?;
        let mut handle: *mut c_void = std::ptr::null_mut();
        // SAFETY: live parent handle, valid C string and out-pointer; the shim catches every
        // C++ exception.
        let err = unsafe {
            forge_c10d_subgroup(
                self.handle,
                c_name.as_ptr(),
                rank as c_int,
                members.len() as c_int,
                &mut handle,
            )
        };
        check(&format!("subgroup {name}"), err)?;
        Ok(ProcessGroup {
            handle,
            rank,
            world: members.len(),
            kind: self.kind,
            device: self.device,
        })
    }
}

// SAFETY: the handle is owned by this value alone and every call through it comes from the
// thread that holds the value (c10d backends may be used from any one thread at a time).
unsafe impl Send for ProcessGroup {}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        if !self.handle.is_null() {
            // SAFETY: the handle came from forge_c10d_new and is freed once.
            unsafe { forge_c10d_free(self.handle) };
            self.handle = std::ptr::null_mut();
        }
    }
}

fn contiguous(op: &str, t: &Tensor) -> Result<()> {
    if t.is_contiguous() {
        Ok(())
    } else {
        Err(TrainerError::Dist {
            op: op.into(),
            message: "needs a contiguous tensor".into(),
        })
    }
}

impl Comm for ProcessGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.world
    }
    fn all_reduce(&mut self, t: &mut Tensor, op: ReduceOp) -> Result<()> {
        contiguous("all_reduce", t)?;
        // SAFETY: live group handle and tensor; the shim only reads/writes the tensor's data.
        check("all_reduce", unsafe {
            forge_c10d_all_reduce(self.handle, t.as_mut_ptr(), op_code(op))
        })
    }
    fn reduce_scatter(&mut self, out: &mut Tensor, input: &Tensor, op: ReduceOp) -> Result<()> {
        check_chunked("reduce_scatter", out, input, self.world)?;
        let mut input = input.shallow_clone();
        // SAFETY: as above; `input` is only read.
        check("reduce_scatter", unsafe {
            forge_c10d_reduce_scatter(self.handle, out.as_mut_ptr(), input.as_mut_ptr(), op_code(op))
        })
    }
    fn all_gather(&mut self, out: &mut Tensor, input: &Tensor) -> Result<()> {
        check_chunked("all_gather", input, out, self.world)?;
        let mut input = input.shallow_clone();
        // SAFETY: as above; `input` is only read.
        check("all_gather", unsafe {
            forge_c10d_all_gather(self.handle, out.as_mut_ptr(), input.as_mut_ptr())
        })
    }
    fn broadcast(&mut self, t: &mut Tensor, root: usize) -> Result<()> {
        contiguous("broadcast", t)?;
        if root >= self.world {
            return Err(TrainerError::Dist {
                op: "broadcast".into(),
                message: format!("root rank {root} does not exist in a world of {}", self.world),
            });
        }
        // SAFETY: as above.
        check("broadcast", unsafe {
            forge_c10d_broadcast(self.handle, t.as_mut_ptr(), root as c_int)
        })
    }
    fn barrier(&mut self) -> Result<()> {
        // SAFETY: live group handle.
        check("barrier", unsafe { forge_c10d_barrier(self.handle) })
    }
    fn describe(&self) -> String {
        format!("{}, rank {} of {}", self.kind.name(), self.rank, self.world)
    }
    fn subgroup(&self, name: &str, members: &[usize]) -> Result<Box<dyn Comm>> {
        if members == [self.rank] {
            return Ok(Box::new(super::SingleProcess));
        }
        Ok(Box::new(ProcessGroup::subgroup(self, name, members)?))
    }
    fn device(&self) -> tch::Device {
        self.device
    }
}
