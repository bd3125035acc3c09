//! The config store: turns a complete reading of the sources into the next
//! generation, keeping the last good version of anything that went bad.

use std::collections::{btree_map, BTreeMap, HashMap};
use std::sync::Arc;

use super::{ConfigSnapshot, Entry, FileLoad, Origin, Rejection, Resource, ResourceKey};

/// Holds the last generation so the next one can fall back on it.
#[derive(Debug, Default)]
pub struct ConfigStore {
    last: Arc<ConfigSnapshot>,
    /// The files `last` was made from, in order: the next preview compares
    /// its files with them, and when only a few documents changed in
    /// place, patches `last` instead of building every key again.
    read: Vec<FileLoad>,
}

/// A generation `preview` made, and the files it was made from.
#[derive(Debug)]
pub struct Preview {
    pub snapshot: Arc<ConfigSnapshot>,
    read: Vec<FileLoad>,
}

impl ConfigStore {
    /// The current generation.
    pub fn current(&self) -> Arc<ConfigSnapshot> {
        self.last.clone()
    }

    /// Builds the next generation from every file the source holds now.
    ///
    /// A rejected document whose resource was good before keeps that good
    /// version; a file that no longer parses at all keeps every resource it
    /// held. A good document always wins over a kept one. The generation
    /// number moves only when something changed.
    pub fn apply(&mut self, files: Vec<FileLoad>) -> Arc<ConfigSnapshot> {
        let next = self.preview(files);
        self.commit(next)
    }

    /// What `apply` would make the next generation, without making it so.
    pub fn preview(&self, files: Vec<FileLoad>) -> Preview {
        let snapshot = match self.patched(&files) {
            Some(snapshot) => snapshot,
            None => self.rebuild(files.clone()),
        };
        Preview {
            snapshot,
            read: files,
        }
    }

    /// The next generation when the only changes are documents whose keys
    /// stay where they were, and files added or removed whole: every
    /// document of a changed, added or removed file good, no rejection
    /// naming its key, and an added key new. What `rebuild` would make,
    /// with no key built or looked up but the changed ones'. `None`
    /// otherwise.
    ///
    /// The Kubernetes source reads each object as a file of its own, so an
    /// object created or deleted (a pod, an EndpointSlice) is a file added
    /// or removed: patched in, not the whole mesh built again.
    fn patched(&self, files: &[FileLoad]) -> Option<Arc<ConfigSnapshot>> {
        let prev = &self.last;
        let mut patch = Patch::default();
        // The files in the order `last` read them (the usual case): paired
        // in place. Else by name.
        let in_place =
            self.read.len() == files.len() && self.read.iter().zip(files).all(|(o, n)| o.file == n.file);
        if in_place {
            for (old, new) in self.read.iter().zip(files) {
                patch.file(prev, Some(old), Some(new))?;
            }
        } else {
            let mut before: HashMap<&str, &FileLoad> = self.read.iter().map(|f| (&*f.file, f)).collect();
            for new in files {
                patch.file(prev, before.remove(&*new.file), Some(new))?;
            }
            for old in before.into_values() {
                patch.file(prev, Some(old), None)?;
            }
        }
        let changed = !patch.added.is_empty()
            || !patch.removed.is_empty()
            || patch.updates.iter().any(|(key, origin, resource)| {
                prev.resources
                    .get(key)
                    .is_none_or(|e| e.origin != *origin || !same(&e.resource, resource))
            });
        if !changed {
            return Some(prev.clone());
        }
        let mut resources = prev.resources.clone();
        for (key, origin, resource) in patch.updates {
            let entry = resources.get_mut(&key)?;
            if !same(&entry.resource, &resource) {
                entry.resource = resource;
            }
            entry.origin = origin;
        }
        for key in &patch.removed {
            resources.remove(key);
        }
        for (key, origin, resource) in patch.added {
            // Defined twice among the added: a duplicate, for `rebuild`.
            if resources.insert(key, Entry { origin, resource }).is_some() {
                return None;
            }
        }
        Some(Arc::new(ConfigSnapshot {
            generation: prev.generation + 1,
            resources,
            rejections: prev.rejections.clone(),
        }))
    }

