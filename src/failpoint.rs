//! Named crash points for crash-injection tests.
//!
//! With the `failpoints` feature, `BIOSEAL_FAILPOINT=<name>` makes the
//! process abort (no destructors, no flushes: as close to a power cut as a
//! process can get) when it reaches that point. Without the feature every
//! call compiles to nothing.

#[cfg(feature = "failpoints")]
pub(crate) fn hit(name: &str) {
    if std::env::var("BIOSEAL_FAILPOINT").is_ok_and(|v| v == name) {
        std::process::abort();
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn hit(_name: &str) {}
