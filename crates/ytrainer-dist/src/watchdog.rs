//! The collective-call watchdog: MPI and NCCL never time out a call whose peers do not arrive, so a rank whose
//! call has waited longer than `YTRAINER_COLLECTIVE_TIMEOUT` ends itself, and the launcher ends the rest.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The collective call this rank is in, if any, for the watchdog: what, since when, and its number.
#[derive(Default)]
pub(crate) struct Watch {
    current: Mutex<Option<(&'static str, Instant, u64)>>,
    calls: std::sync::atomic::AtomicU64,
}

/// Clears the watch when the collective call returns.
pub(crate) struct InCall<'a>(&'a Watch);

impl Watch {
    pub(crate) fn enter(&self, what: &'static str) -> InCall<'_> {
        let n = self
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some((what, Instant::now(), n));
        InCall(self)
    }
}

impl Drop for InCall<'_> {
    fn drop(&mut self) {
        *self.0.current.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

/// Ends this rank when one collective call has waited longer than `timeout`: the other ranks' calls never
/// arrive when one of them hangs (stopped, deadlocked, stuck in I/O), and MPI itself never times out. The
/// rank leaves with `_exit` (no exit handlers: its main thread is inside the MPI library), the launcher sees a
/// rank end without finalising MPI and ends every other rank. Checkpoints are written atomically, so the last
/// one stays intact.
pub(crate) fn spawn_watchdog(watch: Arc<Watch>, timeout: Duration, rank: usize, size: usize) {
    let tick = (timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let spawned = std::thread::Builder::new()
        .name("collective-watchdog".into())
        .spawn(move || loop {
            std::thread::sleep(tick);
            let current = *watch.current.lock().unwrap_or_else(|e| e.into_inner());
            let Some((what, since, n)) = current else {
                continue;
            };
            let waited = since.elapsed();
            if waited < timeout {
                continue;
            }
            let _ = writeln!(
                std::io::stderr(),
                "error: rank {rank} of {size} waited {:.0} s in collective call #{n} ({what}) for the other ranks \
                 (YTRAINER_COLLECTIVE_TIMEOUT = {} s): a rank that did not report this is hung or far behind; \
                 ending every rank (the last checkpoint is intact; resume from it)",
                waited.as_secs_f64(),
                timeout.as_secs_f64(),
            );
            let _ = std::io::stderr().flush();
            // SAFETY: `_exit` ends the process at once; nothing after it runs.
            unsafe { libc::_exit(1) }
        });
    if let Err(e) = spawned {
        eprintln!("warning: no collective-call watchdog ({e}): a hung rank will not be detected");
    }
}
