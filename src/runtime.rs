//! Process-wide settings for fast CPU training, applied once at start-up.

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

/// Stack of each rayon worker: the command runs on one, and Candle's
/// backward pass walks the graph recursively (the main thread has 8 MiB).
const WORKER_STACK: usize = 64 << 20;

/// Runs `command` on a worker of rayon's global pool and waits for it.
///
/// Why: the convolutions, GEMMs and element-wise ops split their work with
/// rayon. Called from the main thread, every one of those calls hands its
/// work to the pool and puts the main thread to sleep until the workers are
/// done: two wake-ups per op, hundreds of ops per step. Called from a
/// worker, the caller takes part itself and only the idle worker is woken.
pub(crate) fn on_worker<T: Send>(command: impl FnOnce() -> T + Send) -> T {
    // Fails only if the pool already exists, and then it is used as it is.
    let _ = rayon::ThreadPoolBuilder::new().stack_size(WORKER_STACK).build_global();
    rayon::scope(|_| command())
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
