//! Worker threads, one single-threaded runtime each, like nginx's worker processes.
//!
//! A connection, the requests on it, their upstream connections and the streams between them all
//! stay on the thread that accepted the connection: no task wakes another thread, no cache line
//! moves between cores on the hot path. The control plane (signals, reload, file watching,
//! systemd) runs on the main thread's runtime.

use std::cell::Cell;
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio::sync::oneshot;

thread_local! {
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// The worker this code runs on (0 off the worker threads): picks per-worker state such as the
/// upstream connection pool.
pub fn current() -> usize {
    INDEX.with(Cell::get)
}

/// How many workers: the configured number, or one per CPU this process may use.
pub fn count(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    std::thread::available_parallelism().map_or(1, usize::from)
}

pub struct Workers {
    handles: Vec<Handle>,
    threads: Vec<(oneshot::Sender<()>, JoinHandle<()>)>,
}

impl Workers {
    pub fn start(count: usize) -> std::io::Result<Self> {
        let mut handles = Vec::with_capacity(count);
        let mut threads = Vec::with_capacity(count);
        for index in 0..count {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            handles.push(runtime.handle().clone());
            let (stop, stopped) = oneshot::channel::<()>();
            let thread = std::thread::Builder::new()
                .name(format!("worker-{index}"))
                .spawn(move || {
                    INDEX.with(|i| i.set(index));
                    runtime.block_on(async {
                        let _ = stopped.await;
                    });
                })?;
            threads.push((stop, thread));
        }
        Ok(Self { handles, threads })
    }

    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    pub fn len(&self) -> usize {
        self.handles.len()
    }
}

impl Drop for Workers {
    /// Ends every worker; whatever still runs there (connections cut by the drain) is dropped.
    fn drop(&mut self) {
        for (stop, thread) in self.threads.drain(..) {
            let _ = stop.send(());
            let _ = thread.join();
        }
    }
}
