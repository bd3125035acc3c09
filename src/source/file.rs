//! The directory source: every `*.yaml`, `*.yml` and `*.json` under a
//! directory, re-read when anything in it changes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use super::{log_generation, SourceError};
use crate::config::{parse_file, ConfigSnapshot, ConfigStore, FileLoad, Origin, Rejection};

/// When a changed directory is re-read: after `quiet` without further
/// events (editors write a file in several steps, and one reading should
/// see all of them), but no later than `max` after the first event, so a
/// steady stream of changes is still served.
///
/// A change that touches nothing but endpoints is served sooner: the
/// directory is read once after `endpoints` of quiet, and if what it holds
/// then parses cleanly and differs from the served config only in
/// Endpoints and EndpointSlices, it is served at once (as istiod does with
/// `PILOT_ENABLE_EDS_DEBOUNCE=false`). Anything else, a file that does not
/// parse yet included, waits for the full `quiet`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Debounce {
    pub quiet: Duration,
    pub max: Duration,
    pub endpoints: Duration,
}

impl Default for Debounce {
    fn default() -> Self {
        Debounce {
            quiet: Duration::from_millis(100),
            max: Duration::from_secs(1),
            endpoints: Duration::from_millis(10),
        }
    }
}

impl Debounce {
    /// Waits, after a first event, until the events pause for `quiet` or
    /// `max` has passed since the first; drains what arrived meanwhile.
    pub async fn settle(&self, events: &mut mpsc::Receiver<()>) {
        let deadline = tokio::time::Instant::now() + self.max;
        settle(events, self.quiet, deadline).await;
    }
}

/// Waits until the events pause for `quiet`, or until `deadline`.
async fn settle(events: &mut mpsc::Receiver<()>, quiet: Duration, deadline: tokio::time::Instant) {
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return;
        }
        match tokio::time::timeout(quiet.min(left), events.recv()).await {
            Ok(Some(())) => continue,
            _ => return,
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
    let paths = config_paths(dir)?;
    Ok(paths.iter().map(|p| load_file(dir, shown_as, p)).collect())
}

/// The config files under `dir`, recursively, in path order.
fn config_paths(dir: &Path) -> Result<Vec<PathBuf>, SourceError> {
    let mut paths = Vec::new();
    collect(dir, &mut paths).map_err(|source| SourceError::ReadDir {
        path: dir.display().to_string(),
        source,
    })?;
    paths.sort();
    Ok(paths)
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
    /// A file was added, removed or changed since `clean` was last called.
    dirty: bool,
}

impl ParseCache {
    /// As `load_dir`, parsing only the files whose text changed.
    pub fn load_dir(&mut self, dir: &Path) -> Result<Vec<FileLoad>, SourceError> {
        let paths = config_paths(dir)?;
        let known = self.files.len();
        let listed: std::collections::HashSet<&PathBuf> = paths.iter().collect();
        self.files.retain(|p, _| listed.contains(p));
        self.dirty |= self.files.len() != known;
        let mut loads = Vec::with_capacity(paths.len());
        for path in paths {
            let name = path.strip_prefix(dir).unwrap_or(&path).display().to_string();
            let text = match std::fs::read_to_string(&path) {
                Ok(text) => text,
                Err(e) => {
                    self.files.remove(&path);
                    self.dirty = true;
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
                    self.dirty = true;
                }
            }
        }
        Ok(loads)
    }

    /// Whether anything was read that the store has not taken in.
    fn dirty(&self) -> bool {
        self.dirty
    }

    /// The store took in the last reading.
    fn clean(&mut self) {
        self.dirty = false;
    }
}

