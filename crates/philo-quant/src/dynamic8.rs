//! bitsandbytes' signed "dynamic" 8-bit code and blockwise 8-bit quantisation with it.
//!
//! QLoRA's double quantisation stores the NF4 block scales (absmax values) as 8-bit indices into
//! this code, one f32 scale per block of 256 indices. To be bit-compatible with bitsandbytes the
//! code table, the scaling and the index search must reproduce its float arithmetic exactly,
//! which is why the construction below mirrors the order of operations of
//! `create_dynamic_map(signed=True)` and of its CUDA quantisation kernel.

use std::sync::OnceLock;

/// Number of entries of an 8-bit code.
pub const DYNAMIC_CODE_LEN: usize = 256;

/// The signed dynamic 8-bit code of bitsandbytes (`create_dynamic_map(signed=True)`, 7 exponent
/// bits, 8 bits in all), sorted ascending: 127 negative values, 0, 127 positive values and 1.0.
///
/// Construction: for each decade `i` in 0..7, `2^i + 1` boundaries evenly spaced on [0.1, 1]
/// (f32, as `torch.linspace` computes them), the 2^i midpoints of neighbouring boundaries,
/// scaled by `10^(i-6)` and mirrored to negative; then 0 and 1.0; then sorted.
pub fn dynamic_code() -> &'static [f32; DYNAMIC_CODE_LEN] {
    static CODE: OnceLock<[f32; DYNAMIC_CODE_LEN]> = OnceLock::new();
    CODE.get_or_init(build_dynamic_code)
}

fn build_dynamic_code() -> [f32; DYNAMIC_CODE_LEN] {
    // 10^(i - 6) for the 7 exponent values, as Python computes `10 ** (i - 6)` (f64).
    const DECADES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut values = Vec::with_capacity(DYNAMIC_CODE_LEN);
    for (i, decade) in DECADES.iter().enumerate() {
        let boundaries = torch_linspace_f32(0.1, 1.0, (1usize << i) + 1);
        // An f32 tensor times a Python float: PyTorch rounds the scalar to f32 first.
        let scale = *decade as f32;
        for pair in boundaries.windows(2) {
            let mean = (pair[0] + pair[1]) / 2.0;
            values.push(scale * mean);
            values.push(-scale * mean);
        }
    }
    values.push(0.0);
    values.push(1.0);
    values.sort_by(f32::total_cmp);
    let mut code = [0f32; DYNAMIC_CODE_LEN];
    code.copy_from_slice(&values);
    code
}

/// `torch.linspace(start, end, steps)` in f32 as PyTorch's CPU kernel computes it: the first half
/// counts up from `start`, the second half counts down from `end`, each element one fused
/// multiply-add. (Plain multiply-then-add differs in the last bit for 42 of the 256 code values;
/// the fused form reproduces bitsandbytes' table exactly.)
fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - 1 - i) as f32, end)
            }
        })
        .collect()
}

/// Index of `x` (expected in [-1, 1]) in a sorted 256-entry `code`, by bitsandbytes' rule
/// (`dQuantize`, non-stochastic): a 7-step binary search starting at index 127, then a choice
/// between the last probed entry and its bracketing neighbour at their f32 midpoint. A value
/// exactly on a midpoint goes to the last probed entry; NaN goes to index 0.
pub fn quantize_dynamic(code: &[f32; DYNAMIC_CODE_LEN], x: f32) -> u8 {
    let mut pivot = 127usize;
    // Nearest probed entries below and above `x`; the table ends until something is probed.
    let mut below = 0usize;
    let mut above = 255usize;
    let mut step = 64usize;
    while step > 0 {
        if x > code[pivot] {
            below = pivot;
            pivot += step;
        } else {
            above = pivot;
            pivot -= step;
        }
        step >>= 1;
    }
    let val = code[pivot];
    let index = if x > val {
        if x > (code[above] + val) * 0.5 {
            above
        } else {
            pivot
        }
    } else if x < (code[below] + val) * 0.5 {
        below
    } else {
        pivot
    };
    // The search keeps every index within 0..=255.
    index as u8
}

/// Blockwise 8-bit quantisation (bitsandbytes `quantize_blockwise`): `values` are cut into
/// consecutive blocks of `block_size` (the last one may be shorter), each block is scaled by
/// the reciprocal of its largest magnitude and every value is mapped with [`quantize_dynamic`].
/// Returns the indices and the per-block scales. `block_size` must be at least 1 (checked by
/// the callers).
pub(crate) fn quantize_blockwise(
    values: &[f32],
    code: &[f32; DYNAMIC_CODE_LEN],
    block_size: usize,
) -> (Vec<u8>, Vec<f32>) {
    let mut indices = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(values.len().div_ceil(block_size));
    for block in values.chunks(block_size) {
        let absmax = block.iter().fold(0f32, |m, v| m.max(v.abs()));
        // bitsandbytes multiplies by the f32 reciprocal rather than dividing; the two differ in
        // the last bit, which can move a value across a midpoint.
        let inverse = 1.0 / absmax;
        indices.extend(block.iter().map(|&v| quantize_dynamic(code, v * inverse)));
        scales.push(absmax);
    }
    (indices, scales)
}

/// Inverse of [`quantize_blockwise`]: `code[index] * scale` of the index's block, in f32.
/// Indices are trusted to be in range of the (256-entry) code and scales to cover every block.
pub(crate) fn dequantize_blockwise(
    indices: &[u8],
    scales: &[f32],
    code: &[f32],
    block_size: usize,
) -> Vec<f32> {
    indices
        .chunks(block_size)
        .zip(scales)
        .flat_map(|(block, &scale)| block.iter().map(move |&q| code[q as usize] * scale))
        .collect()
}
