//! A process's CPU and memory, read from /proc: for `meshd loadgen`'s
//! report and the `process_*` metrics on `/metrics`.

/// CPU seconds (user + system) of a process (Linux's USER_HZ is 100).
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command (which may hold spaces) start after ')'.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

/// (current, peak) resident memory of a process in MB.
pub fn rss_mb(pid: u32) -> Option<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb = |key: &str| -> Option<f64> {
        let line = status.lines().find(|l| l.starts_with(key))?;
        line.split_whitespace().nth(1)?.parse().ok()
    };
    Some((kb("VmRSS:")? / 1024.0, kb("VmHWM:")? / 1024.0))
}

/// Gauge: CPU seconds used.
pub const CPU: &str = "process_cpu_seconds_total";
/// Gauge: resident memory.
pub const RSS: &str = "process_resident_memory_bytes";
/// Gauge: open file descriptors (sockets included).
pub const OPEN_FDS: &str = "process_open_fds";
/// Gauge: Unix time the process started serving.
pub const START_TIME: &str = "process_start_time_seconds";

/// Sets the standard `process_*` gauges for this process (as Prometheus'
/// client libraries name them), just before a scrape renders.
pub fn record_metrics() {
    let pid = std::process::id();
    if let Some(cpu) = cpu_seconds(pid) {
        metrics::gauge!(CPU).set(cpu);
    }
    if let Some((rss, _)) = rss_mb(pid) {
        metrics::gauge!(RSS).set(rss * 1024.0 * 1024.0);
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        metrics::gauge!(OPEN_FDS).set(fds.count() as f64);
    }
    static START: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    let start = START.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or_default()
    });
    metrics::gauge!(START_TIME).set(*start);
}