    /// The next generation built from every document of `files`.
    pub(super) fn rebuild(&self, files: Vec<FileLoad>) -> Arc<ConfigSnapshot> {
        let prev = &self.last;
        let mut resources: BTreeMap<ResourceKey, Entry> = BTreeMap::new();
        let mut rejections = Vec::new();
        let mut fallbacks: Vec<(Vec<ResourceKey>, usize)> = Vec::new();

        for file in files {
            match file.documents {
                Err(rejection) => {
                    let keys = prev
                        .resources
                        .iter()
                        .filter(|(_, e)| e.origin.file == file.file)
                        .map(|(k, _)| k.clone())
                        .collect();
                    fallbacks.push((keys, rejections.len()));
                    rejections.push(rejection);
                }
                Ok(documents) => {
                    for doc in documents.iter() {
                        match doc.result.clone() {
                            Ok(resource) => {
                                let slot = match resources.entry(resource.key()) {
                                    btree_map::Entry::Occupied(first) => {
                                        rejections.push(Rejection {
                                            origin: doc.origin.clone(),
                                            key: Some(first.key().clone()),
                                            field: Some("metadata.name".into()),
                                            reason: format!(
                                                "also defined at {}; the first one is used",
                                                first.get().origin
                                            ),
                                            last_good_kept: false,
                                        });
                                        continue;
                                    }
                                    btree_map::Entry::Vacant(slot) => slot,
                                };
                                // An unchanged resource keeps its Arc, so later
                                // stages see at once that it did not change.
                                let resource = match prev.resources.get(slot.key()) {
                                    Some(old) if same(&old.resource, &resource) => old.resource.clone(),
                                    _ => resource,
                                };
                                slot.insert(Entry {
                                    origin: doc.origin.clone(),
                                    resource,
                                });
                            }
                            Err(rejection) => {
                                let keys = rejection.key.iter().cloned().collect();
                                fallbacks.push((keys, rejections.len()));
                                rejections.push(rejection);
                            }
                        }
                    }
                }
            }
        }
        for (keys, index) in fallbacks {
            for key in keys {
                if let (Some(old), false) = (prev.resources.get(&key), resources.contains_key(&key)) {
                    resources.insert(key, old.clone());
                    rejections[index].last_good_kept = true;
                }
            }
        }

        let same_resources = resources.len() == prev.resources.len()
            && resources
                .iter()
                .zip(prev.resources.iter())
                .all(|((k, a), (l, b))| k == l && a.origin == b.origin && same(&a.resource, &b.resource));
        let changed = !same_resources || rejections != prev.rejections;
        if !changed {
            return prev.clone();
        }
        Arc::new(ConfigSnapshot {
            generation: prev.generation + 1,
            resources,
            rejections,
        })
    }

    /// Makes a generation from `preview` the current one.
    pub fn commit(&mut self, next: Preview) -> Arc<ConfigSnapshot> {
        self.last = next.snapshot;
        self.read = next.read;
        self.last.clone()
    }
}

/// What `ConfigStore::patched` found changed, file by file.
#[derive(Default)]
struct Patch {
    /// Documents of changed files, at keys `last` holds.
    updates: Vec<(ResourceKey, Origin, Arc<Resource>)>,
    /// Documents of added files, at keys `last` does not hold.
    added: Vec<(ResourceKey, Origin, Arc<Resource>)>,
    /// The keys of removed files' documents.
    removed: Vec<ResourceKey>,
}

