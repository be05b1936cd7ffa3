//! Process-wide settings for fast CPU training, applied once at start-up.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Call before any tensor work.
///
/// - Candle runs large element-wise CPU ops (its backward pass's gradient
///   sums above all) on its own thread pool, beside the rayon pool that
///   runs the convolutions and the data loader. Its workers spin after
///   each op, and on a few cores the two pools spun against each other (a
///   `shapes` training step took 2.5x longer on 2 cores when they did), so
///   they park at once unless `CANDLE_BARRIER_POOL_SPIN_LIMIT` says
///   otherwise. Running those ops on one thread instead (the setting until
///   2026-12-03) left the other core idle during the gradient sums: the
///   ResNet-50-FPN step from scratch took 2.72-2.89 s against 2.55-2.74
///   with the pool, the `bccd` step 1.11-1.14 against 1.09-1.13, the
///   `shapes` step the same (BENCHMARKS.md, 2026-12-03, Intel).
/// - Candle asks for its thread count on every matmul, and without
///   `RAYON_NUM_THREADS` that parses /proc/cpuinfo each time (10% of a
///   `shapes` training step in the kernel's cpuinfo printer). The count is
///   read once here and written to `RAYON_NUM_THREADS`.
/// - glibc returns large freed blocks to the kernel at once, so every step
///   page-faults its activations in again (about 15% of a step). Keeping
///   them in the heap (as PyTorch's caching allocator does) avoids that.
/// - glibc gives each thread that allocates an arena of its own, and with
///   freed blocks kept, each arena holds the largest it ever needed. For
///   inference alone (`only_infers`) every thread shares one arena:
///   ResNet-50-FPN at 800x1333 then peaked at 471-490 MiB above the start
///   instead of 670-684, at the same speed once the hot loops stopped
///   allocating (`conv/winograd.rs`); training keeps one arena per thread
///   (one shared arena made the `bccd` step 10% slower). BENCHMARKS.md,
///   2026-12-03, Intel.
pub(crate) fn configure(only_infers: bool) {
    if std::env::var_os("CANDLE_BARRIER_POOL_SPIN_LIMIT").is_none() {
        std::env::set_var("CANDLE_BARRIER_POOL_SPIN_LIMIT", "0");
    }
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", candle_core::utils::get_num_threads().to_string());
    }
    keep_freed_memory(only_infers);
    report_oversized_writes();
}

