//! torch-sys passes `-rpath` only to its own static library, so without this the binary
//! cannot find libtorch at run time unless LD_LIBRARY_PATH is set.
//!
//! libtorch_cuda.so is deliberately not linked: nothing references it by symbol, and loading
//! it costs every run, CUDA or not. `model::load_cuda_backend` opens it, through this same
//! runpath, when a run may use CUDA.

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath={lib_dir}");
}