impl Patch {
    /// Takes in one file, as `old` read it before and `new` now (`None`:
    /// added or removed); `None` when `prev` cannot be patched with it.
    fn file(&mut self, prev: &ConfigSnapshot, old: Option<&FileLoad>, new: Option<&FileLoad>) -> Option<()> {
        let named = |key: &ResourceKey| prev.rejections.iter().any(|r| r.key.as_ref() == Some(key));
        // Every document good: a rejection would come or go with it.
        let good = |f: &FileLoad| -> Option<Vec<(ResourceKey, Origin, Arc<Resource>)>> {
            let docs = f.documents.as_ref().ok()?;
            docs.iter()
                .map(|d| {
                    let resource = d.result.as_ref().ok()?;
                    Some((resource.key(), d.origin.clone(), resource.clone()))
                })
                .collect()
        };
        match (old, new) {
            (Some(old), Some(new)) if same_load(old, new) => {}
            (Some(old), Some(new)) => {
                let (was, now) = (good(old)?, good(new)?);
                if was.len() != now.len() {
                    return None;
                }
                // A document that lost its key to another is named by the
                // duplicate's rejection, as is one whose origin another
                // rejection's reason quotes.
                for ((was, _, _), now) in was.iter().zip(now) {
                    if *was != now.0 || named(&now.0) {
                        return None;
                    }
                    self.updates.push(now);
                }
            }
            (None, Some(new)) => {
                for doc in good(new)? {
                    if prev.resources.contains_key(&doc.0) || named(&doc.0) {
                        return None;
                    }
                    self.added.push(doc);
                }
            }
            (Some(old), None) => {
                for (key, origin, _) in good(old)? {
                    let held = prev.resources.get(&key).is_some_and(|e| e.origin == origin);
                    if !held || named(&key) {
                        return None;
                    }
                    self.removed.push(key);
                }
            }
            (None, None) => {}
        }
        Some(())
    }
}

/// The same reading of a file: the same documents from the same places,
/// each the same shared resource (a file re-read unchanged hands on the
/// same `Arc`s) or the same rejection.
fn same_load(a: &FileLoad, b: &FileLoad) -> bool {
    match (&a.documents, &b.documents) {
        (Ok(x), Ok(y)) => {
            x.len() == y.len()
                && x.iter().zip(y.iter()).all(|(d, e)| {
                    d.origin == e.origin
                        && match (&d.result, &e.result) {
                            (Ok(r), Ok(s)) => Arc::ptr_eq(r, s),
                            (Err(r), Err(s)) => r == s,
                            _ => false,
                        }
                })
        }
        (Err(x), Err(y)) => x == y,
        _ => false,
    }
}

