//! The path normaliser policies are matched on: never a panic, and
//! idempotent — a normalised path normalises to itself, so no second pass
//! (Envoy's, or an upstream's) can turn it into something a prefix rule
//! judged differently.
#![no_main]

use clawgress_policy::normalise_path;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(p) = normalise_path(s) {
        assert!(p.starts_with('/'), "{s:?} -> {p:?}");
        assert_eq!(
            normalise_path(&p).as_deref(),
            Ok(p.as_str()),
            "{s:?} -> {p:?} is not a fixed point"
        );
    }
});