fn unreadable(name: String, e: &std::io::Error) -> FileLoad {
    let name: Arc<str> = name.into();
    FileLoad {
        file: name.clone(),
        documents: Err(Rejection {
            origin: Origin {
                file: name,
                document: 0,
                line: 0,
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
        if res.is_ok_and(|e| changes_files(&e.kind)) {
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
            let deadline = tokio::time::Instant::now() + debounce.max;
            if debounce.endpoints < debounce.quiet {
                settle(&mut events, debounce.endpoints, deadline).await;
                match publish_endpoints(&mut store, &mut cache, &dir, &tx) {
                    Ok(true) => continue,
                    Ok(false) => {}
                    Err(e) => tracing::error!("{e}; serving the last good config"),
                }
            }
            settle(&mut events, debounce.quiet, deadline).await;
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

/// Whether a watch event can mean a changed file. Opening and reading one
/// cannot, and counting them had the source re-read the directory after
/// each of its own readings, ten times a second, for ever.
fn changes_files(kind: &notify::EventKind) -> bool {
    !matches!(kind, notify::EventKind::Access(_))
}

/// Publishes what the directory holds now if that differs from the served
/// config in endpoints alone and rejects nothing new; says whether it did.
fn publish_endpoints(
    store: &mut ConfigStore,
    cache: &mut ParseCache,
    dir: &Path,
    tx: &watch::Sender<Arc<ConfigSnapshot>>,
) -> Result<bool, SourceError> {
    let before = store.current();
    let files = cache.load_dir(dir)?;
    if !cache.dirty() {
        return Ok(false);
    }
    let next = store.preview(files);
    let endpoints_only = next.snapshot.generation != before.generation
        && next.snapshot.rejections == before.rejections
        && before.endpoint_only_change(&next.snapshot).is_some();
    if !endpoints_only {
        return Ok(false);
    }
    let next = store.commit(next);
    cache.clean();
    tracing::debug!(
        generation = next.generation,
        "endpoints changed in {}",
        dir.display()
    );
    tx.send_replace(next);
    Ok(true)
}

fn publish(
    store: &mut ConfigStore,
    cache: &mut ParseCache,
    dir: &Path,
    tx: &watch::Sender<Arc<ConfigSnapshot>>,
) -> Result<(), SourceError> {
    let before = store.current();
    let files = cache.load_dir(dir)?;
    if !cache.dirty() && before.generation != 0 {
        return Ok(()); // the same files as the store holds
    }
    let next = store.apply(files);
    cache.clean();
    if next.generation == before.generation && before.generation != 0 {
        return Ok(());
    }
    log_generation(&before, &next, &dir.display().to_string());
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
            snapshot.resources.keys().map(|k| k.name.to_string()).collect()
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
            ..Debounce::default()
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

    const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\n\
        spec: {ports: [{port: 80}]}\n";

    fn endpoints(ips: &[&str]) -> String {
        let addresses: Vec<String> = ips.iter().map(|ip| format!("{{ip: {ip}}}")).collect();
        format!(
            "apiVersion: v1\nkind: Endpoints\nmetadata: {{name: web, namespace: default}}\n\
             subsets: [{{addresses: [{}], ports: [{{port: 80}}]}}]\n",
            addresses.join(", ")
        )
    }

    #[test]
    fn reading_a_file_is_not_a_change() {
        use notify::event::{
            AccessKind, AccessMode, CreateKind, DataChange, ModifyKind, RemoveKind, RenameMode,
        };
        use notify::EventKind;
        assert!(!changes_files(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!changes_files(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        for kind in [
            EventKind::Create(CreateKind::File),
            EventKind::Modify(ModifyKind::Data(DataChange::Any)),
            EventKind::Modify(ModifyKind::Name(RenameMode::To)),
            EventKind::Remove(RemoveKind::File),
            EventKind::Any,
        ] {
            assert!(changes_files(&kind), "{kind:?}");
        }
    }

    #[test]
    fn only_a_clean_endpoint_change_skips_the_full_quiet() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("svc.yaml"), SERVICE).expect("write");
        std::fs::write(dir.path().join("ep.yaml"), endpoints(&["10.0.0.1"])).expect("write");
        let (mut store, mut cache) = (ConfigStore::default(), ParseCache::default());
        let (tx, rx) = watch::channel(Arc::new(ConfigSnapshot::default()));
        publish(&mut store, &mut cache, dir.path(), &tx).expect("first");
        let first = rx.borrow().generation;

        std::fs::write(dir.path().join("ep.yaml"), endpoints(&["10.0.0.1", "10.0.0.2"])).expect("write");
        assert!(publish_endpoints(&mut store, &mut cache, dir.path(), &tx).expect("read"));
        assert_eq!(rx.borrow().generation, first + 1, "served at once");
        assert_eq!(store.current().generation, first + 1);

        // Unchanged: nothing to serve early.
        assert!(!publish_endpoints(&mut store, &mut cache, dir.path(), &tx).expect("read"));
        // A half-written file waits for the full quiet, and is not reported yet.
        std::fs::write(
            dir.path().join("ep.yaml"),
            "apiVersion: v1\nkind: Endpoints\nmetadata: {name: web,",
        )
        .expect("write");
        assert!(!publish_endpoints(&mut store, &mut cache, dir.path(), &tx).expect("read"));
        // An endpoint change together with any other change waits too.
        std::fs::write(dir.path().join("ep.yaml"), endpoints(&["10.0.0.3"])).expect("write");
        std::fs::write(
            dir.path().join("svc.yaml"),
            SERVICE.replace("port: 80", "port: 81"),
        )
        .expect("write");
        assert!(!publish_endpoints(&mut store, &mut cache, dir.path(), &tx).expect("read"));
        assert_eq!(rx.borrow().generation, first + 1, "nothing more served early");
        assert_eq!(
            store.current().generation,
            first + 1,
            "the store did not move either"
        );
        publish(&mut store, &mut cache, dir.path(), &tx).expect("full");
        assert_eq!(rx.borrow().generation, first + 2);
    }

    #[tokio::test]
    async fn the_watch_serves_an_endpoint_change_before_the_quiet_is_over() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("svc.yaml"), SERVICE).expect("write");
        std::fs::write(dir.path().join("ep.yaml"), endpoints(&["10.0.0.1"])).expect("write");
        let (tx, mut rx) = watch::channel(Arc::new(ConfigSnapshot::default()));
        // Any other change would wait an hour.
        let debounce = Debounce {
            quiet: Duration::from_secs(3600),
            max: Duration::from_secs(3600),
            endpoints: Duration::from_millis(10),
        };
        watch_dir(dir.path().to_path_buf(), ConfigStore::default(), tx, debounce).expect("watch");
        let first = rx.borrow_and_update().generation;
        let tmp = dir.path().join(".ep.yaml.tmp");
        std::fs::write(&tmp, endpoints(&["10.0.0.2"])).expect("write");
        std::fs::rename(&tmp, dir.path().join("ep.yaml")).expect("rename");
        tokio::time::timeout(Duration::from_secs(30), rx.changed())
            .await
            .expect("served long before the hour")
            .expect("open");
        assert_eq!(rx.borrow().generation, first + 1);
    }
}
