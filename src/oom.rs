//! Running out of GPU memory, reported as one clear error: what was being allocated and what
//! to change, instead of the driver's code deep in a chain.

/// Whether `error`, at any layer, is the GPU (or cuBLAS) failing to allocate.
pub fn is_out_of_memory(error: &anyhow::Error) -> bool {
    error.chain().any(|e| {
        let message = e.to_string();
        message.contains("CUDA_ERROR_OUT_OF_MEMORY")
            || message.contains("CUBLAS_STATUS_ALLOC_FAILED")
            || message.contains("out of memory")
    })
}

/// `error` itself, or when it is an out-of-memory error: "out of GPU memory while `what`:
/// `advice`".
pub fn explain(error: impl Into<anyhow::Error>, what: &str, advice: &str) -> anyhow::Error {
    let error = error.into();
    if is_out_of_memory(&error) {
        anyhow::anyhow!("out of GPU memory while {what}. {advice}")
    } else {
        error
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_memory_is_recognised_through_the_chain() {
        // What cudarc reports, wrapped as candle and philo wrap it.
        let driver = anyhow::anyhow!("DriverError(CUDA_ERROR_OUT_OF_MEMORY, \"out of memory\")");
        let wrapped = driver.context("forward of layer 3");
        let e = explain(wrapped, "running training step 1", "--batch_size 4 fits");
        assert_eq!(
            e.to_string(),
            "out of GPU memory while running training step 1. --batch_size 4 fits"
        );
        let other = explain(anyhow::anyhow!("shape mismatch"), "loading", "advice");
        assert_eq!(other.to_string(), "shape mismatch");
    }
}
