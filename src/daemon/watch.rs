//! Watching the config file and the files it names, however editors and tools replace them.
//!
//! Watching a file itself loses track of it once it is replaced by a rename, so the parent
//! directories are watched instead (and, for a symlink, its target's directory too). Any event
//! there leads to a look at the watched files themselves (their identity, size and modification
//! time), so that a busy neighbour in the same directory costs a few `stat`s and delays nothing.
//! A watched file that changed is read once it has settled; only if the contents then differ from
//! those the serving config was built from does a reload follow. That one rule covers writes in
//! place, write-and-rename, delete-and-recreate and a swapped symlink (Kubernetes ConfigMaps).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{Notify, mpsc, watch};

use crate::generation::{Generation, fingerprint};

/// How long the files must stay still after one was replaced whole (renamed over, or created
/// anew), as careful tools write: the new file is complete, but a save is often several steps.
const SETTLE_REPLACED: Duration = Duration::from_millis(100);
/// How long a file changed in place must stay unchanged before it is read. A writer appending
/// a piece at a time leaves prefixes that may well parse (every key but `listen` is optional),
/// so only a file left alone this long is taken to be whole.
const SETTLE_IN_PLACE: Duration = Duration::from_secs(1);

/// What a look at a file shows without reading it: which file it is, its size, when it was
/// last written. None: not there (or not readable).
#[derive(Clone, PartialEq)]
struct Stamp {
    identity: (u64, u64),
    size: u64,
    modified: (i64, i64),
}

fn stamps(files: &[PathBuf]) -> Vec<Option<Stamp>> {
    use std::os::unix::fs::MetadataExt;
    files
        .iter()
        .map(|file| {
            let meta = std::fs::metadata(file).ok()?;
            Some(Stamp {
                identity: (meta.dev(), meta.ino()),
                size: meta.size(),
                modified: (meta.mtime(), meta.mtime_nsec()),
            })
        })
        .collect()
}

/// Waits until the files stop changing and returns how they then look. Each wait is short if
/// the last change replaced a file whole, long if it wrote into one. The first look comes after
/// a moment, so that the steps of one save (truncate, then write) count as one change.
async fn settle(files: &[PathBuf], before: Vec<Option<Stamp>>) -> Vec<Option<Stamp>> {
    let identity = |s: &Option<Stamp>| s.as_ref().map(|s| s.identity);
    tokio::time::sleep(SETTLE_REPLACED).await;
    let (mut previous, mut now) = (before, stamps(files));
    loop {
        let replaced = previous
            .iter()
            .zip(&now)
            .any(|(a, b)| identity(a) != identity(b));
        let quiet = if replaced {
            SETTLE_REPLACED
        } else {
            SETTLE_IN_PLACE
        };
        tokio::time::sleep(quiet).await;
        let again = stamps(files);
        if again == now {
            return again;
        }
        previous = std::mem::replace(&mut now, again);
    }
}

#[derive(Clone, PartialEq)]
struct Watched {
    files: Vec<PathBuf>,
    fingerprint: u64,
}

pub struct FileWatcher {
    watched: watch::Sender<Watched>,
}

impl FileWatcher {
    pub fn start(reload: Arc<Notify>, generation: &Generation) -> std::io::Result<Self> {
        let (events_tx, events) = mpsc::unbounded_channel();
        let watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Reads (ours included) are not changes; counting them would loop forever.
            if let Ok(event) = event
                && !matches!(event.kind, EventKind::Access(_))
            {
                let _ = events_tx.send(());
            }
        })
        .map_err(std::io::Error::other)?;
        let (watched, mut watched_rx) = watch::channel(watched(generation));
        // Watching begins now, before the daemon says it is ready, not when the task first
        // runs: a change made just after READY=1 must not go unseen.
        let mut watching = Watching {
            watcher,
            dirs: HashSet::new(),
        };
        let files = watched_rx.borrow_and_update().files.clone();
        watching.rewatch(&files);
        let at_start = stamps(&files);
        tokio::spawn(run(watching, watched_rx, events, at_start, reload));
        Ok(Self { watched })
    }

    pub fn follow(&self, generation: &Generation) {
        self.watched.send_replace(watched(generation));
    }
}

