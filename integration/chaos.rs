//! Chaos: steady traffic through a stock Envoy gateway for a minute while
//! meshd is killed (SIGKILL), restarted, killed again, and restarted on a
//! changed config. Not one request may fail, and the new config must be
//! served afterwards. Then the Envoy itself is killed and restarted: it
//! comes back with the whole current config.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::{eventually, free_port, hello_mesh, write, Backend, Envoy, Meshd, MeshdPorts, Pod};

/// How long the traffic runs, and at what pace.
const RUN: Duration = Duration::from_secs(60);
const EVERY: Duration = Duration::from_millis(20);

/// One request on a new connection; the status code, or why there was none.
fn request(port: u16) -> Result<u16, String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: hello.example.com\r\nConnection: close\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(|e| e.to_string())?;
    let text = String::from_utf8_lossy(&response);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no status line in {text:?}"))?;
    Ok(status)
}

/// Requests at a steady pace on their own thread until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    failures: Arc<Mutex<Vec<String>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (s, n, f) = (stop.clone(), sent.clone(), failures.clone());
        let thread = std::thread::spawn(move || {
            let mut next = Instant::now();
            while !s.load(Ordering::SeqCst) {
                match request(port) {
                    Ok(200) => {}
                    Ok(code) => f.lock().expect("failures").push(format!("status {code}")),
                    Err(e) => f.lock().expect("failures").push(e),
                }
                n.fetch_add(1, Ordering::SeqCst);
                next += EVERY;
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
        });
        Load {
            stop,
            sent,
            failures,
            thread: Some(thread),
        }
    }

    /// Stops; the requests sent and the failures.
    fn finish(mut self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let failures = self.failures.lock().expect("failures").clone();
        (self.sent.load(Ordering::SeqCst), failures)
    }
}

#[test]
fn traffic_survives_meshd_being_killed_and_restarted_and_envoy_comes_back_whole() {
    let work = tempfile::tempdir().expect("tmp");
    let backend = Backend::start("v1");
    let port = free_port();
    let dir = work.path().join("config");
    let config = |version: &str| hello_mesh(port, backend.port, version);
    write(&dir.join("mesh.yaml"), &config("v1"));
    let ports = MeshdPorts::free();
    let mut meshd = Meshd::start_with(&dir, work.path(), ports, &[]);
    let pod = Pod::ingress_gateway("istio-ingressgateway-1");
    let mut envoy = Envoy::start(&meshd, work.path(), &pod);
    eventually("the gateway serves", Duration::from_secs(20), || {
        match request(port) {
            Ok(200) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    let started = Instant::now();
    let load = Load::start(port);
    let at = |t: u64| std::thread::sleep(Duration::from_secs(t).saturating_sub(started.elapsed()));

    at(10);
    meshd.proc.kill(); // SIGKILL
    at(15);
    meshd = Meshd::start_with(&dir, work.path(), ports, &[]);
    at(30);
    meshd.proc.kill();
    // The config changes while meshd is down.
    write(&dir.join("mesh.yaml"), &config("v2"));
    at(35);
    meshd = Meshd::start_with(&dir, work.path(), ports, &[]);
    eventually(
        "the gateway has the new config",
        Duration::from_secs(20),
        || match envoy.holds_route("\"v2\"") {
            true => Ok(()),
            false => Err(envoy.proc.log_tail()),
        },
    );
    at(RUN.as_secs());
    let (sent, failures) = load.finish();
    assert!(
        sent as u128 >= RUN.as_millis() / EVERY.as_millis() / 2,
        "the load ran: {sent} requests"
    );
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(10)]
    );
    assert!(
        backend.hits.load(Ordering::SeqCst) >= sent,
        "every request reached the backend"
    );

    // meshd has the gateway in sync on the final config.
    let sync = meshd.json("/debug/syncz");
    let proxy = &sync["proxies"][0];
    for t in ["cds", "eds", "lds", "rds"] {
        assert_eq!(
            proxy["types"][t]["sent_version"], proxy["types"][t]["acked_version"],
            "{t}: {sync}"
        );
    }

    // A killed Envoy comes back with the whole current config at once: as
    // soon as it is ready it serves v2.
    envoy.proc.kill();
    envoy = Envoy::start(&meshd, work.path(), &pod);
    assert!(
        envoy.holds_route("\"v2\""),
        "the restarted Envoy has the current routes"
    );
    assert_eq!(request(port), Ok(200), "and serves at once");
}
