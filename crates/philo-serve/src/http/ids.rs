//! Response ids (`chatcmpl-…`, `cmpl-…`) and `created` timestamps.

use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{SystemTime, UNIX_EPOCH};

/// A new id: `prefix` and 24 hex digits, unique within the process and unlikely to repeat across
/// restarts.
///
/// Ids only need to be distinct, not secret: a counter keeps them unique, and hashing it with a
/// key drawn once per process (std's `RandomState`) makes ids of different runs differ.
pub fn response_id(prefix: &str) -> String {
    static KEY: OnceLock<RandomState> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let count = NEXT.fetch_add(1, Ordering::Relaxed);
    let hash = KEY.get_or_init(RandomState::new).hash_one(count);
    format!("{prefix}{hash:016x}{:08x}", count as u32)
}

/// Now, in Unix seconds (0 if the clock is before 1970).
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_have_the_prefix_and_differ() {
        let a = response_id("chatcmpl-");
        let b = response_id("chatcmpl-");
        assert!(a.starts_with("chatcmpl-") && a.len() == "chatcmpl-".len() + 24);
        assert_ne!(a, b);
    }
}
