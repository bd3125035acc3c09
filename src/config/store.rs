//! The config store: turns a complete reading of the sources into the next
//! generation, keeping the last good version of anything that went bad.

use std::collections::{btree_map, BTreeMap};
use std::sync::Arc;

use super::{ConfigSnapshot, Entry, FileLoad, Rejection, Resource, ResourceKey};

/// Holds the last generation so the next one can fall back on it.
#[derive(Debug, Default)]
pub struct ConfigStore {
    last: Arc<ConfigSnapshot>,
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
    pub fn preview(&self, files: Vec<FileLoad>) -> Arc<ConfigSnapshot> {
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
                    for doc in documents {
                        match doc.result {
                            Ok(resource) => {
                                let slot = match resources.entry(resource.key()) {
                                    btree_map::Entry::Occupied(first) => {
                                        rejections.push(Rejection {
                                            origin: doc.origin,
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
                                    origin: doc.origin,
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
    pub fn commit(&mut self, next: Arc<ConfigSnapshot>) -> Arc<ConfigSnapshot> {
        self.last = next;
        self.last.clone()
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
