//! Work spread over the machine's cores, for the few steps whose cost grows
//! with the whole mesh: a push context's services, a snapshot's two
//! halves. Each is a one-off of a hundred milliseconds or more on a large
//! mesh, so a scoped thread per part costs nothing a pool would save;
//! below a size the caller picks, the work stays on the calling thread.

use std::sync::OnceLock;

/// From this many services, a mesh is large: its push context's services
/// are read on every core, and a config key's snapshot is made in two
/// halves at once (clusters and endpoints; listeners and routes). Below
/// it these steps take tens of milliseconds, and what a thread allocates
/// goes to a malloc arena of its own: at 1,000 services and 2,000
/// proxies, 3 MB more peak RSS for 10% less CPU after a new service.
pub const LARGE_MESH: usize = 5000;

/// How many threads a step is spread over (a large config file's parse
/// too): the cores, at most 8.
pub fn cores() -> usize {
    static CORES: OnceLock<usize> = OnceLock::new();
    *CORES.get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get()).min(8))
}

/// `a()` and `b()`: at once on two threads when `parallel` (and there is
/// more than one core), else one after the other. A panic in either is
/// the caller's.
pub fn join<A: Send, B>(parallel: bool, a: impl FnOnce() -> A + Send, b: impl FnOnce() -> B) -> (A, B) {
    if !parallel || cores() < 2 {
        return (a(), b());
    }
    std::thread::scope(|scope| {
        let a = scope.spawn(a);
        let b = b();
        match a.join() {
            Ok(a) => (a, b),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// `items` mapped by `f`, in order: in one part per core when `parallel`.
pub fn map<T: Sync, R: Send>(parallel: bool, items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let parts = if parallel { cores().min(items.len()) } else { 1 };
    if parts < 2 {
        return items.iter().map(f).collect();
    }
    let size = items.len().div_ceil(parts);
    let f = &f;
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(size)
            .map(|chunk| scope.spawn(move || chunk.iter().map(f).collect::<Vec<R>>()))
            .collect();
        let mut out = Vec::with_capacity(items.len());
        for handle in handles {
            match handle.join() {
                Ok(part) => out.extend(part),
                Err(panic) => std::panic::resume_unwind(panic),
            }
        }
        out
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parts_come_back_in_order_and_both_halves_run() {
        let items: Vec<u32> = (0..1001).collect();
        for parallel in [false, true] {
            let doubled = map(parallel, &items, |i| i * 2);
            assert_eq!(doubled, items.iter().map(|i| i * 2).collect::<Vec<_>>());
            assert!(map(parallel, &[] as &[u32], |i| *i).is_empty());
            let (a, b) = join(parallel, || items.len(), || "b");
            assert_eq!((a, b), (1001, "b"));
        }
    }

    #[test]
    fn a_panic_in_a_part_is_the_callers() {
        let items = [1, 2, 3, 4];
        let caught = std::panic::catch_unwind(|| {
            map(true, &items, |i| {
                assert_ne!(*i, 4, "part failed");
                *i
            })
        });
        assert!(caught.is_err());
        let caught = std::panic::catch_unwind(|| join(true, || -> u32 { panic!("half failed") }, || 1));
        assert!(caught.is_err());
    }
}