/// Equal resources; the same `Arc` (an unchanged file's) without looking.
fn same(a: &Arc<Resource>, b: &Arc<Resource>) -> bool {
    Arc::ptr_eq(a, b) || a == b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_file;

    const VS: &str = "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\n\
        metadata: {name: hw, namespace: default}\nspec:\n  hosts: [hw.example.com]\n  http:\n  - route:\n    - destination: {host: ";

    #[test]
    fn invalid_document_keeps_last_good_version() {
        let mut store = ConfigStore::default();
        let good = store.apply(vec![parse_file("vs.yaml", &format!("{VS}hw}}\n"))]);
        assert_eq!(good.resources.len(), 1);
        let bad = store.apply(vec![parse_file("vs.yaml", &format!("{VS}\"\"}}\n"))]);
        assert_eq!(bad.resources, good.resources, "the good version stays");
        assert_eq!(bad.rejections.len(), 1);
        let r = &bad.rejections[0];
        assert!(r.last_good_kept);
        assert_eq!(r.field.as_deref(), Some("spec.http[0].route[0].destination.host"));
        assert!(bad.generation > good.generation);
    }

    #[test]
    fn unparseable_file_keeps_its_resources_and_removed_file_drops_them() {
        let mut store = ConfigStore::default();
        let good = store.apply(vec![parse_file("vs.yaml", &format!("{VS}hw}}\n"))]);
        let bad = store.apply(vec![parse_file("vs.yaml", "spec: [\n")]);
        assert_eq!(bad.resources, good.resources);
        assert!(bad.rejections[0].last_good_kept);
        let gone = store.apply(vec![]);
        assert!(gone.resources.is_empty());
    }

    #[test]
    fn unchanged_input_keeps_the_generation() {
        let mut store = ConfigStore::default();
        let a = store.apply(vec![parse_file("vs.yaml", &format!("{VS}hw}}\n"))]);
        let b = store.apply(vec![parse_file("vs.yaml", &format!("{VS}hw}}\n"))]);
        assert_eq!(a.generation, b.generation);
    }

    /// A document of the tests' small universe: `kind` 0 to 2 an
    /// Endpoints of `n` + 1 addresses, a line each (so that the documents
    /// after it move), 3 and 4 a Service, 5 a VirtualService that is
    /// rejected with its key.
    fn doc((kind, name, n): (u8, u8, u8)) -> String {
        let meta = format!("metadata: {{name: s{name}, namespace: default}}");
        match kind {
            0..=2 => {
                let addresses: String = (0..=n).map(|i| format!("  - {{ip: 10.0.0.{i}}}\n")).collect();
                format!("apiVersion: v1\nkind: Endpoints\n{meta}\nsubsets:\n- addresses:\n{addresses}  ports: [{{port: 80}}]\n")
            }
            3 | 4 => format!("apiVersion: v1\nkind: Service\n{meta}\nspec:\n  ports: [{{port: 80}}]\n"),
            _ => format!("{VS}\"\"}}\n").replace("name: hw", &format!("name: s{name}")),
        }
    }

    /// Reads `texts` (file name → text, `None` for no such file) as the
    /// file source does: a file whose text did not change hands on its
    /// earlier reading, the same `Arc`s.
    fn read(texts: &[Option<String>], seen: &mut BTreeMap<String, (String, FileLoad)>) -> Vec<FileLoad> {
        let mut files = Vec::new();
        for (i, text) in texts.iter().enumerate() {
            let name = format!("f{i}.yaml");
            let Some(text) = text else {
                seen.remove(&name);
                continue;
            };
            match seen.get(&name) {
                Some((was, load)) if was == text => files.push(load.clone()),
                _ => {
                    let load = parse_file(&name, text);
                    seen.insert(name, (text.clone(), load.clone()));
                    files.push(load);
                }
            }
        }
        files
    }

    #[test]
    fn an_endpoint_edited_in_place_is_patched_in() {
        let mut store = ConfigStore::default();
        let mut seen = BTreeMap::new();
        // Service s0 and its endpoints (`n` + 1 addresses), s1 and its.
        let texts = |n| {
            [
                Some([doc((3, 0, 0)), doc((0, 0, n))].join("---\n")),
                Some([doc((3, 1, 0)), doc((0, 1, 1))].join("---\n")),
            ]
        };
        let first = store.apply(read(&texts(1), &mut seen));
        let files = read(&texts(2), &mut seen);
        let patched = store.patched(&files).expect("patched, not rebuilt");
        assert_eq!(patched.generation, first.generation + 1);
        assert_eq!(patched.resources, store.rebuild(files.clone()).resources);
        let key = |kind, name: &str| ResourceKey {
            kind,
            namespace: "default".into(),
            name: name.into(),
        };
        let unchanged = key(crate::config::Kind::Endpoints, "s1");
        assert!(Arc::ptr_eq(
            &first.resources[&unchanged].resource,
            &patched.resources[&unchanged].resource
        ));
        let moved = key(crate::config::Kind::Endpoints, "s0");
        assert_ne!(first.resources[&moved], patched.resources[&moved]);

        // A document that moves to another key is not patched in.
        let renamed = [
            Some([doc((3, 0, 0)), doc((0, 2, 2))].join("---\n")),
            texts(2)[1].clone(),
        ];
        assert!(store.patched(&read(&renamed, &mut seen)).is_none());
    }

    #[test]
    fn a_file_added_or_removed_whole_is_patched_in() {
        let mut store = ConfigStore::default();
        let mut seen = BTreeMap::new();
        let s0 = Some([doc((3, 0, 0)), doc((0, 0, 1))].join("---\n"));
        let s1 = Some([doc((3, 1, 0)), doc((0, 1, 1))].join("---\n"));
        let first = store.apply(read(&[s0.clone(), None], &mut seen));
        // Added: its keys are new.
        let files = read(&[s0.clone(), s1.clone()], &mut seen);
        let added = store.patched(&files).expect("patched, not rebuilt");
        assert_eq!(added.generation, first.generation + 1);
        assert_eq!(added.resources.len(), 4);
        assert_eq!(added.resources, store.rebuild(files.clone()).resources);
        let kept = first.resources.keys().next().expect("a key");
        assert!(Arc::ptr_eq(
            &first.resources[kept].resource,
            &added.resources[kept].resource
        ));
        store.apply(files);
        // Removed: its keys go.
        let files = read(&[None, s1.clone()], &mut seen);
        let removed = store.patched(&files).expect("patched, not rebuilt");
        assert_eq!(removed.resources.len(), 2);
        assert_eq!(removed.resources, store.rebuild(files.clone()).resources);
        store.apply(files);
        // A file that defines a key another holds is a duplicate: rebuilt.
        let again = Some(doc((3, 1, 0)));
        assert!(store.patched(&read(&[again, s1], &mut seen)).is_none());
    }

    /// The proptest's files: unparseable or not, and their documents.
    type Files = Vec<Option<(bool, Vec<(u8, u8, u8)>)>>;

    /// Applies one edit of the proptest below to the files.
    fn edit(files: &mut Files, (op, file, slot, d): (u8, usize, usize, (u8, u8, u8))) {
        let Some((broken, docs)) = &mut files[file] else {
            files[file] = Some((false, vec![d]));
            return;
        };
        let at = slot % docs.len().max(1);
        match op {
            // Most edits move an endpoint, in place.
            0..=7 if !docs.is_empty() => docs[at].2 = d.2,
            8 if !docs.is_empty() => docs[at] = d,
            9 if !docs.is_empty() => drop(docs.remove(at)),
            10 => *broken = !*broken,
            11 => files[file] = None,
            _ => docs.insert(at, d),
        }
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, ..Default::default() })]

        /// Any run of edits to three files (endpoints moved in place,
        /// documents replaced, added and removed, so keys move, repeat and
        /// are rejected; files made unparseable and whole again, removed
        /// and added): each preview is the generation built from scratch.
        #[test]
        fn a_preview_is_the_rebuilt_generation(
            first in proptest::collection::vec((0u8..6, 0u8..6, 0u8..3), 0..10),
            steps in proptest::collection::vec(
                proptest::collection::vec((0u8..14, 0usize..3, 0usize..4, (0u8..6, 0u8..6, 0u8..3)), 1..3),
                1..10,
            )
        ) {
            let mut files: Files = vec![Some((false, Vec::new())); 3];
            for (i, d) in first.into_iter().enumerate() {
                if let Some((_, docs)) = &mut files[i % 3] {
                    docs.push(d);
                }
            }
            let mut store = ConfigStore::default();
            let mut seen = BTreeMap::new();
            for (n, step) in std::iter::once(Vec::new()).chain(steps).enumerate() {
                for e in step {
                    edit(&mut files, e);
                }
                let texts: Vec<Option<String>> = files
                    .iter()
                    .map(|file| {
                        file.as_ref().map(|(broken, docs)| match broken {
                            true => "spec: [\n".to_string(),
                            false => docs.iter().copied().map(doc).collect::<Vec<_>>().join("---\n"),
                        })
                    })
                    .collect();
                let read = read(&texts, &mut seen);
                let rebuilt = store.rebuild(read.clone());
                let next = store.preview(read);
                proptest::prop_assert_eq!(next.snapshot.generation, rebuilt.generation, "step {}", n);
                proptest::prop_assert_eq!(&next.snapshot.resources, &rebuilt.resources, "step {}", n);
                proptest::prop_assert_eq!(&next.snapshot.rejections, &rebuilt.rejections, "step {}", n);
                store.commit(next);
            }
        }
    }

    #[test]
    fn duplicates_are_reported() {
        let mut store = ConfigStore::default();
        let doc = format!("{VS}hw}}\n");
        let snap = store.apply(vec![parse_file("a.yaml", &doc), parse_file("b.yaml", &doc)]);
        assert_eq!(snap.resources.len(), 1);
        assert!(snap.rejections[0]
            .reason
            .contains("also defined at a.yaml:1: document 1"));
    }
}
