//! `make bench`: fan-out at Istio's reference mesh size. For 100, 1,000 and
//! 2,000 simulated proxies against one meshd serving 1,000 services, each
//! scripted change (an endpoint, a VirtualService, a new service) over
//! state of the world and delta: initial sync, convergence p50/p99 (change
//! written → proxy ACKed it), what was pushed, meshd's memory and CPU, and
//! the transport-only baseline over as many streams. Then memory: RSS at
//! 2,000 proxies and the increment per proxy. Prints tables; under
//! `cargo test` it runs one small case as a check that the bench works.

use std::path::PathBuf;

use meshd::loadgen::{run, Change, MeshSpec, Options, Report};

fn options(services: usize, clients: usize, change: Change, delta: bool) -> Options {
    Options {
        mesh: MeshSpec {
            services,
            endpoints: 2,
            virtual_services: services / 10,
            namespaces: 10,
            sidecar_scoping: false,
        },
        clients,
        change,
        delta,
        baseline: true,
        xds_addr: None,
        config_dir: None,
        meshd_pid: None,
        meshd_bin: PathBuf::from(env!("CARGO_BIN_EXE_meshd")),
        soak: None,
    }
}

fn row(r: &Report) -> String {
    let opt = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
    let types: Vec<String> = r
        .responses_by_type
        .iter()
        .map(|(t, n)| format!("{t}:{n}"))
        .collect();
    format!(
        "{:>7} | {:>14} | {:>5} | {:>6.2} | {:>9} | {:>7.1} | {:>7.1} | {:>22} | {:>8.1} | {:>8} | {:>6} | {:>7} | {:>11} | {:>5}",
        r.clients,
        format!("{:?}", r.change).to_lowercase(),
        if r.delta { "delta" } else { "sotw" },
        r.initial_sync_s,
        format!("{}/{}", r.clients_changed, r.clients_pushed),
        r.convergence_p50_ms,
        r.convergence_p99_ms,
        types.join(" "),
        r.bytes_after_change as f64 / 1e6,
        opt(r.meshd_peak_rss_mb),
        opt(r.meshd_change_cpu_s),
        opt(r.meshd_push_ms),
        opt(r.baseline_fan_out_ms),
        opt(r.baseline_ratio),
    )
}

fn main() -> anyhow::Result<()> {
    let full = std::env::args().any(|a| a == "--bench");
    let (services, sizes): (usize, &[usize]) = if full {
        (1000, &[100, 1000, 2000])
    } else {
        (20, &[10])
    };
    let changes: &[Change] = if full {
        &[Change::Endpoint, Change::VirtualService, Change::Service]
    } else {
        &[Change::Endpoint]
    };
    let modes: &[bool] = if full { &[false, true] } else { &[false] };
    let rt = tokio::runtime::Runtime::new()?;
    println!(
        "fan-out: {services} services × 2 endpoints, {} VirtualServices, 10 namespaces; client 0 a gateway, the rest sidecars",
        services / 10
    );
    println!(
        "{:>7} | {:>14} | {:>5} | {:>6} | {:>9} | {:>7} | {:>7} | {:>22} | {:>8} | {:>8} | {:>6} | {:>7} | {:>11} | {:>5}",
        "proxies",
        "change",
        "mode",
        "sync s",
        "chg/push",
        "p50 ms",
        "p99 ms",
        "responses after change",
        "MB sent",
        "peak MB",
        "CPU s",
        "push ms",
        "baseline ms",
        "ratio"
    );
    println!("{}", "-".repeat(160));
    let mut memory = Vec::new();
    for &clients in sizes {
        for &change in changes {
            for &delta in modes {
                let r = rt.block_on(run(&options(services, clients, change, delta)))?;
                assert!(r.clients_changed > 0, "the change reached no proxy: {r:?}");
                println!("{}", row(&r));
                if change == Change::Endpoint && !delta {
                    memory.push((clients, r.meshd_rss_mb, r.meshd_peak_rss_mb));
                }
            }
        }
    }
    println!();
    println!("memory ({services} services, state of the world, after an endpoint change)");
    println!("{:>7} | {:>10} | {:>12}", "proxies", "RSS MB", "peak RSS MB");
    for (clients, rss, peak) in &memory {
        let f = |v: &Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
        println!("{clients:>7} | {:>10} | {:>12}", f(rss), f(peak));
    }
    if let (Some((c0, Some(r0), _)), Some((c1, Some(r1), _))) = (memory.first(), memory.last()) {
        if c1 > c0 {
            println!(
                "per-proxy increment: {:.1} KB",
                (r1 - r0) * 1024.0 / (*c1 - *c0) as f64
            );
        }
    }
    Ok(())
}
