// Bakes libtorch's library folder into the rpath of every binary and test of this crate,
// so `forge` runs without LD_LIBRARY_PATH (torch-sys exports the folder as DEP_TCH_LIBTORCH_LIB).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=FORGE_LINK_TORCH_CUDA");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        // Without this the linker drops libtorch_cuda (nothing references it directly) and
        // CUDA reports unavailable. Only on a full CUDA install (cuDNN present), or when
        // FORGE_LINK_TORCH_CUDA=1 (scripts/device-check.sh builds for another machine's CUDA).
        let p = std::path::Path::new(&lib);
        let forced = std::env::var("FORGE_LINK_TORCH_CUDA").is_ok_and(|v| v == "1");
        if p.join("libtorch_cuda.so").exists() && (forced || p.join("../../nvidia/cudnn").exists()) {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}
