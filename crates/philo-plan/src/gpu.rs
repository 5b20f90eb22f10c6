//! The GPUs a plan can target: memory, bandwidth and dense bf16 tensor throughput, by name or
//! given by hand (`custom:24GiB,1008GB/s,165TFLOPs`).

use serde::Serialize;

use crate::{PlanError, GIB};

/// What a plan needs to know of a GPU.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuSpec {
    pub name: String,
    /// Total memory as the driver reports it, bytes.
    pub memory_bytes: u64,
    /// Peak memory bandwidth, bytes/s.
    pub bandwidth_bytes_per_second: f64,
    /// Peak dense bf16 (f16 where the GPU has no bf16) tensor-core throughput with f32
    /// accumulation, FLOP/s.
    pub tensor_flops: f64,
    /// Whether the GPU computes in bf16 (Turing and older: f16 with loss scaling instead).
    pub bf16: bool,
}

/// The named GPUs of `--gpu`: (name, total MiB as nvidia-smi reports it, GB/s, dense TFLOP/s,
/// bf16). Datasheet figures; the TFLOP/s are without sparsity, with f32 accumulation.
const PRESETS: &[(&str, u64, f64, f64, bool)] = &[
    ("rtx4090", 24_564, 1008.0, 165.2, true),
    ("rtx3090", 24_576, 936.0, 71.0, true),
    ("l4", 23_034, 300.0, 121.0, true),
    ("t4", 15_360, 320.0, 65.0, false),
    ("a10", 23_028, 600.0, 125.0, true),
    ("a100-40", 40_960, 1555.0, 312.0, true),
    ("a100-80", 81_920, 2039.0, 312.0, true),
    ("h100", 81_559, 3350.0, 989.0, true),
    ("h200", 143_771, 4800.0, 989.0, true),
];

impl GpuSpec {
    /// The preset names, for help texts and errors.
    pub fn preset_names() -> Vec<&'static str> {
        PRESETS.iter().map(|p| p.0).collect()
    }

    /// A preset by name (case-insensitive) or `custom:MEMORY,BANDWIDTH,FLOPS` such as
    /// `custom:24GiB,1008GB/s,165TFLOPs`.
    pub fn parse(text: &str) -> Result<GpuSpec, PlanError> {
        let lower = text.trim().to_ascii_lowercase();
        if let Some(custom) = lower.strip_prefix("custom:") {
            return parse_custom(custom, text);
        }
        let &(name, mib, gbps, tflops, bf16) = PRESETS
            .iter()
            .find(|p| p.0 == lower.replace(['_', ' '], "-").replace("rtx-", "rtx"))
            .ok_or_else(|| {
                PlanError::Gpu(format!(
                    "unknown GPU {text:?}: use one of {} or custom:24GiB,1008GB/s,165TFLOPs",
                    Self::preset_names().join(", ")
                ))
            })?;
        Ok(GpuSpec {
            name: name.to_string(),
            memory_bytes: mib << 20,
            bandwidth_bytes_per_second: gbps * 1e9,
            tensor_flops: tflops * 1e12,
            bf16,
        })
    }

    pub fn memory_gib(&self) -> f64 {
        self.memory_bytes as f64 / GIB
    }
}

fn parse_custom(spec: &str, original: &str) -> Result<GpuSpec, PlanError> {
    let bad = |what: &str| {
        PlanError::Gpu(format!(
            "--gpu {original:?}: {what}; write it as custom:24GiB,1008GB/s,165TFLOPs"
        ))
    };
    let parts: Vec<&str> = spec.split(',').map(str::trim).collect();
    let [memory, bandwidth, flops] = parts[..] else {
        return Err(bad("expected three values (memory, bandwidth, TFLOP/s)"));
    };
    let memory_bytes = parse_quantity(
        memory,
        &[("gib", GIB), ("gb", 1e9), ("mib", (1u64 << 20) as f64)],
    )
    .ok_or_else(|| bad(&format!("memory {memory:?} is not like 24GiB")))?;
    let bandwidth = parse_quantity(bandwidth, &[("gb/s", 1e9), ("tb/s", 1e12)])
        .ok_or_else(|| bad(&format!("bandwidth {bandwidth:?} is not like 1008GB/s")))?;
    let flops = parse_quantity(flops, &[("tflops", 1e12), ("tflop/s", 1e12)])
        .ok_or_else(|| bad(&format!("throughput {flops:?} is not like 165TFLOPs")))?;
    Ok(GpuSpec {
        name: format!("custom:{spec}"),
        memory_bytes: memory_bytes as u64,
        bandwidth_bytes_per_second: bandwidth,
        tensor_flops: flops,
        bf16: true,
    })
}

/// `24GiB` → 24 · 2^30 with `units` [(suffix, factor)]; None when no suffix matches or the
/// number is not positive.
fn parse_quantity(text: &str, units: &[(&str, f64)]) -> Option<f64> {
    units.iter().find_map(|&(suffix, factor)| {
        let number = text.strip_suffix(suffix)?.trim();
        let value: f64 = number.parse().ok()?;
        (value > 0.0 && value.is_finite()).then_some(value * factor)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_by_name() {
        let g = GpuSpec::parse("RTX4090").unwrap();
        assert_eq!(g.name, "rtx4090");
        assert_eq!(g.memory_bytes, 24_564 << 20);
        assert_eq!(g.tensor_flops, 165.2e12);
        assert_eq!(GpuSpec::parse("a100_80").unwrap().name, "a100-80");
        assert!(!GpuSpec::parse("t4").unwrap().bf16);
    }

    #[test]
    fn custom_spec() {
        let g = GpuSpec::parse("custom:24GiB,1008GB/s,165TFLOPs").unwrap();
        assert_eq!(g.memory_bytes, 24 << 30);
        assert_eq!(g.bandwidth_bytes_per_second, 1008e9);
        assert_eq!(g.tensor_flops, 165e12);
    }

    #[test]
    fn bad_specs_say_what_to_write() {
        let e = GpuSpec::parse("rtx5090x").unwrap_err().to_string();
        assert!(e.contains("rtx4090") && e.contains("custom:"), "{e}");
        let e = GpuSpec::parse("custom:24GiB,fast,165TFLOPs")
            .unwrap_err()
            .to_string();
        assert!(e.contains("bandwidth \"fast\""), "{e}");
        let e = GpuSpec::parse("custom:24GiB").unwrap_err().to_string();
        assert!(e.contains("three values"), "{e}");
    }
}