/// A write past the file-size limit (`ulimit -f`) raises SIGXFSZ, which
/// kills the process with no message. Ignored, the write fails with EFBIG
/// instead and is reported like a full disk: one error, the previous
/// checkpoint intact.
#[cfg(unix)]
fn report_oversized_writes() {
    // SAFETY: setting a signal to SIG_IGN has no handler to run.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

#[cfg(not(unix))]
fn report_oversized_writes() {}

/// Runs `command` on this thread (the main one), made a worker of rayon's
/// global pool, and returns what it returns.
///
/// Why a worker: the convolutions, GEMMs and element-wise ops split their
/// work with rayon. Called from outside the pool, every one of those calls
/// hands its work to the pool and puts the caller to sleep until the
/// workers are done: two wake-ups per op, hundreds of ops per step. Called
/// from a worker, the caller takes part itself and only the idle worker is
/// woken.
///
/// Why this thread rather than a worker of its own (until 2026-12-03):
/// glibc gives every other thread an arena that grows in heaps of at most
/// 64 MiB and unmaps a heap once it is empty, so activations of tens of MB
/// came back as fresh pages every step (13% of the ResNet-50-FPN training
/// step's samples were the kernel clearing pages), while the main thread's
/// arena grows one heap and keeps it (`keep_freed_memory`). With the
/// command here, peak memory above the start fell from 1209-1210 to
/// 882-885 MiB for R18-FPN fine-tuning, 2483-2527 to 2115-2120 for R50-FPN
/// from scratch and 1040-1116 to 944-979 for the `bccd` step, at the same
/// speed (BENCHMARKS.md, 2026-12-03, Intel). Candle's backward pass walks
/// the graph recursively, and the main thread's 8 MiB of stack are plenty:
/// ResNet-101 trains with 2 MiB (`ulimit -s 2048`).
///
/// Why the other workers stay awake ([`keep_warm`]): a rayon worker with no
/// work sleeps after a few microseconds, and every op's first split then
/// wakes it through the kernel. A `shapes` training step runs hundreds of
/// small ops, and those wake-ups were 10-12% of its samples (scheduler and
/// futex code) while the second core sat idle between them. Kept looking
/// for jobs between ops, as OpenMP's threads spin in PyTorch, the step ran
/// at 162-166 images/s against 142-148, a 1-epoch `shapes` training run
/// (1200 images, evaluation included) took 8.1 s against 9.2-9.7, and the
/// `bccd` and ResNet-50-FPN steps were unchanged within their noise
/// (BENCHMARKS.md, 2026-12-03, Intel). An idle worker yields its core to
/// any other thread that wants it (Candle's pool, the data loader) and
/// naps once it has had nothing to do for [`SPIN`].
pub(crate) fn on_worker<T: Send>(command: impl FnOnce() -> T + Send) -> T {
    // Fails only if the pool already exists, and then it is used as it is.
    let _ = rayon::ThreadPoolBuilder::new().use_current_thread().build_global();
    keeping_workers_warm(command)
}

/// Runs `command` in the current rayon pool while its other workers
/// [`keep_warm`], and returns what it returns.
fn keeping_workers_warm<T: Send>(command: impl FnOnce() -> T + Send) -> T {
    let done = &AtomicBool::new(false);
    rayon::scope(|scope| {
        let commander = rayon::current_thread_index();
        scope.spawn_broadcast(move |_, worker| {
            // Not on the command's own thread: there the loop would run
            // inside one of the command's waits and never give it back.
            if Some(worker.index()) != commander {
                keep_warm(done);
            }
        });
        let _stop = Stop(done);
        command()
    })
}

/// How long an idle worker keeps looking for jobs before it naps.
const SPIN: Duration = Duration::from_millis(2);
/// How long it naps before it looks again.
const NAP: Duration = Duration::from_micros(200);

/// Runs the pool's jobs as they come, from this worker, until `done`.
fn keep_warm(done: &AtomicBool) {
    let mut idle_since = Instant::now();
    while !done.load(Ordering::Relaxed) {
        if rayon::yield_now() == Some(rayon::Yield::Executed) {
            idle_since = Instant::now();
        } else if idle_since.elapsed() < SPIN {
            std::thread::yield_now();
        } else {
            std::thread::sleep(NAP);
        }
    }
}

/// Sets its flag when dropped: the command returned or panicked.
struct Stop<'a>(&'a AtomicBool);

impl Drop for Stop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Freed blocks stay in the heap; in one arena for all threads when
/// `one_arena`.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory(one_arena: bool) {
    /// Blocks up to this size come from the heap, not fresh mappings.
    const MMAP_THRESHOLD: libc::c_int = 1 << 30;
    // SAFETY: mallopt only changes allocator parameters; called before any
    // other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX);
        if one_arena {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory(_one_arena: bool) {}

#[cfg(test)]
mod tests {
    use rayon::prelude::*;

    use super::*;

    fn pool() -> rayon::ThreadPool {
        rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap()
    }

    #[test]
    fn the_command_runs_beside_warm_workers_and_its_value_comes_back() {
        let sum = pool().install(|| keeping_workers_warm(|| (0..1000u64).into_par_iter().sum::<u64>()));
        assert_eq!(sum, 499_500);
    }

    #[test]
    fn a_panicking_command_releases_the_workers() {
        let pool = pool();
        let run = || pool.install(|| keeping_workers_warm(|| panic!("failed")));
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run));
        assert!(outcome.is_err());
        // Every worker left `keep_warm`'s loop: a job on each one returns.
        assert_eq!(pool.broadcast(|_| 1).len(), 3);
    }
}
