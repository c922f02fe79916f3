//! Watching the config file and the files it names, however editors and tools replace them.
//!
//! Watching a file itself loses track of it once it is replaced by a rename, so the parent
//! directories are watched instead (and, for a symlink, its target's directory too). Any change
//! there, once things have been quiet for a moment, leads to a re-read of the watched files; only
//! if their contents differ from the last seen does a reload follow. That one rule covers writes
//! in place, write-and-rename, delete-and-recreate and a swapped symlink (Kubernetes ConfigMaps).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::{Notify, mpsc, watch};

use crate::generation::{Generation, fingerprint};

/// Quiet time after the last change before the files are read: an editor's save is often
/// several events (truncate, write, rename), and reading in the middle would see half a file.
const DEBOUNCE: Duration = Duration::from_millis(100);

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
        let (watched, watched_rx) = watch::channel(watched(generation));
        tokio::spawn(run(watcher, watched_rx, events, reload));
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

async fn run(
    mut watcher: RecommendedWatcher,
    mut watched: watch::Receiver<Watched>,
    mut events: mpsc::UnboundedReceiver<()>,
    reload: Arc<Notify>,
) {
    let mut dirs = HashSet::new();
    let mut current = watched.borrow_and_update().clone();
    rewatch(&mut watcher, &mut dirs, &current.files);
    let mut last_seen = current.fingerprint;
    loop {
        tokio::select! {
            changed = watched.changed() => {
                if changed.is_err() {
                    return;
                }
                current = watched.borrow_and_update().clone();
                rewatch(&mut watcher, &mut dirs, &current.files);
                last_seen = current.fingerprint;
            }
            event = events.recv() => {
                if event.is_none() {
                    return;
                }
                while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, events.recv()).await {}
                if current.files.is_empty() {
                    continue;
                }
                let files = current.files.clone();
                let Ok(on_disk) = tokio::task::spawn_blocking(move || fingerprint_on_disk(&files)).await else {
                    continue;
                };
                if on_disk != last_seen {
                    last_seen = on_disk;
                    tracing::info!("a watched file changed; reloading");
                    reload.notify_one();
                }
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

fn rewatch(watcher: &mut RecommendedWatcher, dirs: &mut HashSet<PathBuf>, files: &[PathBuf]) {
    let wanted: HashSet<PathBuf> = files.iter().flat_map(|f| directories_of(f)).collect();
    for gone in dirs.difference(&wanted) {
        let _ = watcher.unwatch(gone);
    }
    for dir in wanted.difference(dirs) {
        if let Err(error) = watcher.watch(dir, RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), %error, "cannot watch for config changes");
        }
    }
    *dirs = wanted;
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
