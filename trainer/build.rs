// Bakes libtorch's library folder into the rpath of every binary and test of this crate,
// so `forge` runs without LD_LIBRARY_PATH (torch-sys exports the folder as DEP_TCH_LIBTORCH_LIB).
fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        // Without this the linker drops libtorch_cuda (nothing references it directly) and
        // CUDA reports unavailable. Only on a full CUDA install (cuDNN present).
        let p = std::path::Path::new(&lib);
        if p.join("libtorch_cuda.so").exists() && p.join("../../nvidia/cudnn").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
        }
    }
}
