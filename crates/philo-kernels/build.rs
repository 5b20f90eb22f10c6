//! With the `cuda` feature, compiles every `src/cuda/*.cu` with nvcc (found through
//! CUDA_ROOT/CUDA_HOME/CUDA_PATH or PATH) into a fat binary for `CUDA_COMPUTE_CAP` (default 80:
//! Ampere and newer, which the bf16 tensor-core instructions need): machine code for that GPU
//! generation, so the driver does not spend the first step compiling, plus its PTX for newer
//! GPUs. Files named `*_sm90.cu` use Hopper-only instructions (wgmma): they are compiled for
//! sm_90a when `CUDA_COMPUTE_CAP` is 90 and left empty otherwise (the host side then uses the
//! portable kernels). Without the feature, nothing is built.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/cuda");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let cap = cap.trim().replace('.', "");
    let nvcc = ["CUDA_ROOT", "CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|root| PathBuf::from(root).join("bin").join("nvcc"))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let sources = std::fs::read_dir("src/cuda").expect("src/cuda exists");
    for entry in sources {
        let path = entry.expect("readable src/cuda").path();
        if path.extension().and_then(|e| e.to_str()) != Some("cu") {
            continue;
        }
        let stem = path.file_stem().unwrap().to_string_lossy().to_string();
        let fatbin = out.join(format!("{stem}.fatbin"));
        let arch = if stem.ends_with("_sm90") {
            if cap != "90" {
                std::fs::write(&fatbin, []).expect("OUT_DIR is writable");
                continue;
            }
            "90a".to_string()
        } else {
            cap.clone()
        };
        let status = Command::new(&nvcc)
            .args(["--fatbin", "-O3", "-std=c++17", "--expt-relaxed-constexpr"])
            .arg(format!("-gencode=arch=compute_{arch},code=[sm_{arch},compute_{arch}]"))
            .arg("-o")
            .arg(&fatbin)
            .arg(&path)
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run {}: {e}. Install the CUDA toolkit or run `eval \"$(scripts/cuda-toolchain.sh)\"` (see README)", nvcc.display())
            });
        assert!(status.success(), "nvcc failed on {}", path.display());
    }
}
