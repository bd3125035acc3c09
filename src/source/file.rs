//! The directory source: every `*.yaml`, `*.yml` and `*.json` under a
//! directory, re-read when anything in it changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use super::SourceError;
use crate::config::{parse_file, ConfigSnapshot, ConfigStore, FileLoad, Origin, Rejection};

/// When a changed directory is re-read: after `quiet` without further
/// events (editors write a file in several steps, and one reading should
/// see all of them), but no later than `max` after the first event, so a
/// steady stream of changes is still served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Debounce {
    pub quiet: Duration,
    pub max: Duration,
}

impl Default for Debounce {
    fn default() -> Self {
        Debounce {
            quiet: Duration::from_millis(100),
            max: Duration::from_secs(1),
        }
    }
}

impl Debounce {
    /// Waits, after a first event, until the events pause for `quiet` or
    /// `max` has passed since the first; drains what arrived meanwhile.
    pub async fn settle(&self, events: &mut mpsc::Receiver<()>) {
        let deadline = tokio::time::Instant::now() + self.max;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return;
            }
            match tokio::time::timeout(self.quiet.min(left), events.recv()).await {
                Ok(Some(())) => continue,
                _ => return,
            }
        }
    }
}

/// Reads every config file under `dir`, recursively, in path order. Files
/// are named relative to `dir`.
pub fn load_dir(dir: &Path) -> Result<Vec<FileLoad>, SourceError> {
    load_dir_named(dir, Path::new(""))
}

/// As `load_dir`, with file names joined onto `shown_as` (what a person
/// passed on the command line, say).
pub fn load_dir_named(dir: &Path, shown_as: &Path) -> Result<Vec<FileLoad>, SourceError> {
    let mut paths = Vec::new();
    collect(dir, &mut paths).map_err(|source| SourceError::ReadDir {
        path: dir.display().to_string(),
        source,
    })?;
    paths.sort();
    Ok(paths.iter().map(|p| load_file(dir, shown_as, p)).collect())
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        if name.starts_with('.') {
            continue; // editor swap files, Kubernetes ConfigMap `..data` links
        }
        if path.is_dir() {
            collect(&path, out)?;
        } else if [".yaml", ".yml", ".json"].iter().any(|ext| name.ends_with(ext)) {
            out.push(path);
        }
    }
    Ok(())
}

fn load_file(dir: &Path, shown_as: &Path, path: &Path) -> FileLoad {
    let name = shown_as
        .join(path.strip_prefix(dir).unwrap_or(path))
        .display()
        .to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse_file(&name, &text),
        Err(e) => unreadable(name, &e),
    }
}

/// Parsed files by path, reused while a file's text is unchanged: a change
/// to one file of a large directory parses that file only.
#[derive(Debug, Default)]
pub struct ParseCache {
    files: std::collections::HashMap<PathBuf, (String, FileLoad)>,
}

impl ParseCache {
    /// As `load_dir`, parsing only the files whose text changed.
    pub fn load_dir(&mut self, dir: &Path) -> Result<Vec<FileLoad>, SourceError> {
        let mut paths = Vec::new();
        collect(dir, &mut paths).map_err(|source| SourceError::ReadDir {
            path: dir.display().to_string(),
            source,
        })?;
        paths.sort();
        self.files.retain(|p, _| paths.contains(p));
        let mut loads = Vec::with_capacity(paths.len());
        for path in paths {
            let name = path.strip_prefix(dir).unwrap_or(&path).display().to_string();
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) => {
                    self.files.remove(&path);
                    loads.push(unreadable(name, &e));
                    continue;
                }
            };
            match self.files.get(&path) {
                Some((seen, load)) if *seen == text => loads.push(load.clone()),
                _ => {
                    let load = parse_file(&name, &text);
                    loads.push(load.clone());
                    self.files.insert(path, (text, load));
                }
            }
        }
        Ok(loads)
    }
}

fn unreadable(name: String, e: &std::io::Error) -> FileLoad {
    FileLoad {
        file: name.clone(),
        documents: Err(Rejection {
            origin: Origin {
                file: name,
                document: 0,
            },
            key: None,
            field: None,
            reason: format!("cannot read: {e}"),
            last_good_kept: false,
        }),
    }
}

