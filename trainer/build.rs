// 1. Bakes libtorch's library folder into the rpath of every binary and test of this crate,
//    so `forge` runs without LD_LIBRARY_PATH (torch-sys exports the folder as
//    DEP_TCH_LIBTORCH_LIB).
// 2. Compiles the c10d shim (trainer/csrc/c10d_shim.cpp: TCPStore + ProcessGroupGloo, and
//    ProcessGroupNCCL when libtorch_cuda and the NCCL headers are present) and the optimizer
//    shim (trainer/csrc/optim_shim.cpp: fused AdamW and the foreach ops, which tch does not
//    bind) with the `cc` crate against libtorch's headers and gloo's (FORGE_GLOO_INCLUDE,
//    from scripts/setup.sh).
use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=FORGE_GLOO_INCLUDE");
    println!("cargo:rerun-if-env-changed=FORGE_NVIDIA_DIR");
    println!("cargo:rerun-if-env-changed=FORGE_NCCL");
    println!("cargo:rerun-if-env-changed=FORGE_LINK_TORCH_CUDA");
    println!("cargo:rerun-if-changed=csrc/c10d_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/optim_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/guarded.h");
    println!("cargo::rustc-check-cfg=cfg(forge_nccl)");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        panic!("DEP_TCH_LIBTORCH_LIB is not set: torch-sys did not find libtorch (run scripts/setup.sh)");
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    let lib = PathBuf::from(lib);
    // Without this the linker drops libtorch_cuda (nothing references it directly) and
    // CUDA reports unavailable. Only on a full CUDA install (cuDNN present), or when
    // FORGE_LINK_TORCH_CUDA=1 (scripts/device-check.sh builds for another machine's CUDA).
    let forced = std::env::var("FORGE_LINK_TORCH_CUDA").is_ok_and(|v| v == "1");
    let full_cuda = lib.join("libtorch_cuda.so").exists() && (forced || lib.join("../../nvidia/cudnn").exists());
    if full_cuda {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    build_shim(&lib);
}

/// Headers the NCCL translation unit needs (ProcessGroupNCCL.hpp pulls in ATen's CUDA context).
const NCCL_HEADERS: &[&str] = &[
    "nccl.h",
    "cuda_runtime_api.h",
    "crt/host_config.h",
    "nv/target",
    "cublas_v2.h",
    "cusparse.h",
    "cusolverDn.h",
];

/// Include folders of a full CUDA wheel install (site-packages/nvidia/*/include: nvidia-nccl-cu13,
/// nvidia-cuda-runtime, -crt, -cccl, cuBLAS, cuSPARSE, cuSOLVER), when libtorch_cuda is present
/// and every header NCCL needs is found. FORGE_NVIDIA_DIR overrides the nvidia folder;
/// FORGE_NCCL=0 turns NCCL off.
fn nccl_includes(lib: &Path) -> Option<Vec<PathBuf>> {
    if std::env::var("FORGE_NCCL").is_ok_and(|v| v == "0") || !lib.join("libtorch_cuda.so").exists() {
        return None;
    }
    let nvidia = std::env::var("FORGE_NVIDIA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| lib.join("../../nvidia"));
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&nvidia)
        .ok()?
        .flatten()
        .map(|e| e.path().join("include"))
        .filter(|d| d.is_dir())
        .collect();
    dirs.sort();
    let all_found = NCCL_HEADERS.iter().all(|h| dirs.iter().any(|d| d.join(h).exists()));
    all_found.then_some(dirs)
}

fn build_shim(lib: &Path) {
    let include = lib.join("../include");
    let gloo = std::env::var("FORGE_GLOO_INCLUDE")
        .map(PathBuf::from)
        .unwrap_or_default();
    if !gloo.join("gloo/config.h").exists() {
        panic!(
            "gloo headers not found at FORGE_GLOO_INCLUDE={} (needed for the c10d shim): run scripts/setup.sh, which unpacks Debian's libgloo-dev into .forge/gloo",
            gloo.display()
        );
    }
    let mut b = cc::Build::new();
    b.cpp(true)
        .file("csrc/c10d_shim.cpp")
        .file("csrc/optim_shim.cpp")
        .std("c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("USE_C10D_GLOO", None)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .include(&gloo)
        .warnings(false)
        .flag_if_supported("-Wno-unused-parameter")
        .flag_if_supported("-Wno-deprecated-declarations")
        .flag_if_supported("-Wno-interference-size");
    if let Some(dirs) = nccl_includes(lib) {
        b.define("USE_C10D_NCCL", None).define("USE_CUDA", None);
        for d in dirs {
            b.include(d);
        }
        println!("cargo:rustc-cfg=forge_nccl");
        println!("cargo:warning=c10d shim: building with NCCL");
    }
    b.compile("forge_c10d_shim");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    if nccl_includes(lib).is_some() {
        println!("cargo:rustc-link-lib=dylib=torch_cuda");
        println!("cargo:rustc-link-lib=dylib=c10_cuda");
    }
}