fn watched(generation: &Generation) -> Watched {
    Watched {
        files: if generation.config.reload.watch_files {
            generation.files.clone()
        } else {
            Vec::new()
        },
        fingerprint: generation.fingerprint,
    }
}

/// The directories being watched, and the watcher that watches them.
struct Watching {
    watcher: RecommendedWatcher,
    dirs: HashSet<PathBuf>,
}

/// `at_start`: how the files looked when watching began, enough to tell on the first look a
/// file replaced whole (settled in SETTLE_REPLACED) from one written in place.
async fn run(
    mut watching: Watching,
    mut watched: watch::Receiver<Watched>,
    mut events: mpsc::UnboundedReceiver<()>,
    at_start: Vec<Option<Stamp>>,
    reload: Arc<Notify>,
) {
    let mut current = watched.borrow().clone();
    let mut last_stamps = at_start;
    // The files may have changed between the serving config's read of them and the first
    // stamps, so the first event always leads to a look at their contents.
    let mut looked = false;
    loop {
        tokio::select! {
            changed = watched.changed() => {
                if changed.is_err() {
                    return;
                }
                current = watched.borrow_and_update().clone();
                watching.rewatch(&current.files);
            }
            event = events.recv() => {
                if event.is_none() {
                    return;
                }
                while events.try_recv().is_ok() {}
                if current.files.is_empty() || (looked && stamps(&current.files) == last_stamps) {
                    continue;
                }
                looked = true;
                last_stamps = settle(&current.files, last_stamps).await;
                // A reload (SIGHUP) may have been made meanwhile: compare with what serves now.
                if watched.has_changed().unwrap_or(false) {
                    current = watched.borrow_and_update().clone();
                    watching.rewatch(&current.files);
                }
                let files = current.files.clone();
                let Ok(on_disk) = tokio::task::spawn_blocking(move || fingerprint_on_disk(&files)).await else {
                    continue;
                };
                if on_disk == current.fingerprint {
                    tracing::debug!("watched files settled, as the serving config read them");
                    continue;
                }
                // Once: the next change is compared with this one, not with the serving files.
                current.fingerprint = on_disk;
                tracing::info!("a watched file changed; reloading");
                reload.notify_one();
            }
        }
    }
}

fn fingerprint_on_disk(files: &[PathBuf]) -> u64 {
    let contents: Vec<Option<Vec<u8>>> = files.iter().map(|f| std::fs::read(f).ok()).collect();
    fingerprint(
        files
            .iter()
            .zip(&contents)
            .map(|(path, bytes)| (path.as_path(), bytes.as_deref())),
    )
}

impl Watching {
    fn rewatch(&mut self, files: &[PathBuf]) {
        let wanted: HashSet<PathBuf> = files.iter().flat_map(|f| directories_of(f)).collect();
        for gone in self.dirs.difference(&wanted) {
            let _ = self.watcher.unwatch(gone);
        }
        for dir in wanted.difference(&self.dirs) {
            if let Err(error) = self.watcher.watch(dir, RecursiveMode::NonRecursive) {
                tracing::warn!(dir = %dir.display(), %error, "cannot watch for config changes");
            }
        }
        self.dirs = wanted;
    }
}

/// The directory a file is named in, and the one it really lives in if it is a symlink.
fn directories_of(file: &Path) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(parent) = file.parent() {
        dirs.push(parent.to_owned());
    }
    if let Some(parent) = std::fs::canonicalize(file)
        .ok()
        .and_then(|real| real.parent().map(Path::to_owned))
        && !dirs.contains(&parent)
    {
        dirs.push(parent);
    }
    dirs
}