/// Loads `dir` into `store`, publishes the generation, then keeps watching:
/// every change is re-read after the `debounce` and published if it changed
/// anything. Rejections are logged once, when they first appear.
///
/// Returns once the first generation is published; the watch runs on a
/// spawned task for as long as `tx` has receivers.
pub fn watch_dir(
    dir: PathBuf,
    mut store: ConfigStore,
    tx: watch::Sender<Arc<ConfigSnapshot>>,
    debounce: Debounce,
) -> Result<(), SourceError> {
    let (events_tx, mut events) = mpsc::channel::<()>(1);
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        if res.is_ok() {
            // A full channel already means "re-read": dropping is fine.
            let _ = events_tx.try_send(());
        }
    })
    .map_err(|source| SourceError::Watch {
        path: dir.display().to_string(),
        source,
    })?;
    watcher
        .watch(&dir, RecursiveMode::Recursive)
        .map_err(|source| SourceError::Watch {
            path: dir.display().to_string(),
            source,
        })?;

    let mut cache = ParseCache::default();
    publish(&mut store, &mut cache, &dir, &tx)?;
    tokio::spawn(async move {
        let _watcher = watcher; // dropping it stops the watch
        while events.recv().await.is_some() {
            debounce.settle(&mut events).await;
            if let Err(e) = publish(&mut store, &mut cache, &dir, &tx) {
                tracing::error!("{e}; serving the last good config");
            }
            if tx.is_closed() {
                break;
            }
        }
    });
    Ok(())
}

fn publish(
    store: &mut ConfigStore,
    cache: &mut ParseCache,
    dir: &Path,
    tx: &watch::Sender<Arc<ConfigSnapshot>>,
) -> Result<(), SourceError> {
    let before = store.current();
    let files = cache.load_dir(dir)?;
    let next = store.apply(files);
    if next.generation == before.generation && before.generation != 0 {
        return Ok(());
    }
    for r in next.rejections.iter().filter(|r| !before.rejections.contains(r)) {
        let kept = if r.last_good_kept {
            "; serving its last good version"
        } else {
            ""
        };
        tracing::warn!("rejected {r}{kept}");
    }
    tracing::info!(
        generation = next.generation,
        resources = next.resources.len(),
        rejected = next.rejections.len(),
        "config loaded from {}",
        dir.display()
    );
    tx.send_replace(next);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_parse_cache_reads_like_load_dir_and_follows_changes() {
        let dir = tempfile::tempdir().expect("tmp");
        let ns = |name: &str| format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}}}\n");
        std::fs::write(dir.path().join("a.yaml"), ns("a")).expect("write");
        std::fs::write(dir.path().join("b.yaml"), ns("b")).expect("write");
        let mut cache = ParseCache::default();
        let names = |loads: Vec<FileLoad>| -> Vec<String> {
            let snapshot = ConfigSnapshot::from_files(loads);
            snapshot.resources.keys().map(|k| k.name.clone()).collect()
        };
        assert_eq!(names(cache.load_dir(dir.path()).expect("load")), ["a", "b"]);
        assert_eq!(
            names(cache.load_dir(dir.path()).expect("load")),
            names(load_dir(dir.path()).expect("load"))
        );
        std::fs::write(dir.path().join("b.yaml"), ns("c")).expect("write");
        std::fs::remove_file(dir.path().join("a.yaml")).expect("rm");
        assert_eq!(names(cache.load_dir(dir.path()).expect("load")), ["c"]);
        assert_eq!(cache.files.len(), 1, "a removed file leaves the cache");
    }

    #[tokio::test(start_paused = true)]
    async fn debounce_waits_for_quiet_but_not_past_max() {
        let d = Debounce {
            quiet: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        // A single event: settled after the quiet period.
        let (tx, mut rx) = mpsc::channel(16);
        let start = tokio::time::Instant::now();
        d.settle(&mut rx).await;
        assert_eq!(start.elapsed(), Duration::from_millis(100));
        // Events every 50 ms for ever: settled at the max, not later.
        let feeder = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                if tx.send(()).await.is_err() {
                    break;
                }
            }
        });
        let start = tokio::time::Instant::now();
        d.settle(&mut rx).await;
        assert_eq!(start.elapsed(), Duration::from_secs(1));
        feeder.abort();
    }
}
