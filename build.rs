//! torch-sys passes `-rpath` only to its own static library, so without this the binary
//! cannot find libtorch at run time unless LD_LIBRARY_PATH is set.
use std::path::Path;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib_dir) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath={lib_dir}");
    // The linker drops libtorch_cuda.so as unneeded (nothing references it by symbol),
    // and CUDA then silently reports itself unavailable.
    if Path::new(&lib_dir).join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
