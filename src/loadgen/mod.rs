//! `meshd loadgen`: drives a meshd with simulated proxies and measures what
//! a config change costs. It writes a synthetic mesh (see `mesh`) into a
//! config directory, starts a meshd on it as a separate process (or uses a
//! running one), connects P ADS clients over loopback that subscribe and
//! ACK as Envoy does (see `client`), waits until all are in sync, then
//! writes one scripted change and records, per client, the time from the
//! write to its ACK of a response carrying the change; what each client
//! received by type and in bytes; and meshd's CPU seconds and peak RSS
//! (from /proc). With `--baseline` it also fans the responses one sidecar
//! received out over as many streams from a server that does no
//! translation, so that meshd's overhead over pure transport is a ratio.

pub mod baseline;
pub mod client;
pub mod mesh;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use tonic::transport::{Channel, Endpoint};

use self::client::{ClientStats, Identity, Shared};
pub use self::mesh::{Change, MeshSpec};

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    pub mesh: MeshSpec,
    pub clients: usize,
    pub change: Change,
    pub delta: bool,
    pub baseline: bool,
    /// A running meshd's plain xDS address; `config_dir` must be the
    /// directory it watches.
    pub xds_addr: Option<String>,
    pub config_dir: Option<PathBuf>,
    /// The running meshd's process id, for its CPU and memory.
    pub meshd_pid: Option<u32>,
    /// The meshd binary to start (default: this one).
    pub meshd_bin: PathBuf,
    /// Before the change: endpoint churn for a while (the soak).
    pub soak: Option<Soak>,
}

/// Endpoint churn before the final change: `rate` endpoint changes a
/// second for `duration`, meshd's memory sampled every second.
#[derive(Debug, Clone, Copy)]
pub struct Soak {
    pub duration: Duration,
    pub rate: u32,
}

/// What the soak saw.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    pub duration_s: f64,
    pub changes_written: u64,
    pub rss_first_mb: Option<f64>,
    pub rss_last_mb: Option<f64>,
    /// The least-squares slope of meshd's RSS over the soak, after its
    /// first tenth (warm-up).
    pub rss_slope_mb_per_min: Option<f64>,
    /// Responses per client during the churn: the least any client got
    /// (0 would be a starved stream) and the most.
    pub min_client_responses: u64,
    pub max_client_responses: u64,
}

/// The outcome, as `--json` prints it.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub services: usize,
    pub endpoints: usize,
    pub clients: usize,
    pub change: Change,
    pub delta: bool,
    pub sidecar_scoping: bool,
    pub initial_sync_s: f64,
    /// Clients that ACKed a response carrying the change.
    pub clients_changed: usize,
    pub convergence_p50_ms: f64,
    pub convergence_p99_ms: f64,
    pub convergence_max_ms: f64,
    /// Responses received after the change, summed over clients.
    pub responses_by_type: BTreeMap<String, u64>,
    /// Clients that received anything after the change.
    pub clients_pushed: usize,
    pub bytes_after_change: u64,
    pub meshd_peak_rss_mb: Option<f64>,
    pub meshd_rss_mb: Option<f64>,
    pub meshd_cpu_s: Option<f64>,
    pub meshd_change_cpu_s: Option<f64>,
    /// meshd's own push of the change: from its generation installed to
    /// the last proxy's push handed to the transport (`/debug/push_status`;
    /// only when loadgen started meshd). The clients' share of the cores
    /// comes after it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meshd_push_ms: Option<f64>,
    /// The median of the baseline's runs (`baseline_runs_ms`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_fan_out_ms: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub baseline_runs_ms: Vec<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub baseline_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub soak: Option<SoakReport>,
}

