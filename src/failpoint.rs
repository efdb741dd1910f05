//! Named crash points for crash-injection tests.
//!
//! With the `failpoints` feature (switched on only for this crate's own test
//! builds, through its self dev-dependency), `BIOSEAL_FAILPOINT=<name>`
//! makes the process abort (no destructors, no flushes: as close to a power
//! cut as a process can get) when it reaches that point for the
//! `BIOSEAL_FAILPOINT_SKIP`+1-th time (default: the first). With
//! `BIOSEAL_FAILPOINT_ACTION=pause` it instead prints `paused <name>` on
//! stdout and waits there forever, for a test to kill it with SIGKILL at
//! that point (a replica killed mid-rotation). Without the feature every
//! call compiles to nothing.

#[cfg(feature = "failpoints")]
pub(crate) fn hit(name: &str) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static HITS: AtomicU64 = AtomicU64::new(0);
    if std::env::var("BIOSEAL_FAILPOINT").is_ok_and(|v| v == name) {
        let skip = std::env::var("BIOSEAL_FAILPOINT_SKIP")
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        if HITS.fetch_add(1, Ordering::SeqCst) >= skip {
            if std::env::var("BIOSEAL_FAILPOINT_ACTION").is_ok_and(|v| v == "pause") {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "paused {name}");
                let _ = out.flush();
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                }
            }
            std::process::abort();
        }
    }
}

#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn hit(_name: &str) {}
