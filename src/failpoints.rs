//! Crash points for the fault suite. Built only with the `failpoints` feature; armed by
//! `RUNNER_FAILPOINTS=name[:nth][,name[:nth]...]`: on the nth time a point is passed
//! (default the first) the process prints `failpoint NAME hit` on stderr and SIGKILLs
//! itself — no destructors, no flushes, exactly like a crash at that boundary.
//!
//! Points: `shard.after_commit_before_ack`, `shard.after_commit_before_dispatch`,
//! `shard.timer_fired_before_commit`, `dispatch.after_confirm_before_delete`,
//! `effect.after_call_before_commit` (a call a shard made, in either mode),
//! `effect.after_started_before_call`, `effect.after_call_before_publish`,
//! `effect.after_puback_before_completed` (the effect fleet's path), `move.after_copy`,
//! `bridge.decode_marked` (an aggregate event whose body holds `crash_decode`, before it is
//! decoded), `bridge.rerun_handed` (a message in flight at the last crash handed on again);
//! `shard.apply_marked` (an event whose data holds `"crash_process": true`, before its
//! program runs), `replay.after_step` (a page of a controlled replay committed) and
//! `store.flush` (tests pause it) are in the shards crate.

/// Arms the crash points named in `RUNNER_FAILPOINTS` (no-op without the feature).
pub fn install_from_env() {
    #[cfg(feature = "failpoints")]
    if let Ok(spec) = std::env::var("RUNNER_FAILPOINTS") {
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, nth) = match item.split_once(':') {
                Some((n, k)) => (n.to_owned(), k.parse::<u64>().unwrap_or(1).max(1)),
                None => (item.to_owned(), 1),
            };
            let hits = std::sync::atomic::AtomicU64::new(0);
            let label = name.clone();
            let armed = fail::cfg_callback(name.clone(), move || {
                if hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == nth {
                    use std::io::Write;
                    let _ = writeln!(std::io::stderr(), "failpoint {label} hit (pass {nth}): killing the process");
                    let _ = std::io::stderr().flush();
                    // SAFETY: signalling ourselves.
                    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                }
            });
            if let Err(e) = armed {
                eprintln!("cannot arm failpoint {name}: {e}");
            }
        }
    }
}