impl Report {
    /// The report as a two-column table.
    pub fn table(&self) -> String {
        let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        let by_type: Vec<String> = self
            .responses_by_type
            .iter()
            .map(|(t, n)| format!("{t}={n}"))
            .collect();
        let mut rows = vec![
            (
                "services × endpoints",
                format!("{} × {}", self.services, self.endpoints),
            ),
            (
                "clients",
                format!("{} ({})", self.clients, if self.delta { "delta" } else { "sotw" }),
            ),
            ("change", format!("{:?}", self.change).to_lowercase()),
            ("initial sync", format!("{:.2} s", self.initial_sync_s)),
            ("clients with the change", self.clients_changed.to_string()),
            (
                "convergence p50 / p99 / max",
                format!(
                    "{:.1} / {:.1} / {:.1} ms",
                    self.convergence_p50_ms, self.convergence_p99_ms, self.convergence_max_ms
                ),
            ),
            ("clients pushed", self.clients_pushed.to_string()),
            ("responses after the change", by_type.join(" ")),
            ("bytes after the change", self.bytes_after_change.to_string()),
            ("meshd peak RSS (MB)", opt(self.meshd_peak_rss_mb)),
            (
                "meshd CPU total / change (s)",
                format!("{} / {}", opt(self.meshd_cpu_s), opt(self.meshd_change_cpu_s)),
            ),
            ("meshd push of the change (ms)", opt(self.meshd_push_ms)),
            (
                "baseline fan-out (ms) / ratio",
                format!("{} / {}", opt(self.baseline_fan_out_ms), opt(self.baseline_ratio)),
            ),
        ];
        if let Some(soak) = &self.soak {
            rows.push((
                "soak: changes / seconds",
                format!("{} / {:.0}", soak.changes_written, soak.duration_s),
            ));
            rows.push((
                "soak: RSS first / last (MB)",
                format!("{} / {}", opt(soak.rss_first_mb), opt(soak.rss_last_mb)),
            ));
            rows.push((
                "soak: RSS slope (MB/min)",
                soak.rss_slope_mb_per_min
                    .map_or("-".to_string(), |s| format!("{s:.3}")),
            ));
            rows.push((
                "soak: responses per client min / max",
                format!("{} / {}", soak.min_client_responses, soak.max_client_responses),
            ));
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        rows.iter().map(|(k, v)| format!("{k:width$}  {v}\n")).collect()
    }
}

/// A meshd started for the run; killed when dropped.
struct Started {
    child: Child,
    /// Holds meshd's log and CA.
    work: tempfile::TempDir,
}

impl Drop for Started {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> Result<String> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

/// The body of `GET path` on meshd's debug address, when it answers 200.
async fn debug_get(debug_addr: &str, path: &str) -> Option<Vec<u8>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(debug_addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.0\r\nHost: meshd\r\n\r\n");
    s.write_all(request.as_bytes()).await.ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.ok()?;
    if !(buf.starts_with(b"HTTP/1.1 200") || buf.starts_with(b"HTTP/1.0 200")) {
        return None;
    }
    let body = buf.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    Some(buf.split_off(body))
}

/// meshd's own time for the newest push (from the generation installed
/// to the last proxy's push handed to the transport), as
/// `/debug/push_status` reports it.
async fn last_push_ms(debug_addr: &str) -> Option<f64> {
    let body = debug_get(debug_addr, "/debug/push_status").await?;
    let status: serde_json::Value = serde_json::from_slice(&body).ok()?;
    status["pushes"].get(0)?["last_push_ms"].as_f64()
}

async fn wait_ready(debug_addr: &str, child: &mut Child) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!("meshd exited before it was ready: {status}");
        }
        if debug_get(debug_addr, "/ready").await.is_some() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("meshd was not ready within 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts meshd on free loopback ports and waits until it is ready. A
/// port found free can be taken before meshd binds it (by a connection of
/// the clients of a run just ended): then meshd is started again on other
/// ports, at most three times.
async fn start_ready(bin: &Path, config_dir: &Path) -> Result<(Started, String, String)> {
    let mut attempt = 1;
    loop {
        let (mut s, xds, debug) = start_meshd(bin, config_dir, tempfile::tempdir()?)?;
        match wait_ready(&debug, &mut s.child).await {
            Ok(()) => return Ok((s, xds, debug)),
            Err(e) => {
                let log = std::fs::read_to_string(s.work.path().join("meshd.log")).unwrap_or_default();
                let taken = log.contains("in use");
                if !taken || attempt == 3 {
                    return Err(e.context(format!("meshd's log:\n{}", log.trim_end())));
                }
                attempt += 1;
            }
        }
    }
}

fn start_meshd(bin: &Path, config_dir: &Path, work: tempfile::TempDir) -> Result<(Started, String, String)> {
    let (xds, tls, debug, webhook) = (free_addr()?, free_addr()?, free_addr()?, free_addr()?);
    let log = std::fs::File::create(work.path().join("meshd.log"))?;
    let child = Command::new(bin)
        .arg("serve")
        .arg("--config-dir")
        .arg(config_dir)
        .args(["--xds-addr", &xds, "--xds-tls-addr", &tls, "--debug-addr", &debug])
        .args(["--webhook-addr", &webhook])
        .arg("--ca-dir")
        .arg(work.path().join("ca"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok((Started { child, work }, xds, debug))
}

/// Who client `i` is: client 0 an ingress gateway, the others sidecars,
/// spread over the namespaces, ten workloads per namespace.
fn identity(i: usize, spec: &MeshSpec) -> Identity {
    if i == 0 {
        return Identity {
            id: "router~10.253.0.1~istio-ingressgateway-0.istio-system~istio-system.svc.cluster.local".into(),
            namespace: "istio-system".into(),
            labels: [("istio".to_string(), "ingressgateway".to_string())].into(),
        };
    }
    let ns = format!("ns-{}", i % spec.namespaces.max(1));
    let ip = format!("10.254.{}.{}", i / 250, i % 250);
    Identity {
        id: format!("sidecar~{ip}~client-{i}.{ns}~{ns}.svc.cluster.local"),
        namespace: ns,
        labels: [(
            "app".to_string(),
            format!("client-{}", (i / spec.namespaces.max(1)) % 10),
        )]
        .into(),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// Runs of the baseline's fan-out; the median is compared with meshd's.
const BASELINE_RUNS: usize = 3;

/// Waits until no client has received anything for `quiet`, or `max`.
async fn settle(shared: &Shared, quiet: Duration, max: Duration) {
    let deadline = Instant::now() + max;
    let mut seen = shared.responses();
    let mut since = Instant::now();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = shared.responses();
        if now != seen {
            seen = now;
            since = Instant::now();
        } else if since.elapsed() >= quiet {
            return;
        }
    }
}

/// Runs the load and reports.
fn responses(stats: &[Arc<Mutex<ClientStats>>]) -> Vec<u64> {
    stats
        .iter()
        .map(|s| s.lock().map(|s| s.responses.values().sum()).unwrap_or(0))
        .collect()
}

/// The soak: endpoint changes at a steady rate, meshd's RSS sampled every
/// second; then how memory moved and whether every client kept up.
async fn churn(
    dir: &Path,
    spec: &MeshSpec,
    soak: Soak,
    stats: &[Arc<Mutex<ClientStats>>],
    shared: &Shared,
    pid: Option<u32>,
) -> Result<SoakReport> {
    let before = responses(stats);
    let start = Instant::now();
    let every = Duration::from_secs_f64(1.0 / f64::from(soak.rate.max(1)));
    let mut next = tokio::time::Instant::now();
    let mut written = 0u64;
    let mut samples: Vec<(f64, f64)> = Vec::new();
    let mut sampled = Instant::now() - Duration::from_secs(1);
    while start.elapsed() < soak.duration {
        mesh::churn(dir, spec, written)?;
        written += 1;
        if sampled.elapsed() >= Duration::from_secs(1) {
            sampled = Instant::now();
            if let Some((rss, _)) = pid.and_then(crate::process::rss_mb) {
                samples.push((start.elapsed().as_secs_f64() / 60.0, rss));
            }
        }
        next += every;
        tokio::time::sleep_until(next).await;
    }
    settle(shared, Duration::from_millis(500), Duration::from_secs(30)).await;
    let during: Vec<u64> = responses(stats)
        .iter()
        .zip(&before)
        .map(|(after, before)| after - before)
        .collect();
    let warm = samples.len() / 10;
    Ok(SoakReport {
        duration_s: start.elapsed().as_secs_f64(),
        changes_written: written,
        rss_first_mb: samples.first().map(|s| s.1),
        rss_last_mb: samples.last().map(|s| s.1),
        rss_slope_mb_per_min: slope(&samples[warm..]),
        min_client_responses: during.iter().copied().min().unwrap_or(0),
        max_client_responses: during.iter().copied().max().unwrap_or(0),
    })
}

/// The least-squares slope of (x, y) points.
fn slope(points: &[(f64, f64)]) -> Option<f64> {
    if points.len() < 2 {
        return None;
    }
    let n = points.len() as f64;
    let (mx, my) = points
        .iter()
        .fold((0.0, 0.0), |(x, y), p| (x + p.0 / n, y + p.1 / n));
    let (num, den) = points.iter().fold((0.0, 0.0), |(num, den), p| {
        (num + (p.0 - mx) * (p.1 - my), den + (p.0 - mx) * (p.0 - mx))
    });
    (den > 0.0).then(|| num / den)
}

/// How long a running meshd may take to serve the mesh written for it.
const SERVE_WAIT: Duration = Duration::from_secs(120);

/// Against a running meshd (`--xds-addr`), waits until it serves the mesh
/// just written to `dir`, so that the clients' initial sync is of that
/// mesh and not of what meshd served before it read the directory again.
/// A service named after a fresh nonce is written last: once a sidecar's
/// clusters hold it, meshd serves a reading of `dir` made after the whole
/// mesh was in place. Its file is then removed, and the wait is for its
/// cluster to be gone, so that the mesh served is the one written.
async fn await_served(xds_addr: &str, dir: &Path, spec: &MeshSpec) -> Result<()> {
    use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
    use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;

    let deadline = Instant::now() + SERVE_WAIT;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    // Truncated nanoseconds: only the runs in one directory must differ.
    let nonce = (now.as_nanos() as u64) ^ (u64::from(std::process::id()) << 40);
    let name = mesh::write_sync(dir, spec, nonce)?;
    let channel: Channel = Endpoint::from_shared(format!("http://{xds_addr}"))?
        .connect()
        .await
        .with_context(|| format!("connecting to meshd at {xds_addr}"))?;
    // A sidecar of the first namespace, where the marking service is: in
    // its scope with Sidecar scoping too.
    let who = Identity {
        id: "sidecar~10.253.0.2~loadgen-sync.ns-0~ns-0.svc.cluster.local".into(),
        namespace: "ns-0".into(),
        labels: [("app".to_string(), "loadgen-sync".to_string())].into(),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let subscribe = DiscoveryRequest {
        node: Some(client::node(&who)),
        type_url: crate::xds::XdsType::Cluster.url().into(),
        ..Default::default()
    };
    tx.send(subscribe).await?;
    let mut stream = AggregatedDiscoveryServiceClient::new(channel)
        .max_decoding_message_size(usize::MAX)
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .with_context(|| format!("opening an ADS stream to meshd at {xds_addr}"))?
        .into_inner();
    let marker = memchr::memmem::Finder::new(name.as_bytes());
    let mut removed = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let response = match tokio::time::timeout(left, stream.message()).await {
            Ok(Ok(Some(r))) => r,
            Ok(Ok(None)) => bail!("meshd at {xds_addr} closed the stream"),
            Ok(Err(status)) => bail!("meshd at {xds_addr} ended the stream: {status}"),
            Err(_) if removed => bail!(
                "meshd at {xds_addr} still served the service {name} {} s after its file was removed from {}",
                SERVE_WAIT.as_secs(),
                dir.display()
            ),
            Err(_) => bail!(
                "meshd at {xds_addr} did not serve the mesh written to {} within {} s: \
                 is that the directory it watches (`meshd serve --config-dir`)?",
                dir.display(),
                SERVE_WAIT.as_secs()
            ),
        };
        let holds = response.resources.iter().any(|a| marker.find(&a.value).is_some());
        tx.send(DiscoveryRequest {
            type_url: response.type_url,
            version_info: response.version_info,
            response_nonce: response.nonce,
            ..Default::default()
        })
        .await?;
        if holds && !removed {
            mesh::remove_sync(dir)?;
            removed = true;
        } else if !holds && removed {
            return Ok(());
        }
    }
}

pub async fn run(o: &Options) -> Result<Report> {
    let (config_dir, _started_dir) = match &o.config_dir {
        Some(dir) => (dir.clone(), None),
        None => {
            let dir = tempfile::tempdir()?;
            (dir.path().join("config"), Some(dir))
        }
    };
    mesh::write(&config_dir, &o.mesh)
        .with_context(|| format!("writing the mesh into {}", config_dir.display()))?;
    let loaded = crate::config::ConfigSnapshot::from_files(crate::source::load_dir(&config_dir)?);
    if let Some(r) = loaded.rejections.first() {
        bail!("the generated mesh does not load: {r}");
    }
    let mut started = None;
    let (xds_addr, pid, debug_addr) = match &o.xds_addr {
        Some(addr) => {
            let served = await_served(addr, &config_dir, &o.mesh).await;
            // The marking service goes whether or not meshd served it.
            mesh::remove_sync(&config_dir)?;
            served?;
            (addr.clone(), o.meshd_pid, None)
        }
        None => {
            let (s, xds, debug) = start_ready(&o.meshd_bin, &config_dir).await?;
            let pid = s.child.id();
            started = Some(s);
            (xds, Some(pid), Some(debug))
        }
    };
    let cpu_at_start = pid.and_then(crate::process::cpu_seconds);
    let shared = Arc::new(Shared::new(o.change.marker().as_bytes()));
    let start = Instant::now();
    let mut stats = Vec::new();
    let mut tasks = Vec::new();
    // The baseline replays what one proxy received: a sidecar (client 1),
    // as all but one of the proxies are, when there is one.
    let captured_by = o.clients.min(2).saturating_sub(1);
    for i in 0..o.clients {
        let channel: Channel = Endpoint::from_shared(format!("http://{xds_addr}"))?
            .connect()
            .await
            .with_context(|| format!("connecting client {i} to {xds_addr}"))?;
        let s = Arc::new(Mutex::new(ClientStats {
            capture: i == captured_by && o.baseline,
            ..Default::default()
        }));
        stats.push(s.clone());
        let who = identity(i, &o.mesh);
        let shared = shared.clone();
        let delta = o.delta;
        tasks.push(tokio::spawn(async move {
            let result = if delta {
                client::run_delta(channel, who, s.clone(), shared.clone()).await
            } else {
                client::run_sotw(channel, who, s.clone(), shared.clone()).await
            };
            if let Err(e) = result {
                shared.fail(&s, e.to_string());
            }
        }));
    }
    // Initial sync: every client holds every type it subscribed to.
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        // The counts, not each client's stats: the clients are measured
        // on the same cores.
        let synced = shared.synced();
        if synced == o.clients {
            break;
        }
        if shared.failed() > 0 {
            let e = stats
                .iter()
                .find_map(|s| s.lock().ok().and_then(|s| s.error.clone()))
                .unwrap_or_default();
            bail!("a client failed: {e}");
        }
        if Instant::now() > deadline {
            bail!("only {synced} of {} clients in sync after 300 s", o.clients);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let synced_at = stats
        .iter()
        .filter_map(|s| s.lock().ok().and_then(|s| s.synced_at))
        .max()
        .unwrap_or(start);
    let initial_sync = synced_at - start;
    eprintln!(
        "initial sync done in {:.2} s; the change follows once the clients are quiet",
        initial_sync.as_secs_f64()
    );
    settle(&shared, Duration::from_millis(500), Duration::from_secs(30)).await;
    let soak = match o.soak {
        Some(soak) => Some(churn(&config_dir, &o.mesh, soak, &stats, &shared, pid).await?),
        None => None,
    };
    // The change.
    let cpu_before_change = pid.and_then(crate::process::cpu_seconds);
    let written = shared.write_change();
    mesh::apply(&config_dir, &o.mesh, o.change)?;
    // Until every client that got anything has been quiet for a while.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if shared.holding() > 0 || Instant::now() > deadline {
            break;
        }
    }
    settle(&shared, Duration::from_millis(1500), Duration::from_secs(60)).await;
    let cpu_end = pid.and_then(crate::process::cpu_seconds);
    let memory = pid.and_then(crate::process::rss_mb);
    let meshd_push_ms = match &debug_addr {
        Some(addr) => last_push_ms(addr).await,
        None => None,
    };
    let snapshot: Vec<ClientStats> = stats
        .iter()
        .filter_map(|s| s.lock().ok().map(|s| s.clone()))
        .collect();
    for t in &tasks {
        t.abort();
    }
    let mut times: Vec<f64> = snapshot
        .iter()
        .filter_map(|s| s.changed_at.map(|t| (t - written).as_secs_f64() * 1e3))
        .collect();
    times.sort_by(f64::total_cmp);
    let mut by_type: BTreeMap<String, u64> = BTreeMap::new();
    for s in &snapshot {
        for (t, n) in &s.since_change {
            *by_type.entry(t.short_name().into()).or_default() += n;
        }
    }
    let mut report = Report {
        services: o.mesh.services,
        endpoints: o.mesh.endpoints,
        clients: o.clients,
        change: o.change,
        delta: o.delta,
        sidecar_scoping: o.mesh.sidecar_scoping,
        initial_sync_s: initial_sync.as_secs_f64(),
        clients_changed: times.len(),
        convergence_p50_ms: percentile(&times, 50.0),
        convergence_p99_ms: percentile(&times, 99.0),
        convergence_max_ms: times.last().copied().unwrap_or(0.0),
        responses_by_type: by_type,
        clients_pushed: snapshot.iter().filter(|s| !s.since_change.is_empty()).count(),
        bytes_after_change: snapshot.iter().map(|s| s.bytes_since_change).sum(),
        meshd_peak_rss_mb: memory.map(|m| m.1),
        meshd_rss_mb: memory.map(|m| m.0),
        meshd_cpu_s: cpu_end.zip(cpu_at_start).map(|(e, s)| e - s),
        meshd_change_cpu_s: cpu_end.zip(cpu_before_change).map(|(e, s)| e - s),
        meshd_push_ms,
        baseline_fan_out_ms: None,
        baseline_runs_ms: Vec::new(),
        baseline_ratio: None,
        soak,
    };
    drop(started);
    if o.baseline {
        let captured = snapshot
            .iter()
            .find(|s| s.capture)
            .map(|s| s.captured.clone())
            .unwrap_or_default();
        if !captured.is_empty() && report.clients_changed > 0 {
            // A few milliseconds at 100 proxies vary several-fold from run
            // to run: the median of a few runs is the floor.
            for _ in 0..BASELINE_RUNS {
                let floor = baseline::fan_out(captured.clone(), report.clients_changed).await?;
                report.baseline_runs_ms.push(floor.as_secs_f64() * 1e3);
            }
            let mut sorted = report.baseline_runs_ms.clone();
            sorted.sort_by(f64::total_cmp);
            let floor_ms = percentile(&sorted, 50.0);
            report.baseline_fan_out_ms = Some(floor_ms);
            // meshd's fan-out: from the first client with the change to the last.
            let first = times.first().copied().unwrap_or(0.0);
            let fan_out = report.convergence_max_ms - first;
            report.baseline_ratio = Some(if floor_ms > 0.0 { fan_out / floor_ms } else { 0.0 });
        }
    }
    Ok(report)
}
